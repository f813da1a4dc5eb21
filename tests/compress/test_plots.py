import io

import mlflow
import numpy as np
import torch
from matplotlib.image import imread
from mlflow import MlflowClient
from torch import nn

from distill.flows.stages import plots_task
from distill.tasks.compress.architectures import build_mlp
from distill.tasks.compress.plots import pareto_front, penultimate, pipeline_figures
from distill.tasks.platform.config import EvaluateConfig

STAGES = {
    "teacher": {"size_kb": 1000.0, "accuracy": 0.97},
    "reconstructed": {"size_kb": 250.0, "accuracy": 0.975},
    "pruned": {"size_kb": 250.0, "accuracy": 0.96},
    "quantized": {"size_kb": 70.0, "accuracy": 0.965},
}
CURVES = {
    "finetuned": {
        "train_loss": [1.0, 0.5, 0.3],
        "val_loss": [1.1, 0.7, 0.6],
        "val_accuracy": [0.8, 0.9, 0.93],
        "lr": [1e-3, 5e-4, 0.0],
    },
    "pruned": {"train_loss": [], "val_loss": [], "val_accuracy": [], "lr": []},
}


def test_pareto_front_keeps_the_undominated_stages_by_size():
    sizes = [1000.0, 250.0, 250.0, 70.0, 500.0]
    accs = [97.0, 97.5, 96.0, 96.5, 95.0]
    # 250/96.0 loses to 250/97.5, 500/95.0 to 250/97.5, 1000/97.0 to 250/97.5
    assert pareto_front(sizes, accs) == [3, 1]


def test_penultimate_is_the_input_of_the_last_linear():
    torch.manual_seed(0)
    model = build_mlp(8, [16, 4], 3).eval()
    X = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    with torch.no_grad():
        expected = model[:-1](torch.from_numpy(X)).numpy()  # everything before the head
    assert np.allclose(penultimate(model, X), expected)
    assert not model[-1]._forward_hooks  # the hook is removed
    assert penultimate(nn.Sequential(nn.ReLU()), X) is None


def test_figures_render_as_png(digits):
    torch.manual_seed(0)
    teacher, student = build_mlp(64, [32], 10).eval(), build_mlp(64, [8], 10).eval()
    figures = pipeline_figures(
        STAGES, teacher, student, student, digits, CURVES, EvaluateConfig(tsne_rows=60), 0
    )
    assert list(figures) == ["pareto.png", "confusion.png", "tsne.png", "curves.png"]
    for fig in figures.values():
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        image = imread(io.BytesIO(buf.getvalue()), format="png")
        assert (
            image.shape[0] > 200 and image.shape[1] > 200 and image[..., :3].std() > 0.05
        )  # not blank
    # no training stage with curves: no curves figure; a model without Linear: no t-SNE
    figures = pipeline_figures(
        STAGES,
        nn.Sequential(nn.ReLU()),
        student,
        student,
        digits,
        {"pruned": CURVES["pruned"]},
        EvaluateConfig(tsne_rows=60),
        0,
    )
    assert list(figures) == ["pareto.png", "confusion.png"]


def test_plots_are_logged_on_the_parent_run(mlflow_store, digits):
    torch.manual_seed(0)
    model = build_mlp(64, [16], 10).eval()
    run_id = MlflowClient().create_run(mlflow.create_experiment("plots")).info.run_id
    paths = plots_task.fn(
        run_id, STAGES, model, model, model, digits, CURVES, EvaluateConfig(tsne_rows=40), 0
    )
    # at the run's root: MLflow's compare view shows root-level artifacts only
    logged = sorted(a.path for a in MlflowClient().list_artifacts(run_id))
    assert logged == sorted(paths) == ["confusion.png", "curves.png", "pareto.png", "tsne.png"]
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="pareto.png")
    assert imread(local).shape[1] > 200


def test_prune_rounds_are_found_where_the_learning_rate_restarts():
    from distill.tasks.compress.plots import round_starts

    # two recovery rounds of 3 epochs, each a cosine schedule from 1e-3
    assert round_starts([1e-3, 5e-4, 0.0, 1e-3, 5e-4, 0.0]) == [3]
    assert round_starts([1e-3, 1e-3, 1e-3]) == []  # a constant rate is one round

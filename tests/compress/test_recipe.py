"""The distillation recipe by the teacher's family (tasks/compress/recipe.py): `finetune.epochs`
and `finetune.lr` left out take the transformer recipe for a Hugging Face transformer and the
MLP/CNN one otherwise (a plain-torch transformer included: measured better there); a key the
user sets is kept."""

from __future__ import annotations

from typing import Any

import pytest
from torch import nn

from distill.tasks.compress.data import load_dataset
from distill.tasks.compress.finetune import FitSettings
from distill.tasks.compress.pipeline import Recorder, compress
from distill.tasks.compress.recipe import (
    MLP_CNN,
    TRANSFORMER,
    line,
    recipe_for,
    resolved,
    resolved_prune,
    with_recipe,
)
from distill.tasks.platform.config import FinetuneConfig, PruneConfig, build_config
from tests import zoo


def test_the_family_is_read_from_the_teachers_modules():
    mlp = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    assert recipe_for(mlp) == MLP_CNN
    assert recipe_for(zoo.ResNet2d(channels=4)) == MLP_CNN
    # attention alone does not choose it: on this model the MLP/CNN recipe measured better
    assert recipe_for(zoo.TransformerClassifier()) == MLP_CNN
    assert (MLP_CNN.epochs, MLP_CNN.lr, TRANSFORMER.epochs, TRANSFORMER.lr) == (80, 3e-3, 10, 1e-3)
    assert (MLP_CNN.widen, TRANSFORMER.widen) == (1.0, 2.0)  # distilled wide, pruned to the size
    assert (MLP_CNN.recovery_epochs, TRANSFORMER.recovery_epochs) == (3, 6)  # a pruning round's


def test_a_hugging_face_teacher_takes_the_transformer_recipe():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    assert recipe_for(transformers.BertForSequenceClassification(config)) == TRANSFORMER


def test_left_out_keys_are_filled_and_set_ones_kept():
    assert resolved(FinetuneConfig(), TRANSFORMER).model_dump() == (
        FinetuneConfig(epochs=10, lr=1e-3).model_dump()
    )
    mixed = resolved(FinetuneConfig(epochs=3), TRANSFORMER)
    assert (mixed.epochs, mixed.lr) == (3, 1e-3)
    chosen = FinetuneConfig(epochs=80, lr=3e-3)
    assert resolved(chosen, TRANSFORMER) is chosen  # nothing left out: the same object
    with pytest.raises(ValueError, match="left out"):  # a fit never runs on an unfilled recipe
        FitSettings.of(FinetuneConfig(), 0, "cpu")
    assert resolved_prune(PruneConfig(), TRANSFORMER).recovery_epochs == 6
    assert resolved_prune(PruneConfig(), MLP_CNN).recovery_epochs == 3
    set_ = PruneConfig(recovery_epochs=1)
    assert resolved_prune(set_, TRANSFORMER) is set_
    cfg = with_recipe(build_config({}, ["finetune.epochs=5"]), TRANSFORMER)
    assert (cfg.finetune.epochs, cfg.finetune.lr, cfg.compress.prune.recovery_epochs) == (
        5,
        1e-3,
        6,
    )
    assert with_recipe(cfg, TRANSFORMER) is cfg  # nothing left out


def test_the_line_says_which_recipe_a_left_out_key_took():
    said = line(build_config({}, []), TRANSFORMER)
    assert said == (
        "finetune: 10 epochs at lr 0.001, 6 recovery epochs a pruning round from the Hugging "
        "Face transformer recipe (set finetune.epochs / finetune.lr / "
        "compress.prune.recovery_epochs to choose)"
    )
    # a key the user set is named as set, never credited to the recipe
    said = line(
        build_config({}, ["finetune.epochs=1", "compress.prune.recovery_epochs=1"]), TRANSFORMER
    )
    assert said == (
        "finetune: lr 0.001 from the Hugging Face transformer recipe, 1 epoch and 1 recovery "
        "epoch a pruning round as set (set finetune.lr to choose)"
    )
    said = line(build_config({}, ["finetune.lr=0.003"]), TRANSFORMER)
    assert said == (
        "finetune: 10 epochs, 6 recovery epochs a pruning round from the Hugging Face transformer "
        "recipe, lr 0.003 as set (set finetune.epochs / compress.prune.recovery_epochs to choose)"
    )
    assert line(build_config({}, []), MLP_CNN) is None  # the documented default: no line
    set_all = ["finetune.epochs=80", "finetune.lr=0.003", "compress.prune.recovery_epochs=3"]
    assert line(build_config({}, set_all), TRANSFORMER) is None  # the user chose


class Params(Recorder):
    def __init__(self) -> None:
        self.params: dict[str, dict[str, Any]] = {}

    def stage(self, result, measure):
        self.params[result.name] = result.params
        return super().stage(result, measure)


@pytest.mark.parametrize(
    ("teacher", "sets", "expected"),
    [
        ("hf", ["finetune.epochs=null", "compress.prune.recovery_epochs=null"], (10, 1e-3, 6)),
        ("torch transformer", ["finetune.epochs=2"], (2, 3e-3, 3)),
        (
            "mlp",
            ["finetune.epochs=2", "finetune.lr=0.01", "compress.prune.recovery_epochs=1"],
            (2, 1e-2, 1),
        ),
    ],
)
def test_the_finetune_stage_runs_and_records_the_filled_recipe(teacher, sets, expected, tmp_path):
    if teacher == "hf":
        pytest.importorskip("transformers")
        from tests.compress.test_transformer import PIPELINE, _bert, _ids, _teacher_dir

        folder, npz = _teacher_dir(tmp_path, _bert(layers=1), _ids(160))
        given = [*PIPELINE, f"teacher.source=hf:{folder}", f"data.source=npz:{npz}"]
    else:
        arch = "tests.zoo:TransformerClassifier" if teacher != "mlp" else "mlp"
        given = [f"teacher.arch={arch}", "teacher.epochs=2", "reduce.calibration_samples=128"]
        if arch == "mlp":
            given += ["teacher.hidden=[32]"]
        else:
            kwargs = "{d_model: 16, n_heads: 2, dim_feedforward: 32, n_layers: 1}"
            given += [f"teacher.init_args={kwargs}", "data.shape=[8, 8]"]
    cfg = build_config(
        {},
        [
            *given,
            "reduce.budget.ratio=2",
            "finetune.patience=100",  # every epoch of the recipe runs
            "compress.prune.amount=0",
            "compress.quantize.enabled=false",
            "evaluate.latency_repeats=1",
            "evaluate.plots=false",
            "target=null",
            *sets,
        ],
    )
    recorder = Params()
    compress(cfg, load_dataset(cfg.data, cfg.seed), recorder=recorder)
    kd, pruned = recorder.params["finetuned"], recorder.params["pruned"]
    epochs, lr, recovery = expected
    assert (kd["epochs"], kd["lr"], kd["epochs_run"]) == (epochs, lr, epochs)
    assert pruned["recovery_epochs"] == recovery  # recorded as filled in

"""The CUDA path (`device: cuda`), where a GPU is present; skipped everywhere else (CI has none).

What a user relies on: training on the GPU reaches what it reaches on CPU, the teacher is left
where it was, bf16 autocast trains to the same accuracy, and a pipeline run on the GPU registers
a model that serves on a machine without one."""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from distill.tasks.compress.architectures import build_mlp
from distill.tasks.compress.finetune import FitSettings, fit, predict_logits
from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def _accuracy(model, data) -> float:
    return float((predict_logits(model, data.X_test).argmax(1) == data.y_test).mean())


def _mlp(data) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_mlp(data.X_train.shape[1], [128, 128], len(data.classes))


def test_fit_on_cuda_reaches_the_cpu_accuracy_and_returns_a_cpu_model(digits):
    settings = FitSettings(epochs=8, lr=3e-3, batch_size=64, patience=8, seed=0)
    start = _mlp(digits)
    on_cpu, _ = fit(copy.deepcopy(start), digits, settings)
    on_gpu, history = fit(
        copy.deepcopy(start), digits, FitSettings(**{**vars(settings), "device": "cuda"})
    )
    assert {p.device.type for p in on_gpu.parameters()} == {"cpu"}
    assert _accuracy(on_gpu, digits) > 0.9
    # same seed, same batches: only kernel round-off differs
    assert abs(_accuracy(on_gpu, digits) - _accuracy(on_cpu, digits)) <= 0.02
    assert len(history.val_accuracy) == 8 and history.train_loss[-1] < history.train_loss[0]


def test_distilling_on_cuda_leaves_the_teacher_on_cpu(digits):
    teacher, _ = fit(
        _mlp(digits), digits, FitSettings(epochs=6, lr=3e-3, batch_size=64, patience=6)
    )
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_mlp(digits.X_train.shape[1], [32], len(digits.classes))
    settings = FitSettings(
        epochs=6, lr=3e-3, batch_size=64, patience=6, temperature=4.0, alpha=0.9, device="cuda"
    )
    student, _ = fit(student, digits, settings, teacher=teacher)
    assert {p.device.type for p in teacher.parameters()} == {"cpu"}
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert _accuracy(student, digits) > 0.85


def test_bf16_autocast_trains_as_well_as_fp32_and_keeps_fp32_weights(digits):
    start = _mlp(digits)
    base = FitSettings(epochs=8, lr=3e-3, batch_size=64, patience=8, device="cuda")
    fp32, _ = fit(copy.deepcopy(start), digits, base)
    bf16, _ = fit(copy.deepcopy(start), digits, FitSettings(**{**vars(base), "precision": "bf16"}))
    assert {p.dtype for p in bf16.parameters()} == {torch.float32}
    assert _accuracy(bf16, digits) == pytest.approx(_accuracy(fp32, digits), abs=0.03)


SERVE = """
import sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
print(model.predict(pd.read_csv(sys.argv[2]))["prediction"].astype(int).tolist())
"""


def test_a_pipeline_run_on_cuda_serves_without_a_gpu(tmp_path, digits):
    from distill.tasks.release.registry import raw_features

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = os.environ | {
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_REGISTRY_URI": uri,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    sets = [a for p in [*TINY, "device=cuda", "register.model_name=gpu-run"] for a in ("--set", p)]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill.flows.cli",
            "run",
            str(ROOT / "configs" / "digits.yaml"),
            *sets,
            "--json",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout)["metrics"]
    assert metrics["teacher/accuracy"] > 0.8

    csv = tmp_path / "rows.csv"
    raw_features(digits, digits.X_test).to_csv(csv, index=False)
    served = subprocess.run(
        [sys.executable, "-c", SERVE, "models:/gpu-run@challenger", str(csv)],
        cwd=tmp_path,
        env=env | {"CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert served.returncode == 0, served.stderr[-3000:]
    predictions = np.array(json.loads(served.stdout.strip().splitlines()[-1]))
    accuracy = float((np.asarray(digits.classes)[digits.y_test] == predictions).mean())
    assert accuracy == pytest.approx(metrics["final/accuracy"], abs=1e-9)


def test_a_regression_student_distills_on_cuda_as_on_cpu():
    """Float targets, one output and the MSE distillation go to the GPU as classification does."""
    from sklearn.metrics import r2_score

    from distill.tasks.compress.data import load_dataset
    from distill.tasks.platform.config import DataConfig

    data = load_dataset(DataConfig(source="sklearn:diabetes", task="regression"), seed=0)
    torch.manual_seed(0)
    teacher, _ = fit(build_mlp(data.n_features, [64, 64], 1), data, FitSettings(40, 3e-3, 32, 40))
    scores = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(1)
        student = build_mlp(data.n_features, [8], 1)
        settings = FitSettings(40, 3e-3, 32, 40, alpha=0.9, device=device)
        student, history = fit(student, data, settings, teacher=teacher)
        assert {p.device.type for p in student.parameters()} == {"cpu"} and history.val_r2
        scores[device] = r2_score(data.y_test, predict_logits(student, data.X_test).reshape(-1))
    assert scores["cuda"] > 0.3 and abs(scores["cuda"] - scores["cpu"]) < 0.05

"""Stage 7 — evaluate: the numbers a user compares, for the teacher and after every stage.

Quality: accuracy, macro-F1, agreement with the teacher (test split). Cost: parameters,
nonzero parameters, size of the real saved file (and of that file compressed, which is
what sparsity can honestly buy), CPU latency (median) at batch 1 and a large batch, in
the runtime that serves the model (PyTorch for modules, ONNX Runtime for ONNX models).
"""

from __future__ import annotations

import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from sklearn.metrics import accuracy_score, f1_score
from torch import nn

from tasks import tracking
from tasks.config import EvaluateConfig
from tasks.data import Dataset

Predict = Callable[[np.ndarray], np.ndarray]  # float32 rows -> logits


@dataclass(frozen=True)
class OnnxModel:
    """A serialized ONNX model and the parameter counts of the float model it came from."""

    onnx_bytes: bytes
    params: int
    nonzeros: int

    def session(self):  # onnxruntime.InferenceSession
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        return ort.InferenceSession(self.onnx_bytes, opts, providers=["CPUExecutionProvider"])

    def predictor(self) -> Predict:
        sess = self.session()
        name = sess.get_inputs()[0].name
        return lambda X: sess.run(None, {name: X})[0]


def classification_metrics(logits: np.ndarray, y: np.ndarray, teacher_pred: np.ndarray | None) -> dict[str, float]:
    pred = logits.argmax(axis=1)
    out = {"accuracy": float(accuracy_score(y, pred)),
           "f1_macro": float(f1_score(y, pred, average="macro"))}
    if teacher_pred is not None:
        out["agreement"] = float((pred == teacher_pred).mean())
    return out


def latency_ms(predict: Predict, X: np.ndarray, batch: int, repeats: int) -> float:
    """Median wall time of one call on `batch` rows, after warm-up."""
    rows = X[np.arange(batch) % len(X)]
    for _ in range(3):
        predict(rows)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict(rows)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def torch_predictor(model: nn.Module) -> Predict:
    model = model.cpu().eval()

    def predict(X: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(X)).numpy()

    return predict


def saved_size(model: nn.Module | OnnxModel) -> tuple[int, int]:
    """Bytes of the real saved file (state_dict via torch.save, or the .onnx) and of it zlib-compressed."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.bin"
        if isinstance(model, OnnxModel):
            path.write_bytes(model.onnx_bytes)
        else:
            torch.save(model.state_dict(), path)
        blob = path.read_bytes()
    return len(blob), len(zlib.compress(blob, 9))


def count_params(model: nn.Module) -> tuple[int, int]:
    """(parameters, nonzero parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(int(torch.count_nonzero(p)) for p in params)


def evaluate_model(model: nn.Module | OnnxModel, data: Dataset, teacher_pred: np.ndarray | None,
                   cfg: EvaluateConfig) -> dict[str, float]:
    if isinstance(model, OnnxModel):
        predict, (params, nonzeros) = model.predictor(), (model.params, model.nonzeros)
    else:
        predict, (params, nonzeros) = torch_predictor(model), count_params(model)
    metrics = classification_metrics(predict(data.X_test), data.y_test, teacher_pred)
    size, compressed = saved_size(model)
    metrics |= {
        "params": float(params), "nonzeros": float(nonzeros),
        "size_kb": size / 1024, "compressed_kb": compressed / 1024,
        "latency_ms_b1": latency_ms(predict, data.X_test, 1, cfg.latency_repeats),
        f"latency_ms_b{cfg.large_batch}": latency_ms(predict, data.X_test, cfg.large_batch,
                                                     max(5, cfg.latency_repeats // 10)),
    }
    return metrics


def pipeline_summary(stages: dict[str, dict[str, float]], final_stage: str) -> dict[str, float]:
    """The parent run's headline numbers: the final model's metrics and what it cost vs the teacher."""
    teacher, final = stages["teacher"], stages[final_stage]
    out = {f"final/{k}": v for k, v in final.items()}
    out["compression_ratio"] = teacher["size_kb"] / final["size_kb"]
    out["accuracy_drop"] = teacher["accuracy"] - final["accuracy"]
    for key in teacher:
        if key.startswith("latency_ms_b"):
            out[f"speedup_{key.removeprefix('latency_ms_')}"] = teacher[key] / final[key]
    return out


@task(name="evaluate", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1,
      retry_condition_fn=tracking.retry_on_tracking_error)
def evaluate_task(stage: str, model: nn.Module | OnnxModel, data: Dataset, teacher_pred: np.ndarray | None,
                  cfg: EvaluateConfig, parent_run_id: str, params: dict[str, Any] | None = None,
                  curves: dict[str, list[float]] | None = None,
                  extra: dict[str, float] | None = None) -> dict[str, float]:
    """Measure a stage's model and record it as the stage's nested MLflow run."""
    metrics = evaluate_model(model, data, teacher_pred, cfg) | (extra or {})
    tracking.record_stage(parent_run_id, stage, metrics, params, curves, model, data.X_test[:5])
    return metrics

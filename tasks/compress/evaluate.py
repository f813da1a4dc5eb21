"""Stage 7 — evaluate: the numbers a user compares, for the teacher and after every stage.

Quality (test split): accuracy, macro-F1, top-3 accuracy (more than 5 classes), agreement with
the teacher, expected calibration error (15 equal-width confidence bins), negative log-
likelihood, and the train-test accuracy gap (overfitting). A regression target is scored in
the label's units with scikit-learn: R², MAE, RMSE, the train-test R² gap, and agreement with
the teacher as the relative error to its predictions (`teacher_rel_error`: RMS of student -
teacher over the standard deviation of the teacher's predictions; 0 when they agree). Cost:
parameters, nonzero parameters, FLOPs per row (torch's flop counter on the float model; an
ONNX model carries the count of the float model it came from), size of the real saved file
(and of that file compressed, which is what sparsity can honestly buy), CPU latency p50/p95 at
batch 1 and a large batch and throughput at the large batch, in the runtime that serves the
model (PyTorch for modules, ONNX Runtime for ONNX models).
"""

from __future__ import annotations

import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    log_loss,
    mean_absolute_error,
    r2_score,
    root_mean_squared_error,
    top_k_accuracy_score,
)
from torch import nn

from distill.tasks.compress.data import Dataset
from distill.tasks.compress.finite import check_outputs
from distill.tasks.compress.hf import HFLogits
from distill.tasks.compress.masks import IDS, MASK, Padding, unfold
from distill.tasks.compress.rows import predict_batched
from distill.tasks.platform.config import EvaluateConfig

Predict = Callable[[np.ndarray], np.ndarray]  # rows (float32, or int64 token ids) -> logits


@dataclass(frozen=True)
class OnnxModel:
    """A serialized ONNX model and the parameter and FLOP counts of the float model it came from."""

    onnx_bytes: bytes
    params: int
    nonzeros: int
    flops: int | None = None  # per row; None: unknown (the metric is left out)
    # token ids: where a row ends for the model it came from (masks.py), so evaluation can cut
    # the padding off sorted batches; None: every position counts
    padding: Padding | None = None

    def session(self):  # onnxruntime.InferenceSession
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        return ort.InferenceSession(self.onnx_bytes, opts, providers=["CPUExecutionProvider"])

    def takes_any_length(self) -> bool:
        """The graph's sequence axis (axis 1) is dynamic."""
        import onnx  # the graph's header, not a session (that costs a tenth of a second)

        dims = onnx.load_model_from_string(self.onnx_bytes).graph.input[0].type.tensor_type
        shape = dims.shape.dim
        return len(shape) == 2 and not shape[1].HasField("dim_value")

    def predictor(self) -> Predict:
        sess = self.session()
        inputs = [i.name for i in sess.get_inputs()]
        if inputs == [IDS, MASK]:  # the data's rows are folded (masks.py): both inputs from them
            return lambda X: sess.run(None, dict(zip(inputs, unfold(X), strict=True)))[0]
        return lambda X: sess.run(None, {inputs[0]: X})[0]

    @property
    def file_bytes(self) -> bytes:
        return self.onnx_bytes

    suffix = ".onnx"
    artifact = "onnx"  # the registered pyfunc's artifact key (tasks/release/serving_model.py)
    runtime = "onnxruntime"  # the package that serves it


@dataclass(frozen=True)
class TorchScriptModel:
    """A serialized TorchScript model (e.g. PyTorch's dynamic int8) and the counts of its float
    source."""

    ts_bytes: bytes
    params: int
    nonzeros: int
    flops: int | None = None

    def predictor(self) -> Predict:
        import io

        module = torch.jit.load(io.BytesIO(self.ts_bytes), map_location="cpu").eval()

        def predict(X: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return module(torch.from_numpy(X)).numpy()

        return predict

    @property
    def file_bytes(self) -> bytes:
        return self.ts_bytes

    suffix = ".pt"
    artifact = "torchscript"
    runtime = "torch"


SERIALIZED = (OnnxModel, TorchScriptModel)


TOP_K = 3  # top-k accuracy is reported when there are more than TOP_K_MIN_CLASSES classes
TOP_K_MIN_CLASSES = 5
ECE_BINS = 15


def log_softmax(logits: np.ndarray) -> np.ndarray:
    from scipy.special import log_softmax as scipy_log_softmax

    return scipy_log_softmax(np.asarray(logits, dtype=np.float64), axis=1)


def top_k_accuracy(logits: np.ndarray, y: np.ndarray, k: int) -> float:
    """Fraction of rows whose true class is among the k highest scores (scikit-learn's)."""
    scores = np.asarray(logits, dtype=np.float64)
    return float(top_k_accuracy_score(y, scores, k=k, labels=np.arange(scores.shape[1])))


def negative_log_likelihood(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean −log p(true class) under softmax(logits): the cross-entropy (scikit-learn's
    log_loss)."""
    proba = np.exp(log_softmax(logits))
    return float(log_loss(y, proba, labels=np.arange(proba.shape[1])))


def expected_calibration_error(proba: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Σ_b (n_b/N)·|accuracy_b − confidence_b| over equal-width bins (lo, hi] of the top-class
    probability (Guo et al. 2017)."""
    confidence, correct = proba.max(axis=1), proba.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def classification_metrics(
    logits: np.ndarray, y: np.ndarray, teacher_pred: np.ndarray | None
) -> dict[str, float]:
    pred = logits.argmax(axis=1)
    out = {
        "accuracy": float(accuracy_score(y, pred)),
        "f1_macro": float(f1_score(y, pred, average="macro")),
    }
    if logits.shape[1] > TOP_K_MIN_CLASSES:
        out[f"top{TOP_K}_accuracy"] = top_k_accuracy(logits, y, TOP_K)
    if teacher_pred is not None:
        out["agreement"] = float((pred == teacher_pred).mean())
    out["ece"] = expected_calibration_error(np.exp(log_softmax(logits)), y)
    out["nll"] = negative_log_likelihood(logits, y)
    return out


def regression_metrics(
    pred: np.ndarray, y: np.ndarray, teacher_pred: np.ndarray | None
) -> dict[str, float]:
    """R², MAE, RMSE (scikit-learn) of predictions in the label's units, and the relative error
    to the teacher's predictions (same units) when given."""
    pred, y = np.asarray(pred, np.float64).reshape(-1), np.asarray(y, np.float64).reshape(-1)
    out = {
        "r2": float(r2_score(y, pred)),
        "mae": float(mean_absolute_error(y, pred)),
        "rmse": float(root_mean_squared_error(y, pred)),
    }
    if teacher_pred is not None:
        out["teacher_rel_error"] = relative_error(pred, teacher_pred)
    return out


def relative_error(pred: np.ndarray, reference: np.ndarray) -> float:
    """RMS(pred − reference) / std(reference): 0 when they agree, 1 when `pred` is as far from
    `reference` as the reference's own mean is."""
    pred = np.asarray(pred, np.float64).reshape(-1)
    reference = np.asarray(reference, np.float64).reshape(-1)
    spread = float(reference.std())
    rms = float(np.sqrt(np.mean((pred - reference) ** 2)))
    return rms / spread if spread > 0 else (0.0 if rms == 0 else float("inf"))


def reference_predictions(outputs: np.ndarray, data: Dataset) -> np.ndarray:
    """What a teacher's outputs say: class indices, or a regression's values in the label's
    units; the form `evaluate_model` compares students to."""
    if data.is_regression:
        return data.to_units(np.asarray(outputs)[:, 0])
    return np.asarray(outputs).argmax(axis=1)


# the train-test gap is read on at most this many training rows (the same ones for every stage):
# predicting a large training split whole cost evaluation more than the test split did
TRAIN_ROWS = 2048


def train_sample(n: int) -> np.ndarray | None:
    """Sorted row numbers of the training rows the gap is measured on; None: all of them."""
    if n <= TRAIN_ROWS:
        return None
    return np.sort(np.random.default_rng(0).choice(n, size=TRAIN_ROWS, replace=False))


# rows of token ids sorted by length are predicted this many tokens at a time: measured on the
# 4-layer BERT of benchmarks/transformers.py, a quarter of PREDICT_TOKENS was faster per row in
# torch and in ONNX Runtime (activations that stay in cache)
TRIMMED_TOKENS = 16_384


def predict_trimmed(
    predict: Predict, X: np.ndarray, padding: Padding, tokens: int = TRIMMED_TOKENS
) -> np.ndarray:
    """`predict` over rows of token ids sorted by length, each batch cut to its longest row
    (`padding`: where a row ends for this model; what follows never changes its answer), the
    answers put back in the rows' order."""
    lengths = padding.lengths(X)
    order = np.argsort(lengths, kind="stable")
    ranked = lengths[order]
    out = None
    start = 0
    while start < len(X):
        guess = max(1, tokens // int(ranked[start]))
        rows = max(1, tokens // int(ranked[min(start + guess, len(X)) - 1]))
        idx = order[start : start + rows]
        got = predict(np.ascontiguousarray(X[idx, : int(ranked[start + len(idx) - 1])]))
        if out is None:
            out = np.empty((len(X), *got.shape[1:]), dtype=got.dtype)
        out[idx] = got
        start += len(idx)
    assert out is not None  # X has rows
    return out


def padding_of(model: nn.Module | OnnxModel | TorchScriptModel) -> Padding | None:
    """Where a row of token ids ends for `model`: a Hugging Face model of text (`HFLogits`), or
    its ONNX export when the graph takes any length; None: every position counts."""
    if isinstance(model, HFLogits):
        return model.padding()
    if isinstance(model, OnnxModel) and model.padding is not None and model.takes_any_length():
        return model.padding
    return None


def _predict_split(predict: Predict, X: np.ndarray, padding: Padding | None) -> np.ndarray:
    if padding is not None and isinstance(X, np.ndarray) and X.ndim == 2 and len(X):
        return predict_trimmed(predict, X, padding)
    return predict_batched(predict, X)


def quality_metrics(
    predict: Predict,
    data: Dataset,
    teacher_pred: np.ndarray | None,
    padding: Padding | None = None,
    validation: bool = False,
) -> dict[str, float]:
    """The quality numbers of a model on the test split, the train-test gap on at most
    `TRAIN_ROWS` training rows, and with `validation` the score on the validation rows
    (`validation_accuracy`, `validation_r2`): the rows a target's guard decides on, and the ones
    to choose between runs by, where choosing by the test score would spend the test rows (the
    pipeline asks it of the teacher and the served model). Outputs that hold NaN or inf on one
    of those rows stop here (`NonFinite`, naming the row). `padding`: the rows are token ids
    whose padding the model never reads (`padding_of`): batches sorted by length, cut."""
    idx = train_sample(len(data.y_train))
    X_train = data.X_train if idx is None else data.X_train[idx]
    y_train = data.y_train if idx is None else data.y_train[idx]
    # by blocks: a streamed split (tasks/compress/rows.py) is never held whole
    if data.is_regression:

        def first(X: np.ndarray) -> np.ndarray:  # one output per row
            return predict(X)[:, 0]

        test_out = _predict_split(first, data.X_test, padding)
        check_outputs(test_out, "test")
        metrics = regression_metrics(
            data.to_units(test_out), data.to_units(data.y_test), teacher_pred
        )
        train_out = _predict_split(first, X_train, padding)
        check_outputs(train_out, "training", row_ids=idx)
        train_pred = data.to_units(train_out)
        metrics["train_r2"] = float(r2_score(data.to_units(y_train), train_pred))
        metrics["train_test_gap"] = metrics["train_r2"] - metrics["r2"]
        if validation and len(data.y_val) > 1:  # R² of one row is undefined
            val_out = _predict_split(first, data.X_val, padding)
            check_outputs(val_out, "validation")
            val_pred = data.to_units(val_out)
            metrics["validation_r2"] = float(r2_score(data.to_units(data.y_val), val_pred))
        return metrics
    test_out = _predict_split(predict, data.X_test, padding)
    check_outputs(test_out, "test")
    metrics = classification_metrics(test_out, data.y_test, teacher_pred)

    def class_and_finite(X: np.ndarray) -> np.ndarray:  # a training row's class; 0: not finite
        out = predict(X)
        finite = np.isfinite(out.reshape(len(out), -1)).all(axis=1)
        return np.stack([out.argmax(axis=1), finite], axis=1)

    train = _predict_split(class_and_finite, X_train, padding)
    check_outputs(np.where(train[:, 1:] == 1, 0.0, np.nan), "training", row_ids=idx)
    train_pred = train[:, 0]
    metrics["train_accuracy"] = float((train_pred == y_train).mean())
    metrics["train_test_gap"] = metrics["train_accuracy"] - metrics["accuracy"]
    if validation and len(data.y_val):
        val = _predict_split(class_and_finite, data.X_val, padding)
        check_outputs(np.where(val[:, 1:] == 1, 0.0, np.nan), "validation")
        metrics["validation_accuracy"] = float((val[:, 0] == data.y_val).mean())
    return metrics


def latency_percentiles_ms(
    predict: Predict, X: np.ndarray, batch: int, repeats: int
) -> tuple[float, float]:
    """(p50, p95) wall time of one call on `batch` rows, after warm-up."""
    rows = X[np.arange(batch) % len(X)]
    for _ in range(3):
        predict(rows)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict(rows)
        times.append(time.perf_counter() - start)
    p50, p95 = np.percentile(times, [50, 95]) * 1e3
    return float(p50), float(p95)


def example_rows(example: int | np.ndarray, n: int) -> torch.Tensor:
    """`n` rows to run, trace or export a model on: the first rows of the data (`example`: an
    array or `Rows`, in its dtype: int64 token ids stay int64, repeated if there are fewer),
    or `n` float32 rows of zeros of that width (`example`: an int)."""
    if isinstance(example, (int, np.integer)):
        return torch.zeros(n, int(example))
    rows = np.asarray(example[:n])
    if 0 < len(rows) < n:
        rows = rows[np.arange(n) % len(rows)]
    return torch.from_numpy(np.ascontiguousarray(rows))


def flops_per_row(model: nn.Module, example: int | np.ndarray) -> int:
    """Floating-point operations of one forward pass on one row (torch's flop counter: a
    multiply-add counts 2, so a Linear(in, out) costs 2·in·out; zeros from pruning still count).
    `example`: the data's rows (the first is run), or the width of float rows."""
    from torch.utils.flop_counter import FlopCounterMode

    model = model.cpu().eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(example_rows(example, 1))
    return int(counter.get_total_flops())


def torch_predictor(model: nn.Module) -> Predict:
    """Logits of a module on CPU for rows of any dtype, without autograd (inference mode)."""
    model = model.cpu().eval()

    def predict(X: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(X)).float().numpy()

    return predict


def saved_size(model: nn.Module | OnnxModel | TorchScriptModel) -> tuple[int, int]:
    """Bytes of the real saved file (state_dict via torch.save, the .onnx or the TorchScript file)
    and of it zlib-compressed."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.bin"
        if isinstance(model, SERIALIZED):
            path.write_bytes(model.file_bytes)
        else:
            torch.save(model.state_dict(), path)
        blob = path.read_bytes()
    return len(blob), len(zlib.compress(blob, 9))


def count_params(model: nn.Module) -> tuple[int, int]:
    """(parameters, nonzero parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(int(torch.count_nonzero(p)) for p in params)


def evaluate_model(
    model: nn.Module | OnnxModel | TorchScriptModel,
    data: Dataset,
    teacher_pred: np.ndarray | None,
    cfg: EvaluateConfig,
    validation: bool = False,
) -> dict[str, float]:
    """Every metric of the evaluate step (`quality_metrics`, `validation` included, then size,
    FLOPs, latency)."""
    if isinstance(model, SERIALIZED):
        predict, (params, nonzeros), flops = (
            model.predictor(),
            (model.params, model.nonzeros),
            model.flops,
        )
    else:
        predict, (params, nonzeros) = torch_predictor(model), count_params(model)
        flops = flops_per_row(model, data.X_test)
    metrics = quality_metrics(predict, data, teacher_pred, padding_of(model), validation)
    size, compressed = saved_size(model)
    large = cfg.large_batch
    b1_p50, b1_p95 = latency_percentiles_ms(predict, data.X_test, 1, cfg.latency_repeats)
    big_p50, big_p95 = latency_percentiles_ms(
        predict, data.X_test, large, max(10, cfg.latency_repeats // 5)
    )
    metrics |= {
        "params": float(params),
        "nonzeros": float(nonzeros),
        **({"flops": float(flops)} if flops is not None else {}),
        "size_kb": size / 1024,
        "compressed_kb": compressed / 1024,
        "latency_ms_b1": b1_p50,
        "latency_p95_ms_b1": b1_p95,
        f"latency_ms_b{large}": big_p50,
        f"latency_p95_ms_b{large}": big_p95,
        "throughput_rows_s": large / (big_p50 / 1e3),
    }
    return metrics


def pipeline_summary(stages: dict[str, dict[str, float]], final_stage: str) -> dict[str, float]:
    """The parent run's headline numbers: the final model's metrics and what it cost vs the
    teacher."""
    teacher, final = stages["teacher"], stages[final_stage]
    out = {f"final/{k}": v for k, v in final.items()}
    out["compression_ratio"] = teacher["size_kb"] / final["size_kb"]
    if "r2" in final:  # regression
        out["r2_drop"] = teacher["r2"] - final["r2"]
    else:
        out["accuracy_drop"] = teacher["accuracy"] - final["accuracy"]
    for key in teacher:
        if key.startswith("latency_ms_b"):
            out[f"speedup_{key.removeprefix('latency_ms_')}"] = teacher[key] / final[key]
    return out

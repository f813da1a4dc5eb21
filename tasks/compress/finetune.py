"""Stage 4 — fine-tune: knowledge distillation from the teacher into the student.

    loss = α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−α)·CE(s, y)        (Hinton et al. 2015)

For a regression target (one output, standardized on the training rows) the student learns the
teacher's outputs directly, no softmax and so no temperature:

    loss = α·MSE(s, t) + (1−α)·MSE(s, y)        (Huber with `finetune.huber_delta` instead of MSE)

`fit` is the one training loop of the project: the teacher trains with it too (no teacher, α =
0: plain cross-entropy, or MSE for regression). Adam, cosine learning rate, early stopping on
validation accuracy (R² for regression; ties broken by validation loss) restoring the best
weights, seeded. On CUDA the rows, the teacher's logits and the student live on the GPU for
the whole fit, and the forward passes may run under bf16 autocast (`precision`); the model
comes back on CPU, in fp32.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distill.tasks.compress.data import Dataset
from distill.tasks.compress.export_lock import onnx_export_lock
from distill.tasks.compress.finite import TrainingWatch, check_outputs
from distill.tasks.compress.rows import Rows, TrainRows, predict_rows, rows_on
from distill.tasks.platform.config import FinetuneConfig
from distill.tasks.platform.device import resolve_device
from distill.tasks.platform.progress import track


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """α·T²·KL(p_T ‖ p_S) + (1−α)·CE; the T² keeps soft-target gradients on the CE scale."""
    ce = F.cross_entropy(student_logits, labels)
    if teacher_logits is None or alpha == 0:
        return ce
    T = temperature
    kl = F.kl_div(
        F.log_softmax(student_logits / T, dim=1),
        F.log_softmax(teacher_logits / T, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return alpha * T * T * kl + (1 - alpha) * ce


def regression_kd_loss(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor | None,
    targets: torch.Tensor,
    alpha: float,
    huber_delta: float | None = None,
) -> torch.Tensor:
    """α·MSE(s, t) + (1−α)·MSE(s, y) on one output per row (`[N]` or `[N, 1]`); with
    `huber_delta`, Huber losses of that delta instead of the squared errors. The temperature of
    classification's KD has no counterpart here: the teacher's output is matched as it is."""
    s = student_out.reshape(-1)

    def error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if huber_delta is None:
            return F.mse_loss(a, b)
        return F.huber_loss(a, b, delta=huber_delta)

    label = error(s, targets.reshape(-1).to(s.dtype))
    if teacher_out is None or alpha == 0:
        return label
    return alpha * error(s, teacher_out.reshape(-1).to(s.dtype)) + (1 - alpha) * label


def r2(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Coefficient of determination 1 − SSE/SST (scikit-learn's r2_score, one output)."""
    pred, y = pred.reshape(-1).double(), y.reshape(-1).double()
    sst = ((y - y.mean()) ** 2).sum()
    sse = ((y - pred) ** 2).sum()
    return float(1 - sse / sst) if sst > 0 else float("nan")


@dataclass(frozen=True)
class FeatureMatch:
    """The outputs of student layer `student` are trained towards teacher layer `teacher`'s
    outputs `units` (FitNets, Romero et al. 2015, without a regressor: width mode's student
    keeps teacher units, so its layer's j-th output *is* the teacher's `units[j]`)."""

    student: str
    teacher: str
    units: tuple[int, ...]


def feature_pairs(kept_out: dict[str, list[int]]) -> list[FeatureMatch]:
    """A width-mode student's layers against the teacher's (`WidthReport.kept_out`)."""
    return [FeatureMatch(name, name, tuple(units)) for name, units in kept_out.items()]


def _unit_axis(module: nn.Module) -> int:
    return 1 if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else -1


def _output(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # MultiheadAttention: (values, weights)


def feature_loss(
    student: list[torch.Tensor], teacher: list[torch.Tensor], scale: list[torch.Tensor]
) -> torch.Tensor:
    """Mean over layers of mean(((s − t) / std)²), `std` the teacher's std of each unit (shaped
    to broadcast over the unit axis): every layer and unit weighs the same, whatever its scale."""
    terms = [(((s - t) / c) ** 2).mean() for s, t, c in zip(student, teacher, scale, strict=True)]
    return torch.stack(terms).mean()


@torch.no_grad()
def _teacher_features(
    teacher: nn.Module, matches: list[FeatureMatch], X: np.ndarray, device: torch.device
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The teacher's matched units on every row (kept on `device`), and their per-unit std
    shaped to broadcast against them."""
    if not matches:
        return [], []
    teacher.eval()
    home = next(teacher.parameters()).device
    teacher.to(device)
    outs: list[list[torch.Tensor]] = [[] for _ in matches]
    hooks = []
    for i, m in enumerate(matches):
        module = teacher.get_submodule(m.teacher)
        axis, units = _unit_axis(module), torch.tensor(m.units, device=device)

        def hook(_m, _a, out, i=i, axis=axis, units=units) -> None:
            outs[i].append(_output(out).index_select(axis, units).float())

        hooks.append(module.register_forward_hook(hook))
    size = predict_rows(X, 1024)
    try:
        for start in range(0, len(X), size):
            teacher(torch.from_numpy(X[start : start + size]).to(device))
    finally:
        for h in hooks:
            h.remove()
        teacher.to(home)
    feats = [torch.cat(o) for o in outs]
    scales = []
    for f, m in zip(feats, matches, strict=True):
        axis = _unit_axis(teacher.get_submodule(m.teacher)) % f.dim()
        dims = [d for d in range(f.dim()) if d != axis]
        shape = [1] * f.dim()
        shape[axis] = f.shape[axis]
        scales.append(f.std(dim=dims).clamp_min(1e-6).reshape(shape[1:]))
    return feats, scales


@dataclass
class FitSettings:
    epochs: int
    lr: float
    batch_size: int
    patience: int
    weight_decay: float = 0.0
    temperature: float = 1.0
    alpha: float = 0.0
    seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"  # fp32 | bf16: autocast of the forward passes, on CUDA only
    huber_delta: float | None = None  # regression: Huber loss of this delta instead of MSE
    feature_weight: float = 0.0  # β of the feature-matching term (needs a teacher and matches)

    @classmethod
    def of(cls, cfg: FinetuneConfig, seed: int, device: str, **changes: object) -> FitSettings:
        """The `finetune` section's distillation settings (`changes`: e.g. fewer epochs)."""
        return cls(
            **{
                "epochs": cfg.epochs,
                "lr": cfg.lr,
                "batch_size": cfg.batch_size,
                "patience": cfg.patience,
                "weight_decay": cfg.weight_decay,
                "temperature": cfg.temperature,
                "alpha": cfg.alpha,
                "seed": seed,
                "device": device,
                "huber_delta": cfg.huber_delta,
                **changes,
            }
        )


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast on a CUDA device that supports it; plain fp32 anywhere else."""
    if precision == "bf16" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class History:
    """Per-epoch curves, logged as MLflow step metrics."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    best_epoch: int = -1
    val_r2: list[float] = field(default_factory=list)  # regression, in place of val_accuracy

    def curves(self) -> dict[str, list[float]]:
        score = {"val_r2": self.val_r2} if self.val_r2 else {"val_accuracy": self.val_accuracy}
        return {
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            **score,
            "lr": self.lr,
        }


@torch.inference_mode()
def predict_logits(
    model: nn.Module, X: np.ndarray | Rows, batch_size: int | None = None
) -> np.ndarray:
    """Logits of a float model on CPU rows (any dtype: int64 token ids stay int64), wherever the
    model lives; `batch_size` rows at a time (default: 1024 rows, or 65536 tokens of sequences)."""
    model.eval()
    batch_size = batch_size or predict_rows(X, 1024)
    device = next(model.parameters()).device
    out = None
    for start in range(0, len(X), batch_size):
        got = model(torch.from_numpy(X[start : start + batch_size]).to(device)).float().cpu()
        if out is None:  # filled in place: no list of small tensors pinning the heap
            out = torch.empty((len(X), *got.shape[1:]))
        out[start : start + len(got)] = got
    return out.numpy()


def _teacher_logits(teacher: nn.Module, X: np.ndarray | Rows, device: torch.device) -> np.ndarray:
    """The teacher's logits, computed on `device`, the teacher left where it was. A teacher that
    cannot move (an exported graph with tensors of its own device baked in) answers at home."""
    home = next(teacher.parameters()).device
    if home == device:
        return predict_logits(teacher, X)
    try:
        return predict_logits(teacher.to(device), X)
    except RuntimeError:
        teacher.to(home)
        return predict_logits(teacher, X)
    finally:
        teacher.to(home)


def fit(
    model: nn.Module,
    data: Dataset,
    settings: FitSettings,
    teacher: nn.Module | None = None,
    description: str = "training",
    features: list[FeatureMatch] | None = None,
    role: str = "the student",
    lr_key: str | None = "finetune.lr",
) -> tuple[nn.Module, History]:
    """Train `model` in place on data's train split and return it (on CPU) with its curves.
    With a teacher, `features` and `settings.feature_weight` > 0, the loss adds
    β · feature_loss of the matched layers (the teacher's outputs computed once, kept on the
    fit's device). NaN or inf in the teacher's outputs, or in `model`'s on a batch or on the
    validation rows, stops the fit with `NonFinite` naming the epoch and batch and `role`
    ("the teacher" while the teacher trains); `lr_key`: the config key a divergence points to."""
    torch.manual_seed(settings.seed)
    device = resolve_device(settings.device)
    model.to(device)
    regression = data.is_regression  # y: standardized float targets, one output
    y_val = torch.from_numpy(data.y_val).to(device)
    y_val = y_val.float() if regression else y_val.long()
    # the teacher is frozen: its logits are computed once, not every batch, on the fit's device
    t_logits = _teacher_logits(teacher, data.X_train, device) if teacher is not None else None
    if t_logits is not None:
        check_outputs(t_logits, "training", "the teacher", teacher, data.X_train)
    # rows in memory go to the device once; rows on disk come a batch at a time (compress/rows.py)
    train = TrainRows(data.X_train, data.y_train, t_logits, device)
    amp = functools.partial(autocast, device, settings.precision)

    history = History()
    if settings.epochs == 0:
        return model.cpu().eval(), history
    matches = list(features or []) if teacher is not None and settings.feature_weight > 0 else []
    t_feats, scales = _teacher_features(teacher, matches, data.X_train, device)
    s_feats: list[torch.Tensor] = []  # the matched student layers' outputs of the current batch

    def keep_output(module: nn.Module, _args: tuple, out: object) -> None:
        if module.training:
            s_feats.append(_output(out).float())

    hooks = [model.get_submodule(m.student).register_forward_hook(keep_output) for m in matches]
    with onnx_export_lock():  # torch's export flag is process-wide (export_lock.py)
        opt = torch.optim.Adam(
            model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
        )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.epochs)
    gen = torch.Generator(device="cpu").manual_seed(settings.seed)
    best_key, best_state, stale = (-1.0, float("-inf")), copy.deepcopy(model.state_dict()), 0
    watch = TrainingWatch(model, role, lr_key, device)

    for epoch in track(range(settings.epochs), description, total=settings.epochs):
        model.train()
        order = torch.randperm(len(train), generator=gen)
        total = torch.zeros((), device=device)  # summed on the device: no sync per batch
        for batch, (idx, xb, yb, tb) in enumerate(train.batches(order, settings.batch_size)):
            s_feats.clear()
            with amp():
                logits = model(xb)
            watch.batch(logits, epoch, batch, xb)
            if regression:
                loss = regression_kd_loss(
                    logits.float(), tb, yb, settings.alpha, settings.huber_delta
                )
            else:
                loss = kd_loss(logits.float(), tb, yb, settings.temperature, settings.alpha)
            if matches:  # teacher features are held in memory, indexed by row
                loss = loss + settings.feature_weight * feature_loss(
                    s_feats, [f[idx.to(f.device)] for f in t_feats], scales
                )
            loss.backward()
            with onnx_export_lock():  # not while another thread exports (export_lock.py)
                opt.step()
                opt.zero_grad(set_to_none=True)  # the first batch's grads start at None
            total += loss.detach() * len(yb)
        watch.epoch_end(epoch)
        history.lr.append(sched.get_last_lr()[0])
        sched.step()

        model.eval()
        with torch.no_grad(), amp():
            val_logits = torch.cat([model(xb).float() for xb in rows_on(data.X_val, device)])
        watch.validation(val_logits, epoch)
        if regression:  # the validation R² (standardized units: the same R²) picks the best
            val_loss = F.mse_loss(val_logits.reshape(-1), y_val).item()
            val_acc = r2(val_logits, y_val)
            history.val_r2.append(val_acc)
        else:
            val_loss = F.cross_entropy(val_logits, y_val).item()
            val_acc = (val_logits.argmax(1) == y_val).float().mean().item()
            history.val_accuracy.append(val_acc)
        history.train_loss.append(total.item() / len(train))
        history.val_loss.append(val_loss)

        key = (val_acc, -val_loss)
        if key > best_key:
            best_key, best_state, stale = key, copy.deepcopy(model.state_dict()), 0
            history.best_epoch = epoch
        else:
            stale += 1
            if stale >= settings.patience:
                break

    for h in hooks:
        h.remove()
    model.load_state_dict(best_state)
    return model.cpu().eval(), history


def distill(
    teacher: nn.Module,
    student: nn.Module,
    data: Dataset,
    cfg: FinetuneConfig,
    seed: int,
    device: str = "cpu",
) -> tuple[nn.Module, History]:
    settings = FitSettings.of(cfg, seed, device)
    return fit(copy.deepcopy(student), data, settings, teacher=teacher, description="distilling")

"""Stage 4 — fine-tune: knowledge distillation from the teacher into the student.

    loss = α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−α)·CE(s, y)        (Hinton et al. 2015)

For a regression target (one output, standardized on the training rows) the student learns the
teacher's outputs directly, no softmax and so no temperature:

    loss = α·MSE(s, t) + (1−α)·MSE(s, y)        (Huber with `finetune.huber_delta` instead of MSE)

`fit` is the one training loop of the project: the teacher trains with it too (no teacher, α =
0: plain cross-entropy, or MSE for regression). Adam, cosine learning rate, early stopping on
accuracy (R² for regression; ties broken by the loss) restoring the best epoch's weights, seeded.

Which rows choose that epoch matters. The best of many noisy epochs scores above what the model
will score on new rows, and a `target:` guard judges the student on the validation rows
(tasks/compress/guard.py): an epoch chosen on those rows makes the guard see a drop that is too
small (issue 28: 5 of 7 targets on a 1-D CNN "within 1 point" on validation lost 1.2 to 3.2 on
the test rows). So distillation and pruning's recovery (`FitSettings.of`: `held_out`) choose it
on a share of the *training* rows held out of the fit (`held_out_rows`: stratified, seeded, the
same rows for every fit of a run), rows no guard reads and no step trains on; the validation
rows are still scored each epoch, for the curves only. A teacher distill trains
(tasks/compress/teacher.py) chooses on the same held-out rows: a teacher whose epoch the
validation rows chose scores above itself there, and the guard's reference with it (the targets
grid's ResNet1d students were 4-6 points down on validation and 2-3 up on the test rows).

On CUDA the rows, the teacher's logits and the student live on the GPU for the whole fit, and
the forward passes may run under bf16 autocast (`precision`); the model comes back on CPU, in
fp32.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distill.tasks.compress.data import Dataset
from distill.tasks.compress.export_lock import onnx_export_lock, seed_torch
from distill.tasks.compress.finite import TrainingWatch, check_outputs
from distill.tasks.compress.recipe import recipe_for, resolved
from distill.tasks.compress.rows import Rows, TrainRows, predict_rows, rows_on, take
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
    # MultiheadAttention: (values, weights); every other matched layer: one tensor
    return cast(torch.Tensor, out[0] if isinstance(out, tuple) else out)


def feature_loss(
    student: list[torch.Tensor], teacher: list[torch.Tensor], scale: list[torch.Tensor]
) -> torch.Tensor:
    """Mean over layers of mean(((s − t) / std)²), `std` the teacher's std of each unit (shaped
    to broadcast over the unit axis): every layer and unit weighs the same, whatever its scale."""
    terms = [(((s - t) / c) ** 2).mean() for s, t, c in zip(student, teacher, scale, strict=True)]
    return torch.stack(terms).mean()


@torch.no_grad()
def _teacher_features(
    teacher: nn.Module | None,
    matches: list[FeatureMatch],
    X: np.ndarray | Rows,
    device: torch.device,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The teacher's matched units on every row (kept on `device`), and their per-unit std
    shaped to broadcast against them (none without matches: `fit` has none without a teacher)."""
    if not matches or teacher is None:
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


HELD_OUT = 0.1  # share of the training rows a student's fit holds out to choose its epoch on
MIN_HELD_OUT = 20  # fewer would be held out: the validation rows choose


def held_out_rows(y: np.ndarray, share: float, seed: int, stratify: bool = True) -> np.ndarray:
    """Sorted indices of about `share` of the rows of labels `y`, held out of a fit to choose its
    epoch: per class, `round(share * n_c)` of its `n_c` rows drawn by a permutation seeded with
    `seed` (at most `n_c - 1`: every class keeps a training row); `stratify=False` (regression)
    draws from all rows alike. The same `y`, `share` and `seed` give the same rows."""
    y = np.asarray(y)
    if share <= 0 or len(y) == 0:
        return np.empty(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(y == c) for c in np.unique(y)] if stratify else [np.arange(len(y))]
    held = [
        rng.permutation(g)[: min(int(np.floor(share * len(g) + 0.5)), len(g) - 1)] for g in groups
    ]
    return np.sort(np.concatenate(held)).astype(np.int64)


@dataclass(frozen=True)
class Selection:
    """The rows a fit trains on and the rows that choose its epoch (`held`: their indices in the
    training split; empty: the validation rows choose)."""

    X_train: np.ndarray | Rows
    y_train: np.ndarray
    X_select: np.ndarray | Rows
    y_select: np.ndarray
    held: np.ndarray

    @property
    def on_validation(self) -> bool:
        return len(self.held) == 0


def selection_of(data: Dataset, share: float, seed: int) -> Selection:
    """`share` of data's training rows held out to choose the epoch (`held_out_rows`, stratified
    by class unless regression), the rest trained on; with `share` 0, or where fewer than
    `MIN_HELD_OUT` rows would be held out, all training rows train and the validation rows
    choose."""
    held = held_out_rows(data.y_train, share, seed, stratify=not data.is_regression)
    if len(held) < MIN_HELD_OUT:
        return Selection(data.X_train, data.y_train, data.X_val, data.y_val, held[:0])
    kept = np.setdiff1d(np.arange(len(data.y_train)), held)
    return Selection(
        take(data.X_train, kept),
        data.y_train[kept],
        take(data.X_train, held),
        data.y_train[held],
        held,
    )


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
    held_out: float = 0.0  # share of the training rows that choose the epoch (0: validation rows)
    max_seconds: float | None = None  # no epoch starts after this (the best so far restored)

    @classmethod
    def of(cls, cfg: FinetuneConfig, seed: int, device: str, **changes: Any) -> FitSettings:
        """The `finetune` section's distillation settings (`changes`: e.g. fewer epochs); the
        epoch is chosen on `HELD_OUT` of the training rows, never on the guard's rows. Its
        `epochs` and `lr` set: `recipe.resolved` fills left-out ones from the teacher."""
        if cfg.epochs is None or cfg.lr is None:
            raise ValueError("finetune.epochs / lr left out: fill them with recipe.resolved")
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
                "held_out": HELD_OUT,
                "max_seconds": None if cfg.max_minutes is None else 60 * cfg.max_minutes,
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
    # the held-out training rows' score that chose `best_epoch` (empty: the validation rows chose)
    select_accuracy: list[float] = field(default_factory=list)
    select_r2: list[float] = field(default_factory=list)  # regression
    select_rows: int = 0  # how many held-out training rows chose it (0: the validation rows)
    epoch_seconds: list[float] = field(default_factory=list)
    stopped: str = ""  # why training ended before its epochs: "patience" | "time box"

    @property
    def select_score(self) -> list[float]:
        return self.select_r2 or self.select_accuracy

    def curves(self) -> dict[str, list[float]]:
        """Each curve by its attribute's name (the pruning rounds' curves extend them by it)."""
        score = {"val_r2": self.val_r2} if self.val_r2 else {"val_accuracy": self.val_accuracy}
        chosen = {"select_r2": self.select_r2, "select_accuracy": self.select_accuracy}
        select = {k: v for k, v in chosen.items() if v}
        return {
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            **score,
            **select,
            "lr": self.lr,
            "epoch_seconds": self.epoch_seconds,
        }

    def params(self) -> dict[str, Any]:
        """For the stage's run: the epochs run, and why it stopped before its last, if it did."""
        ran = {"epochs_run": len(self.train_loss)}
        return ran | ({"stopped": self.stopped} if self.stopped else {})


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
    assert out is not None, "predict_logits: no rows"  # every split holds rows (dataset.py)
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


def _fusable(model: nn.Module) -> bool | None:
    """True where torch's fused Adam takes every parameter (floating, on CPU or CUDA): one kernel
    per step instead of a dozen ops per tensor (a ~1k-param 1-D ResNet's step 0.18 ms, not 0.89;
    its KD ~10 % faster). None (torch's default) elsewhere."""
    params = list(model.parameters())
    ok = params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return True if ok else None


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
    ("the teacher" while the teacher trains); `lr_key`: the config key a divergence points to.
    The epoch restored is the best on `settings.held_out` of the training rows, held out of the
    fit (`selection_of`), or on the validation rows where none are held out."""
    seed_torch(settings.seed)  # not while another thread exports (export_lock.py)
    device = resolve_device(settings.device)
    model.to(device)
    regression = data.is_regression  # y: standardized float targets, one output
    chosen = selection_of(data, settings.held_out, settings.seed)

    def labels(y: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(y).to(device)
        return t.float() if regression else t.long()

    y_val, y_select = labels(data.y_val), labels(chosen.y_select)
    # the teacher is frozen: its logits are computed once, not every batch, on the fit's device
    t_logits = _teacher_logits(teacher, chosen.X_train, device) if teacher is not None else None
    if t_logits is not None:
        check_outputs(t_logits, "training", "the teacher", teacher, chosen.X_train)
    # rows in memory go to the device once; rows on disk come a batch at a time (compress/rows.py)
    train = TrainRows(chosen.X_train, chosen.y_train, t_logits, device)
    amp = functools.partial(autocast, device, settings.precision)

    history = History()
    if settings.epochs == 0:
        return model.cpu().eval(), history
    matches = list(features or []) if teacher is not None and settings.feature_weight > 0 else []
    t_feats, scales = _teacher_features(teacher, matches, chosen.X_train, device)
    s_feats: list[torch.Tensor] = []  # the matched student layers' outputs of the current batch

    def keep_output(module: nn.Module, _args: tuple, out: object) -> None:
        if module.training:
            s_feats.append(_output(out).float())

    hooks = [model.get_submodule(m.student).register_forward_hook(keep_output) for m in matches]
    with onnx_export_lock():  # torch's export flag is process-wide (export_lock.py)
        opt = torch.optim.Adam(
            model.parameters(),
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            fused=_fusable(model),
        )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.epochs)
    gen = torch.Generator(device="cpu").manual_seed(settings.seed)
    best_key, best_state, stale = (-1.0, float("-inf")), copy.deepcopy(model.state_dict()), 0
    watch = TrainingWatch(model, role, lr_key, device)

    started = time.perf_counter()
    for epoch in track(range(settings.epochs), description, total=settings.epochs):
        if (  # the first epoch always runs
            epoch
            and settings.max_seconds is not None
            and time.perf_counter() - started >= settings.max_seconds
        ):
            history.stopped = f"time box: {settings.max_seconds / 60:g} min (finetune.max_minutes)"
            break
        epoch_started = time.perf_counter()
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
        history.lr.append(float(sched.get_last_lr()[0]))  # a float lr stays a float
        sched.step()

        model.eval()
        with torch.no_grad(), amp():
            val_logits = torch.cat([model(xb).float() for xb in rows_on(data.X_val, device)])
        watch.validation(val_logits, epoch)
        val_acc, val_loss = _scores(val_logits, y_val, regression)
        (history.val_r2 if regression else history.val_accuracy).append(val_acc)
        history.train_loss.append(total.item() / len(train))
        history.val_loss.append(val_loss)
        history.epoch_seconds.append(time.perf_counter() - epoch_started)
        if chosen.on_validation:
            key = (val_acc, -val_loss)
        else:  # the held-out training rows choose: the guard's rows have no say
            with torch.no_grad(), amp():
                select_logits = torch.cat(
                    [model(xb).float() for xb in rows_on(chosen.X_select, device)]
                )
            select_acc, select_loss = _scores(select_logits, y_select, regression)
            (history.select_r2 if regression else history.select_accuracy).append(select_acc)
            history.select_rows = len(chosen.held)
            key = (select_acc, -select_loss)
        if key > best_key:
            best_key, best_state, stale = key, copy.deepcopy(model.state_dict()), 0
            history.best_epoch = epoch
        else:
            stale += 1
            if stale >= settings.patience:
                history.stopped = f"patience: {settings.patience} epochs without a better one"
                break

    for h in hooks:
        h.remove()
    model.load_state_dict(best_state)
    return model.cpu().eval(), history


def _scores(logits: torch.Tensor, y: torch.Tensor, regression: bool) -> tuple[float, float]:
    """(accuracy, cross-entropy), or for regression (R², MSE: standardized units, the same R²)."""
    if regression:
        return r2(logits, y), F.mse_loss(logits.reshape(-1), y).item()
    accuracy = (logits.argmax(1) == y).float().mean().item()
    return accuracy, F.cross_entropy(logits, y).item()


def distill(
    teacher: nn.Module,
    student: nn.Module,
    data: Dataset,
    cfg: FinetuneConfig,
    seed: int,
    device: str = "cpu",
) -> tuple[nn.Module, History]:
    """`student` distilled from `teacher` by `cfg` (its left-out epochs and lr: the teacher's
    family's recipe, tasks/compress/recipe.py); the best epoch restored."""
    settings = FitSettings.of(resolved(cfg, recipe_for(teacher)), seed, device)
    return fit(copy.deepcopy(student), data, settings, teacher=teacher, description="distilling")

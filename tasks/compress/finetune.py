"""Stage 4 — fine-tune: knowledge distillation from the teacher into the student.

    loss = α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−α)·CE(s, y)        (Hinton et al. 2015)

`fit` is the one training loop of the project: the teacher trains with it too (no teacher,
α = 0: plain cross-entropy). Adam, cosine learning rate, early stopping on validation
accuracy (ties broken by validation loss) restoring the best weights, seeded. On CUDA the
rows, the teacher's logits and the student live on the GPU for the whole fit, and the forward
passes may run under bf16 autocast (`precision`); the model comes back on CPU, in fp32.
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

from tasks.compress.data import Dataset
from tasks.compress.rows import Rows, TrainRows, rows_on
from tasks.platform.config import FinetuneConfig
from tasks.platform.device import resolve_device
from tasks.platform.progress import track


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

    def curves(self) -> dict[str, list[float]]:
        return {
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            "val_accuracy": self.val_accuracy,
            "lr": self.lr,
        }


@torch.no_grad()
def predict_logits(model: nn.Module, X: np.ndarray | Rows, batch_size: int = 1024) -> np.ndarray:
    """Logits of a float model on CPU rows, wherever the model lives."""
    model.eval()
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
) -> tuple[nn.Module, History]:
    """Train `model` in place on data's train split and return it (on CPU) with its curves."""
    torch.manual_seed(settings.seed)
    device = resolve_device(settings.device)
    model.to(device)
    y_val = torch.from_numpy(data.y_val).long().to(device)
    # the teacher is frozen: its logits are computed once, not every batch, on the fit's device
    t_logits = _teacher_logits(teacher, data.X_train, device) if teacher is not None else None
    # rows in memory go to the device once; rows on disk come a batch at a time (compress/rows.py)
    train = TrainRows(data.X_train, data.y_train, t_logits, device)
    amp = functools.partial(autocast, device, settings.precision)

    history = History()
    if settings.epochs == 0:
        return model.cpu().eval(), history
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.epochs)
    gen = torch.Generator(device="cpu").manual_seed(settings.seed)
    best_key, best_state, stale = (-1.0, float("-inf")), copy.deepcopy(model.state_dict()), 0

    for epoch in track(range(settings.epochs), description, total=settings.epochs):
        model.train()
        order = torch.randperm(len(train), generator=gen)
        total = torch.zeros((), device=device)  # summed on the device: no sync per batch
        for xb, yb, tb in train.batches(order, settings.batch_size):
            with amp():
                logits = model(xb)
            loss = kd_loss(logits.float(), tb, yb, settings.temperature, settings.alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(yb)
        history.lr.append(sched.get_last_lr()[0])
        sched.step()

        model.eval()
        with torch.no_grad(), amp():
            val_logits = torch.cat([model(xb).float() for xb in rows_on(data.X_val, device)])
            val_loss = F.cross_entropy(val_logits, y_val).item()
            val_acc = (val_logits.argmax(1) == y_val).float().mean().item()
        history.train_loss.append(total.item() / len(train))
        history.val_loss.append(val_loss)
        history.val_accuracy.append(val_acc)

        key = (val_acc, -val_loss)
        if key > best_key:
            best_key, best_state, stale = key, copy.deepcopy(model.state_dict()), 0
            history.best_epoch = epoch
        else:
            stale += 1
            if stale >= settings.patience:
                break

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
    settings = FitSettings(
        epochs=cfg.epochs,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        patience=cfg.patience,
        weight_decay=cfg.weight_decay,
        temperature=cfg.temperature,
        alpha=cfg.alpha,
        seed=seed,
        device=device,
    )
    return fit(copy.deepcopy(student), data, settings, teacher=teacher, description="distilling")

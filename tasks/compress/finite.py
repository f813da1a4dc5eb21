"""NaN and inf stop a run at the stage that made them, before anything is registered.

A diverged fine-tuning (a learning rate far too high) or a teacher whose weights overflow in
float32 leaves a model that predicts class 0 for every row and NaN for every probability:
it must not reach the registry as a working model. `check_model` runs at every stage
boundary (tasks/compress/pipeline.py measures every stage's model through it, before the
model is recorded) on the weights and on the outputs for a batch of rows.

And where it starts (`NonFinite`: the epoch and batch, or the row, and which model): every
training batch and validation pass of `finetune.fit` (`TrainingWatch`: the teacher's training,
KD, pruning's recovery), the teacher's outputs KD reads, the reduce stage's calibration
(`check_calibration`), and every row an evaluation predicts (`check_outputs`); the module it
starts in is found by running the offending rows again with hooks (`first_non_finite`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from distill.tasks.platform.errors import UserError

# the config key most likely behind a stage's NaN
HINTS = {"teacher": "teacher.lr", "finetuned": "finetune.lr", "pruned": "finetune.lr"}


def non_finite_tensor(model: nn.Module) -> str | None:
    """The name of the first floating parameter or buffer holding NaN or inf, else None."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in tensors:
        if tensor.is_floating_point() and not tensor.is_meta and not torch.isfinite(tensor).all():
            return name
    return None


def outputs_of(model: nn.Module | Any, rows: np.ndarray) -> np.ndarray:
    """The model's logits for `rows` (in their dtype: int64 token ids stay int64): a module in
    PyTorch, a serialized model in its runtime."""
    if isinstance(model, nn.Module):
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with torch.inference_mode():
            return model.eval()(torch.from_numpy(rows).to(device)).float().cpu().numpy()
    return np.asarray(model.predictor()(rows))


def check_model(stage: str, model: nn.Module | Any, rows: np.ndarray) -> None:
    """One UserError naming the stage when the model's weights or its outputs on `rows` hold
    NaN or inf (serialized ONNX / TorchScript models: the outputs)."""
    hint = f" ({HINTS[stage]} too high?)" if stage in HINTS else ""
    name = non_finite_tensor(model) if isinstance(model, nn.Module) else None
    if name is not None:
        raise UserError(
            f"stage {stage}: the model's {name} holds NaN or inf{hint}; "
            "the run stops before registration"
        )
    if not np.isfinite(outputs_of(model, rows)).all():
        raise UserError(
            f"stage {stage}: the model outputs NaN or inf{hint}; the run stops before registration"
        )


# --- where NaN or inf starts ----------------------------------------------------------------


class NonFinite(UserError):
    """Outputs holding NaN or inf where they were first seen: `where` ("epoch 3, batch 12",
    "test row 17"), `model` ("the teacher", "the student"; None: the stage's model, which the
    stage guard names), `detail` (the cause where found: a weight, the module it starts in). The
    stage guard puts the stage in front (`line`)."""

    def __init__(self, where: str, model: str | None = None, detail: str = "") -> None:
        self.where, self.model, self.detail = where, model, detail
        super().__init__(self.line())

    def line(self, stage: str | None = None, model: str | None = None) -> str:
        head = ", ".join(part for part in (f"stage {stage}" if stage else "", self.where) if part)
        detail = f"; {self.detail}" if self.detail else ""
        return (
            f"{head}: {self.model or model or 'the model'}'s outputs hold NaN or inf{detail}; "
            "the run stops before registration"
        )


def module_label(path: str, module: nn.Module) -> str:
    """`model.attn (MyAttention)`; the model itself by its class."""
    name = type(module).__name__
    return f"{path} ({name})" if path else name


def _finite(value: Any) -> bool | None:
    """Whether every floating tensor in `value` (a tensor, a tuple, a dict, a ModelOutput) is
    finite; None where it holds none."""
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all()) if value.is_floating_point() else None
    items = value.values() if isinstance(value, dict) else value
    if isinstance(items, (tuple, list)) or isinstance(value, dict):
        seen = [_finite(v) for v in items]
        return None if all(s is None for s in seen) else all(s is not False for s in seen)
    return None


def first_non_finite(model: nn.Module, x: torch.Tensor) -> tuple[str, nn.Module] | None:
    """The first module (dotted path, module) of a forward pass on `x` whose output holds NaN or
    inf while its inputs were finite: where it starts. None when the pass stays finite."""
    found: list[tuple[str, nn.Module]] = []

    def hook(name: str):
        def check(module: nn.Module, args: tuple, out: Any) -> None:
            if not found and _finite(out) is False and _finite(tuple(args)) is not False:
                found.append((name, module))

        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()]
    try:
        with torch.no_grad():
            model(x)
    except Exception:  # noqa: BLE001, S110 -- a diagnosis: the failure being explained is reported
        pass
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def non_finite_cause(model: nn.Module, x: torch.Tensor | None, lr_key: str | None) -> str:
    """Why `model`'s outputs on `x` are not finite, as far as can be told: a weight that holds
    NaN or inf, or the module where it starts (a built-in layer given finite inputs and finite
    weights: an overflow, so the learning rate when `lr_key` names one)."""
    too_high = f" ({lr_key} too high?)" if lr_key else ""
    name = non_finite_tensor(model)
    if name is not None:
        return f"its {name} holds NaN or inf{too_high}"
    found = first_non_finite(model, x) if x is not None else None
    if found is None:
        return ""
    path, module = found
    if type(module).__module__.startswith("torch.nn") and lr_key:
        return f"it starts in {module_label(path, module)}, an overflow{too_high}"
    return f"it starts in {module_label(path, module)}"


def check_outputs(
    outputs: np.ndarray,
    rows: str,
    who: str | None = None,
    model: nn.Module | None = None,
    X: Any = None,
    row_ids: np.ndarray | None = None,
) -> None:
    """NonFinite naming the first of `rows` (e.g. "test") whose outputs hold NaN or inf, and
    `who` made them; with the `model` and its inputs `X`, where in it that starts. `row_ids`:
    the split's row numbers of `outputs` where they are a sample of it."""
    finite = np.isfinite(np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)).all(1)
    if finite.all():
        return
    row = int(np.argmin(finite))
    detail = ""
    if model is not None and X is not None:
        detail = non_finite_cause(model, torch.from_numpy(np.asarray(X[row : row + 1])), None)
    raise NonFinite(f"{rows} row {row if row_ids is None else int(row_ids[row])}", who, detail)


class TrainingWatch:
    """The outputs of every training batch checked for NaN or inf. On CPU each batch is checked
    at once, before the optimizer step (so the weights still say whether they diverged); on an
    accelerator the first bad batch is kept on the device and read once per epoch (one sync,
    not one per batch)."""

    def __init__(self, model: nn.Module, role: str, lr_key: str | None, device: torch.device):
        self.model, self.role, self.lr_key = model, role, lr_key
        self.now = device.type == "cpu"
        self.first = torch.full((), -1, dtype=torch.long, device=device)

    def batch(self, outputs: torch.Tensor, epoch: int, batch: int, x: torch.Tensor) -> None:
        finite = torch.isfinite(outputs.detach()).all()
        if self.now:
            if not bool(finite):
                self._raise(epoch, f"batch {batch + 1}", x)
        else:
            self.first = torch.where((self.first < 0) & ~finite, batch, self.first)

    def validation(self, outputs: torch.Tensor, epoch: int) -> None:
        if not bool(torch.isfinite(outputs).all()):
            self._raise(epoch, "validation rows", None)

    def epoch_end(self, epoch: int) -> None:
        if not self.now and (first := int(self.first.item())) >= 0:
            self._raise(epoch, f"batch {first + 1}", None)

    def _raise(self, epoch: int, where: str, x: torch.Tensor | None) -> None:
        detail = non_finite_cause(self.model, x, self.lr_key)
        raise NonFinite(f"epoch {epoch + 1}, {where}", self.role, detail)


def check_calibration(bases: dict[str, Any], teacher: nn.Module, rows: np.ndarray) -> None:
    """The reduce stage's PCA bases (`mean`, `components`, `explained_variance`) finite; else
    NonFinite naming the first calibration row whose teacher outputs are not (or the basis)."""
    bad = [
        name
        for name, b in bases.items()
        if not all(np.isfinite(a).all() for a in (b.mean, b.components, b.explained_variance))
    ]
    if not bad:
        return
    outputs = np.concatenate(
        [outputs_of(teacher, rows[i : i + 256]) for i in range(0, len(rows), 256)]
    )
    check_outputs(outputs, "calibration", "the teacher")
    raise NonFinite(
        "calibration rows", "the teacher", f"the PCA of what {bad[0]} reads holds NaN or inf"
    )

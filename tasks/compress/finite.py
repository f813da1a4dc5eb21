"""NaN and inf stop a run at the stage that made them, before anything is registered.

A diverged fine-tuning (a learning rate far too high) or a teacher whose weights overflow in
float32 leaves a model that predicts class 0 for every row and NaN for every probability:
it must not reach the registry as a working model. `check_model` runs at every stage
boundary (tasks/compress/pipeline.py measures every stage's model through it, before the
model is recorded) on the weights and on the outputs for a batch of rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from tasks.platform.errors import UserError

# the config key most likely behind a stage's NaN
HINTS = {"teacher": "teacher.lr", "finetuned": "finetune.lr", "pruned": "finetune.lr"}


def non_finite_tensor(model: nn.Module) -> str | None:
    """The name of the first floating parameter or buffer holding NaN or inf, else None."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in tensors:
        if tensor.is_floating_point() and not tensor.is_meta and not torch.isfinite(tensor).all():
            return name
    return None


def outputs(model: nn.Module | Any, rows: np.ndarray) -> np.ndarray:
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
    if not np.isfinite(outputs(model, rows)).all():
        raise UserError(
            f"stage {stage}: the model outputs NaN or inf{hint}; the run stops before registration"
        )

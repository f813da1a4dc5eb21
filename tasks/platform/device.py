"""Where tensors live: `device: cpu | cuda | auto` from the config."""

from __future__ import annotations

import torch

from distill.tasks.platform.errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "config key 'device': cuda requested but no CUDA device is available (use auto or cpu)"
        )
    return torch.device(name)

"""Streamed PCA of a model's activations: mean, components and explained variance per tap.

Forward hooks accumulate, per tapped module, the sample count, the sum and the sum of outer
products (float64) over calibration batches, so peak memory is set by the layer widths and
the batch size, never by the number of calibration rows. Conv outputs are treated with
channels as features and every position as a sample; Linear outputs (`[N, D]` or a
sequence's `[N, T, D]`) with the last axis as features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from distill.tasks.compress.graph import CONVS, REFIT, no_fastpath
from distill.tasks.platform.errors import UserError


@dataclass(frozen=True)
class Basis:
    """PCA of one layer's outputs: mean μ, components U (columns, by decreasing variance)."""

    mean: np.ndarray  # (m,)
    components: np.ndarray  # (m, m)
    explained_variance: np.ndarray  # (m,) eigenvalues, population covariance (1/N)

    def retained(self, k: int) -> float:
        """Fraction of the output variance kept by the first k components."""
        total = self.explained_variance.sum()
        return float(self.explained_variance[:k].sum() / total) if total > 0 else 1.0


def feature_rows(out: torch.Tensor, channels_first: bool) -> torch.Tensor:
    """A layer's outputs as (samples, features): conv channels are on axis 1 and every
    position is a sample; Linear features are on the last axis (`[N, D]`, `[N, T, D]`)."""
    if channels_first:
        return out.movedim(1, -1).reshape(-1, out.shape[1])
    return out.reshape(-1, out.shape[-1])


class Moments:
    """Running n, Σx, Σxxᵀ in float64: mean and covariance without keeping samples."""

    def __init__(self, width: int) -> None:
        self.n = 0
        self.total = torch.zeros(width, dtype=torch.float64)
        self.outer = torch.zeros(width, width, dtype=torch.float64)

    def add_rows(self, rows: torch.Tensor) -> None:
        z = rows.detach().to("cpu", torch.float64)
        self.n += z.shape[0]
        self.total += z.sum(0)
        self.outer += z.T @ z

    def basis(self) -> Basis:
        mean = self.total / max(self.n, 1)
        cov = self.outer / max(self.n, 1) - torch.outer(mean, mean)
        eigvals, eigvecs = torch.linalg.eigh((cov + cov.T) / 2)
        order = torch.argsort(eigvals, descending=True)
        return Basis(
            mean=mean.numpy(),
            components=eigvecs[:, order].numpy(),
            explained_variance=eigvals[order].clamp_min(0).numpy(),
        )


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear and (ungrouped) Conv, by dotted path."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, REFIT) and getattr(m, "groups", 1) == 1
    }


@torch.no_grad()
def collect_bases(
    model: nn.Module, X: np.ndarray, batch_size: int = 256, taps: dict[str, nn.Module] | None = None
) -> dict[str, Basis]:
    """One streamed pass over the calibration rows; a Basis of the outputs of each tapped
    module (default: every Linear/Conv). A module that never runs its own forward (the
    output projection of `nn.MultiheadAttention`, which uses its weight directly) gets none."""
    if len(X) < 2:
        raise UserError(
            "config key 'reduce.calibration_samples': need at least 2 calibration rows, got "
            f"{len(X)}"
        )
    taps = taps if taps is not None else linear_layers(model)
    moments: dict[str, Moments] = {}

    def hook(name: str, channels_first: bool):
        def add(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
            rows = feature_rows(out, channels_first)
            moments.setdefault(name, Moments(rows.shape[1])).add_rows(rows)

        return add

    hooks = [
        module.register_forward_hook(hook(name, isinstance(module, CONVS)))
        for name, module in taps.items()
    ]
    try:
        model.eval()
        with no_fastpath():
            for start in range(0, len(X), batch_size):
                model(torch.from_numpy(X[start : start + batch_size]))
    finally:
        for h in hooks:
            h.remove()
    return {name: m.basis() for name, m in moments.items()}

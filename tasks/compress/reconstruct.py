"""Stage 3 — reconstruct: build the student from the teacher's own weights, no random init.

Two modes (`reconstruct.mode`): low_rank (here) and width (tasks/compress/width.py: keep k units of
each coupled group of the model's graph and re-fit every layer that reads it by least squares).

Low-rank mode replaces each planned layer `z = W x + b` by the PCA-optimal rank-k map of
its outputs, z ≈ μ + U_k U_kᵀ (z − μ), written as two layers:

    first  = Linear(in, k):  weight U_kᵀ W,  bias U_kᵀ (b − μ)
    second = Linear(k, out): weight U_k,     bias μ

A Conv becomes a k-channel conv with the same kernel followed by a 1x1 conv. At full rank
U_k U_kᵀ = I and the student computes exactly what the teacher computes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from distill.tasks.compress import hidden, transformer
from distill.tasks.compress.export_lock import seed_torch
from distill.tasks.compress.reduce import Basis, Reduction
from distill.tasks.compress.width import WidthReport, reconstruct_width
from distill.tasks.platform.config import ReconstructConfig


class Factored(nn.Sequential):
    """A layer written as two (`first`, then `second`). Code of the user's model that reads the
    layer it replaced (Hugging Face's ViT reads `patch_embeddings.projection.weight.dtype`)
    finds the product's `weight` and `bias`, computed when read; the forward runs the two."""

    @property
    def weight(self) -> torch.Tensor:
        first, second = _tensor(self[0], "weight"), _tensor(self[1], "weight")
        if first.dim() == 2:
            return second @ first
        # conv: second is 1x1 — (out, k) contracted with (k, in, *kernel)
        return torch.tensordot(second.flatten(1), first, dims=1)

    @property
    def bias(self) -> torch.Tensor:
        second = self[1]
        return _tensor(second, "weight").flatten(1) @ _tensor(self[0], "bias") + _tensor(
            second, "bias"
        )


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    """A parameter both factors have (each is made with a bias)."""
    value = getattr(module, name)
    assert isinstance(value, torch.Tensor), f"{type(module).__name__}.{name}"
    return value


def _factor_linear(layer: nn.Linear, basis: Basis, k: int) -> nn.Sequential:
    U = torch.tensor(basis.components[:, :k], dtype=torch.float64)  # (out, k)
    mu = torch.tensor(basis.mean, dtype=torch.float64)
    W = layer.weight.detach().to(torch.float64)
    b = (
        layer.bias.detach().to(torch.float64)
        if layer.bias is not None
        else torch.zeros(W.shape[0], dtype=torch.float64)
    )
    first = nn.Linear(layer.in_features, k)
    second = nn.Linear(k, layer.out_features)
    with torch.no_grad():
        first.weight.copy_(U.T @ W)
        first.bias.copy_(U.T @ (b - mu))
        second.weight.copy_(U)
        second.bias.copy_(mu)
    return Factored(first, second)


def _factor_conv(layer: nn.Conv1d | nn.Conv2d, basis: Basis, k: int) -> nn.Sequential:
    U = torch.tensor(basis.components[:, :k], dtype=torch.float64)  # (out_channels, k)
    mu = torch.tensor(basis.mean, dtype=torch.float64)
    W = layer.weight.detach().to(torch.float64)  # (out, in, *kernel)
    b = (
        layer.bias.detach().to(torch.float64)
        if layer.bias is not None
        else torch.zeros(W.shape[0], dtype=torch.float64)
    )
    conv = type(layer)
    geometry: dict[str, Any] = {  # the layer's own, whatever its number of spatial dims
        "kernel_size": layer.kernel_size,
        "stride": layer.stride,
        "padding": layer.padding,
        "dilation": layer.dilation,
        "padding_mode": layer.padding_mode,
    }
    first = conv(layer.in_channels, k, **geometry)
    second = conv(k, layer.out_channels, 1)
    with torch.no_grad():
        first.weight.copy_(torch.tensordot(U.T, W, dims=1))
        _tensor(first, "bias").copy_(U.T @ (b - mu))
        second.weight.copy_(U.reshape(*U.shape, *([1] * (W.dim() - 2))))
        _tensor(second, "bias").copy_(mu)
    return Factored(first, second)


def factor_layer(layer: nn.Module, basis: Basis, k: int) -> nn.Sequential:
    if isinstance(layer, nn.Linear):
        return _factor_linear(layer, basis, k)
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        return _factor_conv(layer, basis, k)
    raise TypeError(f"cannot factor {type(layer).__name__}")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def reconstruct_low_rank(teacher: nn.Module, reduction: Reduction) -> nn.Module:
    """A copy of the teacher with every planned layer replaced by its rank-k factorization."""
    student = copy.deepcopy(teacher)
    for plan in reduction.layers:
        if plan.rank is not None:
            layer = student.get_submodule(plan.name)
            replace_module(
                student, plan.name, factor_layer(layer, reduction.bases[plan.name], plan.rank)
            )
    return student.eval()


def reconstruct(
    teacher: nn.Module,
    reduction: Reduction,
    X_calib: np.ndarray,
    cfg: ReconstructConfig,
    report: WidthReport | None = None,
) -> nn.Module:
    if reduction.mode != cfg.mode:
        raise ValueError(
            f"reduction was planned for {reduction.mode}, reconstruct.mode is {cfg.mode}"
        )
    return RECONSTRUCTORS[cfg.mode](teacher, reduction, X_calib, cfg, report)


def _width(
    teacher: nn.Module,
    reduction: Reduction,
    X_calib: np.ndarray,
    cfg: ReconstructConfig,
    report: WidthReport | None,
) -> nn.Module:
    widths = {p.name: p.rank for p in reduction.layers if p.rank is not None}
    if transformer.holds_blocks(teacher):
        return _narrow_transformer(teacher, widths, X_calib, cfg, report)
    return reconstruct_width(teacher, widths, X_calib, cfg.selection, cfg.ridge, report=report)


def _narrow_transformer(
    teacher: nn.Module,
    widths: dict[str, int],
    X_calib: np.ndarray,
    cfg: ReconstructConfig,
    report: WidthReport | None,
) -> nn.Module:
    """Heads, feed-forward units and layers cut, readers re-fitted (transformer.narrow)."""
    done = transformer.NarrowReport()
    student = transformer.narrow(
        copy.deepcopy(teacher).eval(),
        teacher.eval(),
        widths,
        X_calib,
        cfg.selection,
        cfg.ridge,
        report=done,
    )
    if report is not None:
        report.kept = dict(done.kept)
        report.refitted = list(done.refitted)
        report.not_refitted = dict(done.not_refitted)
    k = widths.get(hidden.NAME)
    if k:  # then the residual stream, re-fitted to the student cut so far
        reference = copy.deepcopy(student).eval()
        cut = hidden.narrow_hidden(student, reference, k, X_calib, ridge=cfg.ridge)
        if report is not None:
            report.refitted += cut.refitted or []
    return student


def _low_rank(
    teacher: nn.Module,
    reduction: Reduction,
    X_calib: np.ndarray,
    cfg: ReconstructConfig,
    report: WidthReport | None,
) -> nn.Module:
    return reconstruct_low_rank(teacher, reduction)


# `reconstruct.mode` -> how the student is built (a test keeps the config's choices equal)
RECONSTRUCTORS: dict[
    str,
    Callable[[nn.Module, Reduction, np.ndarray, ReconstructConfig, WidthReport | None], nn.Module],
] = {"width": _width, "low_rank": _low_rank}


def reinitialized(model: nn.Module, seed: int) -> nn.Module:
    """The same architecture with fresh random weights: the from-scratch baselines' student."""
    seed_torch(seed)  # not while another thread exports (export_lock.py)
    fresh = copy.deepcopy(model)
    for m in fresh.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    return fresh


def reconstruct_with_notes(
    teacher: nn.Module, reduction: Reduction, X_calib: np.ndarray, cfg: ReconstructConfig
) -> tuple[nn.Module, dict[str, object]]:
    """The student, and what its stage record says about the re-fits (width mode)."""
    report = WidthReport()
    student = reconstruct(teacher, reduction, X_calib, cfg, report)
    notes: dict[str, object] = {}
    if cfg.mode == "width":
        notes["refitted_layers"] = len(report.refitted)
        notes |= {f"not_refitted.{layer}": why for layer, why in report.not_refitted.items()}
    return student, notes

"""Stage 2 — reduce: PCA of the teacher's layer outputs, and a size per layer.

The PCA is streamed: forward hooks accumulate, per layer, the sample count, the sum and
the sum of outer products (float64) over calibration batches, so peak memory is set by
the layer widths and the batch size, never by the number of calibration samples.
Conv outputs are treated with channels as features and every pixel as a sample.

Two things can be sized, matching `reconstruct.mode`:
- low_rank: a rank per Linear/Conv, from the PCA of its (pre-activation) outputs. With
  `reduce.method: svd` the basis comes from the weights' SVD instead (data-free baseline).
- width: a number of units per hidden layer, from the PCA of its activations.

Sizes are allocated across layers to meet one budget (`size_kb`, `params`, `ratio`, or
`variance`) by greedy water-filling on explained variance per parameter: each step buys
one more rank (or unit) where a parameter buys the most explained variance, while the
budget holds. A layer whose factorization would not save parameters stays dense.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from prefect import task
from torch import nn

from tasks.caching import STAGE_CACHE
from tasks.config import BudgetConfig, ReduceConfig
from tasks.errors import UserError
from tasks.topology import REDUCIBLE, hidden_chain, width_params

BYTES_PER_PARAM = 4  # budgets count fp32 parameters; int8 quantization later divides by ~4


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


@dataclass(frozen=True)
class LayerPlan:
    name: str
    fan_in: int  # in_features, or in_channels · kernel size
    out: int
    rank: int | None  # low_rank: the rank; width: the units kept. None: the layer stays as it is
    variance: float  # fraction of output variance kept

    @property
    def dense_params(self) -> int:
        return self.out * self.fan_in + self.out

    @property
    def params(self) -> int:
        """Low-rank mode's cost of this layer (in width mode, cost depends on the neighbours)."""
        return self.dense_params if self.rank is None else low_rank_params(self.fan_in, self.out, self.rank)


@dataclass(frozen=True)
class Reduction:
    bases: dict[str, Basis]
    layers: list[LayerPlan]
    teacher_params: int
    student_params: int
    budget_kind: str
    budget_value: float
    mode: str = "low_rank"  # low_rank | width
    method: str = "pca"  # pca | svd

    @property
    def ranks(self) -> dict[str, int | None]:
        return {layer.name: layer.rank for layer in self.layers}


def reduction_record(reduction: Reduction) -> tuple[dict[str, object], dict[str, float]]:
    """(params, metrics) of the reduce stage's MLflow run: the plan, layer by layer."""
    params: dict[str, object] = {"budget": f"{reduction.budget_kind}={reduction.budget_value:g}",
                                 "mode": reduction.mode, "method": reduction.method}
    metrics = {"teacher_params": float(reduction.teacher_params),
               "student_params": float(reduction.student_params),
               "student_size_kb_fp32": reduction.student_params * BYTES_PER_PARAM / 1024,
               "param_ratio": reduction.teacher_params / reduction.student_params}
    for layer in reduction.layers:
        kind = "rank" if reduction.mode == "low_rank" else "width"
        params[f"{kind}.{layer.name}"] = "dense" if layer.rank is None else layer.rank
        metrics[f"variance_kept.{layer.name}"] = layer.variance
    return params, metrics


def low_rank_params(fan_in: int, out: int, k: int) -> int:
    """Parameters of `k×fan_in (+k bias)` followed by `out×k (+out bias)`."""
    return k * fan_in + k + out * k + out


def reducible_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, REDUCIBLE) and getattr(m, "groups", 1) == 1}


def svd_bases(model: nn.Module) -> dict[str, Basis]:
    """Data-free bases from each layer's weights, W = U S Vᵀ: components U, 'variance' s²,
    mean = the bias, so reconstruction gives the truncated SVD `U_k (S_k V_kᵀ x) + b`."""
    bases = {}
    for name, layer in reducible_layers(model).items():
        W = layer.weight.detach().to(torch.float64).reshape(layer.weight.shape[0], -1)
        U, S, _ = torch.linalg.svd(W, full_matrices=True)
        s2 = torch.zeros(W.shape[0], dtype=torch.float64)
        s2[:len(S)] = S**2
        bias = layer.bias.detach().to(torch.float64) if layer.bias is not None else torch.zeros(W.shape[0])
        bases[name] = Basis(mean=bias.numpy(), components=U.numpy(), explained_variance=s2.numpy())
    return bases


def _fan_in(layer: nn.Module) -> int:
    return int(layer.weight[0].numel())


class _Moments:
    """Running n, Σx, Σxxᵀ in float64: mean and covariance without keeping samples."""

    def __init__(self, width: int) -> None:
        self.n = 0
        self.total = torch.zeros(width, dtype=torch.float64)
        self.outer = torch.zeros(width, width, dtype=torch.float64)

    def add(self, out: torch.Tensor) -> None:
        z = out.detach().movedim(1, -1).reshape(-1, out.shape[1]).to("cpu", torch.float64)
        self.n += z.shape[0]
        self.total += z.sum(0)
        self.outer += z.T @ z

    def basis(self) -> Basis:
        mean = self.total / self.n
        cov = self.outer / self.n - torch.outer(mean, mean)
        eigvals, eigvecs = torch.linalg.eigh((cov + cov.T) / 2)
        order = torch.argsort(eigvals, descending=True)
        return Basis(mean=mean.numpy(), components=eigvecs[:, order].numpy(),
                     explained_variance=eigvals[order].clamp_min(0).numpy())


@torch.no_grad()
def collect_bases(model: nn.Module, X: np.ndarray, batch_size: int = 256,
                  taps: dict[str, nn.Module] | None = None) -> dict[str, Basis]:
    """One streamed pass over the calibration rows; a Basis of the outputs of each tapped
    module (default: every reducible layer)."""
    if len(X) < 2:
        raise UserError(f"config key 'reduce.calibration_samples': need at least 2 calibration rows, got {len(X)}")
    taps = taps if taps is not None else reducible_layers(model)
    moments: dict[str, _Moments] = {}

    def hook(name: str):
        def add(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
            moments.setdefault(name, _Moments(out.shape[1])).add(out)
        return add

    hooks = [module.register_forward_hook(hook(name)) for name, module in taps.items()]
    try:
        model.eval()
        for start in range(0, len(X), batch_size):
            model(torch.from_numpy(X[start:start + batch_size]))
    finally:
        for h in hooks:
            h.remove()
    return {name: m.basis() for name, m in moments.items()}


def _out_width(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _smallest_k(basis: Basis, variance: float) -> int:
    cum = np.cumsum(basis.explained_variance) / max(basis.explained_variance.sum(), 1e-300)
    return int(np.searchsorted(cum, variance - 1e-12) + 1)


def _too_small(budget: BudgetConfig, used: int, teacher_params: int) -> UserError:
    return UserError(
        f"config key 'reduce.budget.{budget.kind}': {budget.value:g} is below the smallest reachable "
        f"student: {used} params ({used * BYTES_PER_PARAM / 1024:.1f} KB, ratio {teacher_params / used:.1f})")


def _max_saving_rank(fan_in: int, out: int) -> int:
    """Largest k whose factorization is strictly smaller than the dense layer (0: none)."""
    k = min(fan_in, out)
    while k > 0 and low_rank_params(fan_in, out, k) >= out * fan_in + out:
        k -= 1
    return k


def target_params(budget: BudgetConfig, teacher_params: int) -> int | None:
    if budget.kind == "size_kb":
        return int(budget.value * 1024 // BYTES_PER_PARAM)
    if budget.kind == "params":
        return int(budget.value)
    if budget.kind == "ratio":
        return int(teacher_params / budget.value)
    return None  # variance: a per-layer target, not a size


Step = tuple[Any, float, int]  # (the next size, variance it adds, parameters it costs)


def water_fill(sizes: dict[Any, Any], next_step: Callable[[Any, dict[Any, Any], int], Step | None],
               used: int, target: int) -> dict[Any, Any]:
    """Greedy allocation: repeatedly buy the one step (of any layer) with the most explained
    variance per parameter that still fits in `target`, until none does."""
    sizes = dict(sizes)
    while True:
        best: tuple[float, Any, Any, int] | None = None
        for key in sizes:
            step = next_step(key, sizes, used)
            if step is None:
                continue
            size, gain, cost = step
            if used + cost <= target and (best is None or gain / cost > best[0]):
                best = (gain / cost, key, size, cost)
        if best is None:
            return sizes
        _, key, size, cost = best
        sizes[key] = size
        used += cost


def allocate(shapes: dict[str, tuple[int, int]], bases: dict[str, Basis], budget: BudgetConfig,
             other_params: int = 0) -> list[LayerPlan]:
    """Choose a rank per layer (`shapes`: name -> (fan_in, out)) meeting the budget."""
    caps = {n: _max_saving_rank(*shapes[n]) for n in shapes}
    teacher_params = other_params + sum(out * fi + out for fi, out in shapes.values())

    def plan(name: str, rank: int | None) -> LayerPlan:
        fi, out = shapes[name]
        kept = 1.0 if rank is None else bases[name].retained(rank)
        return LayerPlan(name=name, fan_in=fi, out=out, rank=rank, variance=kept)

    if budget.kind == "variance":
        plans = []
        for name in shapes:
            k = _smallest_k(bases[name], budget.value)
            plans.append(plan(name, k if k <= caps[name] else None))
        return plans

    target = target_params(budget, teacher_params)
    ranks: dict[str, int | None] = {n: (1 if caps[n] > 0 else None) for n in shapes}
    used = other_params + sum(plan(n, r).params for n, r in ranks.items())
    if used > target:
        raise _too_small(budget, used, teacher_params)

    def next_rank(name: str, ranks: dict[str, int | None], used: int) -> Step | None:
        rank = ranks[name]
        if rank is None:
            return None  # dense already
        current, step = plan(name, rank), plan(name, rank + 1 if rank < caps[name] else None)
        return step.rank, step.variance - current.variance, step.params - current.params

    ranks = water_fill(ranks, next_rank, used, target)
    return [plan(n, r) for n, r in ranks.items()]


def allocate_widths(model: nn.Sequential, bases: dict[str, Basis], budget: BudgetConfig) -> list[LayerPlan]:
    """Units per hidden layer: the same water-filling, where one more unit of a layer costs
    its row plus its column in the consumer (so the cost depends on the neighbours' widths)."""
    chain = hidden_chain(model)
    teacher_params = width_params(model, {})

    def plan(h, width: int | None) -> LayerPlan:
        layer = model[h.index]
        kept = 1.0 if width is None else bases[h.name].retained(width)
        return LayerPlan(name=h.name, fan_in=_fan_in(layer), out=h.width, rank=width, variance=kept)

    if budget.kind == "variance":
        plans = []
        for h in chain:
            k = _smallest_k(bases[h.name], budget.value)
            plans.append(plan(h, k if k < h.width else None))
        return plans

    target = target_params(budget, teacher_params)
    widths = {h.index: 1 for h in chain}
    used = width_params(model, widths)
    if used > target:
        raise _too_small(budget, used, teacher_params)
    by_index = {h.index: h for h in chain}

    def next_width(index: int, widths: dict[int, int], used: int) -> Step | None:
        h, w = by_index[index], widths[index]
        if w >= h.width:
            return None  # every unit kept already
        basis = bases[h.name]
        return w + 1, basis.retained(w + 1) - basis.retained(w), width_params(model, widths | {index: w + 1}) - used

    widths = water_fill(widths, next_width, used, target)
    return [plan(h, widths[h.index] if widths[h.index] < h.width else None) for h in chain]


def reduce_model(teacher: nn.Module, X_calib: np.ndarray, cfg: ReduceConfig, mode: str = "low_rank") -> Reduction:
    teacher_params = sum(p.numel() for p in teacher.parameters())
    if mode == "width":
        chain = hidden_chain(teacher)
        bases = collect_bases(teacher, X_calib, cfg.batch_size, taps={h.name: teacher[h.after] for h in chain})
        plans = allocate_widths(teacher, bases, cfg.budget)
        student = width_params(teacher, {int(p.name): p.rank for p in plans if p.rank is not None})
    else:
        layers = reducible_layers(teacher)
        bases = svd_bases(teacher) if cfg.method == "svd" else collect_bases(teacher, X_calib, cfg.batch_size)
        shapes = {n: (_fan_in(m), _out_width(m)) for n, m in layers.items()}
        other = teacher_params - sum(p.numel() for m in layers.values() for p in m.parameters())
        plans = allocate(shapes, bases, cfg.budget, other)
        student = other + sum(p.params for p in plans)
    return Reduction(bases=bases, layers=plans, teacher_params=teacher_params, student_params=student,
                     budget_kind=cfg.budget.kind, budget_value=cfg.budget.value, mode=mode, method=cfg.method)


def calibration_rows(X_train: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A seeded sample of the training split (all of it when n exceeds its size)."""
    if n >= len(X_train):
        return X_train
    idx = np.random.default_rng(seed).choice(len(X_train), size=n, replace=False)
    return X_train[np.sort(idx)]


@task(name="reduce", cache_policy=STAGE_CACHE, persist_result=True)
def reduce_task(teacher: nn.Module, X_calib: np.ndarray, cfg: ReduceConfig, mode: str = "low_rank") -> Reduction:
    return reduce_model(teacher, X_calib, cfg, mode)

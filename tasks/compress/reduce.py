"""Stage 2 — reduce: PCA of the teacher's layer outputs, and a size per layer.

The PCA is streamed (tasks/compress/pca.py): memory is set by the layer widths and the batch size,
never by the number of calibration rows.

Two things can be sized, matching `reconstruct.mode`:
- low_rank: a rank per Linear/Conv, from the PCA of its (pre-activation) outputs. With
  `reduce.method: svd` the basis comes from the weights' SVD instead (data-free baseline).
- width: a number of units per coupled group of the model's graph (tasks/compress/graph.py: a
  hidden layer, a residual stream, a transformer's feed-forward units), from the PCA of
  what the group's readers read; a unit's cost is measured on the model.

Sizes are allocated across layers to meet one budget (`size_kb`, `params`, `ratio`, or
`variance`) by greedy water-filling on explained variance per parameter: each step buys
one more rank (or unit) where a parameter buys the most explained variance, while the
budget holds. A layer whose factorization would not save parameters stays dense.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from distill.tasks.compress import hidden, transformer
from distill.tasks.compress.graph import Group, ParamModel, param_model, trace
from distill.tasks.compress.memo import remembered
from distill.tasks.compress.pca import Basis, Moments, collect_bases, linear_layers  # noqa: F401 (re-exported)
from distill.tasks.compress.transformer import weight_of
from distill.tasks.compress.width import group_bases
from distill.tasks.platform.config import BudgetConfig, ReduceConfig
from distill.tasks.platform.errors import UserError, first_line

BYTES_PER_PARAM = 4  # budgets count fp32 parameters; int8 quantization later divides by ~4
# why a stream that can be narrowed stays whole: its budget favours the other groups
KEPT_BY_BUDGET = "the plan keeps more of the teacher with it whole"


@dataclass(frozen=True)
class LayerPlan:
    name: str
    fan_in: int  # in_features, or in_channels · kernel size
    out: int
    rank: int | None  # low_rank: the rank; width: the units kept. None: the layer stays as it is
    variance: float  # fraction of output variance kept
    bias: bool = True  # the dense layer has one (both factors always do)

    @property
    def dense_params(self) -> int:
        return self.out * self.fan_in + (self.out if self.bias else 0)

    @property
    def params(self) -> int:
        """Low-rank mode's cost of this layer (in width mode, cost depends on the neighbours)."""
        return (
            self.dense_params
            if self.rank is None
            else low_rank_params(self.fan_in, self.out, self.rank)
        )


@dataclass(frozen=True)
class DepthCandidate:
    """One allocation a transformer plan weighed: layers kept per depth group (the others' units
    water-filled to the budget), the student's parameters, and the share of the teacher's output
    variance the re-fitted student misses on the calibration rows (`transformer.output_error`)."""

    layers: dict[str, int]
    params: int
    error: float

    @property
    def label(self) -> str:
        return "_".join(str(k) for k in self.layers.values()) or "all"


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
    fixed: dict[str, str] = field(default_factory=dict)  # layer or group kept whole -> why
    candidates: tuple[DepthCandidate, ...] = ()  # transformers: depth against width, measured

    @property
    def ranks(self) -> dict[str, int | None]:
        return {layer.name: layer.rank for layer in self.layers}


def reduction_record(reduction: Reduction) -> tuple[dict[str, object], dict[str, float]]:
    """(params, metrics) of the reduce stage's MLflow run: the plan, layer by layer."""
    params: dict[str, object] = {
        "budget": f"{reduction.budget_kind}={reduction.budget_value:g}",
        "mode": reduction.mode,
        "method": reduction.method,
    }
    metrics = {
        "teacher_params": float(reduction.teacher_params),
        "student_params": float(reduction.student_params),
        "student_size_kb_fp32": reduction.student_params * BYTES_PER_PARAM / 1024,
        "param_ratio": reduction.teacher_params / reduction.student_params,
    }
    for layer in reduction.layers:
        kind = "rank" if reduction.mode == "low_rank" else "width"
        params[f"{kind}.{layer.name}"] = "dense" if layer.rank is None else layer.rank
        metrics[f"variance_kept.{layer.name}"] = layer.variance
    for name, why in reduction.fixed.items():
        params[f"kept_whole.{name}"] = why[:250]
    for c in reduction.candidates:
        metrics[f"layers_{c.label}.output_error"] = c.error
        metrics[f"layers_{c.label}.params"] = float(c.params)
    return params, metrics


def low_rank_params(fan_in: int, out: int, k: int) -> int:
    """Parameters of `k×fan_in (+k bias)` followed by `out×k (+out bias)`."""
    return k * fan_in + k + out * k + out


def fused_layers(model: nn.Module) -> dict[str, str]:
    """Linear layers that a fused PyTorch transformer layer reads by weight (its inference fast
    path): replacing them by two layers would break it; low-rank mode leaves them dense."""
    fused = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.MultiheadAttention)
    return {
        f"{name}.{child}" if name else child: f"read by weight inside {type(m).__name__}"
        for name, m in model.named_modules()
        if isinstance(m, fused)
        for child, sub in m.named_children()
        if isinstance(sub, nn.Linear)
    }


def svd_bases(model: nn.Module) -> dict[str, Basis]:
    """Data-free bases from each layer's weights, W = U S Vᵀ: components U, 'variance' s²,
    mean = the bias, so reconstruction gives the truncated SVD `U_k (S_k V_kᵀ x) + b`."""
    bases = {}
    fixed = fused_layers(model)
    for name, layer in linear_layers(model).items():
        if name in fixed:
            continue
        weight = weight_of(layer)
        W = weight.detach().to(torch.float64).reshape(weight.shape[0], -1)
        U, S, _ = torch.linalg.svd(W, full_matrices=True)
        s2 = torch.zeros(W.shape[0], dtype=torch.float64)
        s2[: len(S)] = S**2
        b = layer.bias
        bias = (
            b.detach().to(torch.float64)
            if isinstance(b, torch.Tensor)
            else torch.zeros(W.shape[0], dtype=torch.float64)
        )
        bases[name] = Basis(mean=bias.numpy(), components=U.numpy(), explained_variance=s2.numpy())
    return bases


def _fan_in(layer: nn.Module) -> int:
    return int(weight_of(layer)[0].numel())


def _out_width(layer: nn.Module) -> int:
    return int(weight_of(layer).shape[0])  # Linear: out_features; Conv: out_channels


def _smallest_k(basis: Basis, variance: float) -> int:
    cum = np.cumsum(basis.explained_variance) / max(basis.explained_variance.sum(), 1e-300)
    return int(np.searchsorted(cum, variance - 1e-12) + 1)


class BelowSmallest(UserError):
    """A budget below the smallest student the plan can reach (one line, as any UserError);
    `floor`: that student's parameters."""

    def __init__(self, line: str, floor: int = 0) -> None:  # one argument: pickles
        super().__init__(line)
        self.floor = floor


def _too_small(budget: BudgetConfig, used: int, teacher_params: int) -> BelowSmallest:
    return BelowSmallest(
        f"config key 'reduce.budget.{budget.kind}': {budget.value:g} is below the smallest "
        f"reachable student: {used} params ({used * BYTES_PER_PARAM / 1024:.1f} KB, ratio "
        f"{teacher_params / used:.1f})",
        used,
    )


def _max_saving_rank(dense: LayerPlan) -> int:
    """Largest k whose factorization is strictly smaller than the dense layer (0: none)."""
    k = min(dense.fan_in, dense.out)
    while k > 0 and low_rank_params(dense.fan_in, dense.out, k) >= dense.dense_params:
        k -= 1
    return k


def target_params(budget: BudgetConfig, teacher_params: int) -> int:
    """The parameter count a size budget allows (a variance budget is per layer: no count)."""
    if budget.kind == "size_kb":
        return int(budget.value * 1024 // BYTES_PER_PARAM)
    if budget.kind == "params":
        return int(budget.value)
    if budget.kind == "ratio":
        return int(teacher_params / budget.value)
    raise ValueError(f"a {budget.kind} budget sets no parameter count")


Step = tuple[Any, float, int]  # (the next size, variance it adds, parameters it costs)


def water_fill(
    sizes: dict[Any, Any],
    next_step: Callable[[Any, dict[Any, Any], int], Step | None],
    used: int,
    target: int,
) -> dict[Any, Any]:
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


def allocate(
    shapes: dict[str, tuple[int, int]],
    bases: dict[str, Basis],
    budget: BudgetConfig,
    other_params: int = 0,
    no_bias: set[str] | None = None,
) -> list[LayerPlan]:
    """Choose a rank per layer (`shapes`: name -> (fan_in, out)) meeting the budget."""
    no_bias = no_bias or set()

    def plan(name: str, rank: int | None) -> LayerPlan:
        fi, out = shapes[name]
        kept = 1.0 if rank is None else bases[name].retained(rank)
        return LayerPlan(
            name=name, fan_in=fi, out=out, rank=rank, variance=kept, bias=name not in no_bias
        )

    caps = {n: _max_saving_rank(plan(n, None)) for n in shapes}
    teacher_params = other_params + sum(plan(n, None).dense_params for n in shapes)

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


def allocate_widths(
    groups: list[Group] | list[transformer.TGroup],
    bases: dict[str, Basis],
    cost: ParamModel | transformer.Cost | hidden.HiddenCost,
    budget: BudgetConfig,
) -> list[LayerPlan]:
    """Units per coupled group: the same water-filling, where one more unit (one per head,
    for attention) costs what it adds to the real model's parameters (`cost`, measured on the
    model: a channel of a residual stream costs a row or column in every layer it touches)."""
    steps = {g.name: g.step for g in groups}

    def plan(g: Group | transformer.TGroup, width: int | None) -> LayerPlan:
        kept = 1.0 if width is None else bases[g.name].retained(width)
        return LayerPlan(name=g.name, fan_in=0, out=g.width, rank=width, variance=kept)

    if budget.kind == "variance":
        plans = []
        for g in groups:
            k = -(-_smallest_k(bases[g.name], budget.value) // g.step) * g.step
            plans.append(plan(g, k if k < g.width else None))
        return plans

    teacher_params = cost.params()
    target = target_params(budget, teacher_params)
    widths = dict(steps)  # the smallest model: one unit per head
    used = cost.params(widths)
    if used > target:
        raise _too_small(budget, used, teacher_params)
    by_name = {g.name: g for g in groups}

    def next_width(name: str, widths: dict[str, int], used: int) -> Step | None:
        g, w = by_name[name], widths[name]
        if w >= g.width:
            return None  # every unit kept already
        basis, wider = bases[name], w + g.step
        return (
            wider,
            basis.retained(wider) - basis.retained(w),
            cost.params(widths | {name: wider}) - used,
        )

    widths = water_fill(widths, next_width, used, target)
    return [plan(g, widths[g.name] if widths[g.name] < g.width else None) for g in groups]


@dataclass
class Plan:
    """What a planner decides: the bases it measured, a plan per layer or group, the student's
    parameter count, and what stays whole (name -> why)."""

    bases: dict[str, Basis]
    layers: list[LayerPlan]
    student_params: int
    fixed: dict[str, str]
    candidates: tuple[DepthCandidate, ...] = ()


def plan_width(teacher: nn.Module, X_calib: np.ndarray, cfg: ReduceConfig) -> Plan:
    """Units per coupled group of the model's graph, from the PCA of what each group writes;
    for a model of transformer blocks, heads, feed-forward units and layers per stack
    (tasks/compress/transformer.py)."""
    if transformer.holds_blocks(teacher):
        return plan_transformer(teacher, X_calib, cfg)
    example = torch.from_numpy(X_calib[:2])
    graph = trace(teacher, example)
    groups = graph.reducible()
    if not groups:
        raise UserError(
            "reconstruct.mode=width found no group of units to narrow in this teacher: "
            + "; ".join(f"{g.name}: {g.why_not}" for g in graph.groups)
        )
    fixed = {g.name: g.why_not for g in graph.groups if not g.reducible}
    bases = group_bases(teacher, groups, X_calib, cfg.batch_size)
    cost = param_model(teacher, example, groups)
    plans = allocate_widths(groups, bases, cost, cfg.budget)
    student = cost.params({p.name: p.rank for p in plans if p.rank is not None})
    return Plan(bases, plans, student, fixed)


def plan_transformer(teacher: nn.Module, X_calib: np.ndarray, cfg: ReduceConfig) -> Plan:
    """Heads, feed-forward units and layers of the transformer blocks: each group's energy kept
    by its best k units (`transformer.group_bases`), its cost exact (`transformer.cost_model`:
    everything outside the blocks, the embedding table first, is counted and stays). For a size
    budget, depth is weighed against width by measurement (`plan_depth`)."""
    found = transformer.find(teacher)
    every = transformer.transformer_groups(teacher, X_calib, cfg.batch_size, found)
    groups = [g for g in every if g.reducible]
    fixed = {path: why for path, _cls, why in found.refused}
    fixed |= {g.name: g.why_not for g in every if not g.reducible}
    if not groups:
        raise UserError(
            "reconstruct.mode=width found no group of units to narrow in this teacher: "
            + "; ".join(f"{name}: {why}" for name, why in fixed.items())
        )
    bases = transformer.group_bases(teacher, groups, X_calib, cfg.batch_size)
    cost = transformer.cost_model(teacher, groups, found)
    try:
        if cfg.budget.kind != "variance" and any(g.kind == "depth" for g in groups):
            plans, candidates = plan_depth(teacher, X_calib, groups, bases, cost, cfg)
        else:
            plans, candidates = allocate_widths(groups, bases, cost, cfg.budget), ()
    except UserError as err:  # below what heads, units and layers reach: the stream may
        return plan_hidden(teacher, X_calib, cfg, groups, Plan(bases, [], 0, fixed), err)
    student = cost.params({p.name: p.rank for p in plans if p.rank is not None})
    return plan_hidden(
        teacher, X_calib, cfg, groups, Plan(bases, plans, student, fixed, candidates)
    )


# the re-fit of the plan's trial students: the least-squares optimum (what each shape can
# express), not the stage's `reconstruct.ridge`, which trades some of it for a better KD start
TRIAL_RIDGE = 1e-4
# calibration rows the trial students are built and measured on (the calibration sample is
# random already): on the benchmark's BERT all 1,024 made the reduce stage 3-5x slower
TRIAL_ROWS = 256


def plan_depth(
    teacher: nn.Module,
    X_calib: np.ndarray,
    groups: list[transformer.TGroup],
    bases: dict[str, Basis],
    cost: transformer.Cost,
    cfg: ReduceConfig,
) -> tuple[list[LayerPlan], tuple[DepthCandidate, ...]]:
    """Layers against heads and feed-forward units, for a size budget: one candidate per number
    of layers kept (`transformer.depth_candidates`: all, one fewer, ... down to a pure depth cut),
    the other groups water-filled to the budget with those layers; each built as the reconstruct
    stage builds it (`transformer.narrow`: least contributing layers dropped, the layer before a
    dropped run absorbing it, every reader re-fitted) and measured by the share of the teacher's
    output variance it misses on the calibration rows (the first `TRIAL_ROWS`). The smallest
    error wins; on a tie, the most layers."""
    depth = [g for g in groups if g.kind == "depth"]
    width = [g for g in groups if g.kind != "depth"]
    target = target_params(cfg.budget, cost.params())
    budget = BudgetConfig(params=target)
    rows = X_calib[:TRIAL_ROWS]
    reference = transformer.outputs(teacher, rows, cfg.batch_size)
    fixed = transformer.teacher_taps(teacher, rows, cfg.batch_size)  # one pass for all trials
    tried: list[tuple[DepthCandidate, list[LayerPlan]]] = []
    too_small: UserError | None = None
    for kept in transformer.depth_candidates(depth, lambda k: cost.params(k) <= target):
        with_layers = replace(cost, widths=cost.widths | kept)
        try:
            plans = allocate_widths(width, bases, with_layers, budget)
        except UserError as err:  # even one unit per group is over the budget with these layers
            too_small = err
            continue
        plans += [
            LayerPlan(
                name=g.name,
                fan_in=0,
                out=g.width,
                rank=kept[g.name] if kept[g.name] < g.width else None,
                variance=bases[g.name].retained(kept[g.name]),
            )
            for g in depth
        ]
        widths = {p.name: p.rank for p in plans if p.rank is not None}
        student = transformer.narrow(
            copy.deepcopy(teacher).eval(),
            teacher,
            widths,
            rows,
            ridge=TRIAL_RIDGE,
            batch_size=cfg.batch_size,
            fixed=fixed,
        )
        error = transformer.output_error(student, reference, rows, cfg.batch_size)
        tried.append((DepthCandidate(kept, cost.params(widths), error), plans))
    if not tried:
        assert too_small is not None
        raise too_small
    best = min(tried, key=lambda t: t[0].error)
    order = {g.name: i for i, g in enumerate(groups)}
    plans = sorted(best[1], key=lambda p: order[p.name])
    return plans, (best[0], *(c for c, _ in tried if c is not best[0]))


def _retained(plans: list[LayerPlan]) -> float:
    return sum(p.variance for p in plans)


def plan_hidden(
    teacher: nn.Module,
    X_calib: np.ndarray,
    cfg: ReduceConfig,
    groups: list,
    plan: Plan,
    too_small: UserError | None = None,
) -> Plan:
    """`plan` (heads, FFN, depth), or the same water-filling with the hidden size
    (tasks/compress/hidden.py) as one more group when the model's residual stream can be
    narrowed and that plan keeps more: more summed retained variance within the size budget
    (the hidden group counted whole, 1.0, in `plan`), fewer parameters for a variance budget.
    A tied head that a cut unties (GPT-2: vocab x k more) is in the cost, so a plan where
    untying costs more than the cut saves keeps the stream whole, and `fixed` says why.
    `too_small`: the budget is below what `plan` could reach; raised unless the stream can."""
    try:
        group = hidden.hidden_group(teacher, X_calib)
        stream = hidden.find_stream(teacher, X_calib)
    except Exception as err:  # noqa: BLE001 -- a block layout the stream finder cannot follow
        if too_small is not None:
            raise too_small from None
        line = f"hidden size: {type(err).__name__}: {first_line(err)}"
        return replace(plan, fixed=plan.fixed | {hidden.NAME: line})
    if isinstance(stream, str) or group.why_not or stream.width < 4:
        if too_small is not None:
            raise too_small
        narrow = "hidden size: narrower than 4"
        why = group.why_not or (stream if isinstance(stream, str) else narrow)
        return replace(plan, fixed=plan.fixed | {group.name: why})
    group = replace(group, step=hidden.plan_step(group.width))
    basis = hidden.stream_basis(teacher, stream, X_calib, cfg.batch_size)
    bases = plan.bases | {group.name: hidden.plan_basis(basis)}
    cost = hidden.cost_model(teacher, groups, stream)
    try:
        plans = allocate_widths([*groups, group], bases, cost, cfg.budget)
    except UserError as err:  # the stream's smallest student is larger (a head untied): keep `plan`
        plans = []
        if (
            isinstance(err, BelowSmallest)
            and isinstance(too_small, BelowSmallest)
            and err.floor < too_small.floor
        ):
            too_small = err  # the line names the floor with the stream cut too
    student = cost.params({p.name: p.rank for p in plans if p.rank is not None})
    cut = any(p.name == group.name and p.rank is not None for p in plans)
    if too_small is not None:
        if not cut:
            raise too_small
        return Plan(bases, plans, student, plan.fixed)
    if cfg.budget.kind == "variance":
        better = cut and student < plan.student_params
    else:
        better = cut and _retained(plans) > _retained(plan.layers) + 1.0
    if better:
        return Plan(bases, plans, student, plan.fixed)
    why = KEPT_BY_BUDGET
    if stream.tied:
        why += " (a cut unties the tied head: vocab x k more parameters)"
    return replace(plan, fixed=plan.fixed | {group.name: why})


# `reduce.method` -> the bases of each Linear/Conv layer's outputs (low_rank mode)
BASES: dict[str, Callable[[nn.Module, np.ndarray, ReduceConfig, dict], dict[str, Basis]]] = {
    "pca": lambda teacher, X, cfg, taps: collect_bases(teacher, X, cfg.batch_size, taps),
    "svd": lambda teacher, X, cfg, taps: svd_bases(teacher),
}


def plan_low_rank(teacher: nn.Module, X_calib: np.ndarray, cfg: ReduceConfig) -> Plan:
    """A rank per Linear/Conv layer (two thin layers replace one), from `reduce.method`'s bases."""
    teacher_params = sum(p.numel() for p in teacher.parameters())
    fixed = fused_layers(teacher)
    taps = {n: m for n, m in linear_layers(teacher).items() if n not in fixed}
    bases = BASES[cfg.method](teacher, X_calib, cfg, taps)
    fixed |= {
        n: "its forward never runs (the weight is used directly)" for n in taps if n not in bases
    }
    layers = {n: m for n, m in taps.items() if n in bases}
    shapes = {n: (_fan_in(m), _out_width(m)) for n, m in layers.items()}
    other = teacher_params - sum(p.numel() for m in layers.values() for p in m.parameters())
    no_bias = {n for n, m in layers.items() if m.bias is None}
    plans = allocate(shapes, bases, cfg.budget, other, no_bias)
    return Plan(bases, plans, other + sum(p.params for p in plans), fixed)


# `reconstruct.mode` -> how the reduction is planned (a test keeps the config's choices equal)
PLANNERS: dict[str, Callable[[nn.Module, np.ndarray, ReduceConfig], Plan]] = {
    "width": plan_width,
    "low_rank": plan_low_rank,
}


def reduce_model(
    teacher: nn.Module, X_calib: np.ndarray, cfg: ReduceConfig, mode: str = "low_rank"
) -> Reduction:
    """The reduce stage's plan for `teacher` on the calibration rows. The same teacher, rows,
    config and mode again answer from memory (memo.py; the answer is shared: its arrays are
    read-only): a size target's plan measures the reconstruction at the budget the reduce stage
    then builds (`plan.shaped`), and a transformer's plan builds and measures a trial student per
    number of layers (the targets grid's BERT: 10 s a plan)."""
    return _reduced(teacher, X_calib, cfg, mode)


@remembered(keep=4)
def _reduced(teacher: nn.Module, X_calib: np.ndarray, cfg: ReduceConfig, mode: str) -> Reduction:
    plan = PLANNERS[mode](teacher, X_calib, cfg)
    return Reduction(
        bases=plan.bases,
        layers=plan.layers,
        teacher_params=sum(p.numel() for p in teacher.parameters()),
        student_params=plan.student_params,
        budget_kind=cfg.budget.kind,
        budget_value=cfg.budget.value,
        mode=mode,
        method=cfg.method,
        fixed=plan.fixed,
        candidates=plan.candidates,
    )


def calibration_rows(X_train: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A seeded sample of the training split (all of it when n exceeds its size)."""
    if n >= len(X_train):
        return X_train if isinstance(X_train, np.ndarray) else X_train[:]  # rows on disk: read
    idx = np.random.default_rng(seed).choice(len(X_train), size=n, replace=False)
    return X_train[np.sort(idx)]

"""A target's plan: what a narrower model costs when served, and the student that meets the
target in one shot.

- **Costs** (`measure_costs`): the file the registry would get and its batch-1 latency (the
  median of `LATENCY_TRIES` p50s) in the runtime that serves it, fp32 and int8, measured on
  narrowed copies of the teacher (every group at its smallest width, and at half width; a
  latency target's at full width too): a line in the parameter count, fixed bytes (the graph:
  ONNX Runtime's static int8 adds quantize/dequantize nodes worth tens of KB) plus measured
  bytes per parameter.
- **Plan** (`plan_target`): the format and the largest student whose served model meets the
  target (the largest: the least accuracy lost), reached in one shot by the reduce stage (PCA
  width selection with a least-squares re-fit beats magnitude pruning to the same widths:
  README, architectures). A size or latency below the smallest reachable model (by the measured
  costs) gets the drop-only search from the smallest reduction whose reconstruction keeps the
  guard (`smallest_start`): the smallest file within the drop, met where it is within the limit
  (smallest.py); a parameter count below it, guarded pruning rounds (target.py).
- **Shapes** (`shaped`): a reachable size plan's budget, corrected by measuring the reduce and
  reconstruct stages' student before any KD (the line is fitted on evenly narrowed
  copies; the reduce stage narrows unevenly).

`plan_for_target` is the pipeline's plan stage: costs measured, plan made and measured, its start
searched.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import cast

import numpy as np
import torch
from torch import nn

from distill.tasks.compress import hidden, transformer, vocab
from distill.tasks.compress.data import Dataset
from distill.tasks.compress.evaluate import (
    OnnxModel,
    TorchScriptModel,
    latency_percentiles_ms,
    saved_size,
    torch_predictor,
)
from distill.tasks.compress.graph import keep_units, param_model, trace
from distill.tasks.compress.guard import Guard, max_drop_of
from distill.tasks.compress.quantize import (
    Quantized,
    agreeing_int8,
    agreement,
    exported_and_int8,
    quantize_model,
    scale_rows,
)
from distill.tasks.compress.recipe import recipe_for
from distill.tasks.compress.reconstruct import reconstruct
from distill.tasks.compress.reduce import calibration_rows, reduce_model
from distill.tasks.platform.config import (
    SMALLEST,
    BudgetConfig,
    QuantizeConfig,
    ReconstructConfig,
    ReduceConfig,
    TargetConfig,
)
from distill.tasks.platform.progress import note

BYTES_MARGIN = 0.01  # a size plan aims this much under the limit (the line is fitted, not exact)
LATENCY_MARGIN = 0.05  # a latency re-plan aims this much under the limit (the load moves it)
LATENCY_TRIES = 3  # a latency is the median of this many p50s (each of `latency_repeats` calls)
SHAPE_TRIES = 3  # reconstructions measured before the planned build's KD (`shaped`)
WIDEN_MAX_SHARE = 0.5  # a widened first student's most, of the params students are cut from
MIN_CUT = 0.05  # a search's build that would remove less of the parameters is not worth making
SHOWN = 0.99  # int8 is left out of a plan where the teacher's int8 is below the rule at this level


# --- what a narrower model costs when served ------------------------------------------------


@dataclass(frozen=True)
class Costs:
    """Served file bytes and batch-1 latency of one format at measured parameter counts."""

    params: tuple[int, ...]
    file_bytes: tuple[int, ...]
    latency_ms: tuple[float, ...]
    served_as: str  # "onnxruntime int8", "onnxruntime fp32", "torch int8", "torch fp32"

    def line(self, what: str) -> tuple[float, float]:
        """(fixed, per parameter) of the least-squares line through the bytes or the latency."""
        ys = self.file_bytes if what == "bytes" else self.latency_ms
        slope, fixed = np.polyfit(np.asarray(self.params, float), np.asarray(ys, float), 1)
        return float(fixed), float(slope)

    def params_within(self, what: str, limit: float) -> float:
        """Largest parameter count whose predicted bytes (or latency) stay within `limit`; for a
        latency, at least the largest copy measured within it. Latency is no line (the runtime's
        cost per call, the load): the least-squares line through a half-width copy measured slow
        passes above the smallest copy, and would call a limit that copy meets unreachable (the
        targets grid's CNN1d: its 0.0176 ms limit, measured between its smallest copy's latency
        and its teacher's, was found below its smallest model by the plan's costs a minute
        later, and the run searched)."""
        fixed, slope = self.line(what)
        if slope <= 0:  # latency flat in the size here: any size fits if the smallest does
            fits = math.inf if fixed <= limit else -math.inf
        else:
            fits = (limit - fixed) / slope
        if what != "latency":
            return fits
        pairs = zip(self.params, self.latency_ms, strict=True)
        return max([fits, *(float(n) for n, ms in pairs if ms <= limit)])


def narrowed(model: nn.Module, example: torch.Tensor, fraction: float) -> nn.Module:
    """A copy with every reducible group cut to `fraction` of its units (at least one per head):
    only the shapes matter here (file size and latency), not which units stay."""
    if transformer.holds_blocks(model):  # heads, units, layers, then the residual stream
        return hidden.narrowed_hidden(
            transformer.narrowed(model, fraction), example.numpy(), fraction
        )
    out = copy.deepcopy(model)
    for name in [g.name for g in trace(out, example).reducible()]:
        graph = trace(out, example)
        group = graph.group(name)
        per_head = max(1, int(fraction * group.width) // group.step)
        if per_head * group.step < group.width:
            block = group.width // group.step
            keep_units(graph, group, [j for j in range(group.width) if j % block < per_head])
    return out.eval()


def narrowed_to(model: nn.Module, example: torch.Tensor, params: int, steps: int = 8) -> nn.Module:
    """A narrowed copy (`narrowed`) of about `params` parameters: the fraction of the widths
    found by bisection (the largest copy found at or under it; the smallest copy where none is)."""
    low, high = 0.0, 1.0
    best = narrowed(model, example, low)
    for _ in range(steps):
        middle = (low + high) / 2
        copy_ = narrowed(model, example, middle)
        if sum(p.numel() for p in copy_.parameters()) <= params:
            low, best = middle, copy_
        else:
            high = middle
    return best


def int8_ships_at(
    teacher: nn.Module, X: np.ndarray, cfg: QuantizeConfig, seed: int, params: int
) -> str:
    """Why int8 would not ship at `params` parameters ('' where it would): the quantize stage's
    rule measured on a narrowed copy of that size. The costs' copies (the smallest, half width)
    bracket it, and a CNN's static int8 can ship at one and be several times slower at the
    other (the targets grid's CNN1d 32-64: at 18,024 params int8 as fast as fp32 at batch 256,
    at 3,674 params 5x slower), where the plan would count on int8 for a size it does not serve."""
    example = torch.from_numpy(X[:2])
    copy_ = narrowed_to(teacher, example, params)
    q = quantize_model(copy_, X[:64], X, cfg, seed)
    if q.int8_model is not None:
        return ""
    built = sum(p.numel() for p in copy_.parameters())
    return f"at {built:,} params {q.why}"


def steady_latency_ms(served: OnnxModel | TorchScriptModel, X: np.ndarray, repeats: int) -> float:
    """Batch-1 latency as a target measures it: the median of `LATENCY_TRIES` p50s of `repeats`
    calls each, so that one disturbed p50 does not decide. A drift of the machine's speed over
    seconds it does not take out: on this 2-core machine the 90th percentile of repeated
    measurements of one model is 1.47x the 10th, however many calls each takes
    (docs/benchmarks.md, "How steady a batch-1 latency is here")."""
    predict = served.predictor()
    return float(
        np.median([latency_percentiles_ms(predict, X, 1, repeats)[0] for _ in range(LATENCY_TRIES)])
    )


def measure_costs(
    teacher: nn.Module,
    X: np.ndarray,
    cfg: QuantizeConfig,
    seed: int,
    latency_repeats: int = 50,
    fractions: tuple[float, ...] = (0.0, 0.5),
) -> dict[str, Costs]:
    """{"fp32": ..., "int8": ...} (int8 only when compress.quantize.enabled, and only where the
    teacher's own int8 answers as its fp32 export on `min_agreement` of the rows: `int8_breaks`)."""
    example = torch.from_numpy(X[:2])
    points: dict[str, list[tuple[int, int, float]]] = {"fp32": [], "int8": []}
    made = {}
    for fraction in fractions:
        q = quantize_model(narrowed(teacher, example, fraction), X[:64], X, cfg, seed)
        made[fraction] = q
        # int8 as made, shipped or not: whether it ships is decided on the final model
        for fmt, served in (("fp32", q.float_model), ("int8", q.int8_candidate)):
            if served is not None:
                ms = steady_latency_ms(served, X, latency_repeats)
                points[fmt].append((served.params, len(served.file_bytes), ms))
    if points["int8"]:
        why_not = unplanned_int8(teacher, X, cfg, seed, made)
        if why_not:
            note(f"the plan serves fp32: {why_not}")
            del points["int8"]
    return {
        fmt: Costs(
            tuple(int(x[0]) for x in sorted(p)),
            tuple(int(x[1]) for x in sorted(p)),
            tuple(float(x[2]) for x in sorted(p)),
            f"{cfg.runtime} {fmt}",
        )
        for fmt, p in points.items()
        if p
    }


def unplanned_int8(
    teacher: nn.Module, X: np.ndarray, cfg: QuantizeConfig, seed: int, made: dict[float, Quantized]
) -> str:
    """Why the plan should not count on int8 ('' where it should): `compress.quantize.format:
    fp32`; or int8 would not ship by the quantize stage's measured rule (smaller and no slower at
    `compress.quantize.batch`) on any of the narrowed copies the costs measured (`made`, by
    fraction of the widths): a CNN's static int8 is often slower; or the teacher's own int8
    answers otherwise than its fp32 export (`int8_breaks`). A pinned `format: int8` ships int8
    whatever the latency says, so only the last applies to it."""
    if cfg.format == "fp32":
        return "compress.quantize.format=fp32"
    if cfg.format == "measured":
        choices = [q.choice for q in made.values() if q.choice is not None]
        if choices and not any(c.int8_ships for c in choices):
            kind = "static" if cfg.runtime == "onnxruntime" else "dynamic"
            return "int8 would ship on none of the narrowed copies measured (smaller and no " + (
                "slower): " + "; ".join(c.measured(kind) for c in choices)
            )
    return int8_breaks(teacher, X, cfg, seed, made.get(1.0))


def int8_breaks(
    teacher: nn.Module, X: np.ndarray, cfg: QuantizeConfig, seed: int, full: Quantized | None = None
) -> str:
    """Why int8 is not worth planning for: the teacher's own int8 export answers as its fp32
    export on less than `compress.quantize.min_agreement` of up to 1,024 training rows, shown
    at `SHOWN` (the rows and the rule of the quantize stage, which would refuse it for the
    student too: a BERT's static int8 answered one class for every row), and that no per-layer
    fallback restores (`agreeing_int8`). '' where it agrees, or for a regression output.
    `full`: the teacher's quantization where the costs already made it (a latency target's);
    else it is made here, and not measured (the latency `ship` measures costs more than this
    check)."""
    if cfg.min_agreement <= 0 or not cfg.enabled:
        return ""
    if full is None:
        full = exported_and_int8(copy.deepcopy(teacher).eval(), X[:64], X, cfg, seed)
    int8 = full.int8_candidate or full.int8_model
    if int8 is None:
        return ""
    rows = calibration_rows(X, 1024, seed + 1)
    agreed = agreement(full.float_model, int8, rows)
    if agreed is None or agreed >= cfg.min_agreement:
        return ""
    # the teacher stands in for students it is not: only a share the rows show below the rule
    # counts (its upper bound at SHOWN: the ResNet1d of the targets grid agreed on 94.9 % of
    # 512 rows; its students' all-int8 on 92.6-93.4 %, 99 % with the head in fp32; a BERT's
    # 14.5 %)
    from scipy.stats import beta

    same = round(agreed * len(rows))
    if beta.ppf(SHOWN, same + 1, len(rows) - same) >= cfg.min_agreement:
        return ""
    # the quantize stage leaves the layers that cost the agreement in fp32 where that restores it
    fp32 = full.float_model
    if full.method == "static" and isinstance(fp32, OnnxModel):
        calibration = scale_rows(X, seed)
        if agreeing_int8(fp32, rows, cfg.min_agreement, calibration) is not None:
            return ""
    return (
        f"the teacher's int8 answers as its fp32 export on only {100 * agreed:.1f} % of "
        f"{len(rows):,} training rows (compress.quantize.min_agreement {cfg.min_agreement:g}), "
        "nor with the layers that cost it most left in fp32"
    )


# --- the plan -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A reconstruction measured before any KD (`shaped`): the reduce budget, the parameters it
    built, the format its export was measured in and what that measured, in the plan's unit."""

    budget: int
    params: int
    fmt: str
    measured: float


@dataclass(frozen=True)
class Plan:
    kind: str  # size_kb | ratio | params | latency_ms_b1 | smallest (drop-only)
    value: float  # as the user gave it (smallest: the drop)
    limit: float  # what the served model is held to: bytes (size_kb, ratio), params, or ms;
    # smallest: 0 bytes (never reached: the search goes as small as the guard allows)
    fmt: str  # fp32 | int8: what is served
    teacher_params: int
    smallest_params: int  # every group at one unit (per head)
    final_params: int  # the largest model the costs say meets the limit (clamped to reachable)
    reduce_params: int  # the reduce stage's budget
    reachable: bool
    why: str
    # an unreachable plan's start (`smallest_start`), where the reduce stage builds a smaller first
    # candidate (`first_probe`): the search keeps it undistilled as its fallback; 0: the start is
    # what the reduce stage builds
    start_params: int = 0
    # the reconstructions measured before the planned build's KD (`shaped`), in order
    shapes: tuple[Shape, ...] = ()
    # the first student's budget over the one planned (`widened`): distilled wide, pruned to
    # the limit; 1: built at the size planned
    widen: float = 1.0

    @property
    def unit(self) -> str:
        units = {"size_kb": "bytes", "ratio": "bytes", "params": "params", SMALLEST: "bytes"}
        return units.get(self.kind, "ms")

    @property
    def searched(self) -> bool:
        """Whether the drop-only search (smallest.py) builds this plan's students: a drop-only
        target, or a file size or latency below the smallest reachable model (its smallest file
        within the drop comes closest; a parameter count below it is pruned toward instead)."""
        return self.kind == SMALLEST or (not self.reachable and self.unit != "params")


def plan_target(
    target: TargetConfig,
    costs: dict[str, Costs],
    teacher_params: int,
    smallest_params: int,
    teacher_file_bytes: int,
) -> Plan:
    """The format and parameter count that meet the target with the most parameters (a tie goes
    to fp32, which loses nothing); `reduce_params` is set later for an unreachable target. A
    drop-only target (`smallest`) is planned as unreachable: the search starts from the smallest
    reduction that keeps the guard, in int8 where it is enabled (it ships where it measures so)."""
    kind, value = target.kind, target.value
    if kind == SMALLEST:
        fmt = "int8" if "int8" in costs else "fp32"
        why = f"the smallest served file within a drop of {value:g}"
        return Plan(
            kind,
            value,
            0.0,
            fmt,
            teacher_params,
            smallest_params,
            smallest_params,
            smallest_params,
            False,
            why,
        )
    limit = {"size_kb": value * 1024, "ratio": teacher_file_bytes / value}.get(kind, value)
    fits, notes = {}, []
    for fmt, c in costs.items():
        if kind in ("size_kb", "ratio"):
            fits[fmt] = c.params_within("bytes", limit * (1 - BYTES_MARGIN))
            fixed, slope = c.line("bytes")
            notes.append(f"{c.served_as} file {fixed:,.0f} B + {slope:.3f} B/param")
        elif kind == "latency_ms_b1":
            fits[fmt] = c.params_within("latency", limit)
            notes.append(
                f"{c.served_as} {c.latency_ms[0]:.4f} ms at {c.params[0]:,} params, "
                f"{c.latency_ms[-1]:.4f} ms at {c.params[-1]:,}"
            )
        else:
            fits[fmt] = value
    fmt = max(fits, key=lambda f: (min(fits[f], teacher_params), f == "fp32"))
    final = int(min(teacher_params, fits[fmt])) if fits[fmt] > -math.inf else 0
    reachable = final >= smallest_params
    measured = f" (measured: {'; '.join(notes)})" if notes else ""
    if reachable:
        why = (
            f"{kind}={value:g}: {costs[fmt].served_as} with at most {final:,} params{measured}; "
            "reduced to it in one shot"
        )
    else:  # as small as it goes: the search of a drop-only target (smallest.py), int8 tried
        final = smallest_params  # on every candidate where enabled (it ships where smaller)
        if kind in ("size_kb", "ratio") and "int8" in costs:
            fmt = "int8"
        why = (
            f"{kind}={value:g} is below the smallest reachable model "
            f"({smallest_params:,} params){measured}"
        )
    return Plan(
        kind,
        value,
        float(limit),
        fmt,
        teacher_params,
        smallest_params,
        final,
        final,
        reachable,
        why,
    )


def smallest_params(teacher: nn.Module, example: torch.Tensor) -> int:
    """The parameters of the smallest student the width plan can build: every group at its
    smallest step; a transformer at one layer per stack, one head and unit per layer, and its
    residual stream at 2 features where it can be narrowed (and that is smaller: a tied head
    that the cut unties adds vocab x 2)."""
    if transformer.holds_blocks(teacher):
        X = example.numpy()
        tgroups = cast("list[transformer.TGroup]", transformer.reducible_groups(teacher, X))
        ones = {g.name: 1 for g in tgroups}
        floor = transformer.cost_model(teacher, tgroups).params(ones)
        stream = hidden.cuttable(teacher, X)
        if stream is not None:
            cost = hidden.cost_model(teacher, tgroups, stream)
            floor = min(floor, cost.params(ones | {hidden.NAME: 2}))
        return floor
    groups = trace(copy.deepcopy(teacher), example).reducible()
    return param_model(teacher, example, groups).params({g.name: g.step for g in groups})


def smallest_start(
    teacher: nn.Module,
    X_calib: np.ndarray,
    reduce: ReduceConfig,
    recon: ReconstructConfig,
    guard: Guard,
    plan: Plan,
) -> tuple[int, str]:
    """For an unreachable target: the smallest reduce budget on a doubling grid up from 4x the
    smallest model whose reconstruction keeps the guard before any fine-tuning (the teacher's
    size if none does), and what was tried. Found by bisection on the grid, taking a budget
    above one that keeps the guard to keep it too (the drops measured fall with the budget: on
    the targets grid's ResNet1d-32, 0.58, 0.48, 0.26, 0.24, 0.13, 0.09, 0.08, -0.01 from 176 to
    22,528 params): 4 reconstructions there instead of 8."""
    grid, budget = [], min(plan.teacher_params, 4 * plan.smallest_params)
    while budget < plan.teacher_params:
        grid.append(budget)
        budget *= 2
    tried: dict[int, str] = {}

    def keeps(budget: int) -> bool:
        cfg = reduce.model_copy(update={"budget": BudgetConfig(params=budget)})
        reduction = reduce_model(teacher, X_calib, cfg, "width")
        student = reconstruct(teacher, reduction, X_calib, recon)
        check = guard.check("search", torch_predictor(student), reduction.student_params)
        tried[budget] = f"{budget:,}: drop {check.drop:.4f}"
        return check.ok

    fails, keeps_at = -1, len(grid)  # grid[len(grid)]: the teacher's size, taken as keeping it
    while keeps_at - fails > 1:
        mid = (fails + keeps_at) // 2
        if keeps(grid[mid]):
            keeps_at = mid
        else:
            fails = mid
    found = grid[keeps_at] if keeps_at < len(grid) else plan.teacher_params
    return found, "; ".join(tried[b] for b in sorted(tried))


def first_probe(start: int, smallest: int) -> int:
    """The budget a drop-only search distils first: the geometric middle between its start (the
    smallest reduction whose reconstruction keeps the guard) and the smallest reachable model, as
    the search's bisection would aim its first rebuild (smallest.py); `start` itself where that is
    within `MIN_CUT` of it. The start is the largest candidate and its KD the costliest (the targets
    grid's ResNet1d-32: 22,388 params, 27 s of a 116 s search), and the search rarely ships it."""
    probe = int(math.sqrt(start * smallest))
    return start if probe > start * (1 - MIN_CUT) else probe


def aim(plan: Plan) -> float:
    """What a measured correction aims the served model at, in the plan's unit: under the limit
    by `BYTES_MARGIN` (bytes) or `LATENCY_MARGIN` (the load moves a latency)."""
    margin = {"bytes": BYTES_MARGIN, "params": 0.0}.get(plan.unit, LATENCY_MARGIN)
    return plan.limit * (1 - margin)


def achieved(
    plan: Plan, served: OnnxModel | TorchScriptModel, X: np.ndarray, repeats: int
) -> float:
    """What `served` measures in the plan's unit: its file's bytes, its parameters, or its
    batch-1 latency (the median of `LATENCY_TRIES` p50s: one p50 moves with the machine's load)."""
    if plan.unit == "bytes":
        return float(saved_size(served)[0])  # the file on disk
    if plan.unit == "params":
        return float(served.params)
    return steady_latency_ms(served, X, repeats)


def measured_line(
    plan: Plan, costs: dict[str, Costs], points: list[tuple[int, float]], fmt: str
) -> tuple[float, float]:
    """(fixed, per parameter) of what a served model measures in `fmt`, from the models measured
    so far in it (`points`: parameters and measurement, in order): the secant through the last
    two where its slope is positive (two noisy latencies can say a larger model is faster), else
    the costs' slope through the last one, else the costs' line."""
    if plan.unit == "params":
        return 0.0, 1.0
    fixed, slope = costs.get(fmt, costs[plan.fmt]).line(
        "bytes" if plan.unit == "bytes" else "latency"
    )
    if len(points) >= 2 and points[-1][0] != points[-2][0]:
        (p0, m0), (p1, m1) = points[-2], points[-1]
        secant = (m1 - m0) / (p1 - p0)
        if secant > 0:
            return m1 - secant * p1, secant
    if points:
        return points[-1][1] - slope * points[-1][0], slope
    return fixed, slope


def shape_fits(plan: Plan, measured: float) -> bool:
    """Whether a reconstruction that measures this is taken as the planned build: at most the
    limit less half the aim's margin (what KD leaves of the measurement: the same graph, other
    weights), at least two margins under the aim (closer is not worth another reconstruction)."""
    margin = 1 - aim(plan) / plan.limit
    return aim(plan) * (1 - 2 * margin) <= measured <= _ceiling(plan)


def _ceiling(plan: Plan) -> float:
    """The most a reconstruction may measure to be planned: the limit less half the aim's margin."""
    return plan.limit * (1 + aim(plan) / plan.limit) / 2


def shaped(
    plan: Plan,
    costs: dict[str, Costs],
    measure_at: Callable[[int], Shape],
    tries: int = SHAPE_TRIES,
) -> Plan:
    """A size or latency plan with its reduce budget corrected by measuring reconstructions
    before any KD.

    A file's bytes depend on the student's shapes, not on its weights: the reconstruction at a
    budget, exported in the same format, is as large as its KD will be, and costs seconds where
    a KD costs minutes. The costs' line is measured on uniformly narrowed copies, and the
    reduce stage narrows unevenly (the targets grid: digits `size_kb=58.9` planned at 58.2 KB
    measured 59.9 KB after KD, the BERT's `ratio=10` 320.5 KB at 327.1 KB), so a build
    planned by the line misses and is pruned (a few recovery epochs, and accuracy) or rebuilt (a
    whole KD). Here the planned budget's reconstruction is measured (`measure_at`), and while it
    misses `shape_fits`, the budget moves along the secant of the measurements (`measured_line`),
    held inside the bracket of those over the limit and those far under it, at most `tries`
    reconstructions. The largest that fits is planned; where none does, the budget the last
    secant points at (the tries spent), else the largest under the limit. Every reconstruction
    measured is on the plan (`Plan.shapes`): the closed loop's line starts from them (replan.py).

    A batch-1 latency too: it hangs on the shapes and on the format that ships, and the
    reconstruction is measured as the fit would ship it (int8 where it is no slower than fp32 at
    batch 1). The costs' line misses it by more than it misses bytes: latency follows the
    arithmetic per row and the runtime's cost per call, not the parameters (the targets grid's
    CNN1d at 0.0173 ms: planned at 15,970 params, measured 0.0318 ms after KD, and rebuilt 4x
    smaller). What the shapes cannot tell is the guard: int8 it refuses after KD ships as fp32,
    slower where int8 was faster."""
    if not plan.reachable or plan.searched or plan.unit == "params":
        return plan
    shapes: list[Shape] = []
    budget = plan.reduce_params
    for _ in range(tries):
        shape = measure_at(budget)
        shapes.append(shape)
        if shape_fits(plan, shape.measured):
            break
        same = [(s.params, s.measured) for s in shapes if s.fmt == shape.fmt]
        fixed, slope = measured_line(plan, costs, same, shape.fmt)
        over = [s.params for s in shapes if s.measured > _ceiling(plan)]
        under = [s.params for s in shapes if s.measured <= _ceiling(plan)]
        upper = min(over, default=plan.teacher_params)
        lower = max(under, default=plan.smallest_params)
        want = (aim(plan) - fixed) / slope if slope > 0 else 0.0
        if not lower < want < upper:  # the line points outside the bracket: its middle
            want = math.sqrt(lower * upper)
        # the reduce stage lands near its budget, not on it: scaled by where this one landed
        budget = max(plan.smallest_params, round(want * shape.budget / max(shape.params, 1)))
        if upper <= lower or any(s.budget == budget for s in shapes):
            break  # whole units: no budget left between them
    best = max(
        (s for s in shapes if s.measured <= _ceiling(plan)), key=lambda s: s.params, default=None
    )
    tried = "; ".join(
        f"{s.budget:,}: {s.params:,} params, {shown(plan, s.measured)} {s.fmt}" for s in shapes
    )
    if best is not None and shape_fits(plan, best.measured):
        chosen, then = best.budget, f"reduced at {best.budget:,}"
    elif all(s.budget != budget for s in shapes):  # the tries spent: where the last line points
        chosen, then = budget, f"reduced at {budget:,}, where their line meets the aim"
    else:
        chosen = best.budget if best is not None else budget
        then = f"reduced at {chosen:,}"
    why = f"{plan.why}; reconstructions measured before KD ({tried}): {then}"
    return replace(
        plan,
        reduce_params=chosen,
        final_params=best.params if best is not None else plan.final_params,
        why=why,
        shapes=tuple(shapes),
    )


def shown(plan: Plan, x: float) -> str:
    """`x` in the plan's unit, as the records show it."""
    units = {"bytes": f"{x / 1024:.1f} KB", "params": f"{x:,.0f} params"}
    return units.get(plan.unit, f"{x:.4f} ms")


def at_target_batch(quantize: QuantizeConfig, kind: str) -> QuantizeConfig:
    """The quantize settings a target's format is decided with: a batch-1 latency target's at
    batch 1 (int8 ships where it is smaller and no slower there, not at `compress.quantize.batch`,
    which a latency target does not ask about). Static int8 often ships by the batch-256 rule
    and is slower at batch 1: the targets grid's CNN1d sweep, 9,776 params, int8 0.0321 ms at
    batch 1 against fp32's 0.0198 ms; the digits MLP's, 75,183 params, 0.0164 against 0.0124 ms.
    Other kinds keep the configured batch."""
    return quantize.model_copy(update={"batch": 1}) if kind == "latency_ms_b1" else quantize


def planned_quantize(quantize: QuantizeConfig, plan: Plan) -> QuantizeConfig:
    """The quantize settings a plan's students are served with (the fit's exports, a latency
    plan's reconstructions): int8 on exactly where the plan serves int8, its format decided at
    the target's batch (`at_target_batch`)."""
    enabled = quantize.model_copy(update={"enabled": plan.fmt == "int8"})
    return at_target_batch(enabled, plan.kind)


def widened(plan: Plan, widen: float, cut_from: int | None = None) -> Plan:
    """`plan` with its first student built at `widen` times its budget, to be distilled there and
    pruned to the limit (`target.widen`; the Hugging Face transformer recipe's 2: recipe.py); the
    plan as it is for a latency, a search, or where the wider student would be over
    `WIDEN_MAX_SHARE` of the parameters students are cut from (`cut_from`: the teacher's, or its
    vocabulary-trimmed copy's; a student that large loses little: the BERT's 10x target, 233,018
    params, distilled at the size, was 0.75 points better than its teacher)."""
    wide = int(widen * plan.reduce_params)
    if (
        widen <= 1
        or not plan.reachable
        or plan.searched
        or plan.unit not in ("bytes", "params")
        or wide > WIDEN_MAX_SHARE * min(plan.teacher_params, cut_from or plan.teacher_params)
    ):
        return plan
    why = f"{plan.why}; {widened_line(wide, widen, plan.reduce_params)}"
    return replace(plan, reduce_params=wide, widen=widen, why=why)


def widened_line(wide: int, widen: float, planned: int) -> str:
    """What a widened plan does, in the plan's `why` and the run's one line."""
    return (
        f"distilled at {wide:,} params ({widen:g}x the {planned:,} planned: target.widen), "
        "then pruned to the limit"
    )


def plan_for_target(
    teacher: nn.Module,
    data: Dataset,
    target: TargetConfig,
    reduce: ReduceConfig,
    recon: ReconstructConfig,
    quantize: QuantizeConfig,
    seed: int,
    latency_repeats: int,
    start: nn.Module | None = None,
    X_agree: np.ndarray | None = None,
) -> tuple[Plan, dict[str, Costs], int]:
    """(plan, costs, teacher file bytes). `start`: what students are cut from where that is not
    the teacher itself (its vocabulary trimmed: tasks/compress/vocab.py); sizes and ratios stay
    the teacher's, costs are measured on what is cut. `X_agree`: the agreement guard's held-out
    rows (target.agreement_rows)."""
    start = teacher if start is None else start
    quantize = at_target_batch(quantize, target.kind)
    example = torch.from_numpy(data.X_train[:2])
    # latency is no line at small sizes (a runtime's fixed cost per call): one more point
    fractions = (0.0, 0.5, 1.0) if target.kind == "latency_ms_b1" else (0.0, 0.5)
    costs = measure_costs(start, data.X_train[:512], quantize, seed, latency_repeats, fractions)
    teacher_bytes = saved_size(teacher)[0]
    teacher_params = sum(p.numel() for p in teacher.parameters())
    smallest = smallest_params(start, example)
    plan = plan_target(target, costs, teacher_params, smallest, teacher_bytes)
    if plan.reachable and plan.fmt == "int8" and quantize.format == "measured":
        why_not = int8_ships_at(start, data.X_train[:512], quantize, seed, plan.final_params)
        if why_not:  # planned again without int8, as where no copy shipped it
            note(f"the plan serves fp32: {why_not}")
            costs = {fmt: c for fmt, c in costs.items() if fmt != "int8"}
            plan = plan_target(target, costs, teacher_params, smallest, teacher_bytes)
            plan = replace(plan, why=f"{plan.why}; int8 left out: {why_not}")
    if plan.reachable and not plan.searched and plan.unit != "params":
        X_calib = calibration_rows(data.X_train, reduce.calibration_samples, seed)
        X = data.X_train[:512]

        def measure_at(budget: int) -> Shape:
            """The reduce and reconstruct stages at `budget`, exported in the plan's format: for
            bytes, int8 as made, as the costs measured it (its bytes do not hang on whether it
            ships); for a latency, what the fit would ship by its rule (int8 where it is no
            slower at batch 1: `at_target_batch`), as the format moves the latency most."""
            at = reduce.model_copy(update={"budget": BudgetConfig(params=budget)})
            reduction = reduce_model(start, X_calib, at, recon.mode)
            student = reconstruct(start, reduction, X_calib, recon)
            if plan.unit == "bytes":
                made = exported_and_int8(student, X[:64], X, quantize, seed)
                if plan.fmt != "int8":
                    made = made.fp32_instead("")
            else:
                made = quantize_model(student, X[:64], X, planned_quantize(quantize, plan), seed)
            fmt = "fp32" if made.int8_model is None else "int8"
            served = made.served
            return Shape(budget, served.params, fmt, achieved(plan, served, X, latency_repeats))

        plan = shaped(plan, costs, measure_at)
    planned = plan.reduce_params
    widen = recipe_for(teacher).widen if target.widen is None else target.widen
    plan = widened(plan, widen, sum(p.numel() for p in start.parameters()))
    if plan.widen > 1:
        note(widened_line(plan.reduce_params, plan.widen, planned))
    if not plan.reachable:
        guard = Guard.of(teacher, data, max_drop_of(target, data), target.confidence, X_agree)
        X_calib = calibration_rows(data.X_train, reduce.calibration_samples, seed)
        budget, tried = smallest_start(start, X_calib, reduce, recon, guard, plan)
        then = (
            f"then rebuilt at smaller budgets and pruned while the guard holds, bisecting, at "
            f"most {target.max_builds} builds (target.max_builds)"
            if plan.searched
            else "then pruned toward the smallest model while the guard holds"
        )
        trim = "" if plan.kind == SMALLEST else vocab.hint(start)  # what a trim would reach
        # where a budget keeps the guard, the first distilled build is below it: the start stays
        # undistilled, the search's fallback (distilled only where it ships or is pruned from)
        found = budget < teacher_params
        first = first_probe(budget, plan.smallest_params) if plan.searched and found else budget
        deferred = (
            f"; the first build distilled at {first:,} params, the geometric middle down to the "
            "smallest model, the start kept undistilled as the fallback"
            if first < budget
            else ""
        )
        why = (
            f"{plan.why}{trim}: started from the smallest budget whose reconstruction keeps the "
            f"guard ({tried}), {then}{deferred}"
        )
        plan = replace(
            plan, reduce_params=first, start_params=budget if first < budget else 0, why=why
        )
    return plan, costs, teacher_bytes

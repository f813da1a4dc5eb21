"""A size or latency target's closed loop: build, measure the served model, re-plan from the
measurement, rebuild from the reduce stage, at most `target.max_rebuilds` times.

The plan (tasks/compress/plan.py) predicts the served file's bytes (or batch-1 latency) from a
line measured on narrowed copies of the teacher; a student is not such a copy (digits,
`size_kb=30`: 24,033 params predicted at 29.7 KB measured 31.4 KB, 32,176 B, as int8; a 1-D
ResNet's latency target: 0.0669 ms measured against 0.0297 ms). The plan stage corrects a size
or latency plan's budget by measuring reconstructions before any KD (`plan.shaped`: a file's
bytes and a latency hang on the shapes and the format, not the weights), and the line here
starts from those measurements; a build can still miss (int8 may ship otherwise than planned,
the guard may refuse a faster int8, the load moves a latency, the tries run out). After each
build (reduce, reconstruct, KD) the fit exports and measures it (`fit_to_target`), then:

- **met** (the limit and the guard hold), its drop estimated within the allowance: it ships; no
  more builds.
- **met, its drop estimated over the allowance** (the guard keeps a build its validation rows do
  not *show* over: guard.py's "unresolved"): while rebuilds are left, one more build between it
  and the smallest build that missed the limit, as for a build that broke the guard. The guard
  does not decide on single rows (a pruning round is never rolled back on them); a spare rebuild
  looks for a build they do not estimate over, and the loop ships the one they judge best (the
  targets grid, docs/benchmarks.md: both latency targets shipped such a build, 1.11 and 2.00
  validation points over a 1-point allowance, with room under the limit). Where there is no
  room (the limit missed just above it, or, none missed, the measured line meets the limit
  within `MIN_STEP` of it) it ships as it is.
- **a small miss** (a cut of at most `PRUNE_CUT` of the parameters closes it by the cost line
  anchored at the measurement): the fit prunes toward it in guarded rounds with KD recovery, as
  before. A round costs a few recovery epochs; a rebuild costs a whole KD.
- **the planned build breaks the guard**: over the limit, the loop stops (a smaller student
  keeps it less); under it with room, the plan mispredicted (a latency measured under load: the
  targets grid's ResNet1d at 0.0356 ms planned 100 params, predicted 0.0309 ms, measured 0.0202,
  lost 38 points), and the next build is bracketed between it and the limit, as below.
- **a larger miss**, or a pruning round rolled back by the guard, or the rounds spent: rebuild
  from the reduce stage at a corrected budget, while rebuilds are left. The correction is a
  secant in the parameter count: the line through the last two builds' measurements (of the same
  served format), with one build the plan's slope through its measurement; the budget is where
  that line meets the aim (the limit, 1 % under for bytes, `LATENCY_MARGIN` under for latency),
  scaled by what the reduce stage built for the last budget. It is held below every build that
  measured over the limit (at least `MIN_STEP` under: each rebuild makes progress) and above
  every build that broke the guard (a bisection's bracket: where the line points at or below a
  build that broke it, the next budget is the bracket's geometric middle), and at most
  `MAX_SHRINK` times under the smallest that missed (a line through one point is a guess); an
  empty bracket stops the loop.
- **the last build** (no rebuild left) prunes as far as it takes, as the fit did before; so
  does a widened plan's first build (`plan.widened`: distilled at `target.widen` times the size
  planned, its cut to the limit is the plan), whose pruning round the guard rolls back is
  rebuilt at the size the line says, as any other.

The guard decides every build as it decides every step (tasks/compress/guard.py): a build whose
served model breaks it is never shipped while one that keeps it exists, and the next rebuild
bisects between it and the smallest build that missed, also where it met the limit (CNN1d 32-64,
`size_kb=7.8`: a rebuild at 1,354 params measured 6.6 KB and broke the guard; the loop used to
stop there, logging "stopped: met", and ship the 13.7 KB build 0); where the planned build itself
breaks it, the loop stops (a smaller student keeps the guard less). What ships is the build that
met the target with its drop estimated within, else of those that met it the one whose drop's
upper bound is lowest (as a drop-only search picks: smallest.py), else the guard-keeping build
closest to the limit, else the first build.
Unreachable plans (below the smallest model) and drop-only targets take no rebuilds here: their
search (smallest.py) rebuilds at smaller budgets with the same `BuildAt` and `budget_for`.

Latency moves with the load, so it is measured as the median of `LATENCY_TRIES` p50s (target.py's
`achieved`), the loop aims `LATENCY_MARGIN` under the limit, a secant is used only when its slope
is positive (two noisy points can say a larger model is faster), and otherwise the next budget is
the geometric middle of the bracket.

Every build is recorded (`Build`, on `Fitted.builds`): the budget, its parameters, the predicted
and the measured value, what it achieved after pruning, and the decision taken next (for a
build that missed the limit and was rebuilt, why the fit did not prune it there: the cut over
`PRUNE_CUT`, a round the guard rolled back, the rounds spent: `NOT_PRUNED`); the target stage's
run has them as `build_N.*` metrics and params, and the verdict's bound names them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import replace

from torch import nn

from distill.tasks.compress.memo import model_digest
from distill.tasks.compress.plan import Costs, Plan, aim, measured_line
from distill.tasks.compress.target import Build, Fitted, lineage_line
from distill.tasks.platform.config import SMALLEST

PRUNE_CUT = 0.15  # a miss a pruning round closes (of the parameters); a larger one is rebuilt
MIN_STEP = 0.02  # a rebuild is at least this much smaller than any build that missed
MAX_SHRINK = 4.0  # and at most this many times smaller than the smallest that missed

# why a build that missed the limit was rebuilt rather than pruned to it (`fit_to_target`'s stop)
NOT_PRUNED = {
    "cut": "not pruned (a cut over {cut:.0%} needed)",
    "rolled back": "its pruning round broke the guard",
    "rounds": "its pruning rounds fell short",
}

BuildAt = Callable[[int], nn.Module]  # reduce, reconstruct, KD at a parameter budget
Fit = Callable[[nn.Module, float], Fitted]  # fit_to_target with the cut it may prune (max_cut)


def local_line(
    plan: Plan, costs: dict[str, Costs], builds: list[Build], fmt: str
) -> tuple[float, float]:
    """(fixed, per parameter) of what the served model measures in `fmt`, from what was measured
    in it so far: the plan's reconstructions (`Plan.shapes`), then the builds (`measured_line`)."""
    points = [(s.params, s.measured) for s in plan.shapes if s.fmt == fmt]
    points += [(b.params, b.measured) for b in builds if b.fmt == fmt]
    return measured_line(plan, costs, points, fmt)


def predicted_at(
    plan: Plan, costs: dict[str, Costs], builds: list[Build], fmt: str, params: int
) -> float:
    fixed, slope = local_line(plan, costs, builds, fmt)
    return fixed + slope * params


def next_params(plan: Plan, costs: dict[str, Costs], builds: list[Build]) -> tuple[int | None, str]:
    """The parameter count the next build aims at, or None and why there is none."""
    last = builds[-1]
    fixed, slope = local_line(plan, costs, builds, last.fmt)
    over = [b.params for b in builds if b.measured > plan.limit]
    upper = int(min(over, default=plan.teacher_params) * (1 - MIN_STEP))
    if not over and slope > 0:  # none missed it (a spare rebuild): where the line meets it
        upper = min(upper, int((plan.limit - fixed) / slope))
    broke = [b.params for b in builds if not b.guard_ok or not b.within]
    lower = max(plan.smallest_params, int(max(broke, default=0) * (1 + MIN_STEP)))
    if upper < lower:
        above = "limit missed" if over else "the limit, by the measured line"
        return None, (
            f"no size between {lower:,} params (drop over the allowance below) and {upper:,} "
            f"({above})"
        )
    want = (aim(plan) - fixed) / slope if slope > 0 else 0.0
    if want <= lower:  # the line says below what keeps the guard (or nothing): bisect
        want = math.sqrt(lower * upper)
    # a line through one miss is a guess: at most MAX_SHRINK under it (with none, as after a build
    # that met the limit with its drop estimated over, the line's aim above it)
    floor = upper / MAX_SHRINK if over else lower
    return int(min(upper, max(lower, floor, want))), ""


def refit_to_target(
    plan: Plan,
    costs: dict[str, Costs],
    student: nn.Module,
    build_at: BuildAt,
    fit: Fit,
    max_rebuilds: int,
) -> Fitted:
    """The loop of the module's docstring from `student` (built at `plan.reduce_params`)."""
    closed = plan.reachable and plan.kind != SMALLEST
    rebuilds_allowed = max_rebuilds if closed else 0
    builds: list[Build] = []
    fits: list[Fitted] = []
    budget, model = plan.reduce_params, student
    while True:
        last = len(builds) >= rebuilds_allowed
        # a widened plan's first student is pruned to the limit as planned (plan.widened)
        planned_cut = not builds and plan.widen > 1
        fitted = fit(model, 1.0 if last or planned_cut else PRUNE_CUT)
        params, fmt, measured = fitted.built or (
            fitted.quantized.served.params,
            plan.fmt,
            fitted.achieved,
        )
        served_ok = fitted.served_check is not None and fitted.served_check.ok
        within = fitted.served_check is not None and fitted.served_check.estimated_within
        want: int | None = None
        if fitted.met and (within or last):
            then = "shipped: met"
        elif fitted.met:  # kept as not shown over: a rebuild between it and the limit's bracket
            this = Build(
                len(builds), budget, params, fmt, 0.0, measured, 0.0, 0, True, True, "", False
            )
            want, why = next_params(plan, costs, [*builds, this])
            drop = f"met, its drop estimated over the allowance ({_drop(fitted)})"
            then = f"{drop}: rebuild at {want:,} params" if want is not None else f"{drop}: {why}"
        elif not served_ok and (last or (not builds and measured > plan.limit)):
            # the planned build over the limit: no smaller one keeps it (under it, the plan
            # mispredicted: a larger build may meet both, the bracket's lower end, below)
            then = "stopped: it broke the guard" + (" (not shipped)" if builds else "")
        elif last:
            then = (
                f"stopped: {rebuilds_allowed} rebuilds spent (target.max_rebuilds)"
                if closed and rebuilds_allowed
                else "stopped"
            )
        elif fitted.stop in ("cut", "rolled back", "rounds", "guard") or not served_ok:
            # a rebuild that met the limit but broke the guard is a bracket's lower end: the next
            # rebuild aims between it and the smallest build that missed (`next_params`)
            this = Build(
                len(builds), budget, params, fmt, 0.0, measured, 0.0, 0, served_ok, False, ""
            )
            want, why = next_params(plan, costs, [*builds, this])
            then = f"rebuild at {want:,} params" if want is not None else f"stopped: {why}"
            if not served_ok:
                then = f"not shipped (it broke the guard); {then}"
            elif fitted.stop in NOT_PRUNED:  # why the fit left it: a rebuild costs a whole KD
                then = f"{NOT_PRUNED[fitted.stop].format(cut=PRUNE_CUT)}; {then}"
        else:  # the smallest reachable model, or the guard: no build can do better
            then = f"stopped: {fitted.stop}"
        builds.append(
            Build(
                len(builds),
                budget,
                params,
                fmt,
                predicted_at(plan, costs, builds, fmt, params),
                measured,
                fitted.achieved,
                fitted.quantized.served.params,
                served_ok,
                fitted.met,
                then,
                within,
                fitted.built_method,
            )
        )
        fits.append(fitted)
        if want is None:
            break
        budget = untried(budget_for(want, budget, params, plan.smallest_params), want, builds)
        model = build_at(budget)
    return _shipped(plan, fits, builds)


def distilled_once(
    reconstructed_at: Callable[[int], nn.Module], distilled: Callable[[nn.Module], nn.Module]
) -> BuildAt:
    """A `BuildAt` (reduce and reconstruct at a budget, then KD) that distils each student once:
    the reduce stage keeps whole units, so two budgets can build the same student (CNN1d 32-64,
    `size_kb=7.8`: three rebuilds built 1,354 params), and its KD (seeded) would only repeat.
    Keyed by the reconstructed student's digest (its state and plain attributes); each call
    returns its own copy."""
    done: dict[bytes, nn.Module] = {}

    def build_at(budget: int) -> nn.Module:
        student = reconstructed_at(budget)
        key = model_digest(student)
        if key not in done:
            done[key] = distilled(student)
        return copy.deepcopy(done[key])

    return build_at


def untried(budget: int, want: int, builds: list[Build]) -> int:
    """`budget`, unless it is within `MIN_STEP` of the budget of a build that landed on the other
    side of `want` from the nearest build beyond it, or the last build landed on the parameters
    of an earlier one: the reduce stage keeps whole units, so a budget next to one already built
    lands where that one did (CNN1d 32-64, `size_kb=7.8`: budgets 1,638 and 1,639 both built
    1,354 params, the guard broken; and three rebuilds, each a few per cent above the last, did
    so again). Then the geometric middle of the two budgets that landed either side of `want`
    (there 1,798: 1,794 params, the guard kept)."""
    below = [b.budget for b in builds if b.params < want]
    above = [b.budget for b in builds if b.params > want]
    if not below or not above:
        return budget
    low, high = max(below), min(above)
    again = any(b.params == builds[-1].params for b in builds[:-1])
    if high <= low * (1 + MIN_STEP) or (
        not again and low * (1 + MIN_STEP) < budget < high * (1 - MIN_STEP)
    ):
        return budget
    return round(math.sqrt(low * high))


def budget_for(want: int, budget: int, params: int, smallest: int) -> int:
    """The reduce budget that should build `want` parameters, given that `budget` built
    `params`: the reduce stage lands near, not on, its budget (scaled by what it built last)."""
    return max(smallest, round(want * budget / max(params, 1)))


def _drop(fitted: Fitted) -> str:
    check = fitted.served_check
    if check is None or check.decision is None:
        return "no paired decision"
    d = check.decision
    return f"{d.drop:.4f}, interval {d.low:.4f}..{d.high:.4f}, {d.rows} rows"


def _bound(fitted: Fitted) -> float:
    """The served model's drop bound (guard.Decision.bound), or its drop without one."""
    check = fitted.served_check
    if check is None:
        return math.inf
    return check.decision.bound if check.decision is not None else check.drop


def _shipped(plan: Plan, fits: list[Fitted], builds: list[Build]) -> Fitted:
    """The build that met the target with its drop estimated within the allowance, else the one
    that met it whose drop's bound is lowest, else the guard-keeping one closest to the limit,
    else the first; its bound names every build, predicted and measured."""
    ok = [i for i, f in enumerate(fits) if f.served_check is not None and f.served_check.ok]
    met = [i for i in ok if fits[i].met]
    within = [i for i in met if builds[i].within]
    if within or met:
        i = within[0] if within else min(met, key=lambda j: _bound(fits[j]))
    else:
        i = min(ok, key=lambda j: fits[j].achieved) if ok else 0
    chosen = fits[i]
    shown = "; ".join(_line(plan, b) for b in builds)
    which = f"build {i} of {len(builds)} shipped" if len(builds) > 1 else "one build"
    bound = f"{chosen.bound}; {which} ({shown})"
    return replace(chosen, builds=builds, bound=bound, lineage=_lineage(builds, i))


def _lineage(builds: list[Build], shipped: int) -> str:
    """Where a rebuild ships: the stage table's reconstructed and finetuned rows are build 0's,
    its pruned and quantized rows the shipped build's."""
    if shipped == 0:
        return ""
    first, b = builds[0], builds[shipped]
    pruned = f", pruned to {b.final_params:,}" if b.final_params != b.params else ""
    return lineage_line(
        f"build 0 ({first.params:,} params)",
        f"build {shipped}, rebuilt from the reduce stage ({b.params:,} params{pruned})",
    )


def _line(plan: Plan, b: Build) -> str:
    def show(x: float) -> str:
        return {"bytes": f"{x / 1024:.1f} KB", "params": f"{x:,.0f}"}.get(plan.unit, f"{x:.4f} ms")

    pruned = (
        f", pruned to {b.final_params:,}: {show(b.achieved)}" if b.final_params != b.params else ""
    )
    return (
        f"{b.n}: {b.params:,} params, predicted {show(b.predicted)}, measured {show(b.measured)}"
        f"{pruned}, {b.then}"
    )

"""A drop-only target: the smallest served file that loses at most `target.max_accuracy_drop`
(`max_r2_drop`) vs the teacher on the validation rows.

The plan (tasks/compress/plan.py, kind `smallest`) is an unreachable one: it starts from the
smallest budget whose reconstruction keeps the guard (`smallest_start`). That reconstruction, the
**start**, is a candidate as it is (`Start`, named `start no KD`); its KD, the search's costliest
(the largest student: the targets grid's ResNet1d-32 start, 22,388 params, took 27 s of a 116 s
search), runs only where the search ships it or prunes from it, or where no candidate is shown
within (below). The reduce, reconstruct and KD stages build the first rebuild below it instead
(`first_probe`). `smallest_within` then searches, one candidate build at a time (at most
`target.max_builds`; each exported and checked by the guard):

- **rebuilds** (at most half the builds, rounded up: `rebuild_share`): the reduce, reconstruct and
  KD stages again, from the teacher, at a smaller budget (the closed loop's `BuildAt`,
  tasks/compress/replan.py, with its `budget_for`). Each aims at the geometric middle of the bracket
  between the largest candidate whose drop was not within the allowance (at first the smallest
  reachable model) and the smallest that was (at first the start, where the guard kept it even if
  its drop is estimated over; the teacher where it broke it): a bisection on the log of the
  parameter count, stopped when the bracket is narrower than `MIN_CUT` either side. Reconstruction
  before KD is what the start's budget was chosen by; KD brings much smaller reductions back within
  the drop, which pruning the start's larger student does not (ResNet1d-32 of the targets grid,
  docs/benchmarks.md: pruning its start, 22,388 params, went no lower than 11,684 within the drop,
  29.1 KB; a reduction to 988 params, distilled, was within it, 9.7 KB).
- **pruning rounds** (the rest), from the smallest candidate within the drop so far: a
  structured pruning step with KD recovery. From the last kept model, cut to half its parameters
  while the guard holds (after rebuilds: to the geometric middle between it and the largest
  rebuild that was not within); a cut that breaks it is rolled back, and the next one aims at
  the geometric middle between the last kept model and the smallest that broke it;
- it stops when the builds are spent, when the next cut would remove under `MIN_CUT` of the
  parameters, when it would land at or below the last that broke the guard (units are whole: a
  cut aimed between them may land on it again, as CNN1d 32-64's did six times at 598 params),
  or at the smallest reachable model.
- **bridging rebuilds** (builds the rounds left over): where the smallest candidate the rows
  show within (what ships, below) is far above the largest kept candidate below it, a rebuild
  at their geometric middle, again while builds are left (`_bridge`). The search steers by the
  point estimate and ships by the interval; on a large model they part far (the targets grid's
  BERT kept rebuilds of 27,631 and 13,789 params within by the point estimate, none shown
  within, its pruning stopped after two rounds, and it shipped the 441,354-param start).

The guard is the targets' (tasks/compress/guard.py): a candidate is rolled back when its
float model's drop is above the allowance with `target.confidence`, on the paired validation
rows; one the rows cannot show to be over is kept, and the search goes on from it. Every
candidate is exported as it would ship (int8 where it is smaller, no slower and within the guard,
with the per-layer fp32 fallback, else fp32: `guarded_int8`) and measured: the served file's
bytes, its validation score and drop with the drop's interval, its batch-1 latency and its
parameters. Those are the frontier (`Fitted.frontier`).

What ships is the smallest served file among the kept candidates whose served drop the rows
*show* within the allowance: its interval's upper end at `target.confidence` (or, with
`target.agreement_rows`, the bound its disagreement with the teacher on held-out rows gives, where
lower: guard.py) is at most `max_accuracy_drop` (`Decision.shown_within`). Where none is, the
start is distilled if it was not (the largest student, the one most likely shown within), and
then, where none is still, the one whose upper end is lowest ships; of those bound alike, the one
estimated lowest, then the largest: the rows cannot tell them apart, and the smallest of them is
the one they flatter. On digits, 24 seeds (benchmarks/ship_rule.py, docs/benchmarks.md), the two
took the seeds that lost over the point on the test rows from 9 to 3 (test drop +0.82 -> +0.59
points), for size: 150x -> 92x median, 30x or more on 23 seeds of 24 either way.
A point estimate within is not enough to ship: a search that picks the smallest of several
estimates picks the one the rows flatter most (the winner's curse), and where the candidates sit
near the allowance the choice turns on one row (digits, 180 rows: 60.7x or 5.1x). Measured by
benchmarks/ship_rule.py on the same candidates, 8 seeds each (docs/benchmarks.md): on digits the
smallest point estimate shipped 153x at +0.94 test points, 4 of 8 seeds above 1 point; the
smallest shown within 94x (40x at least) at +0.42, 1 of 8.

The search still steers by the point estimate (its bisection's upper end is the smallest
candidate estimated within): steered by the shown line it climbed above its start, since at 180
rows a candidate that loses one row the teacher gets right is never shown within a point (8
seeds: 7.5x at the least, against 40x).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from torch import nn

from distill.tasks.compress.evaluate import latency_percentiles_ms, saved_size, torch_predictor
from distill.tasks.compress.finetune import History
from distill.tasks.compress.guard import Check
from distill.tasks.compress.plan import MIN_CUT
from distill.tasks.compress.prune import prunable_groups, recover
from distill.tasks.compress.quantize import Quantized
from distill.tasks.compress.replan import BuildAt, budget_for
from distill.tasks.compress.target import (
    SMALLEST,
    Candidate,
    Fitted,
    Search,
    achieved,
    cut_toward,
    lineage_line,
)

FIRST_CUT = 0.5  # until a cut breaks the guard, each keeps this fraction of the parameters
UNDISTILLED = "start no KD"  # the frontier's name for a start the search has not distilled


@dataclass(frozen=True)
class Start:
    """A start left undistilled (the plan's `start_params`, `first_probe`): the search's fallback.
    Its reconstruction keeps the guard (that is how its budget was chosen), so it is a candidate
    as it is; its KD, the costliest of the search's (the largest student), runs only where the
    search ships it or prunes from it, or where no candidate is shown within."""

    build: Callable[[], nn.Module]  # the reduce and reconstruct stages at the start's budget
    distill: Callable[[nn.Module], nn.Module]  # the KD stage on it


@dataclass
class _Built:
    """A kept candidate with what it would ship as."""

    model: nn.Module
    quantized: Quantized
    check: Check  # its float model's guard decision
    served_check: Check  # the served model's (int8's, or the float one's)
    int8_check: Check | None
    point: Candidate
    shown: bool  # its served drop is shown within the allowance (`_shown`)


def _shown(check: Check, max_drop: float) -> bool:
    """The rows show the drop within the allowance: its interval's upper end is (a guard with no
    teacher answers to pair has only the point estimate)."""
    if check.decision is None:
        return check.ok
    return check.ok and check.decision.shown_within(max_drop)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def smallest_within(
    search: Search,
    student: nn.Module,
    builds: int = 6,
    build_at: BuildAt | None = None,
    start: Start | None = None,
) -> Fitted:
    """The search of the module's docstring, from `student` (distilled, built at
    `search.plan.reduce_params`: the start, or with `start` the first rebuild), at most `builds`
    candidates: with `build_at` (the reduce, reconstruct and KD stages at a parameter budget,
    replan.py's) up to `rebuild_share(builds)` of them rebuilt from the teacher at smaller
    budgets, then pruning rounds. `start`: the start left undistilled, where `student` is the
    first rebuild (the plan's `start_params`); it is distilled where the search ships it or
    prunes from it, or where no candidate is shown within. The export is the quantize stage's,
    in the plan's format, unless `search.export` replaces it. For a plan below the smallest
    reachable model (a size or latency limit) it ships the smallest file within the drop, met
    only where that is within the plan's limit."""
    data, plan, guard = search.data, search.plan, search.guard

    def measure(model: nn.Module, check: Check) -> _Built:
        quantized, int8, served_check = search.exported(model, check)
        served = quantized.served
        decision = served_check.decision
        point = Candidate(
            check.step,
            served.params,
            saved_size(served)[0],
            "int8" if quantized.int8_model is not None else "fp32",
            served_check.accuracy,
            served_check.drop,
            decision.low if decision else math.nan,
            decision.bound if decision else math.nan,
            check.drop,
            latency_percentiles_ms(served.predictor(), data.X_test, 1, search.latency_repeats)[0],
            check.ok and served_check.ok,
        )
        shown = _shown(served_check, guard.max_drop)
        return _Built(model, quantized, check, served_check, int8, point, shown)

    def measured(name: str, model: nn.Module) -> _Built:
        model = copy.deepcopy(model).eval()
        return measure(model, guard.check(name, torch_predictor(model), _params(model)))

    first = [] if start is None else [measured("rebuild 1", student)]
    begun = measured("start", student) if start is None else measured(UNDISTILLED, start.build())
    kept, frontier, checks = [begun], [begun.point], [begun.check]
    rolled_back: list[str] = []

    def distilled(b: _Built) -> _Built:
        """`b`, distilled where it is the undistilled start (then in its place among the kept)."""
        if start is None or b.check.step != UNDISTILLED:
            return b
        done = measured("start", start.distill(b.model))
        frontier.append(done.point)
        checks.append(done.check)
        if done.point.kept:
            kept[kept.index(b)] = done
            return done
        return b

    rebuilt, rebuild_stop = _rebuild(search, begun, build_at, rebuild_share(builds), measure, first)
    for b in rebuilt:
        frontier.append(b.point)
        checks.append(b.check)
        if b.point.kept:
            kept.append(b)
        else:
            rolled_back.append(b.check.step)
    built = len(rebuilt)
    # pruning goes on from the smallest candidate within the drop (the start where none is)
    base = min((b for b in kept if _shippable(b)), key=lambda b: b.point.params, default=begun)
    if built < builds:  # a round would prune it: the start is distilled first
        base = distilled(base)
    model, params = base.model, base.point.params
    history = History()
    # the parameter count of the last cut that broke the guard: after rebuilds, the largest
    # rebuild below the base that was not within (the bisection goes on between them)
    broke: int | None = max(
        (b.point.params for b in rebuilt if not _shippable(b) and b.point.params < params),
        default=None,
    )
    broke_by = "not within the drop" if broke is not None else "broke the guard"
    while True:
        if not base.point.kept:
            stop = f"the start broke the guard: {guard.why(base.served_check)}"
            break
        if built >= builds:
            stop = f"{built} builds spent (target.max_builds)"
            break
        want = max(
            plan.smallest_params,
            int(math.sqrt(params * broke)) if broke is not None else int(params * FIRST_CUT),
        )
        groups = prunable_groups(model, data.X_train[:2])
        if want > params * (1 - MIN_CUT) or not groups:
            stop = (
                f"a cut between {params:,} params (kept) and {broke:,} ({broke_by}) would "
                f"remove under {MIN_CUT:.0%}"
                if broke is not None and want > plan.smallest_params
                else f"the smallest reachable model ({params:,} params)"
            )
            break
        candidate = cut_toward(model, data, groups, want, search.prune.criterion)
        if _params(candidate) >= params:  # the widths cannot go lower by whole units
            stop = f"the smallest reachable model ({params:,} params)"
            break
        if broke is not None and _params(candidate) <= broke:  # whole units skip the bracket
            stop = (
                f"no cut by whole units lands between {params:,} params (kept) and {broke:,} "
                f"({broke_by}): it cut to {_params(candidate):,}"
            )
            break
        candidate, round_history = recover(
            candidate,
            search.teacher,
            data,
            search.prune,
            search.finetune,
            search.seed,
            search.device,
        )
        built += 1
        rounds = built - len(rebuilt)
        check = guard.check(f"prune round {rounds}", torch_predictor(candidate), _params(candidate))
        checks.append(check)
        tried = measure(candidate, check)
        frontier.append(tried.point)
        if tried.point.kept:
            for name, values in round_history.curves().items():
                getattr(history, name).extend(values)
            model, params = candidate, check.params
            kept.append(tried)
        else:
            rolled_back.append(check.step)
            broke, broke_by = check.params, "broke the guard"  # bisect between them
    # builds left over (the rounds stopped short of `builds`) close the gap the ship rule can
    # leave: rebuilds between the smallest candidate shown within and the largest kept below it
    bridged = 0
    while build_at is not None and built < builds:
        between = _bridge(kept, begun)
        if between is None:
            break
        budget = budget_for(between, plan.reduce_params, _params(student), plan.smallest_params)
        model = build_at(budget).eval()
        built += 1
        bridged += 1
        name = f"rebuild {len(rebuilt) + bridged}"
        check = guard.check(name, torch_predictor(model), _params(model))
        checks.append(check)
        tried = measure(model, check)
        frontier.append(tried.point)
        if not tried.point.kept:  # the rows show it over: the bracket would only repeat it
            rolled_back.append(name)
            break
        kept.append(tried)
    if bridged:
        stop += f"; then {bridged} rebuild(s) toward the smallest candidate shown within"
    chosen, shown, eligible = _ship_rule(kept, begun)
    undistilled = next((b for b in eligible if b.check.step == UNDISTILLED), None)
    if undistilled is not None and (chosen is undistilled or not shown):
        # it would ship as it is, or no candidate is shown within and the largest student has
        # not had its KD: distilled, it is the one most likely shown within (then chosen again)
        distilled(undistilled)
        chosen, shown, eligible = _ship_rule(kept, begun)
    smaller = [b for b in eligible if b.point.size_bytes < chosen.point.size_bytes]
    frontier = [replace(p, shipped=p is chosen.point) for p in frontier]
    if chosen.int8_check is not None:
        checks.append(replace(chosen.int8_check, step="int8"))
    n_kept = sum(p.kept for p in frontier if not p.name.startswith("start"))  # of the builds
    rebuilds = (
        f" ({len(rebuilt)} rebuilt from the reduce stage: {rebuild_stop})" if rebuild_stop else ""
    )
    bound = (
        f"{built} builds{rebuilds}: {n_kept} kept, {len(rolled_back)} rolled back; stopped: "
        f"{stop}; shipped {chosen.point.name} ({chosen.point.served_as})"
    )
    allowance = f"{guard.max_drop:g} at {guard.confidence:.0%}"
    if shown:
        bound += f", the smallest shown within {allowance}"
        if smaller:
            bound += f" ({len(smaller)} smaller kept candidate(s) not shown within it)"
    else:
        bound += (
            f"; no candidate's drop was shown within {allowance} on these rows: shipped the one "
            "they bound lowest"
        )
        alike = [b for b in smaller if _upper(b) <= _upper(chosen)]
        if len(alike) < len(smaller):
            bound += f" ({len(smaller) - len(alike)} smaller kept candidate(s) bound higher)"
        if alike:
            bound += (
                f"; {len(alike)} smaller bound alike and estimated no lower (the rows cannot "
                "tell them apart): the largest of those ships"
            )
    met, got = chosen.point.kept, float(chosen.point.size_bytes)
    if plan.kind != SMALLEST:  # a limit below the smallest reachable model: the closest file
        if plan.unit != "bytes":  # a latency limit, measured as the other targets measure it
            got = achieved(plan, chosen.quantized.served, data.X_test, search.latency_repeats)
        met = met and got <= plan.limit
        bound = (
            "below the smallest reachable model: the smallest file within the drop instead; "
            + bound
        )
    # a pruning round's curves where one is shipped (a rebuild's KD is not recorded here)
    shipped_history = history if chosen.point.name.startswith("prune") else History()
    return Fitted(
        chosen.model,
        chosen.quantized,
        shipped_history,
        checks,
        rolled_back,
        chosen.served_check,
        got,
        met,
        bound,
        frontier,
        lineage=_lineage("start" if start is None else "rebuild 1", _params(student), chosen, base),
    )


def _lineage(first: str, first_params: int, chosen: _Built, base: _Built) -> str:
    """Where what ships is not the search's first build (`first`: what the reconstructed and
    finetuned stages recorded) nor pruned from it (`base`: where the pruning rounds began): which
    build each of the stage table's rows is."""
    name = chosen.point.name
    pruned = name.startswith("prune")
    if (base.point.name if pruned else name) == first:
        return ""
    origin = f", pruned from {base.point.name} ({base.point.params:,} params)" if pruned else ""
    return lineage_line(
        f"the search's first build ({first}, {first_params:,} params)",
        f"the candidate it shipped ({name}, {chosen.point.params:,} params{origin})",
    )


def _ship_rule(kept: list[_Built], start: _Built) -> tuple[_Built, list[_Built], list[_Built]]:
    """(what ships, the kept candidates shown within, those eligible): the smallest file shown
    within the allowance, else the candidate whose drop the rows bound lowest; of those they
    bound alike, the one they estimate lowest, then the largest. Candidates the rows bound
    alike are ones they cannot tell apart, and the smallest of them is the one they flatter
    (digits, 24 seeds, each run's candidates replayed: 6 seeds lost over the point on the test
    rows with the smallest of those, 4 with the largest; docs/benchmarks.md)."""
    eligible = [b for b in kept if b.point.kept] or [start]  # a start that broke it ships
    shown = [b for b in eligible if b.shown]
    if shown:
        return min(shown, key=lambda b: (b.point.size_bytes, b.point.params)), shown, eligible
    chosen = min(
        eligible,
        key=lambda b: (_upper(b), b.point.drop, -b.point.size_bytes, -b.point.params),
    )
    return chosen, shown, eligible


def _bridge(kept: list[_Built], start: _Built) -> int | None:
    """The parameters of a rebuild between the candidate the ship rule picks, where the rows
    show its drop within, and the largest kept candidate below it (whose drop they do not show
    within: else it would be picked): their geometric middle; None where no such pair is at
    least `MIN_CUT` apart either side. The search steers by the point estimate, the ship rule
    asks for the interval's upper end, and on a large model the two can part far: the targets
    grid's BERT (823,174 params, 600 validation rows) kept rebuilds of 27,631 and 13,789 params
    within by the point estimate, none shown within, and shipped its 441,354-param start."""
    chosen, shown, eligible = _ship_rule(kept, start)
    below = [b.point.params for b in eligible if b.point.params < chosen.point.params]
    if not shown or not below:
        return None
    low, high = max(below), chosen.point.params
    want = int(math.sqrt(low * high))
    if want > high * (1 - MIN_CUT) or want < low * (1 + MIN_CUT):
        return None
    return want


def rebuild_share(builds: int) -> int:
    """How many of a search's `builds` may be rebuilds from the reduce stage (each a whole KD):
    half, rounded up; the rest are pruning rounds (a few recovery epochs each)."""
    return builds - builds // 2


def _shippable(b: _Built) -> bool:
    """Where the search steers: a kept candidate whose drop is estimated within (whether the
    rows can show it within is the ship rule's question)."""
    return b.point.kept and b.served_check.estimated_within


def _upper(b: _Built) -> float:
    """The upper end of the served drop's interval (its point estimate without one)."""
    decision = b.served_check.decision
    return decision.bound if decision is not None else b.served_check.drop


def _rebuild(
    search: Search,
    start: _Built,
    build_at: BuildAt | None,
    most: int,
    measure: Callable[[nn.Module, Check], _Built],
    first: list[_Built] | None = None,
) -> tuple[list[_Built], str]:
    """Up to `most` candidates rebuilt from the teacher (`build_at`: reduce, reconstruct, KD),
    each at the geometric middle of the bracket between the largest candidate that was not within
    the drop (else the smallest reachable model) and the smallest that was (else the start where
    the guard kept it, else the teacher); and why they stopped ('' where none could be built).
    `first`: the first rebuild where the reduce stage built it (an undistilled start's)."""
    plan, guard = search.plan, search.guard
    tried: list[_Built] = list(first or [])
    if build_at is None or most <= len(tried):
        return tried, f"at most {most}, half the builds" if tried else ""
    # what the reduce stage built last, at `plan.reduce_params`
    budget, params = plan.reduce_params, (tried or [start])[-1].point.params
    stop = f"at most {most}, half the builds"
    while len(tried) < most:
        done = [start, *tried]
        # above the smallest within; where none is yet, the start if the guard kept it: it was
        # sized by its reconstruction before KD, and KD brings smaller reductions back (the
        # targets grid's ResNet1d-32: its start 1.3 points over on 300 rows, the bisection
        # toward the teacher shipped 1.2x); the teacher only above a start that broke the guard
        upper = min(
            (b.point.params for b in done if _shippable(b)),
            default=start.point.params if start.point.kept else plan.teacher_params,
        )
        lower = max(
            (b.point.params for b in done if not _shippable(b) and b.point.params < upper),
            default=plan.smallest_params,
        )
        want = int(math.sqrt(lower * upper))
        if want > upper * (1 - MIN_CUT) or want < lower * (1 + MIN_CUT):
            stop = f"no size between {lower:,} and {upper:,} params {MIN_CUT:.0%} from both"
            break
        budget = budget_for(want, budget, params, plan.smallest_params)
        model = build_at(budget).eval()
        params = _params(model)
        name = f"rebuild {len(tried) + 1}"
        tried.append(measure(model, guard.check(name, torch_predictor(model), params)))
    return tried, stop


def frontier_table(
    rows: list[dict[str, object]], metric: str = "accuracy", confidence: float = 0.9
) -> str:
    """The frontier (`Candidate.row()` of each) as lines that fit 80 columns: what `distill run`
    prints before the verdict. `hi`: the upper end of the served drop's interval at
    `confidence`, what the ship rule reads (within the allowance: shown within)."""
    score = "val R²" if metric == "r2" else "val %"
    drop = "R² drop" if metric == "r2" else "drop"
    high = f"{confidence:.0%} hi"
    head = (
        f"{'candidate':<13} {'params':>7} {'size KB':>7} {'as':>4} {score:>6} {drop:>7} "
        f"{high:>7} {'b1 ms':>7}  status"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        value, lost, top = (
            float(r[k])  # type: ignore[arg-type]
            for k in ("val_score", "drop", "drop_high")
        )
        shown = (
            (f"{value:.4f}", f"{lost:+.4f}", f"{top:+.4f}")
            if metric == "r2"
            else (f"{100 * value:.2f}", f"{100 * lost:+.2f}", f"{100 * top:+.2f}")
        )
        lines.append(
            f"{r['candidate']!s:<13} {r['params']:>7,} {r['size_kb']:>7.1f} {r['served_as']!s:>4} "
            f"{shown[0]:>6} {shown[1]:>7} {shown[2]:>7} {r['latency_ms_b1']:>7.4f}  {r['status']}"
        )
    for r in rows:  # the columns show the served model; the guard decided on the float one
        if r["status"] == "rolled back":
            lost = float(r["float_drop"])  # type: ignore[arg-type]
            shown_lost = f"{lost:.4f} R²" if metric == "r2" else f"{100 * lost:.2f} points"
            lines.append(f"{r['candidate']} rolled back: its float model lost {shown_lost}")
    return "\n".join(lines)

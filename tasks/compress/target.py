"""Meeting a target on what ships: the plan's student (tasks/compress/plan.py) exported and
measured, and pruned toward the target while the accuracy guard (tasks/compress/guard.py) holds.

- **Guard**: teacher accuracy - model accuracy on the validation rows (never the test split) at
  most `target.max_accuracy_drop`, after the reduction, each pruning round and int8; for a
  regression target teacher R² - model R² at most `target.max_r2_drop`.
- **Fit** (`fit_to_target`): export, measure the real file (or latency); while it misses the
  target and the guard holds, prune a round toward it (KD recovery), rolled back and stopping
  if it breaks the guard. int8 ships by the quantize stage's rule (smaller than fp32 and no
  slower at `compress.quantize.batch`), and only while it keeps the guard (where its float model
  keeps it); otherwise the fp32 export ships.
- **Record** (`target_record`, `verdict`): what the parent run and the user are told.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import cast

import numpy as np
import torch
from torch import nn

from distill.tasks.compress import quantize, transformer
from distill.tasks.compress.data import Dataset
from distill.tasks.compress.evaluate import (
    OnnxModel,
    torch_predictor,
)
from distill.tasks.compress.finetune import History
from distill.tasks.compress.graph import Group, ParamModel, param_model
from distill.tasks.compress.guard import Check, Guard
from distill.tasks.compress.plan import (
    BYTES_MARGIN,
    Costs,
    Plan,
    achieved,
    planned_quantize,
    shown,
)
from distill.tasks.compress.prune import prunable_groups, recover, remove_lowest_units
from distill.tasks.compress.quantize import Quantized, quantize_model, with_fp32_layers
from distill.tasks.compress.reduce import calibration_rows
from distill.tasks.platform.config import (
    SMALLEST,
    FinetuneConfig,
    PruneConfig,
    QuantizeConfig,
)

Predict = Callable[[np.ndarray], np.ndarray]


# --- meeting the target ---------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One model a drop-only search built and measured: a point of its frontier."""

    name: str  # start | prune N
    params: int
    size_bytes: int  # the served export's file (int8 or fp32, as it would ship)
    served_as: str  # int8 | fp32 (the quantize stage's method and why: on the quantize run)
    score: float  # validation accuracy (R²) of the served model
    drop: float  # the teacher's validation score - `score`
    drop_low: float  # the drop's interval (guard.decide; nan without paired answers)
    drop_high: float  # its upper end, or the held-out agreement's bound where lower
    float_drop: float  # the float model's drop: what the guard decided keep or roll back on
    latency_ms_b1: float  # the served model, batch 1, p50
    kept: bool  # within the guard: the search went on from it (else rolled back)
    shipped: bool = False

    @property
    def status(self) -> str:
        return "shipped" if self.shipped else "kept" if self.kept else "rolled back"

    def row(self) -> dict[str, object]:
        """The frontier table's row (the artifact's columns)."""
        return {
            "candidate": self.name,
            "params": self.params,
            "size_kb": round(self.size_bytes / 1024, 3),
            "served_as": self.served_as,
            "val_score": round(self.score, 6),
            "drop": round(self.drop, 6),
            "drop_low": round(self.drop_low, 6),
            "drop_high": round(self.drop_high, 6),
            "float_drop": round(self.float_drop, 6),
            "latency_ms_b1": round(self.latency_ms_b1, 5),
            "status": self.status,
        }


@dataclass(frozen=True)
class Build:
    """One build of a size or latency target's closed loop (tasks/compress/replan.py): the student
    the reduce stage made at `budget`, what the plan (corrected by the builds before it) predicted
    for its served model and what that measured, and what came next."""

    n: int  # 0: the planned build; 1, 2, ...: rebuilds from the reduce stage
    budget: int  # the reduce stage's parameter budget
    params: int  # the student as built (reduce, reconstruct, KD), before any pruning round
    fmt: str  # what its export served as: int8 | fp32
    predicted: float  # in the plan's unit (bytes, ms, params), at `params`
    measured: float  # the served model as built, in the plan's unit
    achieved: float  # after the fit's pruning rounds (what this build would ship)
    final_params: int
    guard_ok: bool  # the served model keeps the guard
    met: bool  # the limit and the guard both hold
    then: str  # the decision taken after it
    # the served model's drop is estimated within the allowance (guard.decide's point estimate);
    # False where the guard kept it only as not shown over ("unresolved")
    within: bool = True
    method: str = ""  # how its export was served (the quantize stage's method)


@dataclass
class Fitted:
    """What `fit_to_target` ends with: the float model, its served form, and why it stopped."""

    model: nn.Module
    quantized: Quantized
    history: History
    checks: list[Check] = field(default_factory=list)  # every guard decision, in order
    rolled_back: list[str] = field(default_factory=list)
    served_check: Check | None = None  # the guard on the served model (int8, or its float source)
    achieved: float = float("nan")  # in the plan's unit
    met: bool = False  # the limit and the guard both hold
    bound: str = ""  # which constraint stopped it, and why
    # a drop-only target's search (tasks/compress/smallest.py): every candidate built, in order
    frontier: list[Candidate] = field(default_factory=list)
    # the student as given, exported and measured before any pruning: (params, served format,
    # the plan's unit); None where nothing was measured
    built: tuple[int, str, float] | None = None
    # why the fit stopped: met | guard (the student as given broke it) | cut (the miss needs a cut
    # over `max_cut`: rebuild rather than prune) | rolled back | rounds | smallest
    stop: str = ""
    builds: list[Build] = field(default_factory=list)  # a closed loop's builds (replan.py)
    # how the student as given was served (the quantize stage's method: "static", "static,
    # weights only", "fp32"...), what its `built` measurement measured
    built_method: str = ""
    # where what ships is not the first student built (the reconstructed and finetuned stages'
    # records): which build each is; "" where they are one lineage
    lineage: str = ""

    def accuracy_drop(self) -> float:
        return self.served_check.drop if self.served_check else float("nan")


def lineage_line(first: str, shipped: str) -> str:
    """What the stage table's rows are where a target ships another build than the first: the
    reconstructed and finetuned rows `first`'s, the pruned and quantized rows `shipped`'s."""
    return f"reconstructed, finetuned: {first}; pruned, quantized: {shipped}"


def params_to_meet(plan: Plan, costs: Costs, params: int, got: float) -> int:
    """Parameters that should meet the limit from where the model is (`got` at `params`): the
    measured slope, anchored at the real measurement."""
    if plan.unit == "params":
        return int(plan.limit)
    limit = plan.limit * (1 - BYTES_MARGIN) if plan.unit == "bytes" else plan.limit
    _, slope = costs.line("bytes" if plan.unit == "bytes" else "latency")
    return params // 2 if slope <= 0 else int(params - (got - limit) / slope)


def keep_fraction_for(
    model: nn.Module,
    example: torch.Tensor,
    groups: list[Group] | list[transformer.TGroup],
    params: int,
) -> float:
    """Largest fraction f such that every group at ceil(f · width) units has at most `params`."""
    cost: ParamModel | transformer.Cost
    if transformer.holds_blocks(model):  # groups of transformer.reducible_groups
        cost = transformer.cost_model(model, cast("list[transformer.TGroup]", groups))
    else:
        cost = param_model(model, example, cast("list[Group]", groups))

    def at(f: float) -> int:
        return cost.params(
            {g.name: max(1, math.ceil(f * g.width / g.step)) * g.step for g in groups}
        )

    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if at(mid) <= params else (lo, mid)
    return lo


def cut_toward(
    model: nn.Module,
    data: Dataset,
    groups: list[Group] | list[transformer.TGroup],
    want: int,
    criterion: str,
) -> nn.Module:
    """A copy of `model` with each prunable group's lowest units removed (by `criterion`, on
    training rows), to the largest common fraction of its width that has at most `want`
    parameters (a model of transformer blocks: to `want` itself, its coarse heads filled around
    by feed-forward units, `transformer.fraction_widths`): one pruning round's cut, before its
    KD recovery."""
    candidate = copy.deepcopy(model)
    remove_lowest_units(
        candidate,
        keep_fraction_for(model, torch.from_numpy(data.X_train[:2]), groups, want),
        criterion,
        data.X_train[:1024],
        {g.name: g.width for g in groups},
        want,
    )
    return candidate


def guarded_int8(
    quantized: Quantized,
    guard: Guard,
    float_check: Check,
    calibration: np.ndarray | None = None,
    ship_rows: tuple[np.ndarray, int] | None = None,
) -> tuple[Quantized, Check | None]:
    """int8 (where the quantize stage ships it: smaller, no slower), unless it breaks the guard
    where its float model keeps it: then ONNX Runtime's static int8 restored as the quantize
    stage restores it for the agreement (`quantize.restored_int8`: the weighted ops alone, then
    the layers that cost the guard most left in fp32; `calibration` rows for its scales, and the
    rows and batch that measure whether it still ships), else the fp32 export."""
    if quantized.int8_model is None:
        return quantized, None
    check = guard.check("int8", quantized.int8_model.predictor(), quantized.int8_model.params)
    if check.ok or not float_check.ok:
        return quantized, check
    why = (
        f"fp32 ships, int8 broke the {_what(guard)} guard: it lost {check.drop:.4f} > "
        f"{guard.max_drop:.4f} on validation rows"
    )
    fp32 = quantized.float_model
    if (
        calibration is None
        or ship_rows is None
        or not isinstance(fp32, OnnxModel)
        or not quantized.method.startswith("static")
    ):
        return quantized.fp32_instead(why), check
    already = quantized.fp32_layers  # left in fp32 for the quantize stage's agreement
    found = None
    for found in restored_int8(fp32, guard, calibration, already, quantized.weights_only):
        kept_fp32 = [*already, *found.fp32_layers]
        weights_only = quantized.weights_only or found.weights_only
        tried = with_fp32_layers(
            quantized, found.model, kept_fp32, *ship_rows, "measured", weights_only
        )
        how = replace(found, fp32_layers=kept_fp32, weights_only=weights_only).how
        if tried.int8_model is not None:
            return replace(
                tried, why=f"int8 ships {how} (the int8 made broke the guard); " + tried.why
            ), replace(found.verdict, step="int8")
        why += f"; int8 {how} kept it, but then {tried.why}"
    if found is None:
        why += "; no fallback (the weighted ops alone, layers in fp32) kept it"
    return quantized.fp32_instead(why), check


def guard_judge(
    guard: Guard, fp32: OnnxModel
) -> Callable[[OnnxModel, list[str]], tuple[bool, float, Check]]:
    """A per-layer fallback's judge (`quantize.mixed_int8`, `quantize.restored_int8`): the guard's
    check of an int8 model with some layers in fp32 (none: the weighted ops alone in int8), its
    accuracy the score."""

    def judge(model: OnnxModel, kept: list[str]) -> tuple[bool, float, Check]:
        if not kept:
            step = "int8, weighted ops alone"
        else:
            step = f"int8, {kept[0]} fp32" if len(kept) == 1 else f"int8, {len(kept)} layers fp32"
        check = guard.check(step, model.predictor(), fp32.params)
        return check.ok, check.accuracy, check

    return judge


def restored_int8(
    fp32: OnnxModel,
    guard: Guard,
    calibration: np.ndarray,
    skip: tuple[str, ...] = (),
    weights_only: bool = False,
    most: int = 16,
) -> Iterator[quantize.Restored[Check]]:
    """The quantize stage's int8 restorations (`quantize.restored_int8`: the weighted ops alone,
    then layers in fp32) judged by the guard (`skip`: the layers already in fp32;
    `weights_only`: the int8 already quantizes its weighted ops alone)."""
    judge = guard_judge(guard, fp32)
    return quantize.restored_int8(fp32, judge, calibration, skip, weights_only, most)


def served_check(quantized: Quantized, int8: Check | None, float_check: Check) -> Check:
    """The guard's decision on what ships: int8's check where int8 ships, else the float one's."""
    return int8 if quantized.int8_model is not None and int8 is not None else float_check


@dataclass(frozen=True)
class Search:
    """What a guarded search holds fixed from its first export to its last (`fit_to_target`,
    smallest.py's `smallest_within`): the teacher (KD recovery), the data, the plan and the costs
    it was made from, the guard, the prune, fine-tune and quantize stages' settings, the seed and
    device, and the batch-1 latency's repeats. `export` replaces the quantize stage's export (a
    test's stand-in); a function's content has no cache key, so a stage task given one is not
    cached (tasks/platform/caching.py)."""

    teacher: nn.Module
    data: Dataset
    plan: Plan
    costs: dict[str, Costs]
    guard: Guard
    prune: PruneConfig
    finetune: FinetuneConfig
    quantize: QuantizeConfig  # as configured: `exported` serves the plan's format
    seed: int
    device: str = "cpu"
    latency_repeats: int = 100
    export: Callable[[nn.Module], Quantized] | None = None

    @property
    def planned_quantize(self) -> QuantizeConfig:
        """The quantize settings the plan's students are served with (`plan.planned_quantize`)."""
        return planned_quantize(self.quantize, self.plan)

    @cached_property
    def calibration(self) -> np.ndarray:
        """The quantize stage's calibration rows (a per-layer fp32 fallback's scales)."""
        return calibration_rows(self.data.X_train, 512, self.seed)

    def exported(self, model: nn.Module, check: Check) -> tuple[Quantized, Check | None, Check]:
        """`model` exported as it would ship, int8 guarded (`guarded_int8`; `check`: its float
        model's guard decision): (what ships, int8's check or None, the served model's check)."""
        quantize, data = self.planned_quantize, self.data
        made = (
            self.export(model)
            if self.export is not None
            else quantize_model(model, data.X_test, data.X_train, quantize, self.seed)
        )
        quantized, int8 = guarded_int8(
            made, self.guard, check, self.calibration, (data.X_test, quantize.batch)
        )
        return quantized, int8, served_check(quantized, int8, check)


def fit_to_target(search: Search, student: nn.Module, max_cut: float = 1.0) -> Fitted:
    """Export and measure; while the limit is missed and the guard holds, prune one round toward
    the limit (at most halving the parameters, at most `prune.rounds` rounds) with KD recovery,
    rolling back a round that breaks the guard. Where the student as given misses by more than a
    cut of `max_cut` of its parameters would close, no round runs (`stop` "cut": the closed loop
    rebuilds from the reduce stage instead). The export is the quantize stage's, in the plan's
    format, unless `search.export` replaces it."""
    data, plan, guard, prune = search.data, search.plan, search.guard, search.prune
    model = copy.deepcopy(student).eval()
    params = sum(p.numel() for p in model.parameters())
    kept = guard.check("reduction", torch_predictor(model), params)
    checks, history, rolled_back, rounds = [kept], History(), [], 0
    built: tuple[int, str, float] | None = None
    built_method = ""
    while True:
        quantized, int8, served = search.exported(model, kept)
        served_fmt = "int8" if quantized.int8_model is not None else "fp32"
        got = achieved(plan, quantized.served, data.X_test, search.latency_repeats)
        if built is None:
            built, built_method = (params, served_fmt, got), quantized.method
        within = got <= plan.limit
        if within or not kept.ok:
            stop = "met" if within else "guard"
            bound = "" if within else f"{_what(guard)} guard: the {kept.step}'s {guard.why(kept)}"
            break
        if rounds >= prune.rounds:
            stop = "rounds"
            bound = f"{plan.kind}: {prune.rounds} pruning rounds (compress.prune.rounds) fell short"
            break
        costs = search.costs.get(served_fmt, search.costs[plan.fmt])
        to_meet = params_to_meet(plan, costs, params, got)
        if rounds == 0 and to_meet < params * (1 - max_cut):
            stop = "cut"
            bound = (
                f"{plan.kind}: {shown(plan, got)} at {params:,} params needs a cut to about "
                f"{max(to_meet, 0):,} (over {max_cut:.0%}): not pruned"
            )
            break
        want = max(plan.smallest_params, params // 2, min(params - 1, to_meet))
        groups = prunable_groups(model, data.X_train[:2])
        if want >= params or not groups:
            stop = "smallest"
            bound = f"{plan.kind}: the model is the smallest reachable ({params:,} params)"
            break
        candidate = cut_toward(model, data, groups, want, prune.criterion)
        candidate, round_history = recover(
            candidate, search.teacher, data, prune, search.finetune, search.seed, search.device
        )
        rounds += 1
        check = guard.check(
            f"prune round {rounds}",
            torch_predictor(candidate),
            sum(p.numel() for p in candidate.parameters()),
        )
        checks.append(check)
        if not check.ok:
            rolled_back.append(check.step)
            stop = "rolled back"
            bound = (
                f"{_what(guard)} guard: {check.step} ({check.params:,} params): "
                f"{guard.why(check)}: rolled back, pruning stopped"
            )
            break
        for name, values in round_history.curves().items():
            getattr(history, name).extend(values)
        model, params, kept = candidate, check.params, check
    if int8 is not None:
        checks.append(int8)
        if quantized.int8_model is None:
            bound = (bound + "; " if bound else "") + (
                f"int8's {guard.why(int8)}: served the fp32 export"
            )
    fitted = Fitted(
        model,
        quantized,
        history,
        checks,
        rolled_back,
        served,
        got,
        within and served.ok,
        built=built,
        built_method=built_method,
        stop=stop,
    )
    if within and not served.ok:
        lost = served if kept.ok else kept  # the step that broke the guard first
        bound = (
            f"{_what(guard)} guard: the {lost.step}'s {guard.why(lost)} "
            f"({plan.kind} met: {shown(plan, got)})"
        )
    fitted.bound = bound or f"{plan.kind}: met ({shown(plan, got)} <= {shown(plan, plan.limit)})"
    return fitted


def _what(guard: Guard) -> str:
    return "R²" if guard.metric == "r2" else "accuracy"


# --- what is recorded -----------------------------------------------------------------------


def target_record(
    plan: Plan, costs: dict[str, Costs], fitted: Fitted, guard: Guard, teacher_file_bytes: int
) -> tuple[dict[str, object], dict[str, float]]:
    """(params, metrics) of the target stage's run; the metrics go on the parent as target/*."""
    params: dict[str, object] = {
        "kind": plan.kind,
        "value": plan.value,
        "format": plan.fmt,
        "served_as": fitted.quantized.method,
        "why": fitted.quantized.why[:500],
        "plan": plan.why[:1000],
        "bound": fitted.bound[:500],
        "rolled_back": ", ".join(fitted.rolled_back) or "none",
        **({"lineage": fitted.lineage[:500]} if fitted.lineage else {}),
    }
    metrics = {
        "limit": plan.limit,
        "achieved": fitted.achieved,
        "met": float(fitted.met),
        "int8": float(fitted.quantized.int8_model is not None),
        "planned_params": float(plan.final_params),
        "reduce_params": float(plan.reduce_params),
        "widen": plan.widen,  # the first student's budget over the one planned (plan.widened)
        "smallest_params": float(plan.smallest_params),
        # an undistilled start's budget (plan.first_probe): the reduce stage built below it
        **({"start_params": float(plan.start_params)} if plan.start_params else {}),
        "final_params": float(fitted.quantized.served.params),
        f"max_{guard.metric}_drop": guard.max_drop,
        f"val_{guard.metric}_drop": fitted.accuracy_drop(),
        f"teacher_val_{guard.metric}": guard.reference,
        "teacher_file_kb": teacher_file_bytes / 1024,
        "pruning_rounds": float(sum(c.step.startswith("prune") for c in fitted.checks)),
    }
    if fitted.frontier:  # a drop-only search: what it built
        # the start (distilled or not: "start no KD") is not one of the builds
        metrics["builds"] = float(sum(not c.name.startswith("start") for c in fitted.frontier))
        metrics["teacher_ratio"] = teacher_file_bytes / fitted.achieved
    if fitted.builds:  # a closed loop (replan.py): each build's prediction and measurement
        metrics["rebuilds"] = float(len(fitted.builds) - 1)
        for b in fitted.builds:
            metrics |= {
                f"build_{b.n}.budget": float(b.budget),
                f"build_{b.n}.params": float(b.params),
                f"build_{b.n}.predicted": b.predicted,
                f"build_{b.n}.measured": b.measured,
                f"build_{b.n}.achieved": b.achieved,
                f"build_{b.n}.final_params": float(b.final_params),
                f"build_{b.n}.met": float(b.met),
            }
            how = f"{b.fmt} ({b.method})" if b.fmt == "int8" and b.method else b.fmt
            params[f"build_{b.n}"] = (
                f"{how}, budget {b.budget:,}, {b.params:,} params: predicted "
                f"{shown(plan, b.predicted)}, measured {shown(plan, b.measured)}; then {b.then}"
            )[:500]
    for n, s in enumerate(plan.shapes):  # the reconstructions measured before KD (plan.shaped)
        metrics |= {
            f"shape_{n}.budget": float(s.budget),
            f"shape_{n}.params": float(s.params),
            f"shape_{n}.measured": s.measured,
        }
    if plan.shapes:
        params["shapes"] = "; ".join(
            f"{s.fmt}, budget {s.budget:,}, {s.params:,} params: {shown(plan, s.measured)}"
            for s in plan.shapes
        )[:500]
    for fmt, cost in costs.items():
        metrics[f"{fmt}.fixed_bytes"], metrics[f"{fmt}.bytes_per_param"] = cost.line("bytes")
    for c in fitted.checks:
        key = c.step.replace(" ", "_")
        metrics[f"val_drop.{key}"], metrics[f"params.{key}"] = c.drop, float(c.params)
        if c.decision is not None:  # the interval the decision was read from
            metrics[f"val_drop_low.{key}"] = c.decision.low
            metrics[f"val_drop_high.{key}"] = c.decision.high
            if c.decision.agreement is not None:  # the bound from the held-out rows
                metrics[f"disagreement_high.{key}"] = c.decision.agreement.high
    served = fitted.served_check
    if served is not None and served.decision is not None:
        params["guard"] = f"{served.step}: {guard.why(served)}"[:500]
        params["guard_rows"] = served.decision.rows
        if served.decision.agreement is not None:
            params["guard_agreement_rows"] = served.decision.agreement.rows
        params["guard_confidence"] = guard.confidence
    return params, metrics


def _named(plan: Plan) -> str:
    if plan.kind == SMALLEST:
        return f"smallest within {plan.value:g} drop"
    return f"{plan.kind}={plan.value:g}"


def _achieved(plan: Plan, x: float) -> str:
    if plan.kind == SMALLEST:  # no limit to hold it to
        return shown(plan, x)
    return f"{shown(plan, x)} (limit {shown(plan, plan.limit)})"


def verdict(plan: Plan, fitted: Fitted, guard: Guard, teacher_bytes: int | None = None) -> str:
    """The one line a user reads (`teacher_bytes`: a drop-only target's ratio)."""
    head = "target met" if fitted.met else "target NOT met"
    decision = fitted.served_check.decision if fitted.served_check else None
    interval = (
        f"{guard.confidence:.0%} interval {decision.low:.4f}..{decision.high:.4f}, "
        f"{decision.rows} rows, "
        if decision is not None
        else ""
    )
    if decision is not None and decision.agreement is not None:
        agree = decision.agreement
        interval += f"<= {agree.high:.4f} by agreement on {agree.rows} held-out rows, "
    unresolved = decision is not None and decision.verdict == "unresolved"
    got = _achieved(plan, fitted.achieved)
    if plan.kind == SMALLEST:
        ratio = f"{teacher_bytes / fitted.achieved:.1f}x, " if teacher_bytes else ""
        served = "int8" if fitted.quantized.int8_model is not None else "fp32"
        got = f"{got} ({ratio}{fitted.quantized.served.params:,} params, {served})"
    return (
        f"{head}: {_named(plan)} -> {got}, {_what(guard)} drop on validation rows "
        f"{fitted.accuracy_drop():.4f} ({interval}max {guard.max_drop:.4f}"
        f"{': not shown to exceed it' if unresolved else ''}); {fitted.bound}"
    )


def target_tags(plan: Plan, fitted: Fitted, guard: Guard) -> dict[str, str]:
    """On the registered version: whether its target was met, with both numbers."""
    return {
        "distill.target_met": str(fitted.met).lower(),
        "distill.target": _named(plan),
        "distill.target_achieved": _achieved(plan, fitted.achieved),
        f"distill.target_{guard.metric}_drop": f"{fitted.accuracy_drop():.4f} "
        f"(max {guard.max_drop:.4f}, validation rows)",
    }

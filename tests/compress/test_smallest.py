"""A drop-only target (tasks/compress/smallest.py): the config that asks for it, the search's
invariants on a small model with a guard whose line is known, what users read, and through the
CLI the goal on digits with the frontier on the parent run."""

from __future__ import annotations

import copy
import csv
import io
import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import pytest
import torch
from matplotlib.collections import LineCollection, PathCollection
from mlflow import MlflowClient

import distill
from distill.tasks.compress.architectures import build_mlp
from distill.tasks.compress.guard import Decision, Guard
from distill.tasks.compress.plan import first_probe, plan_target, smallest_params
from distill.tasks.compress.plots import frontier_figure
from distill.tasks.compress.smallest import (
    MIN_CUT,
    Start,
    frontier_table,
    rebuild_share,
    smallest_within,
)
from distill.tasks.compress.target import Candidate, Search
from distill.tasks.platform.config import PipelineConfig, TargetConfig, build_config, load_config
from distill.tasks.platform.errors import UserError
from tests.api.rows import FAST, _digits, _trained_mlp
from tests.compress.test_target import COSTS, _distill, _sets
from tests.conftest import ROOT

CONFIG = str(ROOT / "configs" / "digits.yaml")

# --- config ---------------------------------------------------------------------------------


def test_a_target_with_only_a_drop_is_the_smallest_within_it():
    cfg = load_config(CONFIG, ["target=null", "target.max_accuracy_drop=0.01"])
    assert cfg.target is not None
    assert (cfg.target.kind, cfg.target.value, cfg.target.max_builds) == ("smallest", 0.01, 6)
    assert all(getattr(cfg.target, k) is None for k in ("size_kb", "ratio", "params"))
    # the file's size kind removed, its drop (0.02) kept
    kept = load_config(CONFIG, ["target.size_kb=null"]).target
    assert (kept.kind, kept.value) == ("smallest", 0.02)
    r2 = build_config({}, ["target.max_r2_drop=0.05", "data.source=sklearn:diabetes"]).target
    assert (r2.kind, r2.value) == ("smallest", 0.05)
    assert build_config({}, ["target.max_accuracy_drop=0.01", "target.max_builds=3"]).target
    # the API's form
    assert TargetConfig.model_validate({"max_accuracy_drop": 0.01}).kind == "smallest"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["target.size_kb=20", "target.ratio=10"],
            (
                "config key 'target': give one of size_kb, ratio, params, latency_ms_b1, not 2 "
                "(got size_kb, ratio); or none, with max_accuracy_drop, for the smallest model "
                "within the drop"
            ),
        ),
        (
            ["target.confidence=0.8"],  # a target with neither a kind nor a drop
            (
                "config key 'target': give one of size_kb, ratio, params, latency_ms_b1, or "
                "max_accuracy_drop (max_r2_drop) alone for the smallest model within the drop"
            ),
        ),
        (
            ["target.size_kb=20", "target.max_builds=3"],
            (
                "config key 'target': max_builds applies only to a drop-only target (here "
                "size_kb is set); remove it or size_kb"
            ),
        ),
        (["target.max_accuracy_drop=0.01", "target.max_builds=0"], "greater than or equal to 1"),
    ],
)
def test_a_target_that_is_not_one_thing_is_refused_in_one_line(overrides, message):
    with pytest.raises(UserError) as err:
        build_config({}, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_drop_only_plan_starts_from_the_smallest_reduction_in_int8():
    plan = plan_target(TargetConfig(max_accuracy_drop=0.01), COSTS, 50_000, 100, 200_000)
    assert (plan.kind, plan.unit, plan.fmt, plan.reachable) == ("smallest", "bytes", "int8", False)
    assert plan.limit == 0 and plan.final_params == plan.reduce_params == 100
    # the first build the reduce stage makes is the bisection's first: the start undistilled
    # above it, unless the middle is within MIN_CUT of the start
    assert first_probe(10_000, 100) == 1_000 and first_probe(105, 100) == 105
    fp32_only = {"fp32": COSTS["fp32"]}  # compress.quantize.enabled=false
    assert plan_target(TargetConfig(max_accuracy_drop=0.01), fp32_only, 50_000, 100, 1).fmt == (
        "fp32"
    )


@pytest.mark.parametrize(
    "target, searched",
    [
        (TargetConfig(max_accuracy_drop=0.01), True),
        (TargetConfig(size_kb=0.001), True),  # below the smallest file
        (TargetConfig(latency_ms_b1=1e-9), True),  # below the smallest model's latency
        (TargetConfig(params=10), False),  # below the smallest model: pruned toward it
        (TargetConfig(size_kb=100), False),  # reachable: one shot
    ],
)
def test_the_search_builds_a_drop_only_or_an_unreachable_size_or_latency(target, searched):
    plan = plan_target(target, COSTS, 50_000, 100, 200_000)
    assert plan.searched is searched


@pytest.mark.parametrize(
    "floor, found, at_most",
    [(20_000, 22_528, 4), (2_000, 2_816, 4), (1, 176, 4), (10**6, 27_816, 4)],
)
def test_the_start_is_found_by_bisection_on_the_doubling_grid(monkeypatch, floor, found, at_most):
    """The grid 176, 352, ..., 22,528 below a 27,816-param teacher (the targets grid's ResNet1d):
    the smallest budget whose reconstruction keeps the guard (here: at least `floor` params),
    or the teacher's size, in at most 4 reconstructions where stepping up the grid took 8."""
    from types import SimpleNamespace

    from distill.tasks.compress import plan as planning

    built = []

    def reduce_model(teacher, X, cfg, mode):
        built.append(cfg.budget.params)
        return SimpleNamespace(student_params=cfg.budget.params)

    monkeypatch.setattr(planning, "reduce_model", reduce_model)
    monkeypatch.setattr(planning, "reconstruct", lambda *args: None)
    monkeypatch.setattr(planning, "torch_predictor", lambda model: None)
    guard = SimpleNamespace(
        check=lambda step, predict, params: SimpleNamespace(ok=params >= floor, drop=0.0)
    )
    plan = replace(
        plan_target(TargetConfig(max_accuracy_drop=0.01), COSTS, 27_816, 44, 100_000),
        teacher_params=27_816,
    )
    config = build_config({}, [])
    budget, tried = planning.smallest_start(
        None, None, config.reduce, config.reconstruct, guard, plan
    )
    assert budget == found and len(built) <= at_most and len(set(built)) == len(built)
    assert tried.split("; ")[0].startswith(f"{min(built):,}: drop")  # listed by budget


# --- the search -----------------------------------------------------------------------------


@dataclass(frozen=True)
class KeepsAbove(Guard):
    """The real guard's numbers, but a model keeps it exactly when it has at least `floor`
    parameters: the line the search has to find is known."""

    floor: int = 0
    within_floor: int = 0  # below it, a kept model's drop is above the allowance (unresolved)
    # a rebuild from the teacher (reduce, reconstruct, KD) keeps it down to this many parameters
    # instead (within, else over): a reduction distilled keeps more than a pruned student
    rebuild_floor: int | None = None
    # below it, a within model's interval reaches above the allowance (not shown within); the
    # larger the model, the lower its upper end
    shown_floor: int = 0

    def check(self, step, predict, params):
        real = super().check(step, predict, params)
        if self.rebuild_floor is not None and step.startswith("rebuild"):
            keeps = params >= self.rebuild_floor
            verdict = "within" if keeps else "over"
            high = self.max_drop + 1.0 / params if params < self.shown_floor else 0.02
            decision = Decision(real.drop, 0.0, high, 1, 0.0, verdict)
            return replace(real, ok=keeps, decision=decision)
        verdict = "within" if params >= self.within_floor else "unresolved"
        decision = Decision(real.drop, 0.0, 0.02, len(self.y_val), 0.0, verdict)
        if params < self.shown_floor:
            decision = replace(decision, high=self.max_drop + 1.0 / params)
        if params < self.floor:
            decision = replace(decision, verdict="over")
        return replace(real, ok=params >= self.floor, decision=decision)


def _mlp_at(budget: int) -> torch.nn.Module:
    """A 64-h-h-10 MLP with the widest h whose h² + 76h + 10 parameters fit `budget`: what the
    reduce stage would build at that budget (near, not on it)."""
    h = max(1, int((-76 + math.sqrt(76**2 - 4 * (10 - budget))) / 2))
    return build_mlp(64, [h, h], 10)


def _recording_mlp_at() -> tuple[list[int], Callable[[int], torch.nn.Module]]:
    """`_mlp_at` that also records the budgets it was asked for."""
    asked: list[int] = []

    def build_at(budget: int) -> torch.nn.Module:
        asked.append(budget)
        return _mlp_at(budget)

    return asked, build_at


def _search(
    digits,
    floor_of,
    builds,
    within_of=lambda n: 0,
    rebuild_floor_of=None,
    build_at=None,
    shown_of=lambda n: 0,
    distills=None,
    limit=None,
    guard_cls=None,
):
    """With `distills` (a list): the start is left undistilled (`Start`), the search gets the
    first rebuild at `first_probe`, and every KD of the start is appended to `distills`. With
    `limit` (kind, value): the plan of that target, below the smallest reachable model.
    `guard_cls`: a `KeepsAbove` of other numbers (`BoundAlike`), given the same fields."""
    cfg = PipelineConfig()
    torch.manual_seed(0)
    student = build_mlp(64, [48, 48], 10)
    n = sum(p.numel() for p in student.parameters())
    target = TargetConfig(max_accuracy_drop=0.01)
    example = torch.zeros(2, 64)
    plan = plan_target(target, {"fp32": COSTS["fp32"]}, n, smallest_params(student, example), n)
    plan = replace(plan, reduce_params=n)  # the budget the start was built at
    if limit is not None:
        plan = replace(plan, kind=limit[0], value=limit[1], limit=limit[1])
    guard = (guard_cls or KeepsAbove)(
        0.0,
        1.0,
        digits.X_val,
        digits.y_val,
        floor=floor_of(n),
        within_floor=within_of(n),
        rebuild_floor=rebuild_floor_of(n) if rebuild_floor_of else None,
        shown_floor=shown_of(n),
    )
    search = Search(
        student,
        digits,
        plan,
        {"fp32": COSTS["fp32"]},
        guard,
        cfg.compress.prune.model_copy(update={"recovery_epochs": 1}),
        cfg.finetune,
        cfg.compress.quantize,
        seed=0,
        latency_repeats=3,
    )
    first, start = student, None
    if distills is not None:  # the pipeline's way for a drop-only plan (plan.start_params)
        budget = first_probe(n, plan.smallest_params)
        first, search = (
            _mlp_at(budget),
            replace(search, plan=replace(plan, reduce_params=budget, start_params=n)),
        )
        start = Start(lambda: student, lambda m: distills.append(m) or copy.deepcopy(m))
    fitted = smallest_within(search, first, builds, build_at, start)
    return fitted, n, floor_of(n)


def test_the_search_ships_the_smallest_kept_file_and_bisects_the_line(digits):
    fitted, n, floor = _search(digits, lambda n: n // 3, builds=6)
    frontier = fitted.frontier
    assert frontier[0].name == "start" and frontier[0].params == n
    built = frontier[1:]
    assert 1 <= len(built) <= 6
    assert [c.name for c in built] == [f"prune round {i}" for i in range(1, len(built) + 1)]
    # every kept candidate keeps the guard, every rolled-back one breaks it
    assert all(c.params >= floor for c in frontier if c.kept)
    assert all(c.params < floor for c in frontier if not c.kept)
    assert fitted.rolled_back == [c.name for c in built if not c.kept]
    # each cut is from the last kept model: smaller than it, and after a cut broke the guard,
    # between it and the last one that broke (the bisection)
    last_kept, last_broke = n, None
    for c in built:
        assert c.params < last_kept
        if last_broke is not None:
            assert last_broke < c.params
        last_kept, last_broke = (c.params, last_broke) if c.kept else (last_kept, c.params)
    # the kept line shrinks in parameters and in the measured file, candidate after candidate
    kept = [c for c in frontier if c.kept]
    assert all(a.params > b.params for a, b in itertools.pairwise(kept))
    assert all(a.size_bytes > b.size_bytes for a, b in itertools.pairwise(kept))
    # it stopped because the next cut would remove under MIN_CUT, not for want of builds
    assert last_broke is not None and math.sqrt(last_kept * last_broke) > last_kept * (1 - MIN_CUT)
    assert "would remove under 5%" in fitted.bound
    # what ships: the one smallest kept file, and that model and export, measured
    shipped = [c for c in frontier if c.shipped]
    assert len(shipped) == 1 and shipped[0] is min(kept, key=lambda c: c.size_bytes)
    assert shipped[0].params == last_kept and floor <= last_kept < 1.2 * floor
    assert fitted.quantized.served.params == sum(p.numel() for p in fitted.model.parameters())
    assert fitted.quantized.served.params == shipped[0].params
    assert len(fitted.quantized.served.file_bytes) == shipped[0].size_bytes == fitted.achieved
    assert fitted.met and fitted.served_check is not None and fitted.served_check.ok
    assert all(c.latency_ms_b1 > 0 and c.served_as == "fp32" for c in frontier)


@pytest.mark.parametrize("limit, met", [(1e6, True), (1e-6, False)])
def test_a_latency_below_the_smallest_reachable_gets_the_search_and_its_latency(digits, limit, met):
    """A latency the plan's costs put below the smallest model (its fixed cost per call measured
    above the limit, as on a loaded machine): the smallest file within the drop ships, met where
    its measured batch-1 latency is within the limit; the target's figure is milliseconds."""
    fitted, _, _ = _search(digits, lambda n: n // 3, builds=3, limit=("latency_ms_b1", limit))
    shipped = next(c for c in fitted.frontier if c.shipped)
    assert fitted.met is met and fitted.bound.startswith("below the smallest reachable model")
    assert 0 < fitted.achieved < 10 and fitted.achieved != shipped.size_bytes  # ms, not bytes


def test_the_search_builds_no_more_than_its_bound(digits):
    fitted, _, _ = _search(digits, lambda n: n // 3, builds=2)
    assert len(fitted.frontier) == 3 and "2 builds spent (target.max_builds)" in fitted.bound
    # halving twice: 1/2 keeps the guard, 1/4 breaks it; the half ships
    assert [c.status for c in fitted.frontier] == ["kept", "shipped", "rolled back"]


def test_what_ships_is_the_smallest_file_whose_drop_is_shown_within(digits):
    # kept down to a third of the parameters, but only models of 45 % or more are within the
    # allowance; below, the rows cannot show them over (unresolved): the search walks on through
    # them, and ships the smallest that is within
    fitted, n, _ = _search(digits, lambda n: n // 3, builds=6, within_of=lambda n: int(0.45 * n))
    kept = [c for c in fitted.frontier if c.kept]
    within = [c for c in kept if c.params >= int(0.45 * n)]
    assert len(kept) > len(within) >= 2  # it went on below the within line
    shipped = [c for c in fitted.frontier if c.shipped]
    assert shipped == [min(within, key=lambda c: c.size_bytes)]
    assert fitted.served_check is not None and fitted.served_check.decision.verdict == "within"
    assert (
        "the smallest shown within 1 at 90% (2 smaller kept candidate(s) not shown within it)"
        in fitted.bound
    )


def test_what_ships_is_shown_within_not_the_smallest_point_estimate_within(digits):
    """Every kept candidate's point estimate is within, but below 45 % of the parameters the
    interval reaches above the allowance: picking the smallest point estimate of many would ship
    the one the rows flatter most (benchmarks/ship_rule.py); the smallest shown within ships."""
    fitted, n, _ = _search(digits, lambda n: n // 3, builds=6, shown_of=lambda n: int(0.45 * n))
    kept = [c for c in fitted.frontier if c.kept]
    shown = [c for c in kept if c.params >= int(0.45 * n)]
    assert len(kept) > len(shown) >= 1
    assert [c for c in fitted.frontier if c.shipped] == [min(shown, key=lambda c: c.size_bytes)]
    assert fitted.met


def test_where_no_candidate_is_shown_within_the_one_bound_lowest_ships(digits):
    fitted, _, _ = _search(digits, lambda n: n // 3, builds=3, shown_of=lambda n: n + 1)
    assert [c.name for c in fitted.frontier if c.shipped] == ["start"]  # the lowest upper end
    assert "no candidate's drop was shown within 1 at 90% on these rows" in fitted.bound
    assert "shipped the one they bound lowest (" in fitted.bound
    assert "smaller kept candidate(s) bound higher)" in fitted.bound


@dataclass(frozen=True)
class BoundAlike(KeepsAbove):
    """Every model kept, estimated within (drop 0.5 of an allowance of 1) and bound alike (its
    interval ending at 1.5: none shown within); with `shown_step`, that step's bound is 0.5."""

    shown_step: str = ""

    def check(self, step, predict, params):
        real = super().check(step, predict, params)
        high = 0.5 if step == self.shown_step else 1.5
        decision = Decision(0.5, 0.0, high, len(self.y_val), 0.0, "within")
        return replace(real, ok=True, drop=0.5, decision=decision)


def test_of_candidates_the_rows_bound_alike_the_largest_ships(digits):
    """None shown within, every kept candidate bound and estimated alike: the rows cannot tell
    them apart, and the smallest of them would be the one they flatter; the largest ships."""
    fitted, n, _ = _search(digits, lambda n: n // 3, builds=3, guard_cls=BoundAlike)
    kept = [c for c in fitted.frontier if c.kept]
    assert len(kept) >= 3 and all(c.drop_high == 1.5 for c in kept)
    shipped = [c for c in fitted.frontier if c.shipped]
    assert shipped == [max(kept, key=lambda c: c.size_bytes)] and shipped[0].params == n
    assert fitted.lineage == ""  # the start ships: the student the stages built
    assert f"{len(kept) - 1} smaller bound alike and estimated no lower" in fitted.bound
    assert "the largest of those ships" in fitted.bound and "bound higher" not in fitted.bound


@dataclass(frozen=True)
class StartShown(BoundAlike):
    shown_step: str = "start"  # the start once distilled: shown within


@pytest.mark.parametrize("guard_cls", [BoundAlike, StartShown])
def test_where_none_is_shown_within_the_undistilled_start_is_distilled(digits, guard_cls):
    """Rebuilds kept, none shown within, the start left undistilled (its KD, the costliest,
    skipped while smaller candidates stood): it is distilled at the end, the candidate most
    likely to be shown within, and the ship rule chooses again with it."""
    distills: list = []
    fitted, n, _ = _search(
        digits,
        lambda n: int(0.9 * n),
        builds=3,
        rebuild_floor_of=lambda n: int(0.15 * n),
        build_at=_mlp_at,
        distills=distills,
        guard_cls=guard_cls,
    )
    names = [c.name for c in fitted.frontier]
    assert len(distills) == 1 and names[0] == "start no KD" and names[-1] == "start"
    shipped = next(c for c in fitted.frontier if c.shipped)
    # shown within, the distilled start ships; bound alike with the rest, the largest: the same
    assert shipped.name == "start" and shipped.params == n
    assert ("the smallest shown within" in fitted.bound) is (guard_cls is StartShown)
    # the stage table's reconstructed and finetuned rows are rebuild 1's, not the start's
    first = next(c for c in fitted.frontier if c.name == "rebuild 1")
    assert fitted.lineage == (
        f"reconstructed, finetuned: the search's first build (rebuild 1, {first.params:,} "
        f"params); pruned, quantized: the candidate it shipped (start, {n:,} params)"
    )


@pytest.mark.parametrize("builds", [3, 6])
def test_rebuilds_from_the_teacher_bisect_below_what_pruning_keeps(digits, builds):
    # pruning keeps the guard down to 90 % of the start, a reduction distilled down to 15 %
    # (ResNet1d-32 in the targets grid: pruning its 22,388-param start stopped at 11,684, a
    # reduction to 988 params distilled was within); without rebuilds the search ships what
    # pruning keeps, with them a smaller file, found by bisection
    asked, build_at = _recording_mlp_at()
    floor_of, rebuild_floor_of = (lambda n: int(0.9 * n)), (lambda n: int(0.15 * n))
    fitted, n, floor = _search(digits, floor_of, builds, rebuild_floor_of=rebuild_floor_of)
    assert next(c.params for c in fitted.frontier if c.shipped) >= floor  # pruning alone
    fitted, n, floor = _search(
        digits, floor_of, builds, rebuild_floor_of=rebuild_floor_of, build_at=build_at
    )
    frontier, least = fitted.frontier, rebuild_floor_of(n)
    rebuilt = [c for c in frontier if c.name.startswith("rebuild")]
    assert len(rebuilt) == len(asked) == rebuild_share(builds) == builds - builds // 2
    assert [c.name for c in frontier] == (
        ["start"]
        + [f"rebuild {i}" for i in range(1, len(rebuilt) + 1)]
        + [f"prune round {i}" for i in range(1, len(frontier) - len(rebuilt))]
    )
    assert len(frontier) - 1 <= builds
    assert any(
        why in fitted.bound
        for why in (f"{builds} builds spent", "no cut by whole units", "would remove under")
    )
    # each rebuild lies inside the bracket between the largest candidate not within (at first
    # the smallest reachable model) and the smallest within (at first the start), near its
    # geometric middle (the reduce stage lands near its budget)
    lower, upper = smallest_params(_mlp_at(n), torch.zeros(2, 64)), n
    for c in rebuilt:
        assert lower < c.params < upper
        assert math.log(c.params) == pytest.approx(math.log(lower * upper) / 2, rel=0.05)
        assert c.kept == (c.params >= least)
        lower, upper = (lower, c.params) if c.kept else (c.params, upper)
    # pruning went on from the smallest rebuild within, toward the largest that was not
    pruned = [c for c in frontier if c.name.startswith("prune")]
    assert all(lower < c.params < upper for c in pruned) and not any(c.kept for c in pruned)
    # what ships: the smallest file within, a rebuild below what pruning keeps, and its bracket
    # is the bisection's: (n / smallest) ** (1 / 2 ** rebuilds) wide at most
    shipped = [c for c in frontier if c.shipped]
    assert len(shipped) == 1 and shipped[0] is min(
        (c for c in frontier if c.kept), key=lambda c: c.size_bytes
    )
    assert shipped[0].name.startswith("rebuild") and least <= shipped[0].params < floor
    width = (n / smallest_params(_mlp_at(n), torch.zeros(2, 64))) ** (1 / 2 ** len(rebuilt))
    assert shipped[0].params / lower <= width * 1.05
    assert fitted.met and fitted.quantized.served.params == shipped[0].params
    assert f"{len(rebuilt)} rebuilt from the reduce stage" in fitted.bound


def test_an_undistilled_start_is_distilled_only_where_the_search_needs_it(digits):
    # rebuilds distilled are within down to 15 % of the start: the search never prunes from the
    # start nor ships it, so its KD (the costliest: the largest student) never runs
    distills: list = []
    fitted, n, _ = _search(
        digits,
        lambda n: int(0.9 * n),
        builds=4,
        rebuild_floor_of=lambda n: int(0.15 * n),
        build_at=_mlp_at,
        distills=distills,
    )
    names = [c.name for c in fitted.frontier]
    assert names[:3] == ["start no KD", "rebuild 1", "rebuild 2"] and "start" not in names
    assert distills == [] and fitted.frontier[0].params == n
    # the first rebuild is the one the reduce stage built: the bracket's geometric middle
    lower = smallest_params(_mlp_at(n), torch.zeros(2, 64))
    first = fitted.frontier[1].params
    assert math.log(first) == pytest.approx(math.log(lower * n) / 2, rel=0.05)
    assert sum(not name.startswith("start") for name in names) <= 4
    assert next(c for c in fitted.frontier if c.shipped).name.startswith(("rebuild", "prune"))

    # nothing below the start is within: it is distilled once, then ships (or is pruned from)
    distills.clear()
    fitted, n, _ = _search(
        digits,
        lambda n: n,
        builds=2,
        rebuild_floor_of=lambda n: n,
        build_at=_mlp_at,
        distills=distills,
    )
    names = [c.name for c in fitted.frontier]
    assert len(distills) == 1 and names.count("start") == 1 and names[0] == "start no KD"
    shipped = next(c for c in fitted.frontier if c.shipped)
    assert shipped.name == "start" and shipped.params == n

    # only the start is shown within: pruning goes on from the smallest rebuild, and the start,
    # chosen at the end, is distilled then and ships
    distills.clear()
    fitted, n, _ = _search(
        digits,
        lambda n: n // 2,
        builds=4,
        rebuild_floor_of=lambda n: int(0.15 * n),
        build_at=_mlp_at,
        shown_of=lambda n: n,
        distills=distills,
    )
    names = [c.name for c in fitted.frontier]
    assert any(name.startswith("prune round") for name in names) and names[-1] == "start"
    assert len(distills) == 1 and next(c for c in fitted.frontier if c.shipped).name == "start"
    # the line counts the builds only: kept and rolled back add up to them, the start apart
    built, n_kept, n_back = map(
        int, re.search(r"(\d+) builds.*?: (\d+) kept, (\d+) rolled back", fitted.bound).groups()
    )
    assert n_kept + n_back == built == sum(not name.startswith("start") for name in names)


def test_a_kept_start_estimated_over_is_bisected_below_not_toward_the_teacher(digits):
    # the start keeps the guard, but its drop is estimated over the allowance (unresolved); a
    # reduction distilled is within down to 15 % (the targets grid's ResNet1d-32: its start 1.3
    # points over on 300 rows; rebuilt toward the teacher it shipped 1.2x)
    fitted, n, _ = _search(
        digits,
        lambda n: n // 3,
        builds=3,
        within_of=lambda n: n + 1,
        rebuild_floor_of=lambda n: int(0.15 * n),
        build_at=_mlp_at,
    )
    rebuilt = [c for c in fitted.frontier if c.name.startswith("rebuild")]
    assert len(rebuilt) == 2 and all(c.params < n for c in rebuilt)
    lower = smallest_params(_mlp_at(n), torch.zeros(2, 64))  # the first: the bracket's middle
    assert math.log(rebuilt[0].params) == pytest.approx(math.log(lower * n) / 2, rel=0.05)
    shipped = next(c for c in fitted.frontier if c.shipped)
    assert shipped.name.startswith("rebuild") and shipped.params < n


def test_a_cut_that_lands_on_the_one_that_broke_is_not_built_again(digits, monkeypatch):
    # whole units: every cut of this model lands at the same width (CNN1d 32-64's drop-only
    # search built the same 598-param cut six times, each rolled back)
    import distill.tasks.compress.smallest as smallest

    monkeypatch.setattr(smallest, "cut_toward", lambda *args: build_mlp(64, [8, 8], 10))
    fitted, n, floor = _search(digits, lambda n: n // 2, builds=6)
    landed = sum(p.numel() for p in build_mlp(64, [8, 8], 10).parameters())
    assert landed < floor
    assert [(c.name, c.params, c.status) for c in fitted.frontier] == [
        ("start", n, "shipped"),
        ("prune round 1", landed, "rolled back"),
    ]
    assert f"no cut by whole units lands between {n:,} params (kept) and {landed:,}" in (
        fitted.bound
    )


def test_a_start_that_breaks_the_guard_ships_unmet_and_builds_nothing(digits):
    fitted, _, _ = _search(digits, lambda n: n + 1, builds=6)
    assert [c.status for c in fitted.frontier] == ["shipped"] and not fitted.met
    assert "the start broke the guard" in fitted.bound


# --- what users see -------------------------------------------------------------------------


def _candidate(name, params, kb, score, kept, shipped=False):
    return Candidate(
        name,
        params,
        int(kb * 1024),
        "int8",
        score,
        0.975 - score,
        0.975 - score - 0.01,  # the drop's interval: 1 point either side
        0.975 - score + 0.01,
        0.975 - score,
        0.012,
        kept,
        shipped,
    )


FRONTIER = [
    _candidate("start", 22_255, 29.5, 0.9667, True),
    _candidate("prune round 1", 11_106, 17.1, 0.9556, True),
    _candidate("prune round 2", 5_532, 9.9, 0.8944, False),
    _candidate("prune round 3", 7_723, 13.2, 0.9611, True, shipped=True),
]


def test_the_frontier_table_fits_80_columns_with_each_candidates_numbers():
    text = frontier_table([c.row() for c in FRONTIER])
    lines = text.splitlines()
    # a line under the table for the rolled-back one: the float model's drop, the guard's input
    assert len(lines) == 2 + len(FRONTIER) + 1 and max(map(len, lines)) <= 80
    assert lines[-1] == "prune round 2 rolled back: its float model lost 8.06 points"
    assert lines[0].split() == [
        "candidate",
        "params",
        "size",
        "KB",
        "as",
        "val",
        "%",
        "drop",
        "90%",
        "hi",
        "b1",
        "ms",
        "status",
    ]
    # the served drop and its interval's upper end, what the ship rule reads
    assert lines[4].split() == (
        [
            "prune",
            "round",
            "2",
            "5,532",
            "9.9",
            "int8",
            "89.44",
            "+8.06",
            "+9.06",
            "0.0120",
            "rolled",
            "back",
        ]
    )
    assert lines[5].endswith("shipped") and lines[2].endswith("kept")


def test_the_frontier_figure_marks_the_shipped_candidate(tmp_path):
    fig = frontier_figure(FRONTIER, reference=0.975, max_drop=0.01)
    ax = fig.axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert labels == [
        "teacher",
        "teacher - 1 point (allowed)",
        "kept, int8",
        "rolled back",
        "shipped: 13.2 KB int8",
        "90% interval",
    ]
    kept, _, shipped = (c for c in ax.collections if isinstance(c, PathCollection))
    assert kept.get_offsets()[:, 0].tolist() == pytest.approx([29.5, 17.1, 13.2], abs=1e-3)
    assert shipped.get_offsets()[0].tolist() == pytest.approx([13.2, 96.11], abs=1e-3)
    # each candidate's bar spans its score's interval: the drop's, read from the teacher's score
    (bars,) = (c for c in ax.collections if isinstance(c, LineCollection))
    start = bars.get_segments()[0]
    assert start[:, 1].tolist() == pytest.approx([96.67 - 1.0, 96.67 + 1.0], abs=1e-2)
    fig.savefig(tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    # bars that may end at the agreement's bound say so
    held = frontier_figure(FRONTIER, reference=0.975, max_drop=0.01, agreement_rows=1200)
    assert held.axes[0].get_legend_handles_labels()[1][-1] == (
        "90% interval\n(or agreement, 1,200 rows)"
    )


def test_the_python_api_takes_a_drop_only_target():
    X, y, Xt, yt = _digits()
    result = distill.compress(
        _trained_mlp(X, y),
        train=(X, y),
        test=(Xt, yt),
        target={"max_accuracy_drop": 0.05, "max_builds": 2},
        **FAST,
    )
    assert result.frontier is not None
    # the start (undistilled, and distilled where the search needed it) and at most 2 builds
    builds = [r for r in result.frontier if not str(r["candidate"]).startswith("start")]
    assert 1 <= len(builds) <= 2 and result.frontier[0]["candidate"] in ("start", "start no KD")
    assert result.target is not None and result.target.startswith("target met: smallest within")
    shipped = [r for r in result.frontier if r["status"] == "shipped"]
    assert len(shipped) == 1 and shipped[0]["size_kb"] == pytest.approx(
        result.served.size_kb, abs=1e-3
    )


def test_builds_left_over_bridge_to_the_smallest_candidate_shown_within(digits):
    # rebuilds keep the guard down to 15 % of the start, but the rows show a drop within only
    # from half of it (the targets grid's BERT: rebuilds of 27,631 and 13,789 params within by
    # the point estimate, none shown within, and its 441,354-param start shipped): pruning stops
    # early, and the build left over is a rebuild between the largest kept candidate below the
    # start and the start, which is shown within and ships
    def search(builds: int, build_at):
        return _search(
            digits,
            lambda n: int(0.9 * n),
            builds,
            rebuild_floor_of=lambda n: int(0.15 * n),
            build_at=build_at,
            shown_of=lambda n: n // 2,
        )

    asked, build_at = _recording_mlp_at()
    fitted, n, _ = search(6, build_at)
    frontier = fitted.frontier
    bridge = frontier[-1]
    assert len(frontier) - 1 == 6 and bridge.name == f"rebuild {len(asked)}" and len(asked) == 4
    below = max(c.params for c in frontier[:-1] if c.kept and c.params < n)
    assert below < n // 2  # kept, not shown within: the start was what shipped before
    assert math.log(bridge.params) == pytest.approx(math.log(below * n) / 2, rel=0.05)
    assert bridge.kept and bridge.shipped and n // 2 <= bridge.params < n
    assert "; then 1 rebuild(s) toward the smallest candidate shown within; " in fitted.bound
    # with every build spent on the way down there is none to bridge with
    fitted, _, _ = search(3, _mlp_at)
    assert [c.name for c in fitted.frontier if c.shipped] == ["start"]


# --- through the CLI ------------------------------------------------------------------------


@pytest.mark.slow
def test_digits_ships_over_30x_within_the_drop_with_its_frontier(tmp_path, mlflow_store):
    """The issue's command on the default digits config (teacher 1,178.6 KB, 180 validation
    rows): `target=null target.max_accuracy_drop=0.01`. By-hand stages reach 46x; the search has
    to ship at least 30x, within the point on the validation rows it decides on and within two on
    the test rows.

    Until the search shipped by the interval, its answer here turned on a single row (the same
    command shipped 60.7x in one environment and 5.1x in another: every smaller candidate lost 2
    or 3 validation rows, a 217,386-param rebuild 2 there and 1 here, so it alone was estimated
    within and shipped), and this test ran on 360 validation rows. Picking the smallest of several
    candidates still favours the one the rows flatter, hence two points on test."""
    sets = ["target=null", "target.max_accuracy_drop=0.01", "register.model_name=least"]
    proc = _distill(["run", CONFIG, *_sets(sets)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "candidate" in proc.stdout and "shipped" in proc.stdout  # the frontier, printed
    out = proc.stdout.splitlines()
    line = [i for i, x in enumerate(out) if x.startswith("target met: smallest within")]
    assert len(line) == 1, proc.stdout[-3000:]
    verdict = [out[line[0]]]  # its clauses wrapped to the 80 columns of a pipe
    verdict += itertools.takewhile(lambda x: x.startswith(("  ", "- ")), out[line[0] + 1 :])
    assert len(verdict) > 1 and max(map(len, verdict)) <= 80, verdict
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri, uri)
    version = client.get_model_version("least", "1")
    run_id = version.tags["mlflow.run_id"]
    m = client.get_run(run_id).data.metrics
    assert m["compression_ratio"] >= 30 and m["target/val_accuracy_drop"] <= 0.01
    assert m["accuracy_drop"] <= 0.02  # on the test rows
    assert m["target/builds"] <= 6 and m["target/met"] == 1.0
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"frontier.csv", "frontier.png"} <= artifacts
    table = Path(client.download_artifacts(run_id, "frontier.csv", str(tmp_path)))
    rows = list(csv.DictReader(io.StringIO(table.read_text())))
    shipped = [r for r in rows if r["status"] == "shipped"]
    assert len(shipped) == 1 and float(shipped[0]["size_kb"]) == pytest.approx(
        m["final/size_kb"], abs=1e-3
    )
    # the stage table's finetuned row is rebuild 1: where another build ships, a line says so
    if not shipped[0]["candidate"].startswith("prune"):  # a round may be pruned from either
        named = f"pruned, quantized: the candidate it shipped ({shipped[0]['candidate']},"
        assert (named in " ".join(proc.stdout.split())) is (shipped[0]["candidate"] != "rebuild 1")
    # the builds and the start: undistilled, and distilled where the search needed it
    starts = [r["candidate"] for r in rows if r["candidate"].startswith("start")]
    assert len(rows) == m["target/builds"] + len(starts) and starts[0] == "start no KD"
    assert version.tags["distill.target"] == "smallest within 0.01 drop"

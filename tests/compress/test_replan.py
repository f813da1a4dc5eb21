"""A size or latency target's closed loop (tasks/compress/replan.py): the re-plan rule on
synthetic served sizes (a plan that mispredicts converges within the rebuild bound, the bound
holds, a small miss is pruned, a rebuild that breaks the guard is not shipped), and the whole
pipeline meeting a size target whose plan was made to mispredict."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import pytest
import torch

from distill.tasks.compress import plan as plan_module
from distill.tasks.compress.evaluate import TorchScriptModel
from distill.tasks.compress.guard import Check, Decision
from distill.tasks.compress.plan import Costs, plan_target, widened
from distill.tasks.compress.quantize import Quantized
from distill.tasks.compress.replan import PRUNE_CUT, next_params, refit_to_target, untried
from distill.tasks.compress.target import Build, Fitted
from distill.tasks.platform.config import TargetConfig, build_config
from distill.tasks.platform.errors import UserError
from tests.compress.test_target import FAST

# the plan's line: int8 file 5,000 B + 1 B/param (measured on narrowed teacher copies)
COSTS = {"int8": Costs((100, 10_100), (5_100, 15_100), (0.0101, 0.0201), "onnxruntime int8")}
TEACHER, SMALLEST = 50_000, 100


class Student(torch.nn.Module):
    """A stand-in built at a budget: the fake fit reads only its parameter count."""

    def __init__(self, params: int) -> None:
        super().__init__()
        self.n = params


@dataclass
class World:
    """What served files really measure: `fixed` + `per_param` bytes; a student below
    `guard_floor` params breaks the guard; a pruning round closes a miss of at most the cut it
    is allowed (and `prune_breaks`: each round is rolled back)."""

    fixed: float
    per_param: float
    guard_floor: int = 0
    prune_breaks: bool = False
    lands: float = 1.0  # the reduce stage builds this fraction of a rebuild's budget
    # below this many params the guard keeps a model only as not shown over ("unresolved": its
    # drop estimated over the allowance); the larger the model, the lower its drop's upper end
    estimate_floor: int = 0

    def __post_init__(self) -> None:
        self.calls: list[tuple[int, float]] = []  # (params, max_cut) of every fit
        self.built: list[int] = []  # the budgets the reduce stage was asked for

    def build_at(self, budget: int) -> Student:
        self.built.append(budget)
        # the reduce stage lands near, not on, its budget
        return Student(budget + 7 if len(self.built) == 1 else round(budget * self.lands) + 7)

    def bytes(self, params: int) -> float:
        return self.fixed + self.per_param * params

    def fit(self, plan, student: Student, max_cut: float) -> Fitted:
        self.calls.append((student.n, max_cut))
        params = student.n
        measured = self.bytes(params)
        stop, final = "met", params  # as fit_to_target: "met" says the limit holds, not the guard
        ok = params >= self.guard_floor
        if measured > plan.limit and not ok:
            stop = "guard"
        elif measured > plan.limit:
            need = (measured - plan.limit * 0.99) / self.per_param  # the exact cut
            if need > max_cut * params:
                stop = "cut"
            elif self.prune_breaks:
                stop = "rolled back"
            else:
                final = int(params - need)
        got = self.bytes(final)
        decision = None
        if self.estimate_floor:
            within = final >= self.estimate_floor
            drop = 0.0 if within else 0.02
            high = 0.04 - final * 1e-7
            verdict = "within" if within else "unresolved"
            decision = Decision(drop, -0.01, high, 300, drop, verdict if ok else "over")
        check = Check("reduction", final, 0.9, 0.0, ok, decision)
        served = Quantized(TorchScriptModel(b"", final, final), None, 0.0, None, "none")
        met = ok and got <= plan.limit
        return Fitted(
            student,
            served,
            None,  # type: ignore[arg-type]  # no training history here
            [check],
            [],
            check,
            got,
            met,
            f"stop {stop}",
            built=(params, "int8", measured),
            stop=stop,
            built_method="static, weights only",
        )


def _plan(size_kb: float):
    return plan_target(TargetConfig(size_kb=size_kb), COSTS, TEACHER, SMALLEST, 400_000)


def _run(world: World, size_kb: float = 20, max_rebuilds: int = 3):
    plan = _plan(size_kb)
    return plan, _refit(world, plan, max_rebuilds)


def _refit(world: World, plan, max_rebuilds: int = 3):
    """The closed loop of `plan` in `world`, from a first student built at its budget."""
    return refit_to_target(
        plan,
        COSTS,
        world.build_at(plan.reduce_params),
        world.build_at,
        lambda s, cut: world.fit(plan, s, cut),
        max_rebuilds,
    )


def test_a_plan_that_mispredicts_converges_by_secant_within_the_bound():
    # 20 KB = 20,480 B, aimed 1 % under (20,275.2): the plan says 15,275 params (its line: 5,000
    # B + 1 B/param); the real files cost 15,000 B + 0.5 B/param: 22,641 B at the 15,282 params
    # built, a cut of 31 % to close (over PRUNE_CUT): rebuilt, not pruned
    world = World(fixed=15_000, per_param=0.5)
    plan, fitted = _run(world)
    assert plan.reduce_params == 15_275
    b = fitted.builds
    assert [x.n for x in b] == [0, 1, 2] and fitted.met and b[-1].met and not b[0].met
    assert [c for _, c in world.calls] == [PRUNE_CUT] * 3  # no build pruned: each was rebuilt
    # build 0 as the plan predicted it (its line at the params built) and as measured
    assert (b[0].params, b[0].measured) == (15_282, 22_641)
    assert b[0].predicted == pytest.approx(20_282)
    # rebuild 1: the plan's slope (1 B/param) through build 0's measurement, 7,359 B + 1 B/param,
    # meets the aim at 12,916 params, asked of the reduce stage as 12,916 x 15,275 / 15,282
    # the fit did not prune it: the cut it needs is over PRUNE_CUT, so the line says why
    assert b[0].then == "not pruned (a cut over 15% needed); rebuild at 12,916 params"
    assert world.built[1] == round(12_916 * 15_275 / 15_282) == 12_910
    assert b[1].predicted == pytest.approx(20_276, abs=1)  # by the anchored line: at the aim
    # it measured 21,458.5 B (the slope is 0.5, not 1); the secant through builds 0 and 1 is the
    # real line: rebuild 2 at (20,275.2 - 15,000) / 0.5 = 10,550 params
    assert b[1].measured == 21_458.5 and b[1].then.endswith("; rebuild at 10,550 params")
    assert b[2].predicted == pytest.approx(b[2].measured)  # the secant predicted it exactly
    assert b[2].measured <= plan.limit and fitted.achieved == b[2].measured
    assert b[2].then == "shipped: met" and "build 2 of 3 shipped" in fitted.bound
    assert {x.method for x in b} == {"static, weights only"}  # how each build's export served
    assert "0: 15,282 params, predicted 19.8 KB, measured 22.1 KB" in fitted.bound


@pytest.mark.parametrize("max_rebuilds", [0, 1, 2])
def test_the_number_of_rebuilds_respects_the_bound(max_rebuilds):
    # a world no secant can satisfy: every file is 30 KB however small, the target 20 KB
    world = World(fixed=30_000, per_param=0.0001)
    _, fitted = _run(world, max_rebuilds=max_rebuilds)
    assert len(fitted.builds) == len(world.built) == max_rebuilds + 1
    assert not fitted.met
    # the last build prunes as far as it takes (the fit before the loop); the others do not
    assert [c for _, c in world.calls] == [PRUNE_CUT] * max_rebuilds + [1.0]
    if max_rebuilds:
        assert (
            fitted.builds[-1].then
            == f"stopped: {max_rebuilds} rebuilds spent (target.max_rebuilds)"
        )
        # each rebuild smaller than every build that missed
        assert all(b.params < a.params for a, b in pairwise(fitted.builds))


def test_a_small_miss_is_pruned_and_a_rolled_back_round_is_rebuilt():
    # 3 % over: a pruning round closes it, no rebuild
    world = World(fixed=5_600, per_param=1.0)
    _, fitted = _run(world)
    assert len(fitted.builds) == 1 and fitted.met and len(world.built) == 1
    assert fitted.builds[0].final_params < fitted.builds[0].params  # pruned
    assert "one build" in fitted.bound
    # the same miss where the guard rolls the round back: rebuilt from the reduce stage
    breaks = World(fixed=5_600, per_param=1.0, prune_breaks=True)
    _, fitted = _run(breaks)
    assert len(fitted.builds) == 2 and fitted.met and len(breaks.built) == 2
    assert fitted.builds[0].then.startswith("its pruning round broke the guard; rebuild at")


def test_a_rebuild_that_breaks_the_guard_is_not_shipped():
    # build 0 (15,282 params) keeps the guard and misses by 46 %; the rebuild the line asks for
    # (5,638) breaks it, so does the one the secant asks for (8,850: where the size fits), and
    # the bisection between that and build 0 (below 12,000 too)
    world = World(fixed=7_000, per_param=1.5, guard_floor=12_000)
    _, fitted = _run(world)
    b = fitted.builds
    assert [x.guard_ok for x in b] == [True, False, False, False]
    assert b[1].then.startswith("not shipped (it broke the guard); rebuild at")
    assert b[2].then.startswith("not shipped") and "rebuild at 8,850" in b[1].then
    # the line now points below a build that broke the guard: the geometric middle of the bracket
    assert b[1].params < b[2].params < b[3].params < b[0].params
    assert b[3].params == pytest.approx((8_846 * 1.02 * 15_282 * 0.98) ** 0.5, rel=0.01)
    assert fitted.quantized.served.params == b[0].final_params == 15_282
    assert not fitted.met and "build 0 of 4 shipped" in fitted.bound
    # with a floor the bisection reaches, the rebuild that keeps the guard and fits ships
    world = World(fixed=7_000, per_param=1.5, guard_floor=8_000)
    _, fitted = _run(world)
    assert [x.guard_ok for x in fitted.builds] == [True, False, True] and fitted.met


def test_a_rebuild_that_meets_the_size_but_breaks_the_guard_is_bisected_not_a_stop():
    # CNN1d 32-64 at size_kb=7.8 (docs/benchmarks.md): build 0 missed by far more than a pruning
    # round closes, the rebuild landed under its budget (1,354 params for 1,632), met the size
    # and broke the guard, and the loop stopped there ("stopped: met") shipping build 0. Here:
    # 12,000 B + 1 B/param against 20 KB (fits up to 8,275 params), the reduce stage landing at
    # 83 % of a rebuild's budget, the guard holding from 7,500 params. Build 0 (15,282) misses;
    # rebuild 1, asked for 8,275, lands at 6,872: fits, breaks the guard; the secant through both
    # says 8,275 again, a budget scaled by how rebuild 1 landed: it keeps the guard and fits
    world = World(fixed=12_000, per_param=1.0, guard_floor=7_500, lands=0.83)
    plan, fitted = _run(world)
    b = fitted.builds
    assert b[1].measured <= plan.limit and not b[1].guard_ok and not b[1].met
    assert b[1].then.startswith("not shipped (it broke the guard); rebuild at")
    assert "stopped: met" not in fitted.bound
    assert b[1].params < b[2].params < b[0].params  # inside the bracket
    assert b[2].guard_ok and b[2].measured <= plan.limit and fitted.met
    assert fitted.quantized.served.params == b[2].params
    assert "build 2 of 3 shipped" in fitted.bound and "2: " in fitted.bound
    # with no rebuild left after it, the guard-broken build is named as such, and build 0 ships
    _, fitted = _run(World(12_000, 1.0, guard_floor=7_500, lands=0.83), max_rebuilds=1)
    assert fitted.builds[-1].then == "stopped: it broke the guard (not shipped)"
    assert not fitted.met and "build 0 of 2 shipped" in fitted.bound


def test_a_planned_build_under_the_limit_that_breaks_the_guard_is_rebuilt_larger():
    # the plan's line (5,000 B + 1 B/param) says 15,275 params for 20 KB; files really measure
    # 1,000 B less, and the guard holds from 15,500 params: build 0 fits with room and breaks
    # it. A larger build fits too (up to 16,275 by the measured line): rebuilt there, not stopped
    world = World(fixed=4_000, per_param=1.0, guard_floor=15_500)
    plan, fitted = _run(world)
    b = fitted.builds
    assert b[0].measured <= plan.limit and not b[0].guard_ok
    assert b[0].then.startswith("not shipped (it broke the guard); rebuild at")
    assert len(b) == 2 and b[0].params < b[1].params and b[1].guard_ok and fitted.met
    assert b[1].measured <= plan.limit
    # over the limit, the planned build that breaks the guard still stops the loop
    world = World(fixed=6_000, per_param=1.0, guard_floor=16_000)
    _, fitted = _run(world)
    assert [x.then for x in fitted.builds] == ["stopped: it broke the guard"]


def test_a_budget_next_to_one_built_moves_to_the_middle_of_the_budgets_either_side():
    # CNN1d 32-64, size_kb=7.8: budget 1,638 built 1,354 params (the guard broke), 1,973 built
    # 1,963 (over the limit); 1,631 params wanted, scaled from the last build: budget 1,639,
    # next to 1,638, which built 1,354 again
    def build(n, budget, params):
        return Build(n, budget, params, "int8", 0.0, 0.0, 0.0, params, True, False, "")

    builds = [build(0, 3_173, 3_162), build(1, 1_638, 1_354), build(2, 1_973, 1_963)]
    middle = round((1_638 * 1_973) ** 0.5)
    assert untried(1_639, 1_631, builds) == middle
    assert untried(1_950, 1_631, builds) == middle  # next to 1,973
    assert untried(1_800, 1_631, builds) == 1_800  # clear of both
    assert untried(1_639, 1_631, builds[:1]) == 1_639  # nothing built below the want yet
    # a budget clear of both, where the last build landed on an earlier one's parameters (1,403
    # wanted; budgets 1,450 and 1,502 both built 1,354): the middle, not another small step up
    again = [build(0, 2_440, 2_428), build(1, 1_450, 1_354), build(2, 1_502, 1_354)]
    assert untried(1_555, 1_403, again) == round((1_502 * 2_440) ** 0.5)
    assert untried(1_555, 1_403, again[:2]) == 1_555  # nothing landed twice yet


def test_the_next_budget_stays_inside_the_bracket():
    plan = _plan(20)

    def build(n, params, measured, ok=True):
        return Build(n, params, params, "int8", 0.0, measured, measured, params, ok, False, "")

    # a guard broken at 9,000 and the limit missed at 9,100: nothing between them
    assert (
        next_params(plan, COSTS, [build(0, 9_000, 30_000, ok=False), build(1, 9_100, 30_000)])[0]
        is None
    )
    # a secant that says a larger model is smaller (noise): the plan's slope through the last
    # build says 11,275 params, held 2 % under every build that missed instead
    got, _ = next_params(plan, COSTS, [build(0, 10_000, 22_000), build(1, 12_000, 21_000)])
    assert got == 9_800
    # no build missed yet below the teacher: the anchored line, within the teacher's size
    assert next_params(plan, COSTS, [build(0, 20_000, 26_000)])[0] == 14_275


def test_an_unreachable_plan_takes_no_rebuilds():
    world = World(fixed=30_000, per_param=1.0)
    plan = _plan(1)  # below the smallest model
    assert not plan.reachable
    fitted = refit_to_target(
        plan, COSTS, Student(500), world.build_at, lambda s, c: world.fit(plan, s, c), 3
    )
    assert len(fitted.builds) == 1 and world.built == [] and world.calls[0][1] == 1.0


def test_a_widened_plan_distils_twice_the_size_and_prunes_it_to_the_limit():
    plan = _plan(12)  # 12 KB: ~7,100 params by the line (the teacher: 50,000)
    wide = widened(plan, 2.0)
    assert (wide.reduce_params, wide.widen) == (2 * plan.reduce_params, 2.0)
    assert wide.final_params == plan.final_params and "then pruned to the limit" in wide.why
    world = World(fixed=5_000, per_param=1.0)
    fitted = _refit(world, wide)
    # one build, twice as large as planned, cut by half as the plan says (not a rebuild)
    assert world.calls == [(wide.reduce_params + 7, 1.0)] and len(world.built) == 1
    assert fitted.met and len(fitted.builds) == 1
    assert fitted.builds[0].final_params <= plan.reduce_params < fitted.builds[0].params
    # its pruning round rolled back by the guard: rebuilt where the line meets the limit
    breaks = World(fixed=5_000, per_param=1.0, prune_breaks=True)
    fitted = _refit(breaks, wide)
    assert fitted.met and len(fitted.builds) == 2
    assert fitted.builds[0].then.startswith("its pruning round broke the guard; rebuild at")
    assert breaks.calls[1][1] == PRUNE_CUT  # the rebuild is fitted as any other
    assert abs(breaks.built[1] - plan.reduce_params) < 0.05 * plan.reduce_params


def test_widening_leaves_latency_searches_and_students_near_the_teacher_alone():
    assert widened(_plan(20), 1.0) == _plan(20)
    assert widened(_plan(1), 2.0) == _plan(1)  # below the smallest model: a search
    latency = plan_target(TargetConfig(latency_ms_b1=0.015), COSTS, TEACHER, SMALLEST, 400_000)
    assert latency.reachable and widened(latency, 2.0) == latency
    near = _plan(40)  # ~35,000 of the teacher's 50,000: twice that is over half of it
    assert near.reachable and widened(near, 2.0) == near
    params = plan_target(TargetConfig(params=10_000), COSTS, TEACHER, SMALLEST, 400_000)
    assert widened(params, 2.0).reduce_params == 20_000
    # students cut from a smaller copy (a trimmed vocabulary): half of that is the ceiling
    assert widened(params, 2.0, cut_from=30_000) == params


def test_widen_is_a_size_or_parameter_targets_key():
    assert build_config({}, ["target.params=100", "target.widen=3"]).target.widen == 3
    with pytest.raises(UserError, match="widen applies only to a size_kb, ratio or params"):
        build_config({}, ["target.latency_ms_b1=0.02", "target.widen=2"])
    with pytest.raises(UserError, match="a drop-only target searches"):
        build_config({}, ["target.max_accuracy_drop=0.01", "target.widen=2"])
    with pytest.raises(UserError, match=r"target\.widen"):
        build_config({}, ["target.size_kb=20", "target.widen=0.5"])


def test_max_rebuilds_is_a_size_or_latency_targets_key():
    assert build_config({}, ["target.size_kb=20"]).target.max_rebuilds == 3
    assert build_config({}, ["target.latency_ms_b1=0.02", "target.max_rebuilds=0"]).target
    with pytest.raises(UserError, match="max_rebuilds applies only to a size_kb, ratio"):
        build_config({}, ["target.max_accuracy_drop=0.01", "target.max_rebuilds=1"])


# int8 served whatever its latency: at ~5,000 params static int8 and fp32 are within a few % at
# batch 256 on this machine, and the measured rule's call flipped in 2 runs of 14 (fp32 then,
# 14 KB: a rebuild at 880 params instead of the one build these tests are about)
INT8 = ["compress.quantize.format=int8"]


def _bytes_per_param_40_percent_low(monkeypatch) -> None:
    """The plan's bytes per parameter made 40 % too low (`Costs.line`)."""
    real_line = Costs.line

    def line(self, what):
        fixed, slope = real_line(self, what)
        return (fixed, 0.6 * slope) if what == "bytes" else (fixed, slope)

    monkeypatch.setattr(Costs, "line", line)


@pytest.mark.slow
def test_the_pipeline_meets_a_size_target_its_plan_mispredicts(digits, monkeypatch):
    # the plan's bytes per parameter made 40 % too low: it plans a student ~1.7x too large, whose
    # int8 file misses 8 KB by far more than a pruning round closes; the loop rebuilds from the
    # reduce stage and the served file meets it
    from distill.tasks.compress.evaluate import saved_size
    from distill.tasks.compress.pipeline import compress
    from distill.tasks.compress.target import target_record

    _bytes_per_param_40_percent_low(monkeypatch)
    # the plan as the line made it: no reconstruction measured before KD (`plan.shaped`)
    monkeypatch.setattr(plan_module, "shaped", lambda plan, *_: plan)
    cfg = build_config(
        {},
        [*FAST, *INT8, "target.size_kb=8", "target.max_accuracy_drop=0.5"],
    )
    out = compress(cfg, digits)
    fitted, plan = out.target.fitted, out.target.plan
    first = fitted.builds[0]
    assert first.measured > plan.limit * 1.15
    assert first.then.startswith("not pruned (a cut over 15% needed); rebuild at")
    assert first.measured > first.predicted  # the plan said it fits
    assert 2 <= len(fitted.builds) <= 4 and out.target.met
    served = saved_size(out.quantized.served)[0]
    assert served <= 8 * 1024 and served == fitted.achieved == fitted.builds[-1].achieved
    assert fitted.builds[-1].params < first.params
    params, metrics = target_record(plan, out.target.costs, fitted, out.target.guard, 1)
    assert metrics["rebuilds"] == len(fitted.builds) - 1
    assert metrics["build_0.measured"] == first.measured and "build_1" in params
    assert "shipped" in out.target.line and "predicted" in out.target.line


def _shape_world(fixed: float, per_param: float, unit: int = 10):
    """A reduce stage that lands on whole units of `unit` params under its budget, and a served
    file of `fixed` bytes plus `per_param` a parameter; the budgets it was asked for."""
    from distill.tasks.compress.plan import Shape

    asked: list[int] = []

    def measure_at(budget: int) -> Shape:
        asked.append(budget)
        params = budget // unit * unit
        return Shape(budget, params, "fp32", fixed + per_param * params)

    return measure_at, asked


def test_the_shape_fit_corrects_the_lines_fixed_bytes_in_one_more_reconstruction():
    # the costs (uniformly narrowed copies) say 655 B + 4 B/param; the reduce stage's uneven widths
    # serve 900 B + 4 B/param (more layers' overhead): the first miss anchors the slope, the
    # second reconstruction fits
    costs = {"fp32": Costs((100, 5_000), (1_055, 20_655), (0.01, 0.02), "onnxruntime fp32")}
    target = TargetConfig(size_kb=8, max_accuracy_drop=0.01)
    plan = plan_target(target, costs, 10_000, 100, 40_000)
    measure_at, asked = _shape_world(900, 4.0)
    shaped = plan_module.shaped(plan, costs, measure_at)
    assert asked[0] == plan.reduce_params and shaped.shapes[0].measured > plan.limit
    assert len(asked) == 2
    got = shaped.shapes[-1]
    assert shaped.reduce_params == got.budget and plan_module.shape_fits(plan, got.measured)
    assert got.measured <= plan.limit and shaped.final_params == got.params
    assert "reconstructions measured before KD" in shaped.why
    # one try: the budget moves to where the line through the one measured meets the aim,
    # unmeasured
    measure_at, asked = _shape_world(900, 4.0)
    once = plan_module.shaped(plan, costs, measure_at, tries=1)
    assert asked == [plan.reduce_params] and once.reduce_params == shaped.reduce_params
    assert "where their line meets the aim" in once.why


def test_the_shape_fit_finds_a_wrong_slope_by_its_secant():
    # the costs' slope 40 % low: the second reconstruction, read off it, lands far under; the
    # third, on the secant through the two, fits
    costs = {"fp32": Costs((100, 5_000), (895, 12_655), (0.01, 0.02), "onnxruntime fp32")}
    plan = plan_target(TargetConfig(size_kb=8, max_accuracy_drop=0.01), costs, 10_000, 100, 40_000)
    measure_at, _ = _shape_world(900, 4.0)
    shaped = plan_module.shaped(plan, costs, measure_at)
    first, second, _ = shaped.shapes
    assert first.measured > plan.limit and second.measured < 0.7 * plan.limit
    # the third fits, or (the tries spent) the budget planned is where the secant meets the aim
    assert plan_module.shape_fits(plan, measure_at(shaped.reduce_params).measured)


def test_the_shape_fit_corrects_a_latency_plan_by_its_measured_reconstructions():
    # the costs' copies say 0.0098 ms + 2.0e-6 ms/param at batch 1; the reduce stage's students
    # measure 0.012 ms + 2e-6 (a slower runtime path): the line's budget misses, the next fits
    costs = {"fp32": Costs((100, 5_000), (1_055, 20_655), (0.01, 0.02), "onnxruntime fp32")}
    target = TargetConfig(latency_ms_b1=0.015, max_accuracy_drop=0.01)
    plan = plan_target(target, costs, 10_000, 100, 40_000)
    measure_at, asked = _shape_world(0.012, 2e-6)
    shaped = plan_module.shaped(plan, costs, measure_at)
    assert asked[0] == plan.reduce_params and shaped.shapes[0].measured > plan.limit
    got = shaped.shapes[-1]
    assert len(asked) == 2 and plan_module.shape_fits(plan, got.measured)
    assert shaped.reduce_params == got.budget < plan.reduce_params
    assert "0.0" in shaped.why and "ms fp32" in shaped.why  # the measurements, in ms


def test_the_shape_fit_leaves_params_and_searched_plans_alone():
    costs = {"fp32": Costs((100, 5_000), (895, 12_655), (0.01, 0.02), "onnxruntime fp32")}
    measure_at, asked = _shape_world(900, 4.0)
    for target in (
        TargetConfig(params=3_000, max_accuracy_drop=0.01),
        TargetConfig(size_kb=0.5, max_accuracy_drop=0.01),  # below the smallest model: searched
        TargetConfig(max_accuracy_drop=0.01),
    ):
        plan = plan_target(target, costs, 10_000, 100, 40_000)
        assert plan_module.shaped(plan, costs, measure_at) == plan
    assert asked == []


@pytest.mark.slow
def test_reconstructions_measured_before_kd_correct_a_mispredicting_plan(digits, monkeypatch):
    """The same plan, 40 % low in bytes per parameter, its budget corrected by measuring the
    reconstructions before any KD: one build meets the limit, no rebuild and no pruning."""
    from distill.tasks.compress.pipeline import compress
    from distill.tasks.compress.target import target_record

    _bytes_per_param_40_percent_low(monkeypatch)
    cfg = build_config({}, [*FAST, *INT8, "target.size_kb=8", "target.max_accuracy_drop=0.5"])
    out = compress(cfg, digits)
    fitted, plan = out.target.fitted, out.target.plan
    assert 2 <= len(plan.shapes) <= plan_module.SHAPE_TRIES
    assert plan.shapes[0].measured > plan.limit  # the line's budget, measured: it misses
    (build,) = fitted.builds
    fitting = [s for s in plan.shapes if plan_module.shape_fits(plan, s.measured)]
    if fitting:  # the second or third reconstruction fits: its budget is planned
        assert plan.reduce_params == max(fitting, key=lambda s: s.params).budget
    else:  # the tries spent (the third a little over, as on some machines): the budget where
        # the line through the last two meets the aim, measured only by its build
        assert plan.reduce_params not in [s.budget for s in plan.shapes]
        under = max(s.params for s in plan.shapes if s.measured <= plan.limit)
        over = min(s.params for s in plan.shapes if s.measured > plan.limit)
        assert under < build.params < over
    assert plan_module.shape_fits(plan, build.measured)
    assert out.target.met and fitted.achieved == build.measured  # no pruning round
    assert not any(c.step.startswith("prune") for c in fitted.checks)
    params, metrics = target_record(plan, out.target.costs, fitted, out.target.guard, 1)
    assert metrics["shape_0.measured"] == plan.shapes[0].measured and "shapes" in params


def test_a_student_built_again_is_not_distilled_again():
    """Two budgets that land on the same whole units build the same student: its KD runs once,
    and every caller gets its own copy (pruning one does not touch the next)."""
    from distill.tasks.compress.replan import distilled_once

    def reconstructed_at(budget: int) -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Linear(4, 2 if budget < 100 else 3)  # whole units: 2 below 100

    distils: list[int] = []

    def distilled(student: torch.nn.Module) -> torch.nn.Module:
        distils.append(student.out_features)
        with torch.no_grad():
            student.weight.add_(1.0)  # what KD changed
        return student

    build_at = distilled_once(reconstructed_at, distilled)
    first, again, other = build_at(80), build_at(95), build_at(150)
    assert distils == [2, 3]  # 95 landed where 80 did
    assert first is not again and torch.equal(first.weight, again.weight)
    with torch.no_grad():
        first.weight.zero_()
    assert torch.equal(build_at(90).weight, again.weight) and other.out_features == 3


def test_a_build_that_meets_with_its_drop_estimated_over_gets_a_spare_rebuild():
    # the targets grid's latency targets: a build met the limit with room under it, its drop 2.00
    # validation points against a 1-point allowance, kept as not shown over, and shipped. Here:
    # 15,000 B + 0.25 B/param against 20 KB (fits up to 21,900 params); build 0 (15,282 params,
    # 18,820 B) meets, and below 16,000 params the drop is estimated over: a rebuild between it
    # and the teacher, by the plan's slope through build 0 at the aim: 16,736 params
    world = World(fixed=15_000, per_param=0.25, estimate_floor=16_000)
    _, fitted = _run(world)
    b = fitted.builds
    assert (
        b[0].met
        and not b[0].within
        and b[0].then.startswith(
            "met, its drop estimated over the allowance (0.0200, interval -0.0100.."
        )
    )
    assert b[0].then.endswith("rebuild at 16,736 params")
    assert [x.within for x in b] == [False, True] and b[1].then == "shipped: met"
    assert fitted.met and fitted.quantized.served.params == b[1].params == 16_735
    assert "build 1 of 2 shipped" in fitted.bound
    assert fitted.lineage == (  # the stage table's rows: which build each is
        "reconstructed, finetuned: build 0 (15,282 params); pruned, quantized: build 1, "
        "rebuilt from the reduce stage (16,735 params)"
    )
    # with no build over the limit the rebuild is where the line aims, not within MAX_SHRINK of
    # the teacher (the grid's BERT at ratio=30: 58,635 params met at 102.4 KB, estimated over;
    # the rebuild went to a quarter of the teacher, 202,073 params, 285 KB): 8 KB, build 0 at
    # 3,117 params (6,558.5 B), the line's aim 8,110 B at 4,668 params
    plan, fitted = _run(World(5_000, 0.5, estimate_floor=3_500), size_kb=8)
    b = fitted.builds
    assert plan.reduce_params == 3_110 and b[0].params == 3_117 and not b[0].within
    assert b[0].then.endswith("rebuild at 4,668 params") and b[1].within and fitted.met
    # no rebuild left: the build ships as it is, met
    _, fitted = _run(World(15_000, 0.25, estimate_floor=16_000), max_rebuilds=0)
    assert [x.then for x in fitted.builds] == ["shipped: met"] and fitted.met
    assert fitted.lineage == ""
    # no build the rows estimate within: of those that met, the one whose drop's bound is lowest
    _, fitted = _run(World(15_000, 0.25, estimate_floor=30_000), max_rebuilds=1)
    b = fitted.builds
    assert [x.met for x in b] == [True, True] and not any(x.within for x in b)
    assert fitted.quantized.served.params == b[1].params and "build 1 of 2 shipped" in fitted.bound
    # and where the limit leaves no room above it, no rebuild: build 0 missed just above it
    world = World(fixed=5_600, per_param=1.0, estimate_floor=20_000)  # pruned 3 % to meet
    _, fitted = _run(world)
    assert len(fitted.builds) == 1 and fitted.met and not fitted.builds[0].within
    assert "drop over the allowance below" in fitted.builds[0].then
    # nor where build 0 met it at the line's limit, none over it (the reconstructions measured
    # before KD plan builds there): a rebuild toward the teacher would miss (digits, size_kb=30:
    # one went to 82,452 params, 93 KB)
    world = World(fixed=5_148, per_param=1.0, estimate_floor=20_000)  # 20,430 B at 15,282
    _, fitted = _run(world)
    assert len(world.built) == 1 and fitted.met and not fitted.builds[0].within
    assert fitted.builds[0].then.endswith("and 15,332 (the limit, by the measured line)")


def test_a_latency_plan_is_measured_on_its_reconstructions_before_kd(digits, monkeypatch):
    """A batch-1 latency the costs' copies mispredict (every student 0.001 ms slower than the
    line): the reconstructions measured before KD move the budget, and the one build meets the
    limit, measuring what its reconstruction did (the same shapes, the same format)."""
    from distill.tasks.compress import target as target_module
    from distill.tasks.compress.pipeline import compress

    costs = {"fp32": Costs((100, 9_000), (1_000, 37_000), (0.005, 0.0139), "onnxruntime fp32")}
    monkeypatch.setattr(plan_module, "measure_costs", lambda *a, **k: dict(costs))

    def world(plan, served, X, repeats):  # a machine whose latency is exact
        return 0.006 + 1e-6 * served.params

    monkeypatch.setattr(plan_module, "achieved", world)
    monkeypatch.setattr(target_module, "achieved", world)
    cfg = build_config({}, [*FAST, "target.latency_ms_b1=0.01", "target.max_accuracy_drop=0.5"])
    out = compress(cfg, digits)
    fitted, plan = out.target.fitted, out.target.plan
    assert plan.shapes[0].measured > plan.limit  # the line's budget (about 5,100 params)
    assert plan_module.shape_fits(plan, plan.shapes[-1].measured)
    (build,) = fitted.builds
    assert build.params == plan.shapes[-1].params and build.measured == plan.shapes[-1].measured
    assert out.target.met and not any(c.step.startswith("prune") for c in fitted.checks)

"""Targets on what ships: plan the stages to meet the final model's size, ratio, parameters or
batch-1 latency, and guard accuracy on validation rows at every lossy step.

- **Costs** (`measure_costs`): the file the registry would get (ONNX fp32 or int8, or
  TorchScript) and its batch-1 latency in the runtime that serves it, measured on two narrowed
  copies of the teacher (every group at its smallest width, and at half width): a line in the
  parameter count, i.e. fixed bytes (the graph) plus measured bytes per parameter.
- **Plan** (`plan_target`): the largest student whose served file meets the target (largest:
  the least accuracy lost), reached in one shot by the reduce stage (PCA width selection and
  least-squares re-fit beat magnitude pruning to the same widths: README, architectures).
  A target below the smallest reachable model is aimed at from a 4x larger reduction by
  pruning rounds, so the guard stops it at the smallest model that keeps the accuracy.
- **Guard** (`Guard.check`): teacher accuracy − model accuracy on the validation rows (never
  the test split) at most `target.max_accuracy_drop`, after the reduction, each pruning round
  and int8.
- **Fit** (`fit_to_target`): export (int8 when it keeps the guard, else the fp32 export), measure
  the real file (or latency); while it misses the target, prune a round toward it (KD recovery),
  and roll the round back and stop if it breaks the guard.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from prefect import task
from torch import nn

from tasks.caching import STAGE_CACHE
from tasks.config import FinetuneConfig, PruneConfig, QuantizeConfig, TargetConfig
from tasks.data import Dataset
from tasks.evaluate import (
    OnnxModel,
    TorchScriptModel,
    latency_percentiles_ms,
    saved_size,
    torch_predictor,
)
from tasks.finetune import History, fit
from tasks.graph import Group, keep_units, param_model, trace
from tasks.prune import _recovery, remove_lowest_units
from tasks.quantize import Quantized, quantize_model

BYTES_MARGIN = 0.01  # the plan aims this much under a size limit (the line is fitted, not exact)
UNREACHABLE_START = 4  # unreachable target: reduce to this many times the smallest model, then prune
Predict = Callable[[np.ndarray], np.ndarray]


# --- what a narrower model costs when served ------------------------------------------------

@dataclass(frozen=True)
class Costs:
    """Served file bytes and batch-1 latency at measured parameter counts (ascending)."""

    params: tuple[int, ...]
    file_bytes: tuple[int, ...]
    latency_ms: tuple[float, ...]
    served_as: str  # "onnxruntime int8", "onnxruntime fp32", "torch int8", "torch fp32"

    def _line(self, ys: tuple[float, ...]) -> tuple[float, float]:
        slope, fixed = np.polyfit(np.asarray(self.params, float), np.asarray(ys, float), 1)
        return float(fixed), float(slope)

    @property
    def bytes_per_param(self) -> float:
        return self._line(self.file_bytes)[1]

    @property
    def fixed_bytes(self) -> float:
        return self._line(self.file_bytes)[0]

    def params_within(self, kind: str, limit: float) -> float:
        """Largest parameter count whose predicted bytes (or latency) stay under `limit`."""
        fixed, slope = self._line(self.file_bytes if kind == "bytes" else self.latency_ms)
        if slope <= 0:  # latency does not grow with size here: any size fits if the smallest does
            return math.inf if fixed <= limit else -math.inf
        return (limit - fixed) / slope


def served_model(model: nn.Module, X: np.ndarray, cfg: QuantizeConfig, seed: int) -> Quantized:
    """The float export and its int8 (when enabled), as the quantize stage makes them."""
    return quantize_model(model, X[:64], X, cfg, seed)


def narrowed(model: nn.Module, example: torch.Tensor, fraction: float) -> nn.Module:
    """A copy with every reducible group cut to `fraction` of its units (at least one head's worth):
    the weights do not matter, only the shapes (for file size and latency)."""
    copy_ = copy.deepcopy(model)
    for name in [g.name for g in trace(copy_, example).reducible()]:
        graph = trace(copy_, example)
        group = graph.group(name)
        keep = max(1, int(fraction * group.width) // group.step) * group.step
        if keep < group.width:
            blocks = group.width // group.step  # the first `keep / step` units of every head
            keep_units(graph, group, [j for j in range(group.width) if j % blocks < keep // group.step])
    return copy_.eval()


def measure_costs(teacher: nn.Module, X: np.ndarray, cfg: QuantizeConfig, seed: int,
                  latency_repeats: int = 50, fractions: tuple[float, ...] = (0.0, 0.5)) -> Costs:
    example = torch.from_numpy(X[:2])
    points = []
    for fraction in fractions:
        model = narrowed(teacher, example, fraction)
        served = served_model(model, X, cfg, seed).served
        ms = latency_percentiles_ms(served.predictor(), X, 1, latency_repeats)[0]
        points.append((served.params, len(served.file_bytes), ms))
    points.sort()
    int8 = "int8" if cfg.enabled else "fp32"
    return Costs(tuple(p for p, _, _ in points), tuple(b for _, b, _ in points), tuple(m for _, _, m in points),
                 f"{cfg.runtime} {int8}")


# --- the plan -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    kind: str  # size_kb | ratio | params | latency_ms_b1
    value: float  # as the user gave it
    limit: float  # what the served model is held to: bytes (size_kb, ratio), params, or ms
    teacher_params: int
    smallest_params: int  # every group at one unit (per head)
    final_params: int  # the largest model the costs say meets the limit (clamped to reachable)
    reduce_params: int  # the reduce stage's budget
    reachable: bool
    why: str

    @property
    def unit(self) -> str:
        return {"size_kb": "bytes", "ratio": "bytes", "params": "params"}.get(self.kind, "ms")


def plan_target(target: TargetConfig, costs: Costs, teacher_params: int, smallest_params: int,
                teacher_file_bytes: int) -> Plan:
    kind, value = target.kind, target.value
    if kind in ("size_kb", "ratio"):
        limit = value * 1024 if kind == "size_kb" else teacher_file_bytes / value
        fits = costs.params_within("bytes", limit * (1 - BYTES_MARGIN))
        how = (f"{costs.served_as} file = {costs.fixed_bytes:,.0f} B + {costs.bytes_per_param:.3f} B/param "
               f"(measured) -> at most {max(fits, 0):,.0f} params under {limit / 1024:.1f} KB")
    elif kind == "params":
        limit, fits, how = value, value, f"at most {value:,.0f} params"
    else:
        limit = value
        fits = costs.params_within("latency", value)
        how = (f"{costs.served_as} batch-1 latency measured {costs.latency_ms[0]:.4f} ms at "
               f"{costs.params[0]:,} params, {costs.latency_ms[-1]:.4f} ms at {costs.params[-1]:,}")
    final = int(min(teacher_params, fits)) if fits > -math.inf else 0
    reachable = final >= smallest_params
    if reachable:
        reduce_params = final
        why = f"{kind}={value:g}: {how}; reduced to it in one shot"
    else:
        final = smallest_params
        reduce_params = min(teacher_params, UNREACHABLE_START * smallest_params)
        why = (f"{kind}={value:g} is below the smallest reachable model ({smallest_params:,} params; {how}): "
               f"reduced to {reduce_params:,} params, then pruned toward it while the guard holds")
    return Plan(kind, value, float(limit), teacher_params, smallest_params, final, reduce_params, reachable, why)


def smallest_params(teacher: nn.Module, example: torch.Tensor) -> int:
    graph = trace(copy.deepcopy(teacher), example)
    groups = graph.reducible()
    return param_model(teacher, example, groups).params({g.name: g.step for g in groups})


# --- the accuracy guard ---------------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    step: str  # reduction | prune round N | int8
    params: int
    accuracy: float  # on the validation rows
    drop: float  # teacher's validation accuracy - this
    ok: bool


@dataclass(frozen=True)
class Guard:
    """Teacher accuracy minus model accuracy on the validation rows at most `max_drop`."""

    reference: float  # the teacher's validation accuracy
    max_drop: float
    X_val: np.ndarray
    y_val: np.ndarray

    @classmethod
    def of(cls, teacher: nn.Module, data: Dataset, max_drop: float) -> Guard:
        reference = float((torch_predictor(teacher)(data.X_val).argmax(1) == data.y_val).mean())
        return cls(reference, max_drop, data.X_val, data.y_val)

    def check(self, step: str, predict: Predict, params: int) -> Check:
        accuracy = float((predict(self.X_val).argmax(1) == self.y_val).mean())
        drop = self.reference - accuracy
        return Check(step, params, accuracy, drop, drop <= self.max_drop + 1e-9)


# --- meeting the target ---------------------------------------------------------------------

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

    def accuracy_drop(self) -> float:
        return self.served_check.drop if self.served_check else float("nan")


def achieved(plan: Plan, served: OnnxModel | TorchScriptModel, X: np.ndarray, repeats: int) -> float:
    if plan.unit == "bytes":
        return float(saved_size(served)[0])  # the file on disk
    if plan.unit == "params":
        return float(served.params)
    return latency_percentiles_ms(served.predictor(), X, 1, repeats)[0]


def params_to_meet(plan: Plan, costs: Costs, params: int, got: float) -> int:
    """Parameters that should meet the limit, from where the model is (`got` at `params`):
    the measured slope, anchored at the real measurement."""
    if plan.unit == "params":
        return int(plan.limit)
    limit = plan.limit * (1 - BYTES_MARGIN) if plan.unit == "bytes" else plan.limit
    _, slope = costs._line(costs.file_bytes if plan.unit == "bytes" else costs.latency_ms)
    if slope <= 0:
        return params // 2
    return int(params - (got - limit) / slope)


def keep_fraction_for(model: nn.Module, example: torch.Tensor, groups: list[Group], params: int) -> float:
    """Largest fraction f such that every group at ceil(f · width) units has at most `params`."""
    cost = param_model(model, example, groups)

    def at(f: float) -> int:
        return cost.params({g.name: max(1, math.ceil(f * g.width / g.step)) * g.step for g in groups})

    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if at(mid) <= params else (lo, mid)
    return lo


def guarded_int8(quantized: Quantized, guard: Guard, checks: list[Check]) -> Quantized:
    """int8 if it keeps the guard, else the fp32 export."""
    if quantized.int8_model is None:
        return quantized
    check = guard.check("int8", quantized.int8_model.predictor(), quantized.int8_model.params)
    checks.append(check)
    if check.ok:
        return quantized
    return Quantized(quantized.float_model, None, quantized.export_max_abs_diff, quantized.int8_max_abs_diff,
                     "fp32 (int8 broke the accuracy guard)")


def fit_to_target(teacher: nn.Module, student: nn.Module, data: Dataset, plan: Plan, costs: Costs,
                  guard: Guard, prune: PruneConfig, finetune: FinetuneConfig, quantize: QuantizeConfig,
                  seed: int, device: str = "cpu", latency_repeats: int = 100,
                  export: Callable[[nn.Module], Quantized] | None = None) -> Fitted:
    """Export and measure; while the limit is missed and the guard holds, prune one round toward
    the limit (at most halving the parameters, at most `prune.rounds` rounds) with KD recovery,
    rolling back a round that breaks the guard. `export` defaults to the quantize stage's."""
    export = export or (lambda m: quantize_model(m, data.X_test, data.X_train, quantize, seed))
    example = torch.from_numpy(data.X_train[:2])
    model = copy.deepcopy(student).eval()
    params = sum(p.numel() for p in model.parameters())
    checks = [guard.check("reduction", torch_predictor(model), params)]
    history, rolled_back, rounds = History(), [], 0
    while True:
        int8_checks: list[Check] = []
        quantized = guarded_int8(export(model), guard, int8_checks)
        got = achieved(plan, quantized.served, data.X_test, latency_repeats)
        within = got <= plan.limit
        if within or not checks[-1].ok:
            bound = "" if within else f"accuracy guard: {checks[-1].step} already lost {checks[-1].drop:.4f}"
            break
        if rounds >= prune.rounds:
            bound = f"{plan.kind}: {prune.rounds} pruning rounds (compress.prune.rounds) were not enough"
            break
        want = max(plan.smallest_params, params // 2, min(params - 1, params_to_meet(plan, costs, params, got)))
        groups = trace(model, example).reducible()
        if want >= params or not groups:
            bound = f"{plan.kind}: the model is the smallest reachable ({params:,} params)"
            break
        fraction = keep_fraction_for(model, example, groups, want)
        candidate = copy.deepcopy(model)
        remove_lowest_units(candidate, fraction, prune.criterion, data.X_train[:1024],
                            {g.name: g.width for g in groups})
        candidate, round_history = fit(candidate, data, _recovery(prune, finetune, seed, device), teacher=teacher,
                                       description="recovering from pruning")
        rounds += 1
        step = f"prune round {rounds}"
        check = guard.check(step, torch_predictor(candidate), sum(p.numel() for p in candidate.parameters()))
        checks.append(check)
        if not check.ok:
            rolled_back.append(step)
            bound = (f"accuracy guard: {step} ({check.params:,} params) lost {check.drop:.4f} > "
                     f"{guard.max_drop:.4f} on validation rows: rolled back, pruning stopped")
            break
        for name, values in round_history.curves().items():
            getattr(history, name).extend(values)
        model, params = candidate, check.params
    kept = [c for c in checks if c.step not in rolled_back][-1]
    checks += int8_checks
    if int8_checks and not int8_checks[-1].ok:
        bound = (bound + "; " if bound else "") + (f"int8 lost {int8_checks[-1].drop:.4f} > {guard.max_drop:.4f}: "
                                                   "served the fp32 export")
    served = int8_checks[-1] if int8_checks and int8_checks[-1].ok else kept
    fitted = Fitted(model, quantized, history, checks, rolled_back, served, got, within and served.ok)
    fitted.bound = bound or f"{plan.kind}: met ({_show(plan, got)} <= {_show(plan, plan.limit)})"
    return fitted


def _show(plan: Plan, x: float) -> str:
    return {"bytes": f"{x / 1024:.1f} KB", "params": f"{x:,.0f} params"}.get(plan.unit, f"{x:.4f} ms")


def target_record(plan: Plan, costs: Costs, fitted: Fitted, guard: Guard,
                  teacher_file_bytes: int) -> tuple[dict[str, object], dict[str, float]]:
    """(params, metrics) of the target stage's run; the metrics go on the parent as target/*."""
    params: dict[str, object] = {"kind": plan.kind, "value": plan.value, "served_as": costs.served_as,
                                 "plan": plan.why[:500], "bound": fitted.bound[:500],
                                 "rolled_back": ", ".join(fitted.rolled_back) or "none"}
    metrics = {"limit": plan.limit, "achieved": fitted.achieved, "met": float(fitted.met),
               "planned_params": float(plan.final_params), "reduce_params": float(plan.reduce_params),
               "smallest_params": float(plan.smallest_params), "final_params": float(fitted.quantized.served.params),
               "bytes_per_param": costs.bytes_per_param, "fixed_bytes": costs.fixed_bytes,
               "max_accuracy_drop": guard.max_drop, "val_accuracy_drop": fitted.accuracy_drop(),
               "teacher_val_accuracy": guard.reference, "teacher_file_kb": teacher_file_bytes / 1024,
               "pruning_rounds": float(sum(c.step.startswith("prune") for c in fitted.checks))}
    for c in fitted.checks:
        key = c.step.replace(" ", "_")
        metrics[f"val_drop.{key}"] = c.drop
        metrics[f"params.{key}"] = float(c.params)
    return params, metrics


def verdict(plan: Plan, fitted: Fitted, guard: Guard) -> str:
    """The one line a user reads."""
    head = "target met" if fitted.met else "target NOT met"
    return (f"{head}: {plan.kind}={plan.value:g} -> {_show(plan, fitted.achieved)} (limit {_show(plan, plan.limit)}), "
            f"accuracy drop on validation rows {fitted.accuracy_drop():.4f} (max {guard.max_drop:.4f}); "
            f"{fitted.bound}")


@task(name="plan-target", cache_policy=STAGE_CACHE, persist_result=True)
def plan_task(teacher: nn.Module, X_train: np.ndarray, target: TargetConfig, quantize: QuantizeConfig,
              seed: int, latency_repeats: int) -> tuple[Plan, Costs, int]:
    """(plan, costs, teacher file bytes)."""
    example = torch.from_numpy(X_train[:2])
    # latency is not a line at small sizes (a runtime's fixed cost per call): one more point
    fractions = (0.0, 0.5, 1.0) if target.kind == "latency_ms_b1" else (0.0, 0.5)
    costs = measure_costs(teacher, X_train[:512], quantize, seed, latency_repeats, fractions)
    teacher_bytes = saved_size(teacher)[0]
    teacher_params = sum(p.numel() for p in teacher.parameters())
    plan = plan_target(target, costs, teacher_params, smallest_params(teacher, example), teacher_bytes)
    return plan, costs, teacher_bytes


@task(name="fit-target", cache_policy=STAGE_CACHE, persist_result=True)
def fit_task(teacher: nn.Module, student: nn.Module, data: Dataset, plan: Plan, costs: Costs, guard: Guard,
             prune: PruneConfig, finetune: FinetuneConfig, quantize: QuantizeConfig, seed: int, device: str,
             latency_repeats: int) -> Fitted:
    return fit_to_target(teacher, student, data, plan, costs, guard, prune, finetune, quantize, seed, device,
                         latency_repeats)


def target_tags(plan: Plan, fitted: Fitted, guard: Guard) -> dict[str, str]:
    """On the registered version: whether its target was met, with both numbers."""
    return {"distill.target_met": str(fitted.met).lower(),
            "distill.target": f"{plan.kind}={plan.value:g}",
            "distill.target_achieved": f"{_show(plan, fitted.achieved)} (limit {_show(plan, plan.limit)})",
            "distill.target_accuracy_drop": f"{fitted.accuracy_drop():.4f} (max {guard.max_drop:.4f}, "
                                            "validation rows)"}

"""Pre-flight: the run's student built and exercised on two rows, before any stage spends time.

A teacher whose architecture the configured mode cannot handle used to fail in the reduce or
plan stage, after the teacher had trained (and with a traceback); here it fails in seconds, in
one line naming the module, its class, the setting and what works instead:

    pre-flight: reconstruct.mode=width cannot narrow model.attn (MyAttention): narrowing
    model.attn.qkv breaks its forward, which reshapes to a fixed shape (...);
    reconstruct.mode=low_rank handles it

On the first two training rows (`ROWS`), with the same functions the stages call:
1. the teacher's forward, and for a teacher that trains here, one training step;
2. the planned student: `reduce_model` and `reconstruct` as the reduce and reconstruct stages
   run them (width mode: every reducible group of the graph cut to half its units, whole heads
   kept; low-rank mode: every factorizable layer factored), then, with structured pruning, the
   prune stage's `remove_lowest_units` on it; groups and layers the engine keeps whole (README:
   a layer without a re-fit rule, the logits) stay whole and are listed (`kept_whole`);
3. one KD step on the student (its forward in training mode, the KD loss, backward);
4. the quantize stage's ONNX export of it.

When one fails, the other setting is tried on the same rows, and named if it passes. The
teacher's weights do not matter (a trained teacher's are fresh ones, `preflight_config`): only
what the model's code does with the shapes.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distill.tasks.compress import hidden, transformer
from distill.tasks.compress.data import Dataset
from distill.tasks.compress.dataset import check_hold_out, unlabeled_rows
from distill.tasks.compress.export_lock import onnx_export_lock
from distill.tasks.compress.failures import culprit
from distill.tasks.compress.finetune import kd_loss, regression_kd_loss
from distill.tasks.compress.finite import non_finite_cause
from distill.tasks.compress.graph import Group, keep_units, trace
from distill.tasks.compress.guard import resolution
from distill.tasks.compress.prune import (
    fold_masks,
    magnitude_prune,
    prunable_groups,
    remove_lowest_units,
)
from distill.tasks.compress.quantize import export_onnx
from distill.tasks.compress.recipe import Recipe, recipe_for
from distill.tasks.compress.recipe import line as recipe_line
from distill.tasks.compress.reconstruct import reconstruct
from distill.tasks.compress.reduce import KEPT_BY_BUDGET, LayerPlan, Reduction, reduce_model
from distill.tasks.compress.teacher import check_teacher
from distill.tasks.compress.vocab import trim
from distill.tasks.compress.width import group_bases
from distill.tasks.platform.config import BudgetConfig, PipelineConfig
from distill.tasks.platform.errors import UserError, first_line
from distill.tasks.platform.progress import note

ROWS = 2
# a group nothing reads (the logits) is never narrowed: no news to report
OUTPUT_GROUP = "no layer reads these units (a model output)"


@dataclass(frozen=True)
class Preflight:
    """What the pre-flight built and how long each check took."""

    seconds: float
    teacher_params: int
    student_params: int  # the pre-flight's student (half width / factored), not the run's
    kept_whole: dict[str, str]  # group or layer -> why the engine keeps it whole
    checks: dict[str, float]  # check -> seconds
    recipe: Recipe  # the teacher's family's KD recipe: fills finetune keys left out


class PreflightFailed(UserError):
    """One line: what cannot be handled, where, and what works instead."""


@dataclass
class _Broken(Exception):  # a check that failed, before it is worded as one line
    setting: str  # the setting that cannot handle it (`reconstruct.mode=width`), or ""
    verb: str  # narrow | factor | run
    where: str  # module path and class
    why: str


def preflight(teacher: nn.Module, data: Dataset, cfg: PipelineConfig) -> Preflight:
    """Every check above on `teacher` (any weights) and the first `ROWS` training rows; raises
    `PreflightFailed` (one line) at the first that fails."""
    start = time.perf_counter()
    checks: dict[str, float] = {}
    X, y = np.asarray(data.X_train[:ROWS]), np.asarray(data.y_train[:ROWS])
    teacher = copy.deepcopy(teacher).cpu().eval()
    try:
        with _timed(checks, "teacher"):
            _step(teacher, X, None, None, data, "the teacher's forward", train=False)
            if cfg.teacher.source == "train":
                _step(copy.deepcopy(teacher), X, y, None, data, "the teacher's training step")
        with _timed(checks, "student"):
            cut = trim(teacher, data.X_train)[0] if cfg.reduce.vocab == "data" else teacher
            student, kept = planned_student(cut, X, cfg)
        with _timed(checks, "kd step"):
            _step(student, X, y, teacher, data, "the student's KD step", cfg=cfg)
        with _timed(checks, "onnx export"):
            _export(student, X)
    except _Broken as broken:
        raise PreflightFailed(_line(broken, teacher, data, cfg)) from None
    return Preflight(
        seconds=time.perf_counter() - start,
        teacher_params=sum(p.numel() for p in teacher.parameters()),
        student_params=sum(p.numel() for p in student.parameters()),
        kept_whole=kept,
        checks=checks,
        recipe=recipe_for(teacher),
    )


def preflight_config(
    cfg: PipelineConfig, data: Dataset, config_dir: str | Path | None = None
) -> Preflight | None:
    """The teacher `cfg` names checked against the data (`check_teacher`: built with fresh
    weights for one that trains, loaded from a file), then pre-flown; None for a teacher from
    MLflow (`models:/`, `runs:/`), which only the teacher stage loads: check it
    with `preflight` then. Each call flies it again: a run that asks twice (the CLI checks before
    the flow starts; the flow and `compress` ask again) asks its `RunContext`
    (tasks/compress/context.py)."""
    teacher = check_teacher(cfg.teacher, data, Path(config_dir) if config_dir else None)
    if cfg.target is not None and not data.is_regression:
        held = cfg.target.agreement_rows
        check_hold_out(held, len(data.X_train))
        if cfg.target.unlabeled:  # read and checked here, before any stage
            held += len(unlabeled_rows(cfg.target.unlabeled, data))
        coarse = resolution("accuracy", len(data.y_val), cfg.target.max_accuracy_drop, held)
        if coarse is not None:
            note(coarse)
    if teacher is None:
        return None
    with torch.random.fork_rng(devices=[]):  # the run's own draws stay as they were
        checked = preflight(teacher, data, cfg)
    said = recipe_line(cfg, checked.recipe)
    if said is not None:
        note(said)
    return checked


def alternative(teacher: nn.Module, data: Dataset, cfg: PipelineConfig, failed: str) -> str | None:
    """Settings that handle `teacher` where `failed` (a setting such as
    `reconstruct.mode=width`, or a stage's name) did not: the first variant whose student builds
    and takes a KD step on the pre-flight's rows, as `key=value and key=value`, or None."""
    X, y = np.asarray(data.X_train[:ROWS]), np.asarray(data.y_train[:ROWS])
    teacher = copy.deepcopy(teacher).cpu().eval()
    mode, method = cfg.reconstruct.mode, cfg.compress.prune.method
    prunes = method == "structured" and (cfg.compress.prune.amount > 0 or cfg.target is not None)
    variants: list[dict[str, str]] = []
    if failed.startswith("compress.prune") or failed in ("prune", "fit-target"):
        variants.append({"compress.prune.method": "unstructured"})
    else:
        other = "low_rank" if mode == "width" else "width"
        variants.append({"reconstruct.mode": other})
        if prunes:
            variants.append({"reconstruct.mode": other, "compress.prune.method": "unstructured"})
    for variant in variants:
        changed = _with(cfg, variant)
        try:
            student, _ = planned_student(teacher, X, changed)
            _step(student, X, y, teacher, data, "the student's KD step", cfg=changed)
        except _Broken:
            continue
        text = " and ".join(f"{k}={v}" for k, v in variant.items())
        # a target plans widths and prunes structurally: another setting means no target
        leaves_width = variant.get("reconstruct.mode", mode) != "width"
        leaves_structured = variant.get("compress.prune.method", method) != "structured"
        if cfg.target is not None and (leaves_width or leaves_structured):
            text += " (without a target: target: null and a reduce.budget)"
        return text
    return None


# --- the planned student ---------------------------------------------------------------------


def planned_student(
    teacher: nn.Module, X: np.ndarray, cfg: PipelineConfig
) -> tuple[nn.Module, dict[str, str]]:
    """The student `cfg` plans, built on rows `X` with the reduce and reconstruct stages' own
    functions, then structurally pruned when the run prunes so; and what stays whole."""
    mode = cfg.reconstruct.mode
    setting = f"reconstruct.mode={mode}"
    verb = "narrow" if mode == "width" else "factor"
    # a budget every model meets: the smallest width / rank that keeps half the variance
    reduce_cfg = cfg.reduce.model_copy(update={"budget": BudgetConfig(variance=0.5)})
    try:
        reduction = reduce_model(teacher, X, reduce_cfg, mode)
        if mode == "width":
            reduction = _half_widths(reduction, teacher, X)
        student = reconstruct(teacher, reduction, X, cfg.reconstruct).eval()
        _forward(student, torch.from_numpy(X))
    except UserError as err:  # the stage's own words ("found no group of units to narrow")
        raise _Broken(setting, verb, "", str(err)) from None
    except Exception as err:  # noqa: BLE001 -- any failure of the model's code is reported
        raise _blame(err, teacher, X, setting, verb, cfg.reduce.batch_size) from None
    kept = {n: why for n, why in reduction.fixed.items() if why != OUTPUT_GROUP}
    method = cfg.compress.prune.method
    if method == "structured" and (cfg.compress.prune.amount > 0 or cfg.target is not None):
        student = _pruned(student, X, cfg)
    elif method == "unstructured" and cfg.compress.prune.amount > 0:
        student = fold_masks(magnitude_prune(copy.deepcopy(student), cfg.compress.prune.amount))
    return student, kept


def _half_widths(reduction: Reduction, teacher: nn.Module, X: np.ndarray) -> Reduction:
    """Every reducible group at half its units (whole heads), so every cut is exercised."""
    if transformer.holds_blocks(teacher):  # heads, units and layers: one at a time (step 1)
        steps: dict[str, int] = {}
    else:
        steps = {g.name: g.step for g in trace(copy.deepcopy(teacher), torch.from_numpy(X)).groups}
    layers = []
    for plan in reduction.layers:
        step = steps.get(plan.name, 1)
        half = max(step, (plan.out // step // 2) * step)
        layers.append(replace(plan, rank=half if half < plan.out else None))
    reduction = replace(reduction, layers=layers)
    return _with_hidden(reduction, teacher, X) if transformer.holds_blocks(teacher) else reduction


def _with_hidden(reduction: Reduction, teacher: nn.Module, X: np.ndarray) -> Reduction:
    """The residual stream at half its width too where the plan kept it whole only because its
    budget favoured that (a run with another budget may cut it): every cut is exercised."""
    why = reduction.fixed.get(hidden.NAME, "")
    stream = hidden.find_stream(teacher, X)
    if not why.startswith(KEPT_BY_BUDGET) or isinstance(stream, str):
        return reduction
    half = LayerPlan(hidden.NAME, 0, stream.width, stream.width // 2, variance=1.0)
    fixed = {n: w for n, w in reduction.fixed.items() if n != hidden.NAME}
    return replace(reduction, layers=[*reduction.layers, half], fixed=fixed)


def _pruned(student: nn.Module, X: np.ndarray, cfg: PipelineConfig) -> nn.Module:
    """The prune stage's structured cut (half of every group's units) on a copy, run once."""
    setting = "compress.prune.method=structured"
    model = copy.deepcopy(student)
    x = torch.from_numpy(X)
    try:
        groups = prunable_groups(model, X)
        if not groups:
            raise _Broken(setting, "narrow", "the student", "it has no group of units to narrow")
        original = {g.name: g.width for g in groups}
        remove_lowest_units(model, 0.5, cfg.compress.prune.criterion, X, original)
        _forward(model, x)
    except _Broken:
        raise
    except Exception as err:  # noqa: BLE001 -- any failure of the model's code is reported
        raise _blame(err, student, X, setting, "narrow", cfg.reduce.batch_size) from None
    return model.eval()


def _blame(
    err: Exception, model: nn.Module, X: np.ndarray, setting: str, verb: str, batch_size: int
) -> _Broken:
    """Which module a failed build is about. In width terms the group whose cut alone breaks
    the forward (or the reduce stage's look at what its readers read) is found one at a time;
    otherwise, and when none alone does, the module the error came out of."""
    if verb == "narrow":
        with contextlib.suppress(Exception):
            found = _group_at_fault(model, X, batch_size)
            if found is not None:
                group, group_err = found
                return _Broken(setting, verb, *_where_why(group_err, model, group))
    return _Broken(setting, verb, *_where_why(err, model, None))


def _group_at_fault(
    model: nn.Module, X: np.ndarray, batch_size: int
) -> tuple[Group, Exception] | None:
    x = torch.from_numpy(X)
    for group in trace(copy.deepcopy(model), x).reducible():
        probe = copy.deepcopy(model)
        graph = trace(probe, x)
        g = graph.group(group.name)
        block = g.width // g.step
        keep = [j for j in range(g.width) if j % block < max(1, block // 2)]
        try:
            keep_units(graph, g, keep)
            _forward(probe, x)
        except Exception as err:  # noqa: BLE001 -- the cut that breaks it
            return group, err
        try:
            group_bases(model, [group], X, batch_size)
        except Exception as err:  # noqa: BLE001 -- what its readers read does not fit
            return group, err
    return None


def _where_why(err: Exception, model: nn.Module, group: Group | None) -> tuple[str, str]:
    """(module path and class, why) of a failed build."""
    while isinstance(err, torch.onnx.OnnxExporterError) and isinstance(err.__cause__, Exception):
        err = err.__cause__  # the exporter's own wrapper says only which of its steps failed
    found = culprit(err)
    if found is not None:
        where = found.label
    elif group is not None:
        where = f"{group.root} ({type(model.get_submodule(group.root)).__name__})"
    else:
        where = type(model).__name__
    reshapes = isinstance(err, RuntimeError) and "is invalid for input of size" in str(err)
    if reshapes:
        text = f"its forward reshapes to a fixed shape ({first_line(err)})"
    elif "data-dependent" in str(err):  # torch.export: `if` on a tensor's value, `.item()`, ...
        text = (
            f"its forward branches on a tensor's values, which one ONNX graph cannot hold "
            f"({first_line(err)}); torch.where or torch.cond keep both branches"
        )
    else:
        text = f"{type(err).__name__}: {first_line(err)}"
    if group is None:
        return where, text
    return where, f"with {group.name} narrowed, " + (text if reshapes else f"it fails: {text}")


# --- the steps ---------------------------------------------------------------------------------


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(x)
    return getattr(out, "logits", out)


def _step(
    model: nn.Module,
    X: np.ndarray,
    y: np.ndarray | None,
    teacher: nn.Module | None,
    data: Dataset,
    what: str,
    train: bool = True,
    cfg: PipelineConfig | None = None,
) -> None:
    """A forward (eval), or a training step: forward in training mode, the loss the stage uses
    (KD against `teacher`, else cross-entropy / MSE), backward; outputs and loss finite."""
    x = torch.from_numpy(X)
    try:
        if not train:
            out = _forward(model, x)
        else:
            model.train()
            out = model(x)
            out = getattr(out, "logits", out)
            with torch.no_grad():
                t_out = _forward(teacher, x).float() if teacher is not None else None
            ft = cfg.finetune if cfg is not None else None
            alpha = ft.alpha if ft is not None and teacher is not None else 0.0
            if data.is_regression:
                target = torch.as_tensor(y, dtype=torch.float32)
                delta = ft.huber_delta if ft is not None else None
                loss = regression_kd_loss(out.float(), t_out, target, alpha, delta)
            else:
                labels = torch.as_tensor(y).long()
                temperature = ft.temperature if ft is not None else 1.0
                loss = kd_loss(out.float(), t_out, labels, temperature, alpha)
            loss.backward()
    except Exception as err:  # noqa: BLE001 -- any failure of the model's code is reported
        where, why = _where_why(err, model, None)
        raise _Broken("", "run", where, f"{what} fails in {where}: {why}") from None
    finally:
        model.eval()
    if not bool(torch.isfinite(out.detach()).all()):
        cause = non_finite_cause(model, x, None)
        raise _Broken(
            "",
            "run",
            type(model).__name__,
            f"{what}: its outputs on {len(X)} training rows hold NaN or inf"
            + (f"; {cause}" if cause else ""),
        )


def _export(student: nn.Module, X: np.ndarray) -> None:
    try:
        with onnx_export_lock():
            export_onnx(student.eval(), X)
    except Exception as err:  # noqa: BLE001 -- the exporter fails in many ways
        where, why = _where_why(err, student, None)
        raise _Broken(
            "compress.quantize",
            "run",
            where,
            f"the student does not export to ONNX (the quantize stage's export) in {where}: {why}",
        ) from None


# --- the line ------------------------------------------------------------------------------


def _line(broken: _Broken, teacher: nn.Module, data: Dataset, cfg: PipelineConfig) -> str:
    if broken.verb == "run":  # the model's own code: no setting of distill's avoids it
        key = "teacher.arch" if broken.why.startswith("the teacher") else None
        return f"pre-flight: {broken.why}" + (f" (config key '{key}')" if key else "")
    where = broken.where or "this teacher"
    line = f"pre-flight: {broken.setting} cannot {broken.verb} {where}: {broken.why}"
    instead = None
    with contextlib.suppress(Exception):
        instead = alternative(teacher, data, cfg, broken.setting)
    if instead is None:
        return line
    return f"{line}; {instead} {'handle' if ' and ' in instead.split(' (')[0] else 'handles'} it"


def _with(cfg: PipelineConfig, changes: dict[str, str]) -> PipelineConfig:
    """`cfg` with dotted keys changed (unvalidated: a variant the pre-flight tries)."""
    updated = cfg
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        chain = [updated]
        for part in parents:
            chain.append(getattr(chain[-1], part))
        new = chain[-1].model_copy(update={leaf: value})
        for parent, part in zip(reversed(chain[:-1]), reversed(parents), strict=True):
            new = parent.model_copy(update={part: new})
        updated = new
    return updated


@contextlib.contextmanager
def _timed(checks: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        checks[name] = time.perf_counter() - start

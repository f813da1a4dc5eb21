"""The whole pipeline as one plain function: teacher -> reduce -> reconstruct -> fine-tune ->
prune -> quantize, every stage's model evaluated, in order.

    from distill.tasks.compress.data import load_dataset
    from distill.tasks.compress.pipeline import compress
    from distill.tasks.platform.config import load_config

    cfg = load_config("configs/digits.yaml")
    outcome = compress(cfg, load_dataset(cfg.data, cfg.seed))
    outcome.stages["quantized"]["accuracy"], outcome.quantized.served

Two parts plug in, and nothing here branches on them: `Steps`, the stage functions (the plain
ones of tasks/compress by default; the flow passes their Prefect tasks, cached and resumable),
and a `Recorder`, told about each stage as it finishes (this module's writes nothing; the flow's
writes MLflow runs, flows/stages.py). With a `target:` the plan sizes the reduction, and one
guarded search takes the place of pruning and int8 (tasks/compress/target.py); a size or latency
target the first build misses is re-planned from the measurement and rebuilt from the reduce
stage (tasks/compress/replan.py: the rebuilds run the same `steps`, inside the fit-target stage;
the reconstructed and finetuned records are the first build's; a drop-only search's first build
is its first rebuild, its start kept undistilled: tasks/compress/smallest.py).

Before any stage the pre-flight builds the planned student on two rows (forward, KD step, ONNX
export: tasks/compress/preflight.py; once per run, which `RunContext` keeps it), so a model the
configured mode cannot handle fails in seconds. Each stage then runs inside one guard
(tasks/compress/failures.py): whatever it raises becomes one line naming the stage, the module
and the setting, the recorder gets the line and the full trace (`Recorder.failed`), and nothing
after it runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from distill.tasks.compress import vocab
from distill.tasks.compress.context import RunContext
from distill.tasks.compress.data import Dataset
from distill.tasks.compress.dataset import hold_out, unlabeled_rows
from distill.tasks.compress.evaluate import (
    OnnxModel,
    TorchScriptModel,
    evaluate_model,
    pipeline_summary,
    reference_predictions,
)
from distill.tasks.compress.export_lock import onnx_export_lock
from distill.tasks.compress.failures import StageGuard
from distill.tasks.compress.finetune import History, distill, predict_logits
from distill.tasks.compress.finite import check_calibration, check_model, check_outputs
from distill.tasks.compress.guard import Guard, max_drop_of
from distill.tasks.compress.plan import Costs, Plan, plan_for_target
from distill.tasks.compress.preflight import alternative, preflight
from distill.tasks.compress.prune import prune_and_recover
from distill.tasks.compress.quantize import Quantized, quantize_model
from distill.tasks.compress.recipe import recipe_for, with_recipe
from distill.tasks.compress.reconstruct import reconstruct_with_notes
from distill.tasks.compress.reduce import (
    BelowSmallest,
    Reduction,
    calibration_rows,
    reduce_model,
    reduction_record,
)
from distill.tasks.compress.replan import distilled_once, refit_to_target
from distill.tasks.compress.smallest import Start, smallest_within
from distill.tasks.compress.target import (
    Candidate,
    Fitted,
    Search,
    fit_to_target,
    target_record,
    target_tags,
    verdict,
)
from distill.tasks.compress.teacher import load_teacher
from distill.tasks.platform.config import (
    BudgetConfig,
    EvaluateConfig,
    PipelineConfig,
    TeacherConfig,
)

STAGES = ("teacher", "reconstructed", "finetuned", "pruned", "quantized")  # the models evaluated
FINAL = STAGES[-1]  # the served model's stage: the run's `final/*` metrics
Model = nn.Module | OnnxModel | TorchScriptModel


def teacher_with_history(
    cfg: TeacherConfig,
    data: Dataset,
    seed: int,
    device: str = "cpu",
    config_dir: str | None = None,
) -> tuple[nn.Module, History]:
    """The teacher, and its training curves (empty for a teacher loaded, not trained)."""
    history = History()
    model = load_teacher(cfg, data, seed, device, Path(config_dir) if config_dir else None, history)
    return model, history


@dataclass(frozen=True)
class Steps:
    """The stage functions `compress` calls. Each keeps the signature of its default; replace one
    with `dataclasses.replace(PLAIN_STEPS, prune=my_prune)`."""

    teacher: Callable[..., tuple[nn.Module, History]] = teacher_with_history
    plan: Callable[..., tuple[Plan, dict[str, Costs], int]] = plan_for_target  # with a target
    reduce: Callable[..., Reduction] = reduce_model
    reconstruct: Callable[..., tuple[nn.Module, dict[str, object]]] = reconstruct_with_notes
    finetune: Callable[..., tuple[nn.Module, History]] = distill
    prune: Callable[..., tuple[nn.Module, History]] = prune_and_recover  # without a target
    quantize: Callable[..., Quantized] = quantize_model  # without a target
    fit: Callable[..., Fitted] = (
        fit_to_target  # with a target: pruning and int8, guarded, per build
    )
    smallest: Callable[..., Fitted] = smallest_within  # with a drop-only target: the search
    evaluate: Callable[..., dict[str, float]] = evaluate_model


PLAIN_STEPS = Steps()


@dataclass
class StageResult:
    """What a stage that made a model hands its recorder."""

    name: str  # one of STAGES
    model: Model
    params: dict[str, Any]  # the stage's settings and notes
    curves: dict[str, list[float]] | None = None  # per-epoch training curves
    started: float | None = None  # time.time() when the stage's work began


class Recorder:
    """Where results are written as each stage finishes. This one writes nothing (`compress`
    returns everything); override what you want written."""

    def stage(
        self, result: StageResult, measure: Callable[[], dict[str, float]]
    ) -> dict[str, float]:
        """A stage made a model: measure it (`measure()`: the evaluate step's metrics), write both
        down, return the metrics, with `seconds` since `result.started`. Measuring is the
        recorder's call so that one writing to a service can retry a failed write, measurement
        included, without running the stage again."""
        return measure() | seconds_since(result.started)

    def record(
        self, stage: str, metrics: dict[str, float], params: dict[str, Any], started: float
    ) -> None:
        """A stage without a model of its own finished: `reduce` (the plan per layer) or `target`
        (the plan and the guarded fit)."""

    def frontier(self, frontier: list[Candidate], guard: Guard, plot: bool) -> None:
        """A drop-only target's search finished: every candidate it built, in order (the
        shipped one marked), against `guard` (the teacher's validation score, the allowance);
        `plot`: draw it too (`evaluate.plots`)."""

    def plots(
        self,
        stages: dict[str, dict[str, float]],
        teacher: nn.Module,
        student: nn.Module,
        final: Model,
        data: Dataset,
        curves: dict[str, dict[str, list[float]]],
        cfg: EvaluateConfig,
        seed: int,
    ) -> None:
        """All stages are measured: the run's figures can be drawn (`evaluate.plots`); the
        arguments are those of tasks/compress/plots.py's `pipeline_figures`."""

    def failed(self, stage: str, line: str, trace: str, started: float | None) -> None:
        """A stage failed: `line` is what the user reads (it names the stage, the module and the
        setting), `trace` the full traceback; the run stops after this. `started`: when the
        stage's work began."""


def seconds_since(started: float | None) -> dict[str, float]:
    return {} if started is None else {"seconds": time.time() - started}


@dataclass
class TargetOutcome:
    """What a `target:` came to: the plan, the guarded fit, and the verdict."""

    plan: Plan
    costs: dict[str, Costs]
    teacher_bytes: int  # the teacher's file, what a `ratio` target divides
    fitted: Fitted
    guard: Guard
    met: bool
    line: str  # the verdict a user reads
    tags: dict[str, str]  # for the registered version: the target, met or not


@dataclass
class Outcome:
    """What `compress` returns: each stage's model, its metrics, the curves, the headline."""

    teacher: nn.Module
    reduction: Reduction
    reconstructed: nn.Module
    finetuned: nn.Module
    pruned: nn.Module  # the float model that was quantized (with a target: the guarded fit's)
    quantized: Quantized  # .served: the model that ships
    stages: dict[str, dict[str, float]]  # metrics of each of STAGES, as the recorder returned them
    curves: dict[str, dict[str, list[float]]]  # teacher, finetuned (with best_epoch), pruned
    summary: dict[str, float]  # final/*, compression_ratio, accuracy_drop or r2_drop, speedup_*
    target: TargetOutcome | None = None


def agreement_rows(cfg: PipelineConfig, data: Dataset) -> tuple[Dataset, np.ndarray | None]:
    """(what every fit of the student sees, the agreement guard's rows): `data` less
    `target.agreement_rows` training rows, and those rows with `target.unlabeled`'s
    (tasks/compress/guard.py); `data` and None without a target, without either, or for a
    regression target."""
    target = cfg.target
    if target is None or data.is_regression or not (target.agreement_rows or target.unlabeled):
        return data, None
    fit, rows = data, []
    if target.agreement_rows:
        fit, held = hold_out(data, target.agreement_rows, cfg.seed)
        rows.append(held)
    if target.unlabeled:
        rows.append(unlabeled_rows(target.unlabeled, data))
    return fit, np.concatenate(rows)


def compress(
    cfg: PipelineConfig,
    data: Dataset,
    steps: Steps = PLAIN_STEPS,
    recorder: Recorder | None = None,
    config_dir: str | None = None,
    context: RunContext | None = None,
) -> Outcome:
    """Every stage of `cfg` on `data`. Each stage's model is measured and handed to `recorder`
    when it is made; a stage's record spans its work (`started`). `config_dir`: the config
    file's folder, where a `module:Name` teacher's module may live. `context`: the run's, where
    its pre-flight may already be (tasks/compress/context.py; default: a new one)."""
    recorder = recorder or Recorder()
    context = context or RunContext()
    seed, device, ev = cfg.seed, cfg.device, cfg.evaluate
    stages: dict[str, dict[str, float]] = {}
    # the planned student on two rows, before the teacher trains (None: an MLflow teacher)
    checked = context.preflight(cfg, data, config_dir)
    guard = StageGuard(recorder)
    # what every fit of the student sees: the data, less the agreement guard's held-out rows
    fit, X_agree = agreement_rows(cfg, data)

    teacher_pred = None

    def made(
        name: str,
        model: Model,
        params: dict[str, Any],
        since: float,
        curves: dict[str, list[float]] | None = None,
        extra: dict[str, float] | None = None,
    ) -> None:
        def measure() -> dict[str, float]:
            check_model(name, model, data.X_test[:256])  # a NaN model stops here, unrecorded
            # the validation score of the teacher and the served model: the run's headline
            # (`final/validation_accuracy`), what runs are chosen by without the test rows
            validation = name in ("teacher", FINAL)
            return steps.evaluate(model, data, teacher_pred, ev, validation) | (extra or {})

        stages[name] = recorder.stage(StageResult(name, model, params, curves, since), measure)

    started = time.time()
    with guard("teacher", started):
        teacher, teacher_history = steps.teacher(cfg.teacher, data, seed, device, config_dir)
        if checked is None:  # loaded by the stage: checked now, before its calibration
            preflight(teacher, data, cfg)
        cfg = with_recipe(cfg, recipe_for(teacher))  # left-out finetune keys: its family's
        guard.teacher = teacher
        guard.alternative = lambda stage: alternative(teacher, data, cfg, stage)
        teacher_out = predict_logits(teacher, data.X_test)
        check_outputs(teacher_out, "test", "the teacher", teacher, data.X_test)
        teacher_pred = reference_predictions(teacher_out, data)

        made(
            "teacher",
            teacher,
            cfg.teacher.model_dump(),
            started,
            curves=teacher_history.curves() if teacher_history.train_loss else None,
        )

    start, trimmed = teacher, None  # what students are cut from: the teacher, or its vocab trimmed
    reduce_cfg = cfg.reduce
    teacher_params = sum(p.numel() for p in teacher.parameters())
    if cfg.reduce.vocab == "data":
        with guard("reduce"):
            start, trimmed = vocab.trim(teacher, fit.X_train)
        if reduce_cfg.budget.kind == "ratio":  # fewer than the teacher's, not the trimmed copy's
            budget = BudgetConfig(params=int(teacher_params / reduce_cfg.budget.value))
            reduce_cfg = reduce_cfg.model_copy(update={"budget": budget})
    plan = None
    if cfg.target is not None:  # the plan chooses the reduce budget
        with guard("plan-target"), onnx_export_lock():
            plan, costs, teacher_bytes = steps.plan(
                teacher,
                fit,
                cfg.target,
                cfg.reduce,
                cfg.reconstruct,
                cfg.compress.quantize,
                seed,
                ev.latency_repeats,
                **({} if trimmed is None else {"start": start}),
                **({} if X_agree is None else {"X_agree": X_agree}),
            )
        reduce_cfg = cfg.reduce.model_copy(
            update={"budget": BudgetConfig(params=plan.reduce_params)}
        )

    started = time.time()
    with guard("reduce", started):
        calibration = calibration_rows(fit.X_train, cfg.reduce.calibration_samples, seed)
        try:
            reduction = steps.reduce(start, calibration, reduce_cfg, cfg.reconstruct.mode)
        except BelowSmallest as err:  # would a trimmed token table reach it?
            trim_hint = vocab.hint(start)
            if not trim_hint:
                raise
            raise BelowSmallest(f"{err}{trim_hint}") from None
        check_calibration(reduction.bases, start, calibration)
        if trimmed is not None:  # the ratio to the teacher itself, not to the trimmed copy
            reduction = replace(reduction, teacher_params=teacher_params)
        params, metrics = reduction_record(reduction)
        if trimmed is not None:  # what the trim saved
            params, metrics = params | {"vocab": "data"}, metrics | trimmed.record()
        recorder.record("reduce", metrics, params, started)

    started = time.time()
    with guard("reconstruct", started):
        reconstructed, notes = steps.reconstruct(start, reduction, calibration, cfg.reconstruct)
        made("reconstructed", reconstructed, cfg.reconstruct.model_dump() | notes, started)

    started = time.time()
    with guard("finetune", started):
        finetuned, history = steps.finetune(teacher, reconstructed, fit, cfg.finetune, seed, device)
        kd_params = cfg.finetune.model_dump() | history.params()
        made("finetuned", finetuned, kd_params, started, curves=history.curves())
    curves = {  # for the plot; the restored best epochs marked
        name: h.curves() | {"best_epoch": [h.best_epoch]}
        for name, h in (("teacher", teacher_history), ("finetuned", history))
    }

    started = time.time()
    target = None
    if plan is None:
        with guard("prune", started):
            pruned, history = steps.prune(
                teacher, finetuned, fit, cfg.compress.prune, cfg.finetune, seed, device
            )
            made(
                "pruned", pruned, cfg.compress.prune.model_dump(), started, curves=history.curves()
            )
        started = time.time()  # the pruned record spans pruning; the quantized one int8 and export
        with guard("quantize", started), onnx_export_lock():
            quantized = steps.quantize(
                pruned, data.X_test, fit.X_train, cfg.compress.quantize, seed
            )
    else:  # prune only while the served model misses the target, each round and int8 guarded
        assert cfg.target is not None  # a plan is made from a target only
        with guard("fit-target", started):
            limit = max_drop_of(cfg.target, data)
            accuracy = Guard.of(teacher, fit, limit, cfg.target.confidence, X_agree)

            def reconstructed_at(budget: int) -> nn.Module:  # the reduce, reconstruct stages
                at = cfg.reduce.model_copy(update={"budget": BudgetConfig(params=budget)})
                reduced = steps.reduce(start, calibration, at, cfg.reconstruct.mode)
                return steps.reconstruct(start, reduced, calibration, cfg.reconstruct)[0]

            def distilled(student: nn.Module) -> nn.Module:  # the KD stage
                return steps.finetune(teacher, student, fit, cfg.finetune, seed, device)[0]

            # the reduce, reconstruct and KD stages again (a student built before: not distilled
            # again)
            rebuild = distilled_once(reconstructed_at, distilled)

            search = Search(
                teacher,
                fit,
                plan,
                costs,
                accuracy,
                cfg.compress.prune,
                cfg.finetune,
                cfg.compress.quantize,
                seed,
                device,
                ev.latency_repeats,
            )

            def fit_one(student: nn.Module, max_cut: float) -> Fitted:
                with onnx_export_lock():
                    return steps.fit(search, student, max_cut)

            # no limit, or a size or latency below the smallest reachable model: the smallest
            # file within the drop (for an unreachable limit, what comes closest without breaking
            # the guard; a parameter count below it is pruned toward instead)
            if plan.searched:
                # the start undistilled, where the reduce stage built the first rebuild below it
                fallback = (
                    Start(lambda: reconstructed_at(plan.start_params), distilled)
                    if plan.start_params
                    else None
                )
                with onnx_export_lock():
                    fitted = steps.smallest(
                        search, finetuned, cfg.target.max_builds, rebuild, fallback
                    )
            else:  # each build fitted under the export lock, rebuilt outside it
                fitted = refit_to_target(
                    plan, costs, finetuned, rebuild, fit_one, cfg.target.max_rebuilds
                )
            pruned, history, quantized = fitted.model, fitted.history, fitted.quantized
            params, metrics = target_record(plan, costs, fitted, accuracy, teacher_bytes)
            recorder.record("target", metrics, params, started)
            if fitted.frontier:
                recorder.frontier(fitted.frontier, accuracy, ev.plots)
            prune_params = cfg.compress.prune.model_dump(exclude={"amount"}) | {
                "planned_by": "target",
                "rounds_run": sum(c.step.startswith("prune") for c in fitted.checks),
                "rolled_back": ", ".join(fitted.rolled_back) or "none",
            }
            # pruning and int8 are one guarded search here: the pruned record spans it
            made("pruned", pruned, prune_params, started, curves=history.curves())
        started = time.time()
        target = TargetOutcome(
            plan,
            costs,
            teacher_bytes,
            fitted,
            accuracy,
            fitted.met,
            verdict(plan, fitted, accuracy, teacher_bytes),
            target_tags(plan, fitted, accuracy),
        )
    curves["pruned"] = history.curves()
    with guard("quantize", started):
        made(
            "quantized",
            quantized.served,
            cfg.compress.quantize.model_dump() | quantized.params,
            started,
            extra=quantized.metrics,
        )

    if ev.plots:  # the float student stands in for the ONNX model where weights are needed (t-SNE)
        with guard("plots"):
            recorder.plots(stages, teacher, pruned, quantized.served, data, curves, ev, seed)
    summary = pipeline_summary(
        {s: {k: v for k, v in m.items() if k != "seconds"} for s, m in stages.items()}, FINAL
    )
    if target is not None:
        summary["target_met"] = float(target.met)
    return Outcome(
        teacher,
        reduction,
        reconstructed,
        finetuned,
        pruned,
        quantized,
        stages,
        curves,
        summary,
        target,
    )

"""The Prefect tasks the pipeline flow runs, and the recorder that writes them to MLflow.

The compression math (`tasks/compress/`: data, teacher, reduce, reconstruct, finetune, prune,
quantize, evaluate, plots, and `pipeline.compress`, which chains them) imports neither Prefect
nor MLflow: call those functions from a notebook. Here each stage function becomes a task with a
name and a cache policy (`STAGE_CACHE`: the content of the inputs and the source of the code the
stage calls, flows/caching.py); `PREFECT_STEPS` hands them to `compress`. Its
`MlflowRecorder` writes each stage's nested MLflow run from a task of its own, retried on
tracking errors. Task runs are named after their stage (`evaluate-finetuned`), in the Prefect UI
and in `distill run`'s lines.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn

from distill.flows.caching import STAGE_CACHE
from distill.tasks.compress.context import RunContext
from distill.tasks.compress.data import Dataset
from distill.tasks.compress.evaluate import OnnxModel
from distill.tasks.compress.finetune import History, distill
from distill.tasks.compress.hf import hf_model, save_student
from distill.tasks.compress.pipeline import Model, StageResult, Steps
from distill.tasks.compress.plan import Costs, Plan, plan_for_target
from distill.tasks.compress.plots import PLOTS_DIR, pipeline_figures
from distill.tasks.compress.prune import prune_and_recover
from distill.tasks.compress.quantize import Quantized, quantize_model
from distill.tasks.compress.reconstruct import reconstruct_with_notes
from distill.tasks.compress.reduce import Reduction, reduce_model
from distill.tasks.compress.replan import BuildAt
from distill.tasks.compress.smallest import Start, smallest_within
from distill.tasks.compress.target import Fitted, Search, fit_to_target
from distill.tasks.compress.teacher import load_teacher
from distill.tasks.platform import retry, tracking
from distill.tasks.platform.caching import content_hash
from distill.tasks.platform.config import (
    DataConfig,
    EvaluateConfig,
    FinetuneConfig,
    PruneConfig,
    QuantizeConfig,
    ReconstructConfig,
    ReduceConfig,
    TargetConfig,
    TeacherConfig,
)
from distill.tasks.release.recorder import TrackingRecorder
from distill.tasks.release.registry import Registered, TorchScriptModel, register_model


@task(name="data", task_run_name="data", cache_policy=NO_CACHE)
def data_task(cfg: DataConfig, seed: int, context: RunContext) -> Dataset:
    """The run's dataset: prepared here unless its context holds it (the CLI's input check)."""
    return context.dataset(cfg, seed)


@task(name="teacher", task_run_name="teacher", cache_policy=STAGE_CACHE, persist_result=True)
def teacher_task(
    cfg: TeacherConfig, data: Dataset, seed: int, device: str, config_dir: str | None = None
) -> tuple[nn.Module, History]:
    """The teacher, and its training curves (empty for a teacher loaded, not trained)."""
    history = History()
    model = load_teacher(cfg, data, seed, device, Path(config_dir) if config_dir else None, history)
    return model, history


@task(name="reduce", task_run_name="reduce", cache_policy=STAGE_CACHE, persist_result=True)
def reduce_task(
    teacher: nn.Module, X_calib: np.ndarray, cfg: ReduceConfig, mode: str = "low_rank"
) -> Reduction:
    return reduce_model(teacher, X_calib, cfg, mode)


@task(
    name="reconstruct", task_run_name="reconstruct", cache_policy=STAGE_CACHE, persist_result=True
)
def reconstruct_task(
    teacher: nn.Module, reduction: Reduction, X_calib: np.ndarray, cfg: ReconstructConfig
) -> tuple[nn.Module, dict[str, object]]:
    return reconstruct_with_notes(teacher, reduction, X_calib, cfg)


@task(name="finetune", task_run_name="finetune", cache_policy=STAGE_CACHE, persist_result=True)
def finetune_task(
    teacher: nn.Module,
    student: nn.Module,
    data: Dataset,
    cfg: FinetuneConfig,
    seed: int,
    device: str,
) -> tuple[nn.Module, History]:
    return distill(teacher, student, data, cfg, seed, device)


@task(name="prune", task_run_name="prune", cache_policy=STAGE_CACHE, persist_result=True)
def prune_task(
    teacher: nn.Module,
    student: nn.Module,
    data: Dataset,
    cfg: PruneConfig,
    finetune: FinetuneConfig,
    seed: int,
    device: str,
) -> tuple[nn.Module, History]:
    return prune_and_recover(teacher, student, data, cfg, finetune, seed, device)


@task(name="quantize", task_run_name="quantize", cache_policy=STAGE_CACHE, persist_result=True)
def quantize_task(
    model: nn.Module, X_test: np.ndarray, X_train: np.ndarray, cfg: QuantizeConfig, seed: int
) -> Quantized:
    return quantize_model(model, X_test, X_train, cfg, seed)


@task(
    name="plan-target", task_run_name="plan-target", cache_policy=STAGE_CACHE, persist_result=True
)
def plan_task(
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
    return plan_for_target(
        teacher, data, target, reduce, recon, quantize, seed, latency_repeats, start, X_agree
    )


@task(name="fit-target", task_run_name="fit-target", cache_policy=STAGE_CACHE, persist_result=True)
def fit_task(search: Search, student: nn.Module, max_cut: float = 1.0) -> Fitted:
    return fit_to_target(search, student, max_cut)


@task(
    name="smallest-target",
    task_run_name="smallest-target",
    cache_policy=STAGE_CACHE,
    persist_result=True,
)
def smallest_task(
    search: Search,
    student: nn.Module,
    builds: int,
    build_at: BuildAt | None = None,
    start: Start | None = None,
) -> Fitted:
    # with `build_at` (a function: no cache key) not cached; its rebuilds' stages are
    return smallest_within(search, student, builds, build_at, start)


@task(
    name="evaluate",
    task_run_name="evaluate-{stage}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=1,
    retry_condition_fn=retry.retry_on_tracking_error,
)
def evaluate_task(
    stage: str,
    measure: Callable[[], dict[str, float]],
    result: StageResult,
    parent_run_id: str,
    example: np.ndarray,
    model_digest: str | None = None,
) -> dict[str, float]:
    """Measure a stage's model (`measure`: the pipeline's evaluation) and record it as the stage's
    nested MLflow run; a retry measures again and replaces the failed attempt's run, and never
    runs the stage itself again. The run spans the stage's work since `result.started`; the
    returned metrics hold its `seconds`. `model_digest`: see tracking.record_stage."""
    from prefect.runtime import task_run

    metrics = measure()
    recorded = tracking.record_stage(
        parent_run_id,
        stage,
        metrics,
        result.params,
        result.curves,
        result.model,
        example,
        replace=task_run.run_count > 1,
        started=result.started,
        model_digest=model_digest,
    )
    from prefect import get_run_logger

    get_run_logger().info(
        "%s: accuracy %.4f, %.1f KB, batch-1 latency %.4f ms (MLflow stage run under %s)",
        stage,
        metrics.get("accuracy", float("nan")),
        metrics.get("size_kb", float("nan")),
        metrics.get("latency_ms_b1", float("nan")),
        parent_run_id,
    )
    return {key.removeprefix(f"{stage}/"): value for key, value in recorded.items()}


@task(name="plots", task_run_name="plots", cache_policy=NO_CACHE, retries=1)
def plots_task(
    parent_run_id: str,
    stages: dict[str, dict[str, float]],
    teacher: nn.Module,
    student: nn.Module,
    final: nn.Module | OnnxModel,
    data: Dataset,
    curves: dict[str, dict[str, list[float]]],
    cfg: EvaluateConfig,
    seed: int,
) -> list[str]:
    """Draw the run's figures and log them on the parent run; return their artifact paths."""
    figures = pipeline_figures(stages, teacher, student, final, data, curves, cfg, seed)
    return [
        tracking.log_figure(parent_run_id, fig, f"{PLOTS_DIR}/{name}".lstrip("/"))
        for name, fig in figures.items()
    ]


@task(name="register", task_run_name="register", cache_policy=NO_CACHE)
def register_task(
    model: OnnxModel | TorchScriptModel,
    data: Dataset,
    model_name: str,
    tags: dict[str, str],
    challenger: bool = True,
    description: str | None = None,
) -> Registered:
    return register_model(model, data, model_name, tags, challenger, description)


# `compress` with every stage a cached, resumable task run (evaluation runs in evaluate_task)
PREFECT_STEPS = Steps(
    teacher=teacher_task,
    plan=plan_task,
    reduce=reduce_task,
    reconstruct=reconstruct_task,
    finetune=finetune_task,
    prune=prune_task,
    quantize=quantize_task,
    fit=fit_task,
    smallest=smallest_task,
)


STUDENT_HF = "student_hf"  # the parent run's save_pretrained directory of the student


def log_student_hf(run_id: str, student: nn.Module) -> str | None:
    """A Hugging Face student as `student_hf/` on the parent run (`save_pretrained`, its config
    updated by the cuts: the same Auto class loads it without distill); where its config cannot
    describe it, `student_hf.txt` says why instead. None: not a Hugging Face model; '' saved;
    else the reason."""
    if hf_model(student) is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        why = save_student(student, Path(tmp) / STUDENT_HF)
        if why:
            tracking.log_note(run_id, f"no {STUDENT_HF}/: {why}\n", f"{STUDENT_HF}.txt")
        else:
            tracking.log_directory(run_id, Path(tmp) / STUDENT_HF, STUDENT_HF)
    return why


class MlflowRecorder(TrackingRecorder):
    """tasks/release/recorder.py's MLflow record of each stage, each stage's record a Prefect
    task run (retried on a tracking error, measuring again, never running the stage again)."""

    def stage(
        self, result: StageResult, measure: Callable[[], dict[str, float]]
    ) -> dict[str, float]:
        # a cached teacher is logged once per experiment: its runs point to the model by digest
        digest = content_hash(result.model) if result.name == "teacher" else None
        metrics = evaluate_task(
            result.name, measure, result, self.parent_run_id, self.example, digest
        )
        self.metrics |= tracking.prefixed(result.name, metrics)
        return metrics

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
        plots_task(self.parent_run_id, stages, teacher, student, final, data, curves, cfg, seed)

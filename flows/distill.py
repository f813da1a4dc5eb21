"""The pipeline flow: teacher -> reduce -> reconstruct -> fine-tune -> prune -> quantize ->
register.

The flow composes stage tasks and records each stage as a nested MLflow run under one
parent run; it computes nothing itself. Config and data are checked before any run is
opened, so bad input leaves nothing in MLflow.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.stages import (
    data_task,
    evaluate_task,
    finetune_task,
    fit_task,
    plan_task,
    plots_task,
    prune_task,
    quantize_task,
    reconstruct_task,
    reduce_task,
    register_task,
    teacher_task,
)
from tasks.compress.data import Dataset
from tasks.compress.evaluate import pipeline_summary
from tasks.compress.finetune import predict_logits
from tasks.compress.reduce import calibration_rows, reduction_record
from tasks.compress.target import Guard, target_record, target_tags, verdict
from tasks.compress.teacher import check_teacher
from tasks.platform import tracking
from tasks.platform.config import (
    DEFAULT_CONFIG,
    BudgetConfig,
    PipelineConfig,
    build_config,
    load_config,
)
from tasks.release.registry import Registered, remove_incomplete_registrations, teacher_lineage

STAGES = ("teacher", "reconstructed", "finetuned", "pruned", "quantized")
# torch.onnx.export (dynamo) is not thread-safe: pipelines in threads of one process (a sweep)
# quantize one at a time. Reached through a function: a flow shipped to a Dask worker is
# pickled by value, and a lock cannot be; a module-level function is pickled by reference.
_ONNX_EXPORT = threading.Lock()


def onnx_export_lock() -> threading.Lock:
    return _ONNX_EXPORT


def local_settings() -> contextlib.AbstractContextManager[Any]:
    """Prefect settings for flows this process runs itself (`distill run`, `distill sweep`, the
    benchmarks). Without a Prefect server (the temporary one lives and dies with this process)
    nothing reads flow-run heartbeats, and the engine waits up to 1 s for their thread at the end
    of every flow run: heartbeats are off then. With PREFECT_API_URL they stay on (crash
    detection)."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        temporary_settings,
    )

    if PREFECT_API_URL.value():
        return contextlib.nullcontext()
    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


@dataclass
class RunSummary:
    run_id: str
    experiment_id: str
    run_url: str
    model_name: str | None
    model_version: str | None
    metrics: dict[str, float]  # the parent run's metrics
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    promotion: Any = None  # tasks.release.promotion.Decision, with `distill run --promote`
    target: dict[str, Any] | None = None  # {"met": bool, "line": str} when the config has a target

    def as_json(self) -> dict[str, Any]:
        return (
            {
                "run_id": self.run_id,
                "run_url": self.run_url,
                "model_name": self.model_name,
                "model_version": self.model_version,
                "metrics": self.metrics,
                "stages": self.stages,
            }
            | ({"promotion": self.promotion.as_json()} if self.promotion is not None else {})
            | ({"target": self.target} if self.target is not None else {})
        )


@dataclass
class Progress:
    """What a pipeline run has produced so far (all of it, or up to the stage that failed)."""

    stages: dict[str, dict[str, float]] = field(
        default_factory=dict
    )  # metrics of each evaluated model
    recorded: dict[str, float] = field(
        default_factory=dict
    )  # STAGE/METRIC of the other stage records
    summary: dict[str, float] = field(default_factory=dict)  # final/*, compression_ratio, ...
    registered: Registered | None = None
    target: dict[str, Any] | None = None  # {"met": bool, "line": str}

    def stage_metrics(self) -> dict[str, float]:
        return self.recorded | {f"{s}/{k}": v for s, m in self.stages.items() for k, v in m.items()}


@flow(name="distill", log_prints=False)
def distill_flow(
    config_path: str | None = None,
    overrides: list[str] | None = None,
    promote: bool = False,
    from_run: str | None = None,
    tags: dict[str, str] | None = None,
) -> RunSummary:
    """`promote`: run the promotion gates right after registration. `from_run`: take the config
    from that MLflow run's record instead of `config_path` (tasks/release/reproduce.py).
    `tags`: extra tags on the parent run (a sweep's id)."""
    record = None
    if from_run:
        from flows.promote import connect_registry
        from tasks.release.reproduce import read_record

        connect_registry()
        record = read_record(from_run)
        path, cfg = None, build_config(record.config, overrides)
    else:
        path = Path(config_path or DEFAULT_CONFIG)
        cfg = load_config(path, overrides)
    settings = tracking.load_settings()
    config_dir = str(path.resolve().parent) if path is not None else None
    data = data_task(cfg.data, cfg.seed)
    check_teacher(
        cfg.teacher, data, Path(config_dir) if config_dir else None
    )  # before any run exists
    if record is not None:
        from tasks.release.reproduce import check_record

        for warning in check_record(record, cfg.data.source, data.digest, tracking.git_commit()):
            get_run_logger().warning(warning)
    experiment_id = tracking.configure(settings)
    tags = (
        {
            "prefect.flow_run_id": str(flow_run.id),
            "distill.config_hash": cfg.digest(),
            "distill.dataset_digest": data.digest,
            "distill.git_commit": tracking.git_commit(),
            "distill.dataset_source": cfg.data.source,
        }
        | teacher_lineage(cfg.teacher.source)
        | (tags or {})
    )
    if record is not None:
        tags["distill.reproduces"] = record.run_id
    tracking.close_dead_runs(experiment_id)  # parents left RUNNING by killed processes -> FAILED
    remove_incomplete_registrations()  # versions (and empty models) those processes left

    kind = f"target-{cfg.target.kind}" if cfg.target is not None else cfg.reduce.budget.kind
    with tracking.parent_run(
        experiment_id, f"{cfg.name}-{kind}", cfg.flat(), tags | tracking.process_tags()
    ) as run_id:
        tracking.log_run_inputs(
            yaml.safe_dump(cfg.model_dump(), sort_keys=False),
            path,
            data.raw_frame(5),  # the schema and a few rows; not the whole table
            data.source,
            data.name,
            data.digest,
            rows=len(data.y_train) + len(data.y_val) + len(data.y_test),
        )
        done = Progress()
        try:
            run_stages(cfg, data, run_id, tags, done, config_dir)
        finally:
            # on the parent in one batch, after registration (MLflow reads the history of every
            # metric of a run it logs a model in, one query per key); a failed run keeps what it
            # finished
            tracking.log_metrics(run_id, done.stage_metrics())
            tracking.log_metrics(
                run_id, done.summary, model_id=done.registered.model_id if done.registered else None
            )
    registered, stages = done.registered, done.stages

    summary = RunSummary(
        run_id=run_id,
        experiment_id=experiment_id,
        run_url=tracking.run_url(settings, experiment_id, run_id),
        model_name=registered.name if registered else None,
        model_version=registered.version if registered else None,
        metrics=tracking.run_metrics(run_id),
        stages=stages,
        target=done.target,
    )
    if done.target is not None and not done.target["met"]:
        get_run_logger().warning(done.target["line"])
    if promote and registered is not None:
        from flows.promote import promote_flow

        summary.promotion = promote_flow(registered.name, registered.version, cfg.promote)
    create_markdown_artifact(
        markdown=stage_table_markdown(summary),
        key="distill-summary",
        description="distill: stages and the MLflow run",
    )
    return summary


def run_stages(
    cfg: PipelineConfig,
    data: Dataset,
    run_id: str,
    tags: dict[str, str],
    done: Progress,
    config_dir: str | None = None,
) -> None:
    """The stage tasks in order, each recorded as a nested run of `run_id`; results go into `done`.
    `config_dir`: the config file's folder, where a `module:Name` teacher's module may live."""
    seed, device, ev, stages = cfg.seed, cfg.device, cfg.evaluate, done.stages

    teacher = teacher_task(cfg.teacher, data, seed, device, config_dir)
    teacher_pred = predict_logits(teacher, data.X_test).argmax(1)
    stages["teacher"] = evaluate_task(
        "teacher", teacher, data, teacher_pred, ev, run_id, params=cfg.teacher.model_dump()
    )

    plan = None
    reduce_cfg = cfg.reduce
    if cfg.target is not None:  # the plan chooses the reduce budget (tasks/compress/target.py)
        with onnx_export_lock():
            plan, costs, teacher_bytes = plan_task(
                teacher,
                data,
                cfg.target,
                cfg.reduce,
                cfg.reconstruct,
                cfg.compress.quantize,
                seed,
                ev.latency_repeats,
            )
        reduce_cfg = cfg.reduce.model_copy(
            update={"budget": BudgetConfig(params=plan.reduce_params)}
        )

    calibration = calibration_rows(data.X_train, cfg.reduce.calibration_samples, seed)
    reduction = reduce_task(teacher, calibration, reduce_cfg, cfg.reconstruct.mode)
    params, metrics = reduction_record(reduction)
    done.recorded |= tracking.record_stage(run_id, "reduce", metrics, params)

    student, notes = reconstruct_task(teacher, reduction, calibration, cfg.reconstruct)
    stages["reconstructed"] = evaluate_task(
        "reconstructed",
        student,
        data,
        teacher_pred,
        ev,
        run_id,
        params=cfg.reconstruct.model_dump() | notes,
    )

    student, history = finetune_task(teacher, student, data, cfg.finetune, seed, device)
    stages["finetuned"] = evaluate_task(
        "finetuned",
        student,
        data,
        teacher_pred,
        ev,
        run_id,
        params=cfg.finetune.model_dump(),
        curves=history.curves(),
    )
    curves = {"finetuned": history.curves()}

    if plan is None:
        student, history = prune_task(
            teacher, student, data, cfg.compress.prune, cfg.finetune, seed, device
        )
        prune_params = cfg.compress.prune.model_dump()
        with onnx_export_lock():
            quantized = quantize_task(
                student, data.X_test, data.X_train, cfg.compress.quantize, seed
            )
    else:  # prune only while the served model misses the target, each round and int8 guarded
        guard = Guard.of(teacher, data, cfg.target.max_accuracy_drop)
        with onnx_export_lock():
            fitted = fit_task(
                teacher,
                student,
                data,
                plan,
                costs,
                guard,
                cfg.compress.prune,
                cfg.finetune,
                cfg.compress.quantize,
                seed,
                device,
                ev.latency_repeats,
            )
        student, history, quantized = fitted.model, fitted.history, fitted.quantized
        prune_params = cfg.compress.prune.model_dump(exclude={"amount"}) | {
            "planned_by": "target",
            "rounds_run": sum(c.step.startswith("prune") for c in fitted.checks),
            "rolled_back": ", ".join(fitted.rolled_back) or "none",
        }
        target_params, target_metrics = target_record(plan, costs, fitted, guard, teacher_bytes)
        done.recorded |= tracking.record_stage(run_id, "target", target_metrics, target_params)
        done.target = {"met": fitted.met, "line": verdict(plan, fitted, guard)}
        tags = tags | target_tags(plan, fitted, guard)
    stages["pruned"] = evaluate_task(
        "pruned",
        student,
        data,
        teacher_pred,
        ev,
        run_id,
        params=prune_params,
        curves=history.curves(),
    )
    curves["pruned"] = history.curves()
    stages["quantized"] = evaluate_task(
        "quantized",
        quantized.served,
        data,
        teacher_pred,
        ev,
        run_id,
        params=cfg.compress.quantize.model_dump() | {"method": quantized.method},
        extra={"export_max_abs_diff": quantized.export_max_abs_diff}
        | (
            {"int8_max_abs_diff": quantized.int8_max_abs_diff}
            if quantized.int8_max_abs_diff is not None
            else {}
        ),
    )

    if ev.plots:  # the float student stands in for the ONNX model where weights are needed (t-SNE)
        plots_task(run_id, stages, teacher, student, quantized.served, data, curves, ev, seed)
    done.summary = pipeline_summary(stages, "quantized")
    if done.target is not None:
        done.summary["target_met"] = float(done.target["met"])
    if cfg.registry.enabled:
        done.registered = register_task(
            quantized.served, data, cfg.registry.model_name, tags | {"mlflow.run_id": run_id}
        )


def stage_table_markdown(summary: RunSummary) -> str:
    rows = [
        (
            "| stage | params | FLOPs/row | size KB | accuracy | ECE | train-test gap "
            "| latency b1 ms p50 / p95 |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    nan = float("nan")
    for stage, m in summary.stages.items():
        rows.append(
            f"| {stage} | {m['params']:,.0f} | {m.get('flops', nan):,.0f} | {m['size_kb']:.1f} | "
            f"{m['accuracy']:.4f} | {m.get('ece', nan):.4f} | {m.get('train_test_gap', nan):+.4f} "
            f"| {m['latency_ms_b1']:.3f} / {m.get('latency_p95_ms_b1', nan):.3f} |"
        )
    registered = (
        f"Registered **{summary.model_name}** version {summary.model_version} "
        "(alias `challenger`).\n\n"
        if summary.model_name
        else ""
    )
    return (
        f"# distill run\n\n{registered}MLflow run: [{summary.run_id}]({summary.run_url})\n\n"
        + "\n".join(rows)
    )

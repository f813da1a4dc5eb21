"""The pipeline flow: teacher -> reduce -> reconstruct -> fine-tune -> prune -> quantize ->
register.

The flow composes stage tasks and records each stage as a nested MLflow run under one
parent run; it computes nothing itself. Config and data are checked before any run is
opened, so bad input leaves nothing in MLflow.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger
from prefect import tags as prefect_tags
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
from tasks.compress.evaluate import pipeline_summary, reference_predictions
from tasks.compress.finetune import predict_logits
from tasks.compress.reduce import calibration_rows, reduction_record
from tasks.compress.target import Guard, max_drop_of, target_record, target_tags, verdict
from tasks.compress.teacher import check_teacher
from tasks.platform import dead_runs, store, tracking
from tasks.platform.caching import content_hash
from tasks.platform.config import (
    DEFAULT_CONFIG,
    BudgetConfig,
    PipelineConfig,
    build_config,
    check_task_keys,
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


_UNITS = {
    "size_kb": "{:g} KB",
    "ratio": "{:g}x",
    "params": "{:,.0f} params",
    "latency_ms_b1": "{:g} ms b1",
    "variance": "variance {:g}",
}


def run_name(cfg: PipelineConfig, variant: str | None = None) -> str:
    """What a person tells runs apart by, in the MLflow runs table and the Prefect UI:
    `digits · target 20 KB`, `digits · budget 250 KB`; a sweep variant names its grid values
    (`digits · reduce.budget.size_kb=8, finetune.temperature=2`)."""
    if variant:
        return f"{cfg.name} · {variant}"
    if cfg.target is not None:
        return f"{cfg.name} · target {_UNITS[cfg.target.kind].format(cfg.target.value)}"
    budget = cfg.reduce.budget
    return f"{cfg.name} · budget {_UNITS[budget.kind].format(budget.value)}"


def flow_run_name() -> str:
    """The Prefect flow run's name: the MLflow run's (config and overrides as given)."""
    from prefect.runtime import flow_run as current

    params = current.parameters
    try:
        if params.get("from_run"):
            return f"reproduce {str(params['from_run'])[:8]}"
        cfg = load_config(
            Path(params.get("config_path") or DEFAULT_CONFIG), params.get("overrides")
        )
    except Exception:  # noqa: BLE001 -- the flow itself reports a bad config, with its key
        return Path(params.get("config_path") or DEFAULT_CONFIG).stem
    return run_name(cfg, (params.get("tags") or {}).get("distill.sweep_variant"))


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
    run_name: str = ""
    flow_run_id: str | None = None  # the Prefect flow run
    ui_running: bool = True  # run_url answers now (a tracking server, or `distill ui`)

    def as_json(self) -> dict[str, Any]:
        return (
            {
                "run_id": self.run_id,
                "run_name": self.run_name,
                "run_url": self.run_url,
                "flow_run_id": self.flow_run_id,
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


@flow(name="distill", flow_run_name=flow_run_name, log_prints=False)
def distill_flow(
    config_path: str | None = None,
    overrides: list[str] | None = None,
    promote: bool = False,
    from_run: str | None = None,
    tags: dict[str, str] | None = None,
    challenger: bool = True,
) -> RunSummary:
    """`promote`: run the promotion gates right after registration. `from_run`: take the config
    from that MLflow run's record instead of `config_path` (tasks/release/reproduce.py).
    `tags`: extra tags on the parent run (a sweep's id; `mlflow.parentRunId`: the sweep's run).
    `challenger`: the registered version takes alias `challenger` (a sweep gives it to its best
    variant only)."""
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
    settings = store.load_settings()
    config_dir = str(path.resolve().parent) if path is not None else None
    data = data_task(cfg.data, cfg.seed)
    check_task_keys(cfg, data.task)  # `auto` is decided by the data
    check_teacher(
        cfg.teacher, data, Path(config_dir) if config_dir else None
    )  # before any run exists
    if record is not None:
        from tasks.release.reproduce import check_record

        for warning in check_record(record, cfg.data.source, data.digest, tracking.git_commit()):
            get_run_logger().warning(warning)
    experiment_id = store.configure(settings)
    tags = (
        {
            "prefect.flow_run_id": str(flow_run.id),
            "distill.config_hash": cfg.digest(),
            "distill.dataset_digest": data.digest,
            "distill.dataset_source": cfg.data.source,
        }
        | tracking.source_tags()
        | teacher_lineage(cfg.teacher.source)
        | (tags or {})
    )
    if record is not None:
        tags["distill.reproduces"] = record.run_id
    dead_runs.close_dead_runs(experiment_id)  # parents left RUNNING by killed processes -> FAILED
    remove_incomplete_registrations()  # versions (and empty models) those processes left

    name = run_name(cfg, (tags or {}).get("distill.sweep_variant"))
    logger = get_run_logger()
    logger.info("MLflow parent run %r in experiment %s", name, experiment_id)
    with tracking.parent_run(
        experiment_id, name, cfg.flat(), tags | dead_runs.process_tags()
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
            lineage = {k: v for k, v in tags.items() if k != "mlflow.parentRunId"}
            with prefect_tags(f"config:{cfg.name}"):  # on every stage's task run
                run_stages(cfg, data, run_id, lineage, done, config_dir, challenger)
            logger.info("stages done; final metrics on the parent run %s", run_id)
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
        run_url=store.run_url(settings, experiment_id, run_id),
        model_name=registered.name if registered else None,
        model_version=registered.version if registered else None,
        metrics=tracking.run_metrics(run_id),
        stages=stages,
        target=done.target,
        run_name=name,
        flow_run_id=str(flow_run.id),
        ui_running=settings.tracking_uri.startswith(("http://", "https://"))
        or store.running_ui(settings) is not None,
    )
    tracking.set_description(run_id, stage_table_markdown(summary, link=False))
    if done.target is not None and not done.target["met"]:
        get_run_logger().warning(done.target["line"])
    if promote and registered is not None:
        from flows.promote import run_promotion

        summary.promotion = run_promotion(registered.name, registered.version, cfg.promote)
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
    challenger: bool = True,
) -> None:
    """The stage tasks in order, each recorded as a nested run of `run_id`; results go into `done`.
    `config_dir`: the config file's folder, where a `module:Name` teacher's module may live."""
    seed, device, ev, stages = cfg.seed, cfg.device, cfg.evaluate, done.stages

    started = time.time()  # each stage's nested run spans its work (stage_run)
    teacher, teacher_history = teacher_task(cfg.teacher, data, seed, device, config_dir)
    teacher_pred = reference_predictions(predict_logits(teacher, data.X_test), data)
    stages["teacher"] = evaluate_task(
        "teacher",
        teacher,
        data,
        teacher_pred,
        ev,
        run_id,
        params=cfg.teacher.model_dump(),
        curves=teacher_history.curves() if teacher_history.train_loss else None,
        started=started,
        model_digest=content_hash(teacher),  # a cached teacher is logged once per experiment
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

    started = time.time()
    calibration = calibration_rows(data.X_train, cfg.reduce.calibration_samples, seed)
    reduction = reduce_task(teacher, calibration, reduce_cfg, cfg.reconstruct.mode)
    params, metrics = reduction_record(reduction)
    done.recorded |= tracking.record_stage(run_id, "reduce", metrics, params, started=started)

    started = time.time()
    student, notes = reconstruct_task(teacher, reduction, calibration, cfg.reconstruct)
    stages["reconstructed"] = evaluate_task(
        "reconstructed",
        student,
        data,
        teacher_pred,
        ev,
        run_id,
        params=cfg.reconstruct.model_dump() | notes,
        started=started,
    )

    started = time.time()
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
        started=started,
    )
    curves = {  # for the plot; the restored best epochs marked
        name: h.curves() | {"best_epoch": [h.best_epoch]}
        for name, h in (("teacher", teacher_history), ("finetuned", history))
    }

    def evaluate_pruned(params: dict[str, Any], since: float) -> dict[str, float]:
        return evaluate_task(
            "pruned",
            student,
            data,
            teacher_pred,
            ev,
            run_id,
            params=params,
            curves=history.curves(),
            started=since,
        )

    started = time.time()
    if plan is None:
        student, history = prune_task(
            teacher, student, data, cfg.compress.prune, cfg.finetune, seed, device
        )
        stages["pruned"] = evaluate_pruned(cfg.compress.prune.model_dump(), started)
        started = time.time()  # the pruned run spans pruning; the quantized one int8 and export
        with onnx_export_lock():
            quantized = quantize_task(
                student, data.X_test, data.X_train, cfg.compress.quantize, seed
            )
    else:  # prune only while the served model misses the target, each round and int8 guarded
        guard = Guard.of(teacher, data, max_drop_of(cfg.target, data))
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
        done.recorded |= tracking.record_stage(
            run_id, "target", target_metrics, target_params, started=started
        )
        # pruning and int8 are one guarded search here: the pruned run spans it
        stages["pruned"] = evaluate_pruned(prune_params, started)
        started = time.time()
        done.target = {"met": fitted.met, "line": verdict(plan, fitted, guard)}
        tags = tags | target_tags(plan, fitted, guard)
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
        started=started,
    )

    if ev.plots:  # the float student stands in for the ONNX model where weights are needed (t-SNE)
        plots_task(run_id, stages, teacher, student, quantized.served, data, curves, ev, seed)
    done.summary = pipeline_summary(
        {s: {k: v for k, v in m.items() if k != "seconds"} for s, m in stages.items()}, "quantized"
    )
    if done.target is not None:
        done.summary["target_met"] = float(done.target["met"])
    if cfg.registry.enabled:
        done.registered = register_task(
            quantized.served,
            data,
            cfg.registry.model_name,
            tags | {"mlflow.run_id": run_id},
            challenger,
            version_description(cfg, done.summary, tags),
        )


def version_description(
    cfg: PipelineConfig, summary: dict[str, float], tags: dict[str, str]
) -> str:
    """The registered version's description in the registry UI: what run made it, and its
    headline numbers."""
    quality = (
        f"R² {summary['final/r2']:.3f} ({summary['r2_drop']:+.3f} vs the teacher)"
        if "final/r2" in summary
        else f"accuracy {100 * summary['final/accuracy']:.2f}% "
        f"({100 * summary['accuracy_drop']:+.2f} points vs the teacher)"
    )
    return (
        f"{run_name(cfg, tags.get('distill.sweep_variant'))}: {quality}, "
        f"{summary['final/size_kb']:.1f} KB ({summary['compression_ratio']:.1f}x smaller), "
        f"batch-1 latency {summary['final/latency_ms_b1']:.3f} ms. "
        f"Config {cfg.digest()[:12]}, dataset {tags.get('distill.dataset_digest', '?')[:12]}."
    )


def _stage_rows(summary: RunSummary) -> list[str]:
    """The markdown table's rows: accuracy and calibration, or R², MAE, RMSE in the label's units
    and the relative error to the teacher for a regression run."""
    nan = float("nan")
    if any("r2" in m for m in summary.stages.values()):
        rows = [
            (
                "| stage | params | size KB | R² | MAE | RMSE | rel. error vs teacher "
                "| train-test gap | latency b1 ms p50 / p95 | time s |"
            ),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for stage, m in summary.stages.items():
            rows.append(
                f"| {stage} | {m['params']:,.0f} | {m['size_kb']:.1f} | {m['r2']:.4f} | "
                f"{m['mae']:.4g} | {m['rmse']:.4g} | {m.get('teacher_rel_error', nan):.4f} | "
                f"{m.get('train_test_gap', nan):+.4f} | {m['latency_ms_b1']:.3f} / "
                f"{m.get('latency_p95_ms_b1', nan):.3f} | {m.get('seconds', nan):.1f} |"
            )
        return rows
    rows = [
        (
            "| stage | params | FLOPs/row | size KB | accuracy | ECE | train-test gap "
            "| latency b1 ms p50 / p95 | time s |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for stage, m in summary.stages.items():
        rows.append(
            f"| {stage} | {m['params']:,.0f} | {m.get('flops', nan):,.0f} | {m['size_kb']:.1f} | "
            f"{m['accuracy']:.4f} | {m.get('ece', nan):.4f} | {m.get('train_test_gap', nan):+.4f} "
            f"| {m['latency_ms_b1']:.3f} / {m.get('latency_p95_ms_b1', nan):.3f} "
            f"| {m.get('seconds', nan):.1f} |"
        )
    return rows


def stage_table_markdown(summary: RunSummary, link: bool = True) -> str:
    """The stage table: the Prefect flow run's artifact (`link`: with the MLflow run's URL) and the
    MLflow parent run's description (`mlflow.note.content`)."""
    nan = float("nan")
    m = summary.metrics
    if "compression_ratio" in m and "r2_drop" in m:
        headline = (
            f"**{m['compression_ratio']:.1f}x** smaller, R² drop **{m['r2_drop']:+.4f}**, "
            f"batch-1 speedup {m.get('speedup_b1', nan):.1f}x.\n\n"
        )
    elif "compression_ratio" in m and "accuracy_drop" in m:
        headline = (
            f"**{m['compression_ratio']:.1f}x** smaller, accuracy drop "
            f"**{100 * m['accuracy_drop']:+.2f} points**, batch-1 speedup "
            f"{m.get('speedup_b1', nan):.1f}x.\n\n"
        )
    else:
        headline = ""
    registered = (
        f"Registered **{summary.model_name}** version {summary.model_version}.\n\n"
        if summary.model_name
        else ""
    )
    target = f"Target: {summary.target['line']}\n\n" if summary.target else ""
    where = f"MLflow run: [{summary.run_id}]({summary.run_url})\n\n" if link else ""
    return (
        f"# distill run: {summary.run_name or summary.run_id}\n\n{headline}{target}{registered}"
        + where
        + "\n".join(_stage_rows(summary))
    )

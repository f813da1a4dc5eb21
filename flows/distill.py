"""The pipeline flow: teacher -> reduce -> reconstruct -> fine-tune -> prune -> quantize ->
register.

The flow runs tasks/compress/pipeline.py's `compress` with the stages as Prefect tasks and a
recorder that writes each stage as a nested MLflow run under one parent run
(flows/stages.py), then registers the served model; it computes nothing itself. Config and data
are checked before any run is opened, so bad input leaves nothing in MLflow.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import TagsContext
from prefect.runtime import flow_run

from distill.flows.stages import (
    PREFECT_STEPS,
    MlflowRecorder,
    data_task,
    log_student_hf,
    register_task,
)
from distill.flows.summary import RunSummary, run_name, stage_table_markdown, version_description
from distill.tasks.compress.context import RunContext
from distill.tasks.compress.failures import StageGuard
from distill.tasks.compress.pipeline import Outcome, compress
from distill.tasks.compress.recipe import with_recipe
from distill.tasks.platform import dead_runs, progress, store, tracking
from distill.tasks.platform.config import DEFAULT_CONFIG, build_config, check_task_keys, load_config
from distill.tasks.release.registry import (
    Registered,
    remove_incomplete_registrations,
    teacher_lineage,
)


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


F = TypeVar("F", bound=Callable[..., Any])


def untagged_task_runs(body: F) -> F:
    """A flow's `body` whose task runs carry no tags. Prefect 3.8 asks its server for a
    concurrency slot for every tag on a task run before running it, whether or not any limit
    exists (PrefectHQ/prefect#19367); most calls take milliseconds, but about one run in two
    stalled about 2 s on one (the digits pipeline sized by hand: median 2.96 s with tags, 2.47 s
    without, 16 runs each; docs/benchmarks.md, "Untagged task runs"). The flow run keeps its
    tags (`distill`, the command, `config:NAME`): the Prefect UI filters runs by those."""

    @functools.wraps(body)
    def untagged(*args: Any, **kwargs: Any) -> Any:
        with TagsContext(current_tags=set()):
            return body(*args, **kwargs)

    return untagged  # type: ignore[return-value]


def tag_flow_run(tag: str) -> None:
    """Add `tag` to the running flow run (one API call; its task runs stay untagged)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, tags=sorted({*flow_run.tags, tag}))


def flow_run_name() -> str:
    """The Prefect flow run's name: the MLflow run's (config and overrides as given)."""
    from prefect.runtime import flow_run as current

    params = current.parameters
    try:
        if params.get("from_run"):
            return f"reproduce {str(params['from_run'])[:8]}"
        path = Path(params.get("config_path") or DEFAULT_CONFIG)
        context = params.get("context")  # the command's: the config it parsed, not a re-read
        cfg = (
            context.config(path, params.get("overrides"))
            if isinstance(context, RunContext)
            else load_config(path, params.get("overrides"))
        )
    except Exception:  # noqa: BLE001 -- the flow itself reports a bad config, with its key
        return Path(params.get("config_path") or DEFAULT_CONFIG).stem
    return run_name(cfg, (params.get("tags") or {}).get("distill.sweep_variant"))


def flow_run_label() -> str:
    """`[NAME] ` of the Prefect flow run this thread is in (a sweep variant's grid values)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return f"[{ctx.flow_run.name}] " if ctx is not None and ctx.flow_run is not None else ""


@flow(name="distill", flow_run_name=flow_run_name, log_prints=False)
@untagged_task_runs
def distill_flow(
    config_path: str | None = None,
    overrides: list[str] | None = None,
    promote: bool = False,
    from_run: str | None = None,
    tags: dict[str, str] | None = None,
    challenger: bool = True,
    context: RunContext | None = None,
) -> RunSummary:
    """`promote`: run the promotion gates right after registration. `from_run`: take the config
    from that MLflow run's record instead of `config_path` (tasks/release/reproduce.py).
    `tags`: extra tags on the parent run (a sweep's id; `mlflow.parentRunId`: the sweep's run).
    `challenger`: the registered version takes alias `challenger` (a sweep gives it to its best
    variant only). `context`: the run's (tasks/compress/context.py), from a caller in this process
    that already prepared its data or flew its pre-flight (`distill run`, `distill sweep`); a
    deployment's run makes its own."""
    progress.run_label = flow_run_label  # progress lines name this flow run (a sweep's variant)
    record = None
    if from_run:
        from distill.flows.promote import connect_registry
        from distill.tasks.release.reproduce import read_record

        connect_registry()
        record = read_record(from_run)
        path, cfg = None, build_config(record.config, overrides)
    else:
        path = Path(config_path or DEFAULT_CONFIG)
    context = context or RunContext()
    if path is not None:
        cfg = context.config(path, overrides)
    settings = store.load_settings()
    config_dir = str(path.resolve().parent) if path is not None else None
    data = data_task(cfg.data, cfg.seed, context)
    check_task_keys(cfg, data.task)  # `auto` is decided by the data
    # before any run exists: the teacher against the data, the planned student on two rows
    checked = context.preflight(cfg, data, config_dir)
    stages_cfg = cfg  # what the stages run with; `cfg` is what the run records
    if checked is not None:  # finetune keys left out: the recipe the stages will fill them with
        cfg = with_recipe(cfg, checked.recipe)
    if record is not None:
        from distill.tasks.release.reproduce import check_record, pin_format

        for warning in check_record(record, cfg.data.source, data.digest, tracking.git_commit()):
            get_run_logger().warning(warning)
        stages_cfg, pinned = pin_format(cfg, record, overrides)
        if pinned:
            get_run_logger().info(pinned)
    experiment_id = store.configure(settings)
    tags = (
        {
            "prefect.flow_run_id": str(flow_run.id),
            "distill.config_hash": cfg.digest(),
            "distill.dataset_digest": data.digest,
            # the test rows: the user's own split, or drawn with seed and data.test_size
            "distill.split": "user" if data.user_split else "seeded",
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

    tag_flow_run(f"config:{cfg.name}")
    name = run_name(cfg, (tags or {}).get("distill.sweep_variant"))
    logger = get_run_logger()
    logger.info("MLflow parent run %r in experiment %s", name, experiment_id)
    with tracking.parent_run(
        experiment_id, name, cfg.flat(), tags | tracking.process_tags()
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
        recorder = MlflowRecorder(run_id, data.X_test[:5])
        outcome: Outcome | None = None
        registered: Registered | None = None
        try:
            lineage = {k: v for k, v in tags.items() if k != "mlflow.parentRunId"}
            outcome = compress(stages_cfg, data, PREFECT_STEPS, recorder, config_dir, context)
            with StageGuard(recorder)("student_hf"):
                unsaved = log_student_hf(run_id, outcome.pruned)
                if unsaved:
                    logger.info("no student_hf/: %s", unsaved)
            if outcome.target is not None:
                lineage |= outcome.target.tags
            if cfg.registry.enabled:
                with StageGuard(recorder)("register"):
                    registered = register_task(
                        outcome.quantized.served,
                        data,
                        cfg.registry.model_name,
                        lineage | {"mlflow.run_id": run_id},
                        challenger,
                        version_description(cfg, outcome.summary, lineage),
                    )
            logger.info("stages done; final metrics on the parent run %s", run_id)
        finally:
            # on the parent in one batch, after registration (MLflow reads the history of every
            # metric of a run it logs a model in, one query per key); a failed run keeps what it
            # finished
            tracking.log_metrics(run_id, recorder.metrics)
            tracking.log_metrics(
                run_id,
                outcome.summary if outcome is not None else {},
                model_id=registered.model_id if registered else None,
            )
    target = None
    if outcome.target is not None:
        target = {"met": outcome.target.met, "line": outcome.target.line}
        if outcome.target.fitted.lineage:  # the stage rows are not one student's: which is which
            target["lineage"] = outcome.target.fitted.lineage
        if outcome.target.fitted.frontier:  # a drop-only target: the candidates it built
            target["frontier"] = [c.row() for c in outcome.target.fitted.frontier]
            target["metric"] = outcome.target.guard.metric
            target["confidence"] = outcome.target.guard.confidence
    summary = RunSummary(
        run_id=run_id,
        experiment_id=experiment_id,
        run_url=store.run_url(settings, experiment_id, run_id),
        model_name=registered.name if registered else None,
        model_version=registered.version if registered else None,
        metrics=tracking.run_metrics(run_id),
        stages=outcome.stages,
        target=target,
        run_name=name,
        flow_run_id=str(flow_run.id),
        ui_running=settings.tracking_uri.startswith(("http://", "https://"))
        or store.running_ui(settings) is not None,
    )
    tracking.set_description(run_id, stage_table_markdown(summary, link=False))
    if target is not None and not target["met"]:
        get_run_logger().warning(target["line"])
    if promote and registered is not None:
        from distill.flows.promote import run_promotion

        summary.promotion = run_promotion(registered.name, registered.version, cfg.promote)
    create_markdown_artifact(
        markdown=stage_table_markdown(summary),
        key="distill-summary",
        description="distill: stages and the MLflow run",
    )
    return summary

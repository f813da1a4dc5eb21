"""The pipeline's stages recorded in MLflow without an orchestrator: each stage a nested run of
the parent (model, params, metrics, curves), the figures on the parent, a failed stage FAILED
with its line and `error.txt`. The flow's recorder (flows/stages.py) is this one with each
stage's record made a Prefect task (retried on a tracking error)."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from typing import Any

import numpy as np
from torch import nn

from distill.tasks.compress.data import Dataset
from distill.tasks.compress.guard import Guard
from distill.tasks.compress.pipeline import Model, Recorder, StageResult
from distill.tasks.compress.plots import PLOTS_DIR, frontier_figure, pipeline_figures
from distill.tasks.compress.target import Candidate
from distill.tasks.platform import retry, tracking
from distill.tasks.platform.caching import content_hash
from distill.tasks.platform.config import EvaluateConfig

FRONTIER_CSV = "frontier.csv"  # at the run's root, beside the plots


class TrackingRecorder(Recorder):
    """Each stage as a nested MLflow run of `parent_run_id`. `metrics`: the STAGE/METRIC keys of
    every stage recorded so far, for the parent run, also when a later stage fails."""

    def __init__(self, parent_run_id: str, example: np.ndarray) -> None:
        self.parent_run_id = parent_run_id
        self.example = example  # the logged models' input example
        self.metrics: dict[str, float] = {}

    def stage(
        self, result: StageResult, measure: Callable[[], dict[str, float]]
    ) -> dict[str, float]:
        # a teacher is logged once per experiment: its runs point to the model by digest
        digest = content_hash(result.model) if result.name == "teacher" else None
        recorded = tracking.record_stage(
            self.parent_run_id,
            result.name,
            measure(),
            result.params,
            result.curves,
            result.model,
            self.example,
            started=result.started,
            model_digest=digest,
        )
        self.metrics |= recorded
        return {key.removeprefix(f"{result.name}/"): value for key, value in recorded.items()}

    def record(
        self, stage: str, metrics: dict[str, float], params: dict[str, Any], started: float
    ) -> None:
        self.metrics |= tracking.record_stage(
            self.parent_run_id, stage, metrics, params, started=started
        )

    def frontier(self, frontier: list[Candidate], guard: Guard, plot: bool) -> None:
        """A drop-only target's candidates on the parent run: `frontier.csv` (one row each) and,
        with `plot`, `frontier.png`."""
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=list(frontier[0].row()), lineterminator="\n")
        writer.writeheader()
        writer.writerows(c.row() for c in frontier)
        tracking.log_note(self.parent_run_id, table.getvalue(), FRONTIER_CSV)
        if plot:
            agreement = 0 if guard.X_agree is None else len(guard.X_agree)
            figure = frontier_figure(
                frontier, guard.reference, guard.max_drop, guard.metric, guard.confidence, agreement
            )
            tracking.log_figure(self.parent_run_id, figure, f"{PLOTS_DIR}/frontier.png".lstrip("/"))

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
        figures = pipeline_figures(stages, teacher, student, final, data, curves, cfg, seed)
        for name, fig in figures.items():
            tracking.log_figure(self.parent_run_id, fig, f"{PLOTS_DIR}/{name}".lstrip("/"))

    def failed(self, stage: str, line: str, trace: str, started: float | None) -> None:
        """The failed stage's nested run: FAILED, the line as its description, the trace in
        `error.txt`; the parent gets both too. Tried twice on a tracking error."""
        for attempt in range(2):
            try:
                tracking.record_failure(self.parent_run_id, stage, line, trace, started)
                return
            except Exception as err:
                if attempt or not retry.is_transient(err):
                    raise

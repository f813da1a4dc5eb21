"""What a pipeline run is called and what it reports: the run's name in MLflow and Prefect, the
`RunSummary` the flow returns (`distill run --json` prints it), the registered version's
description and the stage table (in markdown: the Prefect artifact and the MLflow run's
description; in the terminal: what `distill run` prints).
"""

from __future__ import annotations

import functools
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Any

from distill.tasks.platform.config import PipelineConfig

_UNITS = {
    "size_kb": "{:g} KB",
    "ratio": "{:g}x",
    "params": "{:,.0f} params",
    "latency_ms_b1": "{:g} ms b1",
    "smallest": "smallest within {:g} drop",
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


@dataclass
class RunSummary:
    run_id: str
    experiment_id: str
    run_url: str
    model_name: str | None
    model_version: str | None
    metrics: dict[str, float]  # the parent run's metrics
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    promotion: Any = None  # distill.tasks.release.promotion.Decision, with `distill run --promote`
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
    if summary.target and summary.target.get("lineage"):
        target += f"Stages: {summary.target['lineage']}\n\n"
    where = f"MLflow run: [{summary.run_id}]({summary.run_url})\n\n" if link else ""
    return (
        f"# distill run: {summary.run_name or summary.run_id}\n\n{headline}{target}{registered}"
        + where
        + "\n".join(_stage_rows(summary))
    )


def _ms(value: float) -> str:
    """A latency in ms, three significant digits and never in scientific notation."""
    if value < 0.1:
        return f"{value:.4f}"
    return f"{value:.3f}" if value < 1 else f"{value:.3g}" if value < 100 else f"{value:.0f}"


def print_stage_table(summary: RunSummary) -> None:
    """`distill run`'s report on stdout: the stage table made to fit 80 columns (accuracy and
    agreement in %, sizes in KB), the headline, the MLflow run and the registered version."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    first = next(iter(summary.stages.values()))
    large = next(
        k for k in first if k.startswith("latency_ms_b") and k != "latency_ms_b1"
    )  # latency_ms_bN
    regression = "r2" in first
    # regression: R² and the errors in the label's units, the relative error to the teacher
    # (MAE: in MLflow and the markdown table; four quality columns would not fit 80 columns)
    quality = ("R²", "RMSE", "rel err") if regression else ("acc %", "agree %")
    table = Table(
        title=summary.run_name or "distill: stages",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    for col in (
        "stage",
        "params",
        "KB",
        *quality,
        "b1 ms",
        f"b{large.removeprefix('latency_ms_b')} ms",
        "time s",
    ):
        table.add_column(col, justify="left" if col == "stage" else "right", no_wrap=True)
    nan = float("nan")
    for stage, m in summary.stages.items():
        scores = (
            (
                f"{m['r2']:.3f}",
                f"{m['rmse']:.4g}",
                f"{m.get('teacher_rel_error', nan):.3f}",
            )
            if regression
            else (f"{100 * m['accuracy']:.2f}", f"{100 * m.get('agreement', nan):.2f}")
        )
        table.add_row(
            stage,
            f"{m['params']:,.0f}",
            f"{m['size_kb']:,.1f}",
            *scores,
            _ms(m["latency_ms_b1"]),
            _ms(m[large]),
            f"{m.get('seconds', nan):.1f}",
        )
    console = Console(width=None if sys.stdout.isatty() else 80, soft_wrap=False)
    console.print(table)
    if summary.target and summary.target.get("lineage"):  # the rows are not one student's
        lineage = clauses(summary.target["lineage"], console.width, bullet="")
        console.print(lineage, highlight=False)
    m = summary.metrics
    drop = (
        f"R² drop {m['r2_drop']:+.4f}"
        if regression
        else f"accuracy drop {100 * m['accuracy_drop']:+.2f} points"
    )
    console.print(
        f"compression {m['compression_ratio']:.1f}x, {drop}, "
        f"speedup b1 {m.get('speedup_b1', nan):.1f}x"
    )
    # a path-free line each: a terminal makes them clickable; nothing is cut at 80 columns
    console.print(f"MLflow run {summary.run_id}", soft_wrap=True)
    console.print(f"  {summary.run_url}", soft_wrap=True, highlight=False)
    if not getattr(summary, "ui_running", True):
        console.print("  (start `distill ui` to open it)", highlight=False)
    flow_url = _flow_run_url(summary.flow_run_id)
    if flow_url:
        console.print(f"Prefect flow run\n  {flow_url}", soft_wrap=True, highlight=False)
    if summary.model_name:
        console.print(
            f"registered {summary.model_name} version {summary.model_version} (alias challenger)"
        )


def clauses(line: str, width: int = 80, bullet: str = "- ") -> str:
    """A long one-line report (a target's verdict) as lines within `width`: its first clause,
    then each clause after a `; ` outside brackets on a line of its own (after `bullet`), each
    wrapped with a hanging indent. Words are not broken (numbers, ranges, keys stay whole)."""
    parts, depth, begin = [], 0, 0
    for i, ch in enumerate(line):
        depth = max(0, depth + (ch in "([") - (ch in ")]"))  # a stray ")" opens nothing
        if depth == 0 and line.startswith("; ", i):
            parts.append(line[begin:i])
            begin = i + 2
    parts.append(line[begin:])
    wrap = functools.partial(
        textwrap.fill,
        width=max(width, 40),
        subsequent_indent="  ",
        break_long_words=False,
        break_on_hyphens=False,
    )
    return "\n".join([wrap(parts[0]), *(wrap(p, initial_indent=bullet) for p in parts[1:])])


def _flow_run_url(flow_run_id: str | None) -> str | None:
    """The flow run's page in the Prefect UI: only on a real server (PREFECT_API_URL); the
    temporary one of a bare `distill run` is gone when the command ends."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    if not flow_run_id or not PREFECT_API_URL.value() or not PREFECT_UI_URL.value():
        return None
    return f"{PREFECT_UI_URL.value().rstrip('/')}/runs/flow-run/{flow_run_id}"

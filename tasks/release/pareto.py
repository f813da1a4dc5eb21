"""Sweep summary: which variants are worth keeping, as the Pareto front of accuracy vs size.

A variant is on the front when no other variant is at least as accurate *and* at most as
large, with one of the two strictly better. The summary is one MLflow run (tagged with the
sweep id, beside the variants' own parent runs) holding the table as markdown and CSV and
a plot of every variant's final accuracy against its final size on disk.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.platform import tracking

ACCURACY, SIZE = "final/accuracy", "final/size_kb"
COLUMNS = [
    "variant",
    "overrides",
    "status",
    "accuracy",
    "size_kb",
    "compression_ratio",
    "accuracy_drop",
    "pareto",
    "run_id",
]


def pareto_mask(sizes: list[float], accuracies: list[float]) -> list[bool]:
    """True where no other point is both no larger and no less accurate (and better in one)."""
    points = list(zip(sizes, accuracies, strict=True))
    return [
        not any(s2 <= s and a2 >= a and (s2 < s or a2 > a) for s2, a2 in points) for s, a in points
    ]


def summary_frame(results: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per variant (`index`, `overrides`, `run_id`, `metrics` or `error`), smallest
    first."""
    rows = []
    for r in results:
        m = r.get("metrics") or {}
        rows.append(
            {
                "variant": r["index"],
                "overrides": ", ".join(r["overrides"]) or "(base config)",
                "status": "finished" if m else f"failed: {r.get('error', '')}"[:200],
                "accuracy": m.get(ACCURACY, np.nan),
                "size_kb": m.get(SIZE, np.nan),
                "compression_ratio": m.get("compression_ratio", np.nan),
                "accuracy_drop": m.get("accuracy_drop", np.nan),
                "run_id": r.get("run_id") or "",
            }
        )
    frame = pd.DataFrame(rows, columns=[c for c in COLUMNS if c != "pareto"])
    done = frame["status"] == "finished"
    on_front = pareto_mask(
        frame.loc[done, "size_kb"].tolist(), frame.loc[done, "accuracy"].tolist()
    )
    frame["pareto"] = pd.Series(on_front, index=frame.index[done], dtype=bool).reindex(
        frame.index, fill_value=False
    )
    return (
        frame[COLUMNS]
        .sort_values(["size_kb", "variant"], na_position="last")
        .reset_index(drop=True)
    )


def markdown_table(frame: pd.DataFrame) -> str:
    lines = [
        (
            "| variant | overrides | accuracy | size KB | compression | accuracy drop | Pareto "
            "| MLflow run |"
        ),
        "|---:|---|---:|---:|---:|---:|:---:|---|",
    ]
    for r in frame.itertuples():
        if r.status != "finished":
            lines.append(f"| {r.variant} | {r.overrides} | {r.status} | | | | | |")
            continue
        lines.append(
            f"| {r.variant} | {r.overrides} | {r.accuracy:.4f} | {r.size_kb:.1f} | "
            f"{r.compression_ratio:.1f}x | {100 * r.accuracy_drop:+.2f} pt | "
            f"{'**yes**' if r.pareto else ''} | {r.run_id} |"
        )
    return "\n".join(lines)


def pareto_plot(frame: pd.DataFrame, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    done = frame[frame["status"] == "finished"]
    front = done[done["pareto"]].sort_values("size_kb")
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ax.scatter(done["size_kb"], 100 * done["accuracy"], color="0.6", label="variant", zorder=2)
    ax.step(front["size_kb"], 100 * front["accuracy"], where="post", color="tab:red", zorder=1)
    ax.scatter(
        front["size_kb"], 100 * front["accuracy"], color="tab:red", label="Pareto front", zorder=3
    )
    for r in done.itertuples():
        ax.annotate(
            str(r.variant),
            (r.size_kb, 100 * r.accuracy),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    ax.set_xlabel("final model size on disk (KB)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def record_sweep(
    experiment_id: str,
    sweep_id: str,
    grid: dict[str, list[str]],
    frame: pd.DataFrame,
    tags: dict[str, str],
) -> str:
    """The sweep's summary run: grid as params, table (md + csv) and plot as artifacts."""
    from mlflow import MlflowClient

    params = {f"grid.{k}": ", ".join(v) for k, v in grid.items()}
    with tracking.parent_run(
        experiment_id, f"sweep-{sweep_id[:8]}", params, tags | tracking.process_tags()
    ) as run_id:
        client = MlflowClient()
        done = frame[frame["status"] == "finished"]
        tracking.log_metrics(
            run_id,
            {
                "sweep/variants": len(frame),
                "sweep/finished": len(done),
                "sweep/pareto": int(done["pareto"].sum()),
            }
            | (
                {
                    "sweep/best_accuracy": float(done["accuracy"].max()),
                    "sweep/smallest_size_kb": float(done["size_kb"].min()),
                }
                if len(done)
                else {}
            ),
        )
        client.log_text(
            run_id, f"# sweep {sweep_id}\n\n{markdown_table(frame)}\n", "sweep/pareto.md"
        )
        client.log_text(run_id, frame.to_csv(index=False), "sweep/variants.csv")
        if len(done):
            with tempfile.TemporaryDirectory() as tmp:
                plot = pareto_plot(
                    frame, Path(tmp) / "pareto.png", f"sweep {sweep_id[:8]}: accuracy vs size"
                )
                client.log_artifact(run_id, str(plot), "sweep")
    return run_id


@task(name="sweep-summary", cache_policy=NO_CACHE)
def summarize_task(
    results: list[dict[str, Any]],
    grid: dict[str, list[str]],
    sweep_id: str,
    experiment_id: str,
    tags: dict[str, str],
) -> tuple[pd.DataFrame, str]:
    frame = summary_frame(results)
    return frame, record_sweep(experiment_id, sweep_id, grid, frame, tags)

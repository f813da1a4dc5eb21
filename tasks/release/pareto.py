"""Sweep summary: which variants are worth keeping, as the Pareto front of accuracy vs size.

A variant is on the front when no other variant is at least as accurate *and* at most as
large, with one of the two strictly better. The summary is the sweep's MLflow run (tagged with
the sweep id; the variants' pipeline runs nest under it) holding the table as its description,
as markdown and CSV, and a plot of every variant's final accuracy against its final size on
disk. `best_variant` picks the one version of the sweep that becomes `challenger`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from distill.tasks.platform import tracking

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


def short_label(overrides: str) -> str:
    """`reduce.budget.size_kb=8, finetune.temperature=2` -> `size_kb=8, temperature=2`."""
    parts = [p.strip() for p in overrides.split(", ") if p.strip()]
    return ", ".join(
        p.split("=", 1)[0].rsplit(".", 1)[-1] + "=" + p.split("=", 1)[1] if "=" in p else p
        for p in parts
    )


def pareto_plot(frame: pd.DataFrame, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    done = frame[frame["status"] == "finished"]
    front = done[done["pareto"]].sort_values("size_kb")
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ax.scatter(done["size_kb"], 100 * done["accuracy"], color="0.6", label="variant", zorder=2)
    ax.step(
        front["size_kb"],
        100 * front["accuracy"],
        where="post",
        color="tab:red",
        marker="o",
        label="Pareto front",
        zorder=3,
    )
    seen: dict[tuple[float, float], int] = {}  # variants on one point: labels stacked, not over
    for r in done.itertuples():
        point = (round(r.size_kb, 1), round(100 * r.accuracy, 2))
        k = seen[point] = seen.get(point, -1) + 1
        ax.annotate(
            short_label(r.overrides),
            (r.size_kb, 100 * r.accuracy),
            textcoords="offset points",
            xytext=(4, 4 + 10 * k),
            fontsize=7,
        )
    ax.margins(x=0.3, y=0.12)  # room for the labels right of and above each point
    ax.set_xlabel("final model size on disk (KB)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def sweep_run_name(grid: dict[str, list[str]]) -> str:
    """`sweep · reduce.budget.size_kb=8,16; finetune.temperature=2,4`: the sweep's MLflow run and
    its Prefect flow run are named by the grid."""
    return ("sweep · " + "; ".join(f"{k}={','.join(v)}" for k, v in grid.items()))[:250]


def open_sweep_run(
    experiment_id: str, sweep_id: str, grid: dict[str, list[str]], tags: dict[str, str]
) -> str:
    """The sweep's run, opened before its variants: their pipeline runs nest under it (MLflow's
    runs table folds them), named by the grid (`sweep · reduce.budget.size_kb=8,16`)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    run_id = client.create_run(
        experiment_id, run_name=sweep_run_name(grid), tags=tags | tracking.process_tags()
    ).info.run_id
    tracking.log_metrics(run_id, {}, params={f"grid.{k}": ", ".join(v) for k, v in grid.items()})
    return run_id


def record_sweep(run_id: str, sweep_id: str, frame: pd.DataFrame, best: str | None) -> str:
    """The sweep's summary on its run: table (md + csv, and as its description), plot; closed."""
    from mlflow import MlflowClient

    client = MlflowClient()
    status = "FAILED"
    try:
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
        table = markdown_table(frame)
        tracking.set_description(
            run_id, f"# sweep {sweep_id[:8]}\n\n{best or 'no challenger'}\n\n{table}\n"
        )
        client.log_text(run_id, f"# sweep {sweep_id}\n\n{table}\n", "sweep/pareto.md")
        client.log_text(run_id, frame.to_csv(index=False), "sweep/variants.csv")
        if len(done):
            with tempfile.TemporaryDirectory() as tmp:
                plot = pareto_plot(
                    frame, Path(tmp) / "pareto.png", f"sweep {sweep_id[:8]}: accuracy vs size"
                )
                client.log_artifact(run_id, str(plot), "sweep")
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
    return run_id


def best_variant(frame: pd.DataFrame, max_accuracy_drop: float | None) -> int | None:
    """The variant a sweep offers as challenger: the smallest finished one whose accuracy drop
    is within the promotion gate; none within it (or no gate): the most accurate, the smaller
    on a tie. Returns its row's `variant`, or None when none finished."""
    done = frame[frame["status"] == "finished"]
    if done.empty:
        return None
    if max_accuracy_drop is not None:
        within = done[done["accuracy_drop"] <= max_accuracy_drop + 1e-9]
        if len(within):
            return int(within.sort_values(["size_kb", "variant"]).iloc[0]["variant"])
    ranked = done.assign(neg=-done["accuracy"]).sort_values(["neg", "size_kb", "variant"])
    return int(ranked.iloc[0]["variant"])

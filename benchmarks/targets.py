"""Targets on what ships, measured: `distill run --set target.…` for two teachers and five
targets (4x, 10x and 30x smaller files than the teacher's, a batch-1 latency, and drop-only: the
smallest file within the 1-point drop), against what
each run achieved: the registered file's size, the accuracy drop (test rows; the guard decided on
validation rows), whether the target was met, and the run's wall time.

Teachers: the default MLP 64-512-512-10 on digits, and a 1-D ResNet (tests/zoo.py, 32 channels)
on the generated signals of benchmarks/architectures.py. Each teacher is trained once and loaded
from its file by every run (`teacher.source: file:`); every run recomputes its stages (no cache).
The latency target is the midpoint of the fastest served format's batch-1 latency at the smallest
and at the teacher's widths, measured first.

Cost of planning: the 10x run against the same pipeline sized by hand to the same final model
(`reduce.budget.params` and int8 or not as the plan chose, no pruning), alternating, median of
`--repeats` runs each.

    .venv/bin/python benchmarks/targets.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from architectures import signals  # noqa: E402 -- importable only after the sys.path inserts

CONFIG = str(ROOT / "configs" / "digits.yaml")
COMMON = [
    "evaluate.plots=false",
    "evaluate.latency_repeats=200",
    "register.model_name=bench-targets",
]
RESNET = {"channels": 32, "n_classes": 8}


def teachers(tmp: Path) -> dict[str, list[str]]:
    X, y = signals(0)
    np.savez(tmp / "signals.npz", X=X.astype(np.float32), y=y)
    return {
        "MLP 64-512-512-10, digits": [],
        "ResNet1d-32, signals": [
            f"data.source=npz:{tmp / 'signals.npz'}",
            "data.shape=[1, 64]",
            "teacher.arch=tests.zoo:ResNet1d",
            f"teacher.init_args={json.dumps(RESNET)}",
            "teacher.epochs=40",
            "teacher.lr=0.003",
        ],
    }


def trained_teacher(overrides: list[str], path: Path, seed: int) -> tuple[list[str], float]:
    """Train once, save the state_dict; -> overrides loading it, and the latency target (ms)."""
    from distill.tasks.compress.data import load_dataset
    from distill.tasks.compress.target import measure_costs
    from distill.tasks.compress.teacher import train_teacher
    from distill.tasks.platform.config import load_config

    cfg = load_config(CONFIG, [f"seed={seed}", *overrides])
    data = load_dataset(cfg.data, seed)
    teacher = train_teacher(cfg.teacher, data, seed)
    torch.save(teacher.state_dict(), path)
    costs = measure_costs(teacher, data.X_train[:512], cfg.compress.quantize, seed, 300, (0.0, 1.0))
    fastest = [min(c.latency_ms[i] for c in costs.values()) for i in (0, -1)]  # smallest, teacher
    latency = round(sum(fastest) / 2, 4)
    return [*overrides, f"teacher.source=file:{path}"], latency


def run(overrides: list[str]) -> tuple[dict[str, float], dict | None, float]:
    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

    from distill.flows.distill import distill_flow

    start = time.perf_counter()
    with temporary_settings(updates={PREFECT_TASKS_REFRESH_CACHE: True}):
        summary = distill_flow(CONFIG, [*COMMON, *overrides])
    return summary.metrics, summary.target, time.perf_counter() - start


def show_target(kind: str, value: float) -> str:
    if kind == "smallest":
        return f"smallest within {100 * value:g} point"
    return f"{value:g}x smaller file" if kind == "ratio" else f"{value:g} ms at batch 1"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats", type=int, default=3, help="of the planning-cost runs (0: none)"
    )
    parser.add_argument(
        "--kinds", nargs="*", help="only these: ratio latency_ms_b1 smallest (default: all)"
    )
    parser.add_argument("--teachers", nargs="*", help="only these: MLP ResNet1d (default: both)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="distill-targets-"))
    os.environ.update(
        {
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
            "DISTILL_MLFLOW_CONFIG": f"{tmp}/none",
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "MLFLOW_LOGGING_LEVEL": "ERROR",
            "DO_NOT_TRACK": "true",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
    )
    from distill.flows.distill import local_settings

    rows, costs, begin = [], [], time.perf_counter()
    with local_settings():
        run(
            ["target=null", "teacher.epochs=1", "finetune.epochs=0"]
        )  # starts Prefect, warms every import
        for name, teacher_overrides in teachers(tmp).items():
            if args.teachers and not any(name.startswith(t) for t in args.teachers):
                continue
            loaded, latency = trained_teacher(teacher_overrides, tmp / f"{len(rows)}.pt", args.seed)
            # the default guard, 1 point (configs/digits.yaml ships 2 for the demo)
            base = [f"seed={args.seed}", "target.max_accuracy_drop=0.01", *loaded]
            for kind, value in (
                ("ratio", 4),
                ("ratio", 10),
                ("ratio", 30),
                ("latency_ms_b1", latency),
                ("smallest", 0.01),  # drop-only: the smallest file within the 1 point
            ):
                if args.kinds and kind not in args.kinds:
                    continue
                given = (
                    ["target=null", f"target.max_accuracy_drop={value}"]
                    if kind == "smallest"
                    else [f"target.{kind}={value}"]
                )
                m, target, wall = run([*base, *given])
                rows.append((name, kind, value, m, target, wall))
            if args.repeats == 0 or not any(r[0] == name and r[1:3] == ("ratio", 10) for r in rows):
                continue
            # planning's cost: the 10x run vs the same pipeline sized by hand to its plan,
            # alternating, median of `--repeats` each
            m = next(r[3] for r in rows if r[0] == name and r[1:3] == ("ratio", 10))
            by_hand = [
                *base,
                "target=null",
                "compress.prune.amount=0",
                f"reduce.budget.params={int(m['target/reduce_params'])}",
                f"compress.quantize.enabled={'true' if m['target/int8'] else 'false'}",
            ]
            walls: dict[str, list[float]] = {"targeted": [], "by hand": []}
            sizes = {}
            for _ in range(args.repeats):
                for arm, overrides in (
                    ("targeted", [*base, "target.ratio=10"]),
                    ("by hand", by_hand),
                ):
                    metrics, _, wall = run(overrides)
                    walls[arm].append(wall)
                    sizes[arm] = metrics["final/size_kb"]
            costs.append((name, sizes, {arm: statistics.median(w) for arm, w in walls.items()}))

    print(
        f"seed {args.seed}, {torch.get_num_threads()} threads; accuracy drop = teacher - final on "
        "the test rows, in points (the guard, max 1 point, is decided on validation rows)\n"
    )
    print(
        "| teacher | target | teacher KB | final KB | achieved | accuracy drop | pruning rounds | "
        "met | wall s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|---:|")
    for name, kind, value, m, target, wall in rows:
        achieved = (  # what the target stage measured and decided on (median of 3 p50s)
            f"{m['target/achieved']:.4f} ms"
            if kind == "latency_ms_b1"
            else f"{m['teacher/size_kb'] / m['final/size_kb']:.1f}x"
        )
        print(
            f"| {name} | {show_target(kind, value)} | {m['teacher/size_kb']:.1f} | "
            f"{m['final/size_kb']:.1f} | {achieved} | {100 * m['accuracy_drop']:+.2f} | "
            f"{m['target/pruning_rounds']:.0f} | {'yes' if target['met'] else '**no**'} | "
            f"{wall:.1f} |"
        )
    print("\nWhy each run stopped (`target` stage record):\n")
    for name, kind, value, _m, target, _wall in rows:
        print(f"- {name}, {show_target(kind, value)}: {target['line']}")
    if not costs:
        print(f"\n({time.perf_counter() - begin:.0f} s in all)")
        return
    print(
        f"\nmedian wall s of {args.repeats} runs each, alternating\n\n"
        "| teacher | 10x targeted: final KB | wall s | by hand, same plan: final KB | wall s | "
        "**targeted / by hand** |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, size, wall in costs:
        print(
            f"| {name} | {size['targeted']:.1f} | {wall['targeted']:.1f} | {size['by hand']:.1f} | "
            f"{wall['by hand']:.1f} | **{wall['targeted'] / wall['by hand']:.2f}** |"
        )
    print(f"\n({time.perf_counter() - begin:.0f} s in all)")


if __name__ == "__main__":
    main()

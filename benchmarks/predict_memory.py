"""Peak memory of `distill predict` as the input grows 10x: chunked streaming vs reading it whole.

    .venv/bin/python benchmarks/predict_memory.py [--rows 50000] [--factor 10] [--baseline DIR]

Registers a tiny model on a numeric table (30 float columns, `distill run` with few epochs),
writes CSVs of `rows` and `factor * rows` rows, and runs `distill predict` on each in a fresh
process, reporting its wall time and peak RSS (the child's ru_maxrss). `--baseline` runs the
same predictions with another checkout's code (e.g. one that reads the whole file at once).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "teacher.hidden=[32, 32]",
    "teacher.epochs=3",
    "target=null",
    "reduce.budget.ratio=2",
    "reduce.calibration_samples=64",
    "finetune.epochs=1",
    "compress.prune.recovery_epochs=1",
    "evaluate.latency_repeats=3",
    "evaluate.large_batch=32",
    "evaluate.plots=false",
    "register.model_name=predict-memory",
    "data.label=label",
]


def _table(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, 30))
    frame = pd.DataFrame(X, columns=[f"f{i:02d}" for i in range(30)])
    return frame.assign(label=(X[:, 0] + X[:, 1] > 0).astype(int))


def _child(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """(wall s, peak RSS MB) of one process, measured from a wrapper that has only that child."""
    probe = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "rc = subprocess.run(sys.argv[1:]).returncode; "
        "print(rc, time.perf_counter() - t, "
        "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, *command],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    rc, wall, rss = done.stdout.split()[-3:]
    if rc != "0":
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return float(wall), float(rss) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--baseline", type=Path, default=None)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="distill-predict-mem-") as name:
        tmp = Path(name)
        env = os.environ | {
            "PYTHONPATH": str(ROOT),
            "PREFECT_HOME": str(tmp / "prefect"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
            "MLFLOW_REGISTRY_URI": f"sqlite:///{tmp}/mlflow.db",
            "DISTILL_MLFLOW_CONFIG": str(tmp / "absent.yaml"),
            "OMP_NUM_THREADS": "1",
        }
        _table(3000, 0).to_csv(tmp / "train.csv", index=False)
        sets = [a for s in [*TINY, f"data.source=csv:{tmp / 'train.csv'}"] for a in ("--set", s)]
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "distill.flows.cli",
                "run",
                str(ROOT / "configs" / "digits.yaml"),
                *sets,
            ],
            env=env,
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        if run.returncode != 0:
            raise SystemExit(run.stderr[-3000:])
        sizes = {"1x": opts.rows, f"{opts.factor}x": opts.rows * opts.factor}
        block = _table(opts.rows, 1)
        for label, rows in sizes.items():
            start = time.perf_counter()
            for i in range(rows // opts.rows):
                block.to_csv(
                    tmp / f"{label}.csv", index=False, mode="w" if i == 0 else "a", header=i == 0
                )
            mb = (tmp / f"{label}.csv").stat().st_size / 2**20
            took = time.perf_counter() - start
            print(f"wrote {label}: {rows:,} rows, {mb:.0f} MB ({took:.0f} s)")
        checkouts = {"chunked (this)": ROOT}
        if opts.baseline:
            checkouts["baseline"] = opts.baseline
        print(f"\nload average {os.getloadavg()[0]:.2f}\n")
        print("| code | input | wall s | peak RSS MB |\n|---|---|---:|---:|")
        for code_label, code in checkouts.items():
            for label in sizes:
                command = [
                    sys.executable,
                    "-m",
                    "distill.flows.cli",
                    "predict",
                    "--model",
                    "models:/predict-memory/1",
                    "--input",
                    f"{label}.csv",
                    "--output",
                    f"out-{label}.csv",
                    "--label",
                    "label",
                ]
                wall, rss = _child(command, env | {"PYTHONPATH": str(code)}, tmp)
                print(f"| {code_label} | {label} | {wall:.1f} | {rss:.0f} |", flush=True)


if __name__ == "__main__":
    main()

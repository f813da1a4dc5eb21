"""How long a bad input takes to be told, against `distill --help`.

    .venv/bin/python benchmarks/fail_fast.py [--repeats 3] [--baseline /path/to/other/checkout]

Each case is a fresh `python -m distill.flows.cli` process (wall time, median of the repeats) in an
empty folder with its own PREFECT_HOME and MLflow store, as a user's first try would be.
`--baseline` runs the same cases with another checkout's code (PYTHONPATH) side by side.
Issue 20 asks for a bad input under 3 s on an idle machine; the load average is printed, and
the child's CPU time (user + sys) stands in for the wall time of an idle machine (start-up and
imports run on one core).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]


def _files(tmp: Path) -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(90, 4)), columns=list("abcd"))
    frame.assign(label=np.arange(90) % 14 + 1).to_csv(tmp / "ages.csv", index=False)
    torch.save({"0.weight": torch.zeros(8, 64)}, tmp / "wrong.pt")


CASES = {  # name: arguments after the config
    "--help": None,
    "missing data file": ["--set", "data.source=csv:absent.csv"],
    "label column absent": ["--set", "data.source=csv:ages.csv", "--set", "data.label=y"],
    "integer label, many values": [
        "--set",
        "data.source=csv:ages.csv",
        "--set",
        "data.label=label",
    ],
    "data.shape does not fit": ["--set", "data.shape=[1,7,7]"],
    "teacher file does not fit": ["--set", "teacher.source=file:wrong.pt"],
}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_case(code: Path, args: list[str] | None, tmp: Path) -> tuple[float, float, str]:
    """(wall s, CPU s of the child, its last stderr line)."""
    env = os.environ | {
        "PYTHONPATH": str(code),
        "PREFECT_HOME": str(tmp / "prefect"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
        "DISTILL_MLFLOW_CONFIG": str(tmp / "absent.yaml"),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "distill.flows.cli"]
    command += ["--help"] if args is None else ["run", str(code / "configs" / "digits.yaml"), *args]
    start, cpu = time.perf_counter(), _children_cpu()
    done = subprocess.run(
        command, env=env, cwd=tmp, capture_output=True, text=True, timeout=600, check=False
    )
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu
    line = (done.stderr.strip().splitlines() or ["(no stderr)"])[-1] if args else "usage"
    return wall, cpu, line


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", type=Path, default=None)
    opts = parser.parse_args()
    checkouts = {"this": ROOT} | ({"baseline": opts.baseline} if opts.baseline else {})
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print(
        "| case | "
        + " | ".join(f"{k} wall s | {k} CPU s" for k in checkouts)
        + " | message (this) |"
    )
    print("|---|" + "---:|---:|" * len(checkouts) + "---|")
    for name, args in CASES.items():
        cells, message = [], ""
        for label, code in checkouts.items():
            walls, cpus = [], []
            for _ in range(opts.repeats):
                with tempfile.TemporaryDirectory(prefix="distill-failfast-") as tmp:
                    _files(Path(tmp))
                    wall, cpu, line = time_case(code, args, Path(tmp))
                walls.append(wall)
                cpus.append(cpu)
                message = line if label == "this" else message
            cells.append(f"{statistics.median(walls):.2f} | {statistics.median(cpus):.2f}")
        print(f"| {name} | " + " | ".join(cells) + f" | {message[:110]} |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

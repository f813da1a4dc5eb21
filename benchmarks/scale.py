"""How the pipeline's cost grows with the data: wall time and peak memory at 1x, 4x, 16x rows.

    .venv/bin/python benchmarks/scale.py [--factors 1 4 16] [--rows 1797]

Generated data (scikit-learn `make_classification`: 64 features, 10 classes, like digits),
`rows × factor` rows saved as NPZ, then the default pipeline (`distill run`, tracking into
a throw-away store, fresh Prefect cache) in a child process per size: its wall time and its
peak RSS. Training epochs are fixed by the config, so the work grows with the rows; the
reduce stage's own memory is measured separately by benchmarks/reduce_memory.py.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(npz: str) -> None:
    """Run the pipeline in this process and print its peak RSS (MB) as JSON."""
    sys.path.insert(0, str(ROOT))
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(
        app,
        [
            "run",
            str(ROOT / "configs" / "digits.yaml"),
            "--fresh",
            "--set",
            f"data.source=npz:{npz}",
            "--set",
            "register.enabled=false",
        ],
    )
    if result.exit_code != 0:
        raise SystemExit(result.output[-2000:])
    print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rows", type=int, default=1797)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return

    import numpy as np
    from sklearn.datasets import make_classification

    tmp = Path(tempfile.mkdtemp(prefix="distill-scale-"))
    env = os.environ | {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
        "DISTILL_MLFLOW_CONFIG": f"{tmp}/none",
        "PREFECT_HOME": f"{tmp}/prefect",
        "PYTHONPATH": str(ROOT),
    }
    print("| rows | wall time s | per 1k rows s | peak RSS MB |")
    print("|---:|---:|---:|---:|")
    for factor in args.factors:
        n = args.rows * factor
        X, y = make_classification(
            n_samples=n,
            n_features=64,
            n_informative=24,
            n_classes=10,
            n_clusters_per_class=1,
            random_state=0,
        )
        npz = tmp / f"data_{factor}.npz"
        np.savez(npz, X=X, y=y)
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(npz)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        wall = time.perf_counter() - start
        peak = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
        print(f"| {n:,} | {wall:.1f} | {1000 * wall / n:.2f} | {peak:.0f} |")


if __name__ == "__main__":
    main()

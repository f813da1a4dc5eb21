"""How the pipeline's cost grows with the data: wall time, peak memory and the seconds of each
stage at 1x, 10x, ... a generated 100,000 x 100 table.

    .venv/bin/python benchmarks/scale.py [--factors 1 10] [--rows 100000] [--set KEY=VALUE ...]

The table: scikit-learn `make_classification` (100 features, 30 informative, 4 classes),
`--rows` rows; a factor of k writes it k times (each copy jittered by 1e-3 noise, so rows do
not repeat exactly) into one Parquet file, 100,000-row row groups, a block at a time. Each
size runs `distill run configs/digits.yaml` (the default pipeline and its target, the source
swapped, with `SCALE_RECIPE`'s fewer epochs and larger batches; `--set` for more) in its own
process, tracking into a throw-away store with a fresh
Prefect cache and a fresh data cache: its wall time, its peak RSS (the process's own
`ru_maxrss`, printed at exit) and the `distill: STAGE done in X s` lines it prints.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# epochs and batches a 2-core machine runs at 1M rows in minutes: the work per row is the same
# at every size, so the table shows what grows with the rows; `--set` overrides, `--recipe` drops
SCALE_RECIPE = [
    "teacher.epochs=3",
    "teacher.batch_size=256",
    "finetune.epochs=2",
    "finetune.batch_size=256",
    "compress.prune.recovery_epochs=1",
]
STAGE_LINE = re.compile(r"^distill: ([\w-]+) (?:done|cached) in (\d+\.\d) s", re.MULTILINE)
# the child: distill's CLI, then its own peak RSS on stderr (after every stage line)
CHILD = """
import atexit, resource, runpy, sys
atexit.register(lambda: print("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                              / 1024, file=sys.stderr, flush=True))
sys.argv = ["distill", *sys.argv[1:]]
runpy.run_module("distill.flows.cli", run_name="__main__")
"""


def write_table(path: Path, rows: int, factor: int, features: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import make_classification

    X, y = make_classification(
        n_samples=rows,
        n_features=features,
        n_informative=30,
        n_classes=4,
        n_clusters_per_class=2,
        random_state=0,
    )
    names = [f"f{i}" for i in range(features)]
    rng = np.random.default_rng(0)
    schema = pa.schema([(n, pa.float64()) for n in names] + [("label", pa.int64())])
    with pq.ParquetWriter(path, schema) as writer:
        for copy in range(factor):
            block = X if copy == 0 else X + rng.normal(scale=1e-3, size=X.shape)
            columns = {n: block[:, i] for i, n in enumerate(names)} | {"label": y}
            writer.write_table(pa.table(columns, schema=schema), row_group_size=100_000)


def run(path: Path, tmp: Path, sets: list[str]) -> tuple[float, float, list[tuple[str, float]]]:
    env = os.environ | {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
        "DISTILL_MLFLOW_CONFIG": f"{tmp}/none",
        "PREFECT_HOME": f"{tmp}/prefect",
        "DISTILL_DATA_CACHE": f"{tmp}/data-cache",
        "PYTHONPATH": str(ROOT),
    }
    tmp.mkdir(parents=True, exist_ok=True)
    args = ["run", str(ROOT / "configs" / "digits.yaml"), "--fresh"]
    for s in [f"data.source=parquet:{path}", "data.label=label", *sets]:
        args += ["--set", s]
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *args],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp,
        check=False,
    )
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    peak = float(re.findall(r"^peak_rss_mb (\S+)$", out.stderr, re.MULTILINE)[-1])
    return wall, peak, [(name, float(s)) for name, s in STAGE_LINE.findall(out.stderr)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--features", type=int, default=100)
    parser.add_argument("--set", action="append", default=[], dest="sets")
    parser.add_argument(
        "--recipe", action="store_true", help="the config's own epochs and batch sizes"
    )
    args = parser.parse_args()
    sets = args.sets if args.recipe else [*SCALE_RECIPE, *args.sets]

    tmp = Path(tempfile.mkdtemp(prefix="distill-scale-"))
    results = {}
    for factor in args.factors:
        path = tmp / f"table_{factor}x.parquet"
        write_table(path, args.rows, factor, args.features)
        results[factor] = run(path, tmp / f"run_{factor}x", sets)
        path.unlink()
        wall, peak, _ = results[factor]
        print(f"{factor}x: {wall:.1f} s, peak RSS {peak:.0f} MB", file=sys.stderr, flush=True)

    _, base_peak, _ = results[args.factors[0]]
    print("| rows | wall time s | per 1k rows s | peak RSS MB | RSS vs first |")
    print("|---:|---:|---:|---:|---:|")
    for factor, (wall, peak, _) in results.items():
        n = args.rows * factor
        print(
            f"| {n:,} | {wall:.1f} | {1000 * wall / n:.2f} | {peak:.0f} | {peak / base_peak:.2f}x |"
        )
    print()
    print("| stage | " + " | ".join(f"{args.rows * f:,} rows s" for f in results) + " |")
    print("|---|" + "---:|" * len(results))
    order = []
    for _, _, stages in results.values():
        order += [name for name, _ in stages if name not in order]
    for name in order:
        cells = []
        for _, _, stages in results.values():
            seconds = [s for n, s in stages if n == name]
            cells.append(f"{sum(seconds):.1f}" if seconds else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")
    # start-up, imports, Prefect's temporary server, reading the data, MLflow's parent run
    cells = [f"{wall - sum(s for _, s in stages):.1f}" for wall, _, stages in results.values()]
    print("| outside the stage lines | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

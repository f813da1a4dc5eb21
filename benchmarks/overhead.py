"""What Prefect and MLflow cost on top of the work itself, measured side by side.

    .venv/bin/python benchmarks/overhead.py [--repeats 3] [--set key=value ...]

In one process, alternating: (a) the default pipeline called bare (tasks/compress/pipeline.py's
`compress` with its plain steps: no Prefect, no MLflow; evaluation included, since the flow
evaluates every stage too, and the run's figures drawn and written as PNG files, since the flow
draws them too), and (b) the
full flow with tracking into a throw-away SQLite store. Medians and their ratio, with the
default config and with `evaluate.plots: false` (then neither arm draws). The flow's first
run also starts Prefect's temporary server: it is run once before the timing (and that
start-up is reported on its own, as are a cold `distill run` process and `distill --help`).
Prefect's result cache is refreshed on every run (PREFECT_TASKS_REFRESH_CACHE), so the flow
recomputes every stage like the bare calls do. The flow runs as `distill run` runs it
(`distill.flows.distill.local_settings`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "configs" / "digits.yaml"


def bare(overrides: list[str]) -> None:
    """The flow's work as plain calls: the one pipeline function with its plain steps (same
    stages, same evaluation), the same figures written as PNG files (when `evaluate.plots` is on),
    nothing recorded."""
    from distill.tasks.compress.data import load_dataset
    from distill.tasks.compress.pipeline import Recorder, compress
    from distill.tasks.compress.plots import pipeline_figures
    from distill.tasks.platform.config import load_config

    class PngFiles(Recorder):
        def plots(self, *inputs) -> None:
            with tempfile.TemporaryDirectory() as tmp:
                for name, figure in pipeline_figures(*inputs).items():
                    figure.savefig(Path(tmp) / name, dpi=100)

    cfg = load_config(CONFIG, overrides)
    compress(cfg, load_dataset(cfg.data, cfg.seed), recorder=PngFiles())


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def process_seconds(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "distill.flows.cli", *args],
        cwd=ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def compare(overrides: list[str], repeats: int) -> tuple[float, float]:
    """Median seconds of (bare, flow), alternating."""
    from distill.flows.distill import distill_flow

    bare(overrides)  # warm-up
    t_bare, t_flow = [], []
    for _ in range(repeats):
        t_bare.append(timed(bare, overrides))
        t_flow.append(timed(distill_flow, str(CONFIG), overrides))
    return statistics.median(t_bare), statistics.median(t_flow)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    # the hand-sized stages, as the README's table was measured (both arms could plan a target
    # now: they run the same pipeline function); a target's planning is measured by
    # benchmarks/targets.py
    args.overrides = ["target=null", *args.overrides]
    tmp = tempfile.mkdtemp(prefix="distill-overhead-")
    env = os.environ | {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
        "DISTILL_MLFLOW_CONFIG": f"{tmp}/none",
        "PREFECT_HOME": f"{tmp}/prefect",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "MLFLOW_LOGGING_LEVEL": "ERROR",
        "DO_NOT_TRACK": "true",
        "PYTHONPATH": str(ROOT),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_TASKS_REFRESH_CACHE": "true",
    }
    os.environ.update(env)
    from distill.flows.distill import distill_flow, local_settings
    from distill.tasks.platform.servers import prefect_server

    with local_settings():  # as `distill run` sets them, once per process
        start = time.perf_counter()
        distill_flow(
            str(CONFIG), args.overrides
        )  # starts the temporary Prefect server, warms every import
        first = time.perf_counter() - start
        rows = {
            "default (plots on)": compare(args.overrides, args.repeats),
            "`evaluate.plots: false`": compare(
                [*args.overrides, "evaluate.plots=false"], args.repeats
            ),
        }
    run_args = ["run", str(CONFIG), *[a for s in args.overrides for a in ("--set", s)]]
    cold = process_seconds(run_args, env)
    with prefect_server(Path(tmp) / "prefect-server") as api:
        cold_served = process_seconds(run_args, env | {"PREFECT_API_URL": api})
    help_s = statistics.median(process_seconds(["--help"], env) for _ in range(3))

    print(
        f"median of {args.repeats}, alternating; bare = the same stage functions and figures, "
        "nothing recorded\n"
    )
    print("| config | bare s | flow s | overhead s | **flow / bare** |")
    print("|---|---:|---:|---:|---:|")
    for name, (b, f) in rows.items():
        print(f"| {name} | {b:.2f} | {f:.2f} | {f - b:+.2f} | **{f / b:.2f}** |")
    print("\n| process | seconds |")
    print("|---|---:|")
    print(
        f"| first flow run in a process (temporary Prefect server start, imports) | {first:.2f} |"
    )
    print(f"| `distill run` as a cold process (temporary Prefect server) | {cold:.2f} |")
    print(
        "| `distill run` as a cold process, PREFECT_API_URL set to a running `prefect server` | "
        f"{cold_served:.2f} |"
    )
    print(f"| `distill --help` | {help_s:.2f} |")


if __name__ == "__main__":
    main()

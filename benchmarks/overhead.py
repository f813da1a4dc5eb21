"""What Prefect and MLflow cost on top of the work itself, measured side by side.

    .venv/bin/python benchmarks/overhead.py [--repeats 3] [--set key=value ...]

In one process, alternating: (a) the default pipeline's stage functions called bare (no
Prefect, no MLflow; evaluation included, since the flow evaluates every stage too), and
(b) the full flow with tracking into a throw-away SQLite store. Medians and their ratio.
The flow's first run also starts Prefect's temporary server: it is run once before the
timing (and that start-up is reported on its own, as are a cold `distill run` process and
`distill --help`). Prefect's result cache is refreshed on every run (PREFECT_TASKS_REFRESH_CACHE),
so the flow recomputes every stage like the bare calls do.
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
    """The flow's work as plain calls: same stages, same evaluation, nothing recorded."""
    from tasks.config import load_config
    from tasks.data import load_dataset
    from tasks.evaluate import evaluate_model
    from tasks.finetune import distill, predict_logits
    from tasks.prune import prune_and_recover
    from tasks.quantize import quantize_model
    from tasks.reconstruct import reconstruct
    from tasks.reduce import calibration_rows, reduce_model
    from tasks.teacher import load_teacher

    cfg = load_config(CONFIG, overrides)
    data = load_dataset(cfg.data, cfg.seed)
    teacher = load_teacher(cfg.teacher, data, cfg.seed)
    pred = predict_logits(teacher, data.X_test).argmax(1)
    evaluate_model(teacher, data, pred, cfg.evaluate)
    X = calibration_rows(data.X_train, cfg.reduce.calibration_samples, cfg.seed)
    student = reconstruct(teacher, reduce_model(teacher, X, cfg.reduce, cfg.reconstruct.mode), X, cfg.reconstruct)
    evaluate_model(student, data, pred, cfg.evaluate)
    student, _ = distill(teacher, student, data, cfg.finetune, cfg.seed)
    evaluate_model(student, data, pred, cfg.evaluate)
    student, _ = prune_and_recover(teacher, student, data, cfg.compress.prune, cfg.finetune, cfg.seed)
    evaluate_model(student, data, pred, cfg.evaluate)
    quantized = quantize_model(student, data.X_test, data.X_train, cfg.compress.quantize, cfg.seed)
    evaluate_model(quantized.served, data, pred, cfg.evaluate)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def process_seconds(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="distill-overhead-")
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "DISTILL_MLFLOW_CONFIG": f"{tmp}/none",
                        "PREFECT_HOME": f"{tmp}/prefect", "PREFECT_LOGGING_LEVEL": "WARNING",
                        "MLFLOW_LOGGING_LEVEL": "ERROR", "DO_NOT_TRACK": "true", "PYTHONPATH": str(ROOT),
                        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_TASKS_REFRESH_CACHE": "true"}
    os.environ.update(env)
    from flows.distill import distill_flow

    start = time.perf_counter()
    distill_flow(str(CONFIG), args.overrides)  # starts the temporary Prefect server, warms every import
    first = time.perf_counter() - start
    bare(args.overrides)
    t_bare, t_flow = [], []
    for _ in range(args.repeats):
        t_bare.append(timed(bare, args.overrides))
        t_flow.append(timed(distill_flow, str(CONFIG), args.overrides))
    b, f = statistics.median(t_bare), statistics.median(t_flow)
    cold = process_seconds(["run", str(CONFIG), *[a for s in args.overrides for a in ("--set", s)]], env)
    help_s = statistics.median(process_seconds(["--help"], env) for _ in range(3))

    print(f"| measurement (median of {args.repeats}, alternating) | seconds |")
    print("|---|---:|")
    print(f"| stage functions, bare | {b:.2f} |")
    print(f"| full flow: Prefect tasks + MLflow tracking + registry | {f:.2f} |")
    print(f"| **ratio flow / bare** | **{f / b:.2f}** |")
    print(f"| first flow run in a process (temporary Prefect server start, imports) | {first:.2f} |")
    print(f"| `distill run` as a cold process | {cold:.2f} |")
    print(f"| `distill --help` | {help_s:.2f} |")


if __name__ == "__main__":
    main()

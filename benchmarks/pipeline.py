"""The default pipeline (configs/digits.yaml) over several seeds: mean ± std per stage.

    .venv/bin/python benchmarks/pipeline.py [--seeds 0 1 2] [--set key=value ...]

Runs the real flow (Prefect + MLflow) against a throw-away MLflow store and prints the
markdown table the README shows. Seeds change the split, the teacher's init and training.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="distill-bench-")
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
    from distill.flows.distill import distill_flow

    runs = [
        distill_flow(str(ROOT / "configs" / "digits.yaml"), [f"seed={s}", *args.overrides])
        for s in args.seeds
    ]

    def cell(values: list[float], fmt: str) -> str:
        if len(values) == 1:
            return format(values[0], fmt)
        return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"

    print(
        "Default pipeline "
        f"(configs/digits.yaml{', ' + ' '.join(args.overrides) if args.overrides else ''}), seeds "
        f"{args.seeds}, mean ± std, CPU ({os.cpu_count()} cores)\n"
    )
    print(
        "| stage | params | nonzeros | size KB | accuracy % | agreement % | latency b1 ms | "
        "latency b256 ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")

    def col(stage: str, key: str) -> list[float]:
        return [r.stages[stage][key] for r in runs]

    def summary(key: str) -> list[float]:
        return [r.metrics[key] for r in runs]

    for stage in runs[0].stages:
        cells = [
            cell(col(stage, "params"), ",.0f"),
            cell(col(stage, "nonzeros"), ",.0f"),
            cell(col(stage, "size_kb"), ".1f"),
            cell([100 * v for v in col(stage, "accuracy")], ".2f"),
            cell([100 * v for v in col(stage, "agreement")], ".2f"),
            cell(col(stage, "latency_ms_b1"), ".4f"),
            cell(col(stage, "latency_ms_b256"), ".3f"),
        ]
        print(f"| {stage} | {' | '.join(cells)} |")
    print(
        f"\nfinal model: {cell(summary('final/size_kb'), '.1f')} KB, "
        f"compression {cell(summary('compression_ratio'), '.1f')}x, "
        f"accuracy drop {cell([100 * v for v in summary('accuracy_drop')], '.2f')} points, "
        f"speedup b1 {cell(summary('speedup_b1'), '.1f')}x, "
        f"b256 {cell(summary('speedup_b256'), '.1f')}x"
    )


if __name__ == "__main__":
    main()

"""What each compression step buys in size and speed, in the runtime that serves it.

    .venv/bin/python benchmarks/compression.py [--seed 0] [--repeats 200]

Two teachers on digits: the default MLP (configs/digits.yaml) and a 2-D CNN on the 8x8
images (`data.shape: [1, 8, 8]`, channels [32, 64]). Each goes through the default stages sized
by hand (`target: null`) in tasks/compress/pipeline.py's `compress`, the flow's pipeline as
plain calls (no Prefect/MLflow): width-mode student -> KD -> structured pruning ->
ONNX Runtime int8 (dynamic for the MLP, static with calibration for the CNN). Sizes are the
saved files; latency is the median of `--repeats` calls (batch 256: a tenth as many), all
measured side by side in this one process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.tasks.compress.data import load_dataset  # noqa: E402
from distill.tasks.compress.evaluate import evaluate_model  # noqa: E402
from distill.tasks.compress.pipeline import compress  # noqa: E402
from distill.tasks.platform.config import EvaluateConfig, PipelineConfig, load_config  # noqa: E402

CNN = [
    "data.shape=[1, 8, 8]",
    "teacher.arch=cnn",
    "teacher.channels=[32, 64]",
    "reduce.budget.size_kb=60",
]


def stages(cfg: PipelineConfig, ev: EvaluateConfig) -> list[tuple[str, dict[str, float]]]:
    """The pipeline function's models, measured with `ev`; the float ONNX export beside the
    int8 model it serves."""
    cfg = cfg.model_copy(update={"evaluate": ev})
    data = load_dataset(cfg.data, cfg.seed)
    out = compress(cfg, data)
    quantized = out.quantized  # the table shows no agreement with the teacher: no teacher_pred
    return [
        ("teacher fp32 (torch)", out.stages["teacher"]),
        ("student fp32 (torch)", out.stages["finetuned"]),
        ("structured-pruned fp32 (torch)", out.stages["pruned"]),
        (
            "pruned fp32 (onnxruntime)",
            evaluate_model(quantized.float_model, data, None, ev),
        ),
        (f"int8 {quantized.method} (onnxruntime)", out.stages["quantized"]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    ev = EvaluateConfig(latency_repeats=args.repeats, large_batch=256)
    print(f"digits, seed {args.seed}, {torch.get_num_threads()} threads; latency medians in ms\n")
    print(
        "| teacher | model | params | size KB | accuracy % | b1 ms | b256 ms | b256 speedup vs "
        "teacher |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, overrides in (("MLP 64-512-512-10", []), ("CNN 32-64 on 8x8", CNN)):
        cfg = load_config(  # the stages sized by hand (reduce.budget, prune.amount): no target
            ROOT / "configs" / "digits.yaml", [f"seed={args.seed}", "target=null", *overrides]
        )
        rows = stages(cfg, ev)
        base = rows[0][1]["latency_ms_b256"]
        for name, m in rows:
            print(
                f"| {label} | {name} | {m['params']:,.0f} | {m['size_kb']:.1f} | "
                f"{100 * m['accuracy']:.2f} | {m['latency_ms_b1']:.4f} | "
                f"{m['latency_ms_b256']:.3f} | {base / m['latency_ms_b256']:.1f}x |"
            )


if __name__ == "__main__":
    main()

"""What evaluating one stage costs on the transformers benchmark's BERT (issue 27 item 6: <= 2 s
per stage for 2,000 sequences of 28 tokens), with and without length-sorted, cut batches.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/evaluation.py [--repeats 3]

benchmarks/transformers.py's BERT (4 layers, hidden 128, 4 heads, FFN 512; untrained: the cost
does not depend on the weights) and its token task (28 tokens, right-padded from 14-28), 2,000
test rows and 3,400 training rows (the train-test gap reads 2,048 of them), evaluated by
`evaluate_model` as the pipeline evaluates a stage (`evaluate.large_batch=64`,
`latency_repeats=30`), as a PyTorch module and as its fp32 ONNX export. In one process,
alternating: "whole" (every row at its padded length: `padding_of` switched off) and "sorted"
(the default: rows sorted by length, each batch cut to its longest real row). Prints each
call's seconds, the medians, and the largest difference between the two arms' quality metrics.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.tasks.compress import evaluate  # noqa: E402
from distill.tasks.compress.dataset import Dataset  # noqa: E402
from distill.tasks.compress.evaluate import OnnxModel, count_params, flops_per_row  # noqa: E402
from distill.tasks.compress.finetune import predict_logits  # noqa: E402
from distill.tasks.compress.hf import HFLogits  # noqa: E402
from distill.tasks.compress.quantize import export_onnx  # noqa: E402
from distill.tasks.platform.config import EvaluateConfig  # noqa: E402

QUALITY = ("accuracy", "f1_macro", "agreement", "ece", "nll", "train_accuracy", "train_test_gap")


def _transformers_benchmark():
    """benchmarks/transformers.py as a module (its file name would shadow the library)."""
    spec = importlib.util.spec_from_file_location(
        "bench_transformers", ROOT / "benchmarks" / "transformers.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    bench = _transformers_benchmark()
    X, y = bench.order_task(0, 7400)
    T = X.shape[1]
    data = Dataset(
        name="order",
        source="npz:order",
        feature_names=[f"t{i}" for i in range(T)],
        input_shape=(T,),
        classes=list(range(6)),
        X_train=X[2000:5400],
        y_train=y[2000:5400],
        X_val=X[5400:],
        y_val=y[5400:],
        X_test=X[:2000],
        y_test=y[:2000],
        mean=np.zeros(T, np.float32),
        scale=np.ones(T, np.float32),
        digest="order",
    )
    torch.manual_seed(0)
    bert = HFLogits(bench._bert(6), "sequence classification").eval()
    params, nonzeros = count_params(bert)
    onnx = OnnxModel(
        export_onnx(bert, data.X_train),
        params,
        nonzeros,
        flops_per_row(bert, data.X_test),
        bert.padding(),
    )
    teacher_pred = predict_logits(bert, data.X_test).argmax(1)
    cfg = EvaluateConfig(plots=False, large_batch=64, latency_repeats=30)
    arms = {"whole": lambda model: None, "sorted": evaluate.padding_of}
    seconds: dict[tuple[str, str], list[float]] = {}
    metrics: dict[tuple[str, str], dict[str, float]] = {}
    print(f"torch threads {torch.get_num_threads()}", flush=True)
    for _ in range(args.repeats):
        for model_name, model in (("torch", bert), ("onnx", onnx)):
            for arm, padding_of in arms.items():
                evaluate.padding_of = padding_of  # type: ignore[assignment]
                start = time.perf_counter()
                metrics[model_name, arm] = evaluate.evaluate_model(model, data, teacher_pred, cfg)
                seconds.setdefault((model_name, arm), []).append(time.perf_counter() - start)
                print(f"{model_name} {arm} {seconds[model_name, arm][-1]:.2f} s", flush=True)
    evaluate.padding_of = arms["sorted"]  # type: ignore[assignment]
    print("\n| model | arm | seconds per stage (median) | calls |\n|---|---|---|---|")
    for (model_name, arm), times in seconds.items():
        calls = " ".join(f"{t:.2f}" for t in times)
        print(f"| {model_name} | {arm} | {statistics.median(times):.2f} | {calls} |")
    for model_name in ("torch", "onnx"):
        whole, cut = metrics[model_name, "whole"], metrics[model_name, "sorted"]
        diff = max(abs(whole[k] - cut[k]) for k in QUALITY)
        print(f"{model_name}: largest quality-metric difference between the arms {diff:.2e}")


if __name__ == "__main__":
    main()

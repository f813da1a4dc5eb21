"""CPU against CUDA, side by side in one run: training, distillation and a whole `distill run`.

    python benchmarks/gpu.py [--epochs 4] [--rows 30000] [--pipeline] [--quick]

For each workload the same model starts from the same weights and trains the same epochs on
CPU, on CUDA in fp32, and on CUDA under bf16 autocast (`FitSettings.precision`); a student
reduced to a quarter of the teacher's parameters (width mode, on CPU: the engine's least
squares run there) is then distilled on each. Time is wall time per epoch; accuracy is on the
test split. `--pipeline` adds `distill run configs/digits.yaml` end to end with `device=cpu`
and `device=cuda` (a temporary MLflow store, no plots). Plain stage functions otherwise, no
Prefect or MLflow. Without a GPU only the CPU column runs.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.architectures import accuracy, signals  # noqa: E402
from benchmarks.quality import generated_dataset  # noqa: E402
from distill.tasks.compress.architectures import build_mlp, wrap_input  # noqa: E402
from distill.tasks.compress.data import Dataset, load_dataset  # noqa: E402
from distill.tasks.compress.finetune import FitSettings, fit  # noqa: E402
from distill.tasks.compress.reduce import calibration_rows, reduce_model  # noqa: E402
from distill.tasks.compress.width import reconstruct_width  # noqa: E402
from distill.tasks.platform.config import BudgetConfig, DataConfig, ReduceConfig  # noqa: E402
from tests import zoo  # noqa: E402


def signal_data(rows: int, length: int = 256) -> Dataset:
    X, y = signals(0, n=rows, length=length)
    return generated_dataset(X, y, "signals", 0, [1, length])


def workloads(rows: int) -> dict[str, tuple[Callable[[], Dataset], Callable[[], nn.Module], int]]:
    """name -> (data, model factory, batch size)."""
    return {
        "digits MLP 64-512-512-10": (
            lambda: load_dataset(DataConfig(), 0),
            lambda: build_mlp(64, [512, 512], 10),
            64,
        ),
        f"ResNet1d, 64 ch, {rows:,} signals x 256": (
            lambda: signal_data(rows),
            lambda: wrap_input(zoo.ResNet1d(in_channels=1, channels=64, n_classes=8), [1, 256]),
            256,
        ),
        "Transformer d=128 x4 layers, digits tokens": (
            lambda: load_dataset(DataConfig(shape=[8, 8]), 0),
            lambda: wrap_input(
                zoo.TransformerClassifier(
                    n_features=8,
                    seq_len=8,
                    d_model=128,
                    n_heads=4,
                    dim_feedforward=256,
                    n_layers=4,
                    n_classes=10,
                ),
                [8, 8],
            ),
            64,
        ),
    }


def timed_fit(
    model: nn.Module, data: Dataset, settings: FitSettings, teacher: nn.Module | None = None
) -> tuple[nn.Module, float]:
    if settings.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model, history = fit(model, data, settings, teacher=teacher)
    if settings.device == "cuda":
        torch.cuda.synchronize()
    return model, (time.perf_counter() - start) / max(1, len(history.train_loss))


def run_workload(
    name: str,
    data: Dataset,
    make: Callable[[], nn.Module],
    batch: int,
    epochs: int,
    columns: list[tuple[str, str, str]],
) -> list[str]:
    torch.manual_seed(0)
    start = make()
    base = {"epochs": epochs, "lr": 1e-3, "batch_size": batch, "patience": epochs, "seed": 0}
    teachers, rows = {}, []
    for label, device, precision in columns:  # the teacher, trained from the same weights
        teachers[label], per_epoch = timed_fit(
            copy.deepcopy(start), data, FitSettings(**base, device=device, precision=precision)
        )
        rows.append((label, per_epoch, accuracy(teachers[label], data)))
    teacher = teachers[columns[0][0]]
    X = calibration_rows(data.X_train, 1024, 0)
    t0 = time.perf_counter()
    plan = reduce_model(teacher, X, ReduceConfig(budget=BudgetConfig(ratio=4)), mode="width")
    student = reconstruct_width(
        teacher, {p.name: p.rank for p in plan.layers if p.rank is not None}, X
    )
    reduce_s = time.perf_counter() - t0
    kd = []
    for _label, device, precision in columns:
        tuned, per_epoch = timed_fit(
            copy.deepcopy(student),
            data,
            FitSettings(**base, temperature=4.0, alpha=0.9, device=device, precision=precision),
            teacher=teacher,
        )
        kd.append((per_epoch, accuracy(tuned, data)))
    cpu_train, cpu_kd = rows[0][1], kd[0][0]
    out = []
    for (label, train_s, train_acc), (kd_s, kd_acc) in zip(rows, kd, strict=True):
        out.append(
            f"| {name} | {label} | {1000 * train_s:,.0f} | {cpu_train / train_s:.1f}x | "
            f"{100 * train_acc:.1f} | {1000 * kd_s:,.0f} | {cpu_kd / kd_s:.1f}x | "
            f"{100 * kd_acc:.1f} |"
        )
    out.append(f"| {name} | reduce + re-fit (CPU, once) | {1000 * reduce_s:,.0f} | | | | | |")
    return out


def pipeline_seconds(device: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        env = os.environ | {
            "MLFLOW_TRACKING_URI": uri,
            "MLFLOW_REGISTRY_URI": uri,
            "PREFECT_HOME": f"{tmp}/prefect",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        start = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "distill.flows.cli",
                "run",
                str(ROOT / "configs" / "digits.yaml"),
                "--set",
                f"device={device}",
                "--set",
                "evaluate.plots=false",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise SystemExit(f"distill run device={device} failed:\n{proc.stderr[-2000:]}")
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rows", type=int, default=30000, help="rows of the signal task")
    parser.add_argument(
        "--pipeline", action="store_true", help="also time `distill run` on each device"
    )
    parser.add_argument("--quick", action="store_true", help="1 epoch, 3,000 signals: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.rows = 1, 3000
    columns = [("CPU", "cpu", "fp32")]
    if torch.cuda.is_available():
        columns += [("CUDA fp32", "cuda", "fp32"), ("CUDA bf16 autocast", "cuda", "bf16")]
        where = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    else:
        where = "no CUDA device: CPU only"
    print(
        f"{where}; CPU: {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; "
        f"{args.epochs} epochs\n"
    )
    warm = load_dataset(DataConfig(), 0)  # first calls pay for kernels and thread pools: not timed
    for _, device, precision in columns:
        fit(
            build_mlp(64, [32], 10),
            warm,
            FitSettings(
                epochs=1, lr=1e-3, batch_size=64, patience=1, device=device, precision=precision
            ),
        )
    print(
        "| workload | device | train ms/epoch | speed-up | test acc % | KD ms/epoch | speed-up | "
        "student acc % |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, (data, make, batch) in workloads(args.rows).items():
        for line in run_workload(name, data(), make, batch, args.epochs, columns):
            print(line, flush=True)
    if args.pipeline:
        print("\n| `distill run configs/digits.yaml` | wall s |\n|---|---:|")
        for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
            print(f"| device={device} | {pipeline_seconds(device):.1f} |", flush=True)


if __name__ == "__main__":
    main()

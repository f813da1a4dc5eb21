"""Width mode on architectures users bring: residual CNNs, a MobileNet block, a transformer.

    .venv/bin/python benchmarks/architectures.py [--seeds 0 1 2] [--ratios 2 4 10]

For each architecture (tests/zoo.py) a teacher is trained, then for each budget (teacher
params / student params) four students of the same size are compared on test accuracy:

- reconstructed  distill's width mode: units chosen by pivoted QR on the PCA of what each
                 coupled group's readers read, every reader re-fitted by least squares
- fine-tuned     that student after knowledge distillation (the pipeline's fine-tune stage)
- scratch        the same student architecture, random init, trained on labels as long as
                 the teacher was
- TP L2 + KD     Torch-Pruning's group L2 magnitude importance picks the units at the same
                 widths (no re-fit), then the same distillation

Tasks (no network): digits as 1x8x8 images (ResNet2d, MobileNet block), digits as 8 tokens
of 8 features (transformer encoder), and a generated 1-D signal task (ResNet1d: class-
dependent frequencies, random phase and shift, noise). Plain stage functions, no Prefect
or MLflow: this measures the method, not the plumbing.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.tasks.compress.data import Dataset, load_dataset, prepare
from distill.tasks.compress.finetune import FitSettings, distill, fit, predict_logits
from distill.tasks.compress.graph import keep_units, pruning_group, trace
from distill.tasks.compress.reconstruct import reinitialized
from distill.tasks.compress.reduce import calibration_rows, reduce_model
from distill.tasks.compress.sources import Table
from distill.tasks.compress.width import choose_units, reconstruct_width
from distill.tasks.platform.config import BudgetConfig, DataConfig, FinetuneConfig, ReduceConfig
from tests import zoo

TEACHER_EPOCHS = 40


def signals(
    seed: int, n: int = 3000, length: int = 64, classes: int = 8, noise: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Class c: two sinusoids at frequencies set by c (one shared by neighbouring classes),
    random phases and amplitudes, plus noise: separable, but not by a single frequency."""
    rng = np.random.default_rng(1000 + seed)
    y = rng.integers(0, classes, n)
    t = np.arange(length) / length
    f1, f2 = 3 + y, 4 + (y // 2) * 2
    phase = rng.uniform(0, 2 * np.pi, (n, 2))
    amp = rng.uniform(0.5, 1.5, (n, 2))
    X = (
        amp[:, :1] * np.sin(2 * np.pi * f1[:, None] * t + phase[:, :1])
        + amp[:, 1:] * np.sin(2 * np.pi * f2[:, None] * t + phase[:, 1:])
        + rng.normal(0, noise, (n, length))
    )
    return X, y


def dataset(task: str, seed: int) -> Dataset:
    if task == "signals":
        X, y = signals(seed)
        table = Table(
            X=X,
            y=y,
            names=[f"t{i}" for i in range(X.shape[1])],
            name="signals",
            where="generated signals",
            row_shape=(X.shape[1],),
        )
        return prepare(table, DataConfig(shape=[1, X.shape[1]]), seed)
    shape = {"digits-image": [1, 8, 8], "digits-tokens": [8, 8]}[task]
    return load_dataset(DataConfig(shape=shape), seed)


ARCHS = {  # name -> (task, module factory)
    "ResNet2d": ("digits-image", lambda: zoo.ResNet2d(in_channels=1, channels=16, n_classes=10)),
    "ResNet1d": ("signals", lambda: zoo.ResNet1d(in_channels=1, channels=16, n_classes=8)),
    "MobileNet block": (
        "digits-image",
        lambda: zoo.MobileNetBlockNet(in_channels=1, channels=16, n_classes=10),
    ),
    "Transformer": (
        "digits-tokens",
        lambda: zoo.TransformerClassifier(
            n_features=8,
            seq_len=8,
            d_model=64,
            n_heads=4,
            dim_feedforward=128,
            n_layers=2,
            n_classes=10,
        ),
    ),
}


def accuracy(model: nn.Module, data: Dataset) -> float:
    return float((predict_logits(model, data.X_test).argmax(1) == data.y_test).mean())


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tp_l2_student(teacher: nn.Module, widths: dict[str, int], example: torch.Tensor) -> nn.Module:
    """The same widths, units ranked by Torch-Pruning's group L2 magnitude, no re-fit."""
    student = copy.deepcopy(teacher)
    graph = trace(student, example)
    importance = tp.importance.GroupMagnitudeImportance(p=2)
    for group in graph.groups:
        k = widths.get(group.name)
        if k is None or k >= group.width:
            continue
        scores = importance(pruning_group(graph, group)).detach().double().numpy()
        keep_units(graph, group, choose_units(group, k, scores=scores))
    return student.eval()


def run_cell(
    teacher: nn.Module, data: Dataset, ratio: float, seed: int, ft: FinetuneConfig
) -> dict[str, float]:
    X = calibration_rows(data.X_train, 1024, seed)
    plan = reduce_model(teacher, X, ReduceConfig(budget=BudgetConfig(ratio=ratio)), mode="width")
    widths = {p.name: p.rank for p in plan.layers if p.rank is not None}
    student = reconstruct_width(teacher, widths, X)
    tuned, _ = distill(teacher, student, data, ft, seed)
    scratch, _ = fit(
        reinitialized(student, seed),
        data,
        FitSettings(epochs=TEACHER_EPOCHS, lr=1e-3, batch_size=64, patience=10, seed=seed),
    )
    pruned, _ = distill(
        teacher, tp_l2_student(teacher, widths, torch.from_numpy(X[:2])), data, ft, seed
    )
    return {
        "params": params(student),
        "reconstructed": accuracy(student, data),
        "fine-tuned": accuracy(tuned, data),
        "scratch": accuracy(scratch, data),
        "TP L2 + KD": accuracy(pruned, data),
    }


def pct(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ratios", type=float, nargs="+", default=[2, 4, 10])
    parser.add_argument("--epochs", type=int, default=30, help="fine-tuning epochs (KD)")
    parser.add_argument("--archs", nargs="+", default=list(ARCHS))
    args = parser.parse_args()
    ft = FinetuneConfig(epochs=args.epochs, patience=10)
    start = time.perf_counter()
    print(
        f"Test accuracy %, mean ± std over seeds {args.seeds}. Teachers and scratch: "
        f"{TEACHER_EPOCHS} epochs (CE); fine-tuning: {args.epochs} epochs of KD "
        f"(T={ft.temperature}, alpha={ft.alpha}).\n"
    )
    columns = ["reconstructed", "fine-tuned", "scratch", "TP L2 + KD"]
    print("| architecture | task | size | params | " + " | ".join(columns) + " |")
    print("|---|---|---|---:|" + "---:|" * len(columns))
    for arch in args.archs:
        task, factory = ARCHS[arch]
        teachers, datas = {}, {}
        for seed in args.seeds:
            datas[seed] = data = dataset(task, seed)
            torch.manual_seed(seed)
            model = nn.Sequential(
                OrderedDict(input=nn.Unflatten(1, data.input_shape), model=factory())
            )
            teachers[seed], _ = fit(
                model,
                data,
                FitSettings(epochs=TEACHER_EPOCHS, lr=1e-3, batch_size=64, patience=10, seed=seed),
            )
        acc = [accuracy(teachers[s], datas[s]) for s in args.seeds]
        print(
            f"| {arch} | {task} | teacher | {params(teachers[args.seeds[0]]):,} | "
            f"{pct(acc)} | | | |",
            flush=True,
        )
        for ratio in args.ratios:
            cells = [run_cell(teachers[s], datas[s], ratio, s, ft) for s in args.seeds]
            row = " | ".join(pct([c[col] for c in cells]) for col in columns)
            print(
                f"| {arch} | {task} | {ratio:g}x fewer | {cells[0]['params']:,} | {row} |",
                flush=True,
            )
    print(f"\n({time.perf_counter() - start:.0f} s on {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()

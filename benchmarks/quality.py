"""Does building the student from the teacher beat training it from scratch? Side by side.

    .venv/bin/python benchmarks/quality.py [--seeds 0 1 2] [--ratios 10 30 90] [--epochs 30]

For each dataset, seed and budget (teacher params / student params), five students get the
same fine-tuning (same epochs, lr, early stopping), differing only in where they start:

- scratch      the width-mode student's architecture, random init, labels only (CE)
- kd-random    same architecture, random init, knowledge distillation
- svd+kd       low-rank factorization from the SVD of the weights (data-free), then KD
- pca-lr+kd    low-rank from the PCA of layer outputs (this project's low_rank mode), then KD
- pca-width+kd k units per hidden layer + least-squares re-fit (width mode), then KD

"before FT" is the accuracy right after the surgery: how much of the teacher survives it.
"gap %" is the fraction of the teacher–scratch accuracy gap a method recovers,
(acc − scratch) / (teacher − scratch), computed on the means (Hinton et al. 2015: 91 % on MNIST).
Plain stage functions, no Prefect or MLflow: this measures the method, not the plumbing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.config import BudgetConfig, DataConfig, FinetuneConfig, ReduceConfig, TeacherConfig  # noqa: E402
from tasks.data import load_dataset  # noqa: E402
from tasks.errors import UserError  # noqa: E402
from tasks.finetune import FitSettings, distill, fit, predict_logits  # noqa: E402
from tasks.reconstruct import reconstruct_low_rank, reinitialized  # noqa: E402
from tasks.reduce import calibration_rows, reduce_model  # noqa: E402
from tasks.teacher import train_teacher  # noqa: E402
from tasks.width import reconstruct_width  # noqa: E402

DATASETS = {  # dataset -> teacher hidden sizes
    "digits": [512, 512],
    "breast_cancer": [256, 256],
}
METHODS = ("scratch", "kd-random", "svd+kd", "pca-lr+kd", "pca-width+kd")


def accuracy(model: torch.nn.Module, X: np.ndarray, y: np.ndarray) -> float:
    return float((predict_logits(model, X).argmax(1) == y).mean())


def run_cell(data, teacher, ratio: float, seed: int, ft: FinetuneConfig) -> dict[str, tuple[float | None, float, int]]:
    """method -> (accuracy before fine-tuning, after, params)."""
    X = calibration_rows(data.X_train, 1024, seed)
    budget = ReduceConfig(budget=BudgetConfig(ratio=ratio))
    out: dict[str, tuple[float | None, float, int]] = {}
    starts: dict[str, torch.nn.Module | None] = {}
    try:
        starts["pca-lr+kd"] = reconstruct_low_rank(teacher, reduce_model(teacher, X, budget))
        svd = ReduceConfig(budget=BudgetConfig(ratio=ratio), method="svd")
        starts["svd+kd"] = reconstruct_low_rank(teacher, reduce_model(teacher, X, svd))
    except UserError:  # below the smallest low-rank student of this teacher
        starts["pca-lr+kd"] = starts["svd+kd"] = None
    plan = reduce_model(teacher, X, budget, mode="width")
    width = reconstruct_width(teacher, {p.name: p.rank for p in plan.layers if p.rank is not None}, X)
    starts["pca-width+kd"] = width
    for name, start in starts.items():
        if start is None:
            continue
        tuned, _ = distill(teacher, start, data, ft, seed)
        out[name] = (accuracy(start, data.X_test, data.y_test), accuracy(tuned, data.X_test, data.y_test),
                     sum(p.numel() for p in start.parameters()))
    fresh = reinitialized(width, seed)
    params = sum(p.numel() for p in fresh.parameters())
    scratch, _ = fit(reinitialized(width, seed), data, FitSettings(epochs=ft.epochs, lr=ft.lr, batch_size=ft.batch_size,
                                                                   patience=ft.patience, seed=seed))
    out["scratch"] = (None, accuracy(scratch, data.X_test, data.y_test), params)
    kd, _ = distill(teacher, fresh, data, ft, seed)
    out["kd-random"] = (None, accuracy(kd, data.X_test, data.y_test), params)
    return out


def mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ratios", type=float, nargs="+", default=[10, 30, 90])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    args = parser.parse_args()
    ft = FinetuneConfig(epochs=args.epochs, patience=10)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()

    print(f"Fine-tuning: {args.epochs} epochs, lr {ft.lr}, T={ft.temperature}, alpha={ft.alpha}, early stopping "
          f"patience {ft.patience}; seeds {args.seeds}; test accuracy %, mean ± std\n")
    print("| dataset | budget | method | params | before FT % | after FT % | gap % |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name in args.datasets:
        teachers, datas = {}, {}
        for seed in args.seeds:
            datas[seed] = load_dataset(DataConfig(source=f"sklearn:{name}"), seed)
            teachers[seed] = train_teacher(TeacherConfig(hidden=DATASETS[name]), datas[seed], seed)
        teacher_acc = [accuracy(teachers[s], datas[s].X_test, datas[s].y_test) for s in args.seeds]
        n_teacher = sum(p.numel() for p in teachers[args.seeds[0]].parameters())
        print(f"| {name} | teacher | — | {n_teacher:,} | — | {mean_std(teacher_acc)} | — |")
        for ratio in args.ratios:
            cells = [run_cell(datas[s], teachers[s], ratio, s, ft) for s in args.seeds]
            scratch = statistics.mean(c["scratch"][1] for c in cells)
            gap = statistics.mean(teacher_acc) - scratch
            for method in METHODS:
                rows = [c[method] for c in cells if method in c]
                if not rows:
                    print(f"| {name} | {ratio:g}x | {method} | — | below the smallest low-rank student | — | — |")
                    continue
                before = [r[0] for r in rows if r[0] is not None]
                after = [r[1] for r in rows]
                recovered = f"{100 * (statistics.mean(after) - scratch) / gap:.0f}" if abs(gap) > 1e-9 else "n/a"
                print(f"| {name} | {ratio:g}x | {method} | {rows[0][2]:,} | {mean_std(before)} | "
                      f"{mean_std(after)} | {recovered} |")
    print(f"\n({time.perf_counter() - start:.0f} s on {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()

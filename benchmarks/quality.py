"""How much of the teacher–scratch gap does distill's student recover? Side by side, 3 seeds.

    .venv/bin/python benchmarks/quality.py [--seeds 0 1 2] [--ratios 10 30 0] [--epochs 80]
                                           [--patience EPOCHS] [--lr LR] [--ridge R]
                                           [--features BETA]
                                           [--tasks signals-cnn table-mlp digits-mlp]

Tasks (no network): a 1-D CNN (3 conv layers of 32 channels, the built-in `cnn`) on generated
signals (`benchmarks/architectures.py`'s two-sinusoid task at noise 0.3), an MLP 256-256 on a
generated table (scikit-learn's `make_classification`: 40 features, 20 informative, 6 classes,
3 clusters per class), and the default digits MLP 512-512. Budgets are teacher params / student
params; `0` is the smallest student the engine can build (one unit per group).

For each task, seed and budget, students of the same architecture get the same training
(same epochs, lr, batch, early stopping on validation, best epoch restored), differing only in
where they start and what they learn from:

- before FT     distill's width mode right after reconstruction (PCA units + least squares,
                ridge `--ridge`, by default `reconstruct.ridge`'s)
- distill       that student after knowledge distillation (the default `finetune.temperature`
                and `alpha`): the pipeline's path
- ridge 1e-4    the same, reconstructed with the earlier near-zero ridge (the ablation)
- + features    (`--features BETA` only) distill plus matching the teacher's kept units
                layer by layer, weight β (tasks/compress/finetune.py's `FeatureMatch`)
- scratch CE    random init, labels only
- scratch KD    random init, the same distillation
- TP L2 + KD    Torch-Pruning's group L2 magnitude picks units at the same widths, then KD

"gap %" is (distill − scratch CE) / (teacher − scratch CE) on the means: the fraction of the
teacher–scratch gap the student recovers (Hinton et al. 2015: 91 % on MNIST).
Plain stage functions, no Prefect or MLflow.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.architectures import accuracy, signals, tp_l2_student
from distill.tasks.compress.architectures import build_cnn, build_mlp
from distill.tasks.compress.data import Dataset, load_dataset, prepare
from distill.tasks.compress.finetune import FitSettings, feature_pairs, fit
from distill.tasks.compress.graph import param_model
from distill.tasks.compress.recipe import MLP_CNN
from distill.tasks.compress.reconstruct import reinitialized
from distill.tasks.compress.reduce import calibration_rows, reduce_model
from distill.tasks.compress.sources import Table
from distill.tasks.compress.width import WidthReport, reconstruct_width
from distill.tasks.platform.config import (
    BudgetConfig,
    DataConfig,
    FinetuneConfig,
    ReconstructConfig,
    ReduceConfig,
)

TEACHER_EPOCHS = 60
OLD_RIDGE = 1e-4  # reconstruct.ridge before the recipe this benchmark found
COLUMNS = ("before FT", "distill", "ridge 1e-4", "scratch CE", "scratch KD", "TP L2 + KD")


def generated_dataset(
    X: np.ndarray, y: np.ndarray, name: str, seed: int, shape: list[int] | None = None
) -> Dataset:
    """Generated rows as a user's table: columns x0.., prepared (split, standardized) by `seed`."""
    table = Table(
        X=X,
        y=y,
        names=[f"x{i}" for i in range(X.shape[1])],
        name=name,
        where="generated",
        row_shape=(X.shape[1],),
    )
    return prepare(table, DataConfig(shape=shape), seed)


def signals_cnn(seed: int) -> tuple[Dataset, nn.Module]:
    X, y = signals(seed, n=3000, length=64, classes=8, noise=0.3)
    return generated_dataset(X, y, "signals", seed, [1, 64]), build_cnn((1, 64), [32, 32, 32], 8)


def table_mlp(seed: int) -> tuple[Dataset, nn.Module]:
    from sklearn.datasets import make_classification

    X, y = make_classification(
        n_samples=6000,
        n_features=40,
        n_informative=20,
        n_redundant=10,
        n_classes=6,
        n_clusters_per_class=3,
        class_sep=1.0,
        random_state=100 + seed,
    )
    return generated_dataset(X, y, "table", seed), build_mlp(40, [256, 256], 6)


def digits_mlp(seed: int) -> tuple[Dataset, nn.Module]:
    return load_dataset(DataConfig(), seed), build_mlp(64, [512, 512], 10)


TASKS: dict[str, Callable[[int], tuple[Dataset, nn.Module]]] = {
    "signals-cnn": signals_cnn,
    "table-mlp": table_mlp,
    "digits-mlp": digits_mlp,
}


def smallest_ratio(teacher: nn.Module, X: np.ndarray) -> float:
    """Teacher params / params of the smallest student width mode builds (one step per group)."""
    cost = param_model(teacher, torch.from_numpy(X[:2]))
    return cost.params() / cost.params(dict.fromkeys(cost.widths, 1))


def run_cell(
    teacher: nn.Module,
    data: Dataset,
    ratio: float,
    seed: int,
    train: FitSettings,
    features: float = 0.0,
    ridge: float = ReconstructConfig().ridge,
) -> dict[str, float]:
    X = calibration_rows(data.X_train, 1024, seed)
    ratio = ratio or smallest_ratio(teacher, X) * 0.999
    plan = reduce_model(teacher, X, ReduceConfig(budget=BudgetConfig(ratio=ratio)), mode="width")
    widths = {p.name: p.rank for p in plan.layers if p.rank is not None}
    report = WidthReport()
    student = reconstruct_width(teacher, widths, X, ridge=ridge, report=report)
    ft = FinetuneConfig()
    kd = FitSettings(**{**vars(train), "temperature": ft.temperature, "alpha": ft.alpha})

    def trained(start: nn.Module, settings: FitSettings, with_teacher: bool, **kw) -> float:
        model, _ = fit(
            copy.deepcopy(start), data, settings, teacher=teacher if with_teacher else None, **kw
        )
        return accuracy(model, data)

    fresh = reinitialized(student, seed)
    cell = {
        "params": sum(p.numel() for p in student.parameters()),
        "ratio": ratio,
        "before FT": accuracy(student, data),
        "distill": trained(student, kd, True),
        "ridge 1e-4": trained(reconstruct_width(teacher, widths, X, ridge=OLD_RIDGE), kd, True),
        "scratch CE": trained(fresh, train, False),
        "scratch KD": trained(fresh, kd, True),
        "TP L2 + KD": trained(tp_l2_student(teacher, widths, torch.from_numpy(X[:2])), kd, True),
    }
    if features:
        with_features = FitSettings(**{**vars(kd), "feature_weight": features})
        matches = feature_pairs(report.kept_out)
        cell["+ features"] = trained(student, with_features, True, features=matches)
    return cell


def task_seed(
    task: str,
    seed: int,
    ratios: list[float],
    train: FitSettings,
    features: float = 0.0,
    ridge: float = ReconstructConfig().ridge,
) -> tuple[float, int, list[dict]]:
    """One task and seed: (teacher accuracy, teacher params, a cell per budget). A process's
    work."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)  # before the teacher's init: the same teacher in any process
    data, model = TASKS[task](seed)
    torch.manual_seed(seed)
    teacher, _ = fit(
        model,
        data,
        FitSettings(epochs=TEACHER_EPOCHS, lr=1e-3, batch_size=64, patience=15, seed=seed),
    )
    settings = FitSettings(**{**vars(train), "seed": seed})
    return (
        accuracy(teacher, data),
        sum(p.numel() for p in teacher.parameters()),
        [run_cell(teacher, data, ratio, seed, settings, features, ridge) for ratio in ratios],
    )


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--ratios", type=float, nargs="+", default=[10, 30, 0], help="0: the smallest student"
    )
    ft = FinetuneConfig()
    parser.add_argument(
        "--epochs", type=int, default=MLP_CNN.epochs, help="every student's training epochs"
    )
    parser.add_argument(
        "--patience",
        type=int,
        default=None,
        help="early stopping on validation accuracy (default: the epochs, no early stop)",
    )
    parser.add_argument(
        "--lr", type=float, default=MLP_CNN.lr, help="every student's learning rate"
    )
    parser.add_argument(
        "--features", type=float, default=0.0, help="β > 0: add the feature-matching ablation"
    )
    parser.add_argument(
        "--ridge", type=float, default=ReconstructConfig().ridge, help="width mode's re-fit ridge"
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument(
        "--jobs", type=int, default=1, help="processes, one (task, seed) each, 1 thread each"
    )
    args = parser.parse_args()
    args.patience = args.patience or args.epochs
    train = FitSettings(
        epochs=args.epochs, lr=args.lr, batch_size=ft.batch_size, patience=args.patience
    )
    columns = COLUMNS[:3] + ("+ features",) * bool(args.features) + COLUMNS[3:]
    start = time.perf_counter()
    pairs = [(task, seed) for task in args.tasks for seed in args.seeds]
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {
            pair: pool.submit(task_seed, *pair, args.ratios, train, args.features, args.ridge)
            for pair in pairs
        }
        results = {pair: future.result() for pair, future in futures.items()}
    print(
        f"Test accuracy %, mean ± std over seeds {args.seeds}. Teachers: {TEACHER_EPOCHS} epochs "
        f"(CE). Every student: {args.epochs} epochs, patience {args.patience}, lr {train.lr}, "
        f"batch {train.batch_size}; KD at T={ft.temperature:g}, α={ft.alpha:g}; width mode's "
        f"ridge {args.ridge:g}"
        + (f"; feature matching β={args.features:g}" if args.features else "")
        + ".\n"
    )
    print("| task | size | params | teacher | " + " | ".join(columns) + " | gap % |")
    print("|---|---|---:|---:|" + "---:|" * (len(columns) + 1))
    for task in args.tasks:
        t_acc = [results[task, s][0] for s in args.seeds]
        print(
            f"| {task} | teacher | {results[task, args.seeds[0]][1]:,} | {mean_std(t_acc)} |"
            + " |" * (len(columns) + 1)
        )
        for i, ratio in enumerate(args.ratios):
            cells = [results[task, s][2][i] for s in args.seeds]
            means = {c: statistics.mean(cell[c] for cell in cells) for c in columns}
            teacher, scratch = statistics.mean(t_acc), means["scratch CE"]
            gap = (
                f"{100 * (means['distill'] - scratch) / (teacher - scratch):.0f}"
                if teacher > scratch
                else "—"
            )
            size = f"{ratio:g}x" if ratio else f"smallest ({cells[0]['ratio']:.0f}x)"
            row = " | ".join(mean_std([cell[c] for cell in cells]) for c in columns)
            print(f"| {task} | {size} | {cells[0]['params']:,} | | {row} | {gap} |")
    print(f"\n({time.perf_counter() - start:.0f} s, {args.jobs} processes)")


if __name__ == "__main__":
    main()

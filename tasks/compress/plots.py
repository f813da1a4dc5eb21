"""Plots of one pipeline run, logged as PNG artifacts at the root of the parent run (MLflow's
compare view shows only root-level artifacts side by side: under a folder they would not
compare).

- `pareto.png`: test accuracy vs size on disk (log x) of every stage; the teacher is a
  star, the stages no other stage beats on both axes are joined (the Pareto front).
- `confusion.png`: confusion matrix of the final (served) model on the test split.
- `tsne.png`: t-SNE of the teacher's and the student's penultimate embeddings (the input of
  their last Linear, caught by a forward hook) on test rows, coloured by true class. The
  served model is ONNX, so the student here is the float model it was exported from.
- `curves.png`: the fine-tune and prune-recovery curves (also step metrics on the stages).
- `frontier.png` (a drop-only target): validation accuracy vs served file size of every
  candidate the search built (tasks/compress/smallest.py), kept ones joined in build order,
  rolled-back ones crossed, the shipped one ringed; the teacher's validation accuracy and the
  allowance below it as lines.

A regression run draws the Pareto plot with test R², `predicted.png` (the final model's
predictions against the true values of the test split, in the label's units) in place of the
confusion matrix, and no t-SNE (its colours are classes).

Figures are built on matplotlib's object API with the Agg canvas: no pyplot state, no
display needed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter
from sklearn.manifold import TSNE
from sklearn.metrics import confusion_matrix
from threadpoolctl import threadpool_limits
from torch import nn

from distill.tasks.compress.data import Dataset
from distill.tasks.compress.evaluate import SERIALIZED, OnnxModel, TorchScriptModel, torch_predictor
from distill.tasks.compress.rows import predict_batched
from distill.tasks.compress.target import Candidate
from distill.tasks.platform.config import EvaluateConfig
from distill.tasks.platform.progress import track

PLOTS_DIR = ""  # the run's root: see above
TSNE_ITERATIONS = 500


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def pareto_front(sizes: list[float], accuracies: list[float]) -> list[int]:
    """Indices of the points no other point beats on both (smaller size, higher accuracy), by
    size."""
    front = []
    for i, (s, a) in enumerate(zip(sizes, accuracies, strict=True)):
        dominated = any(
            (s2 <= s and a2 >= a) and (s2 < s or a2 > a)
            for j, (s2, a2) in enumerate(zip(sizes, accuracies, strict=True))
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: sizes[i])


def pareto_figure(stages: dict[str, dict[str, float]]) -> Figure:
    names = list(stages)
    sizes = [stages[n]["size_kb"] for n in names]
    regression = all("r2" in stages[n] for n in names)
    accs = [stages[n]["r2"] if regression else 100 * stages[n]["accuracy"] for n in names]
    fig = _figure(6.4, 4.4)
    ax = fig.add_subplot()
    front = pareto_front(sizes, accs)
    # a staircase: the best accuracy reachable at or below each size
    if len(front) > 1:  # one point is no front: no legend entry without a line
        ax.plot(
            [sizes[i] for i in front],
            [accs[i] for i in front],
            "-",
            drawstyle="steps-post",
            color="tab:gray",
            alpha=0.6,
            linewidth=2,
            label="Pareto front",
            zorder=1,
        )
    placed: dict[tuple[float, float], int] = {}  # stages on one point: labels stacked
    for name, size, acc in zip(names, sizes, accs, strict=True):
        teacher = name == "teacher"
        ax.scatter(
            size,
            acc,
            s=160 if teacher else 50,
            marker="*" if teacher else "o",
            color="tab:red" if teacher else "tab:blue",
            zorder=2,
            label="teacher" if teacher else None,
        )
        k = placed[(round(size, 1), round(acc, 2))] = (
            placed.get((round(size, 1), round(acc, 2)), -1) + 1
        )
        ax.annotate(
            name, (size, acc), textcoords="offset points", xytext=(6, 4 + 11 * k), fontsize=9
        )
    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _pos: f"{v:g}")  # 20, 30 rather than 2x10^1
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain if max(sizes) / min(sizes) < 10 else NullFormatter())
    ax.margins(x=0.15, y=0.12)  # room for the labels
    ax.set_xlabel("size on disk (KB, log scale)")
    what = "R²" if regression else "accuracy"
    ax.set_ylabel("test R²" if regression else "test accuracy (%)")
    ax.set_title(f"{what} vs size across stages")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig


def frontier_figure(
    frontier: list[Candidate],
    reference: float,
    max_drop: float,
    metric: str = "accuracy",
    confidence: float = 0.9,
    agreement_rows: int = 0,
) -> Figure:
    """The drop-only search's candidates: validation score vs served file size (log x), by
    format and fate, named in build order (r1: the first rebuild, p1: the first pruning round),
    each with its score's interval at `confidence` (the paired drop's, read from the teacher's
    score; with `agreement_rows` held-out or unlabeled rows, its lower end the agreement's bound
    where that is tighter): a candidate whose bar ends above the allowed line is shown within
    the drop."""
    scale = 1.0 if metric == "r2" else 100.0
    unit = "" if metric == "r2" else " point" if scale * max_drop == 1 else " points"
    fig = _figure(7.8, 4.4)
    ax = fig.add_subplot()
    ax.axhline(scale * reference, color="tab:red", linestyle=":", linewidth=1, label="teacher")
    ax.axhline(
        scale * (reference - max_drop),
        color="tab:red",
        linestyle="--",
        linewidth=1,
        label=f"teacher - {scale * max_drop:g}{unit} (allowed)",
    )
    groups = (
        ("kept, int8", lambda c: c.kept and c.served_as == "int8", "o", "tab:blue"),
        ("kept, fp32", lambda c: c.kept and c.served_as != "int8", "s", "tab:cyan"),
        ("rolled back", lambda c: not c.kept, "x", "tab:gray"),
    )
    for label, member, marker, color in groups:
        points = [c for c in frontier if member(c)]
        if points:
            ax.scatter(
                [c.size_bytes / 1024 for c in points],
                [scale * c.score for c in points],
                marker=marker,
                s=50,
                color=color,
                label=label,
                zorder=2,
            )
    bars = [c for c in frontier if math.isfinite(c.drop_low) and math.isfinite(c.drop_high)]
    if bars:  # score = reference - drop: the drop's interval [low, high], read from the teacher
        ax.errorbar(
            [c.size_bytes / 1024 for c in bars],
            [scale * c.score for c in bars],
            yerr=[  # (a bootstrap quantile may fall on the wrong side of the estimate)
                [scale * max(0.0, c.drop_high - c.drop) for c in bars],
                [scale * max(0.0, c.drop - c.drop_low) for c in bars],
            ],
            fmt="none",
            ecolor="tab:gray",
            elinewidth=1,
            capsize=3,
            alpha=0.7,
            zorder=1,
            label=f"{confidence:.0%} interval"
            + (f"\n(or agreement, {agreement_rows:,} rows)" if agreement_rows else ""),
        )
    labelled: list[tuple[float, float]] = []  # (KB, score) of the labels placed above
    for c in frontier:
        if c.shipped:
            ax.scatter(
                c.size_bytes / 1024,
                scale * c.score,
                s=260,
                facecolors="none",
                edgecolors="tab:red",
                linewidths=2,
                label=f"shipped: {c.size_bytes / 1024:.1f} KB {c.served_as}",
                zorder=3,
            )
        kb, score = c.size_bytes / 1024, scale * c.score
        # a label next to one already above (same score, sizes within 15 %) goes below its point
        crowded = any(abs(s - score) < 0.1 and abs(math.log(kb / k)) < 0.15 for k, s in labelled)
        if not crowded:
            labelled.append((kb, score))
        ax.annotate(
            c.name.replace("prune round ", "p").replace("rebuild ", "r"),
            (kb, score),
            textcoords="offset points",
            xytext=(6, -12 if crowded else 5),
            fontsize=8,
        )
    sizes = [c.size_bytes / 1024 for c in frontier]
    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain if max(sizes) / min(sizes) < 10 else NullFormatter())
    ax.margins(x=0.15, y=0.15)
    ax.set_xlabel("served file (KB, log scale)")
    ax.set_ylabel("validation R²" if metric == "r2" else "validation accuracy (%)")
    ax.set_title("smallest within the drop: the candidates (r: rebuilt, p: pruned, in order)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return fig


def confusion_figure(
    y_true: np.ndarray, y_pred: np.ndarray, classes: list[Any], title: str
) -> Figure:
    matrix = confusion_matrix(y_true, y_pred, labels=range(len(classes)))
    n = len(classes)
    fig = _figure(max(4.0, 0.5 * n + 2.5), max(3.6, 0.5 * n + 2.0))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ticks = range(n)
    ax.set_xticks(ticks, [str(c) for c in classes], rotation=45 if n > 10 else 0)
    ax.set_yticks(ticks, [str(c) for c in classes])
    if n <= 20:
        threshold = matrix.max() / 2
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    str(matrix[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if matrix[i, j] > threshold else "black",
                )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return fig


def predicted_figure(y_true: np.ndarray, y_pred: np.ndarray, title: str) -> Figure:
    """Regression: predicted against true values, with the line y = x."""
    fig = _figure(4.8, 4.4)
    ax = fig.add_subplot()
    ax.scatter(y_true, y_pred, s=12, alpha=0.6, color="tab:blue")
    lo, hi = float(min(y_true.min(), y_pred.min())), float(max(y_true.max(), y_pred.max()))
    ax.plot([lo, hi], [lo, hi], "--", color="tab:gray", label="predicted = true")
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig


def penultimate(model: nn.Module, X: np.ndarray) -> np.ndarray | None:
    """The input of the model's last Linear layer for rows X (None: the model has no Linear)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        return None
    caught: list[torch.Tensor] = []
    handle = linears[-1].register_forward_hook(
        lambda _m, inputs, _out: caught.append(inputs[0].detach())
    )
    try:
        torch_predictor(model)(X)
    finally:
        handle.remove()
    return torch.cat(caught).reshape(len(X), -1).numpy()


def tsne_2d(embedding: np.ndarray, seed: int) -> np.ndarray:
    perplexity = min(30.0, (len(embedding) - 1) / 3)  # t-SNE needs perplexity < rows
    # one OpenMP thread: beside torch's thread pool on a busy CPU, more threads made it ~30x slower.
    # 500 iterations, not scikit-learn's 1,000: on the digits teacher's test rows the final KL
    # divergence is 0.262 vs 0.259 and trustworthiness (10 neighbours) 0.993 both ways, at half
    # the cost
    with threadpool_limits(limits=1, user_api="openmp"):
        return TSNE(
            n_components=2,
            perplexity=perplexity,
            init="pca",
            max_iter=TSNE_ITERATIONS,
            random_state=seed,
        ).fit_transform(embedding.astype(np.float64))


def tsne_figure(
    embeddings: dict[str, np.ndarray], y: np.ndarray, classes: list[Any], seed: int
) -> Figure:
    fig = _figure(5.2 * len(embeddings) + 1.0, 4.8)
    axes = fig.subplots(1, len(embeddings), squeeze=False)[0]
    cmap = "tab10" if len(classes) <= 10 else "tab20"
    for ax, (name, emb) in zip(axes, embeddings.items(), strict=True):
        points = tsne_2d(emb, seed)
        scatter = ax.scatter(
            points[:, 0], points[:, 1], c=y, cmap=cmap, s=10, vmin=-0.5, vmax=len(classes) - 0.5
        )
        ax.set_title(f"{name} ({emb.shape[1]}-d penultimate)")
        ax.set_xticks([])
        ax.set_yticks([])
    if len(classes) <= 20:
        bar = fig.colorbar(scatter, ax=list(axes), ticks=range(len(classes)), shrink=0.8)
        bar.ax.set_yticklabels([str(c) for c in classes])
        bar.set_label("true class")
    fig.suptitle(f"t-SNE of penultimate embeddings, {len(y)} test rows")
    return fig


def round_starts(lr: list[float]) -> list[int]:
    """Epochs where a new training round began (prune recovery restarts its cosine schedule:
    the learning rate jumps back up)."""
    return [i for i in range(1, len(lr)) if lr[i] > lr[i - 1] * (1 + 1e-9)]


def curves_figure(curves: dict[str, dict[str, list[float]]]) -> Figure | None:
    """Per training stage, one column: the training objective (KD), the validation
    cross-entropy and the validation accuracy, each on its own axis (they are different
    quantities); dotted lines between prune rounds; the restored best epoch marked."""
    stages = {s: c for s, c in curves.items() if any(c.get(k) for k in ("train_loss", "val_loss"))}
    if not stages:
        return None
    fig = _figure(4.6 * len(stages), 7.5)
    axes = fig.subplots(3, len(stages), squeeze=False, sharex="col")
    for col, (stage, c) in enumerate(stages.items()):
        regression = bool(c.get("val_r2"))  # R² and MSE in place of accuracy and cross-entropy
        rows = (
            ("train_loss", "train: KD objective", "tab:blue", 1),
            ("val_loss", f"validation {'MSE' if regression else 'cross-entropy'}", "tab:orange", 1),
            ("val_r2", "validation R²", "tab:green", 1)
            if regression
            else ("val_accuracy", "validation accuracy (%)", "tab:green", 100),
        )
        best = int(c["best_epoch"][0]) if c.get("best_epoch") else -1
        starts = round_starts(c.get("lr", []))
        for row, (key, label, color, scale) in enumerate(rows):
            ax = axes[row][col]
            values = [scale * v for v in c.get(key, [])]
            if values:
                ax.plot(range(len(values)), values, marker=".", color=color)
            if 0 <= best < len(values):
                ax.axvline(best, color="0.3", linestyle="--", linewidth=1)
                ax.plot(best, values[best], "o", mfc="none", mec="black", ms=9, zorder=3)
            for i, start in enumerate(starts):
                ax.axvline(start - 0.5, color="0.6", linestyle=":", linewidth=1)
                if row == 0:
                    ax.annotate(
                        f"round {i + 2}",
                        (start - 0.5, 1),
                        xycoords=("data", "axes fraction"),
                        xytext=(2, -10),
                        textcoords="offset points",
                        fontsize=7,
                        color="0.4",
                    )
            teacher_loss = key == "train_loss" and stage == "teacher"  # trained on labels alone
            ax.set_ylabel("train: cross-entropy" if teacher_loss else label, fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        title = stage + (f" (best epoch {best} restored, dashed)" if best >= 0 else "")
        title += f", {len(starts) + 1} rounds" if starts else ""
        axes[0][col].set_title(title, fontsize=10)
        axes[-1][col].set_xlabel("epoch")
    fig.suptitle("training curves")
    return fig


def _predict(model: nn.Module | OnnxModel | TorchScriptModel, X: np.ndarray) -> np.ndarray:
    predict = model.predictor() if isinstance(model, SERIALIZED) else torch_predictor(model)
    return predict_batched(predict, X)


def pipeline_figures(
    stages: dict[str, dict[str, float]],
    teacher: nn.Module,
    student: nn.Module,
    final: nn.Module | OnnxModel | TorchScriptModel,
    data: Dataset,
    curves: dict[str, dict[str, list[float]]],
    cfg: EvaluateConfig,
    seed: int,
) -> dict[str, Figure]:
    """The run's figures by artifact file name (a figure whose inputs are missing is left out)."""

    def pareto() -> Figure:
        return pareto_figure(stages)

    def confusion() -> Figure:
        pred = _predict(final, data.X_test).argmax(axis=1)
        return confusion_figure(
            data.y_test,
            pred,
            data.classes,
            f"final model, test split (accuracy {100 * (pred == data.y_test).mean():.2f} %)",
        )

    def tsne() -> Figure | None:
        X, y = data.X_test[: cfg.tsne_rows], data.y_test[: cfg.tsne_rows]
        found = {"teacher": penultimate(teacher, X), "student": penultimate(student, X)}
        embeddings = {name: e for name, e in found.items() if e is not None}
        if len(X) < 4 or len(embeddings) < len(found):
            return None
        return tsne_figure(embeddings, y, data.classes, seed)

    def training() -> Figure | None:
        return curves_figure(curves)

    def predicted() -> Figure:
        from sklearn.metrics import r2_score

        truth, pred = data.to_units(data.y_test), data.to_units(_predict(final, data.X_test)[:, 0])
        title = f"final model, test split (R² {r2_score(truth, pred):.4f})"
        return predicted_figure(truth, pred, title)

    makers = (
        {"pareto.png": pareto, "predicted.png": predicted, "curves.png": training}
        if data.is_regression
        else {
            "pareto.png": pareto,
            "confusion.png": confusion,
            "tsne.png": tsne,
            "curves.png": training,
        }
    )
    figures = {}
    for name in track(list(makers), "drawing plots", total=len(makers)):
        figure = makers[name]()
        if figure is not None:
            figures[name] = figure
    return figures

"""Hidden size (tasks/compress/hidden.py) against heads + FFN width at the same parameter count.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hidden.py [--epochs 30] [--seed 0]

A ViT (`ViTForImageClassification`, 2 layers, hidden 64, 4 heads, FFN 128, 2x2 patches) trained
here on scikit-learn's 8x8 digits (stratified 80/20 split). For each kept hidden fraction (1.0,
0.75, 0.5) the student is the teacher with its residual stream rotated and sliced (`narrow_hidden`:
without and with the least-squares re-fit), and beside it a student of the same parameter count
(closest) made by transformer.py's `narrow` cutting heads and FFN units (re-fitted downstream).
Before any fine-tuning: test accuracy, agreement with the teacher, and the logits' relative error
|z_s - z_t| / |z_t| on the test rows, and the share of what the norms read that the slice drops
on the calibration rows (512 training rows).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

# the repository, not benchmarks/ (whose transformers.py would shadow the library)
sys.path.remove(str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.tasks.compress import hidden as hd
from distill.tasks.compress import transformer as tr


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    X = (d.images[:, None] / 16.0).astype(np.float32)
    return tuple(train_test_split(X, d.target, test_size=0.2, stratify=d.target, random_state=0))


def vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
    )
    return ViTForImageClassification(config)


def train(model: nn.Module, X: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(X)).split(64):
            loss = nn.functional.cross_entropy(model(Xt[idx]).logits, yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()


def logits(model: nn.Module, X: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return tr._output(model, torch.from_numpy(X))


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def heads_ffn_widths(teacher: nn.Module, X: np.ndarray, target: int) -> dict[str, int]:
    """Heads and FFN width (one each for the stack) whose shapes-only cut is within 0.5 % of
    `target` parameters, cutting both by the closest fractions (else the closest count)."""
    groups = {g.kind: g for g in tr.transformer_groups(teacher, X[:2]) if g.reducible}
    h, f = groups["heads"], groups["ffn"]
    base = params(teacher)

    def cost(widths: dict[str, int]) -> int:
        m = copy.deepcopy(teacher)
        tr.cut(m, widths)
        return base - params(m)

    per_head, per_unit = cost({h.name: h.width - 1}), cost({f.name: f.width - 1})
    combos = [
        (abs(base - (h.width - a) * per_head - (f.width - b) * per_unit - target), a, b)
        for a in range(1, h.width + 1)
        for b in range(1, f.width + 1)
    ]
    close = [c for c in combos if c[0] <= 0.005 * target] or [min(combos)]
    best = min(close, key=lambda c: (abs(c[1] / h.width - c[2] / f.width), c[0]))
    return {h.name: best[1], f.name: best[2]}


def row(name: str, student: nn.Module, teacher_z: torch.Tensor, X: np.ndarray, y: np.ndarray):
    z = logits(student, X)
    acc = (z.argmax(1).numpy() == y).mean()
    agree = (z.argmax(1) == teacher_z.argmax(1)).float().mean().item()
    err = ((z - teacher_z).norm() / teacher_z.norm()).item()
    return f"| {name} | {params(student):,} | {100 * acc:.2f} | {100 * agree:.2f} | {err:.4f} |"


HEADER = (
    "| student | params | test acc % | agreement % | logits rel. error | stream lost |\n"
    "|---|---|---|---|---|---|"
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    X_train, X_test, y_train, y_test = digits()
    torch.manual_seed(args.seed)
    teacher = vit()
    tick = time.perf_counter()
    train(teacher, X_train, y_train, args.epochs, args.seed)
    print(f"teacher trained in {time.perf_counter() - tick:.0f} s")
    calib = X_train[:512]
    t_z = logits(teacher, X_test)
    print(HEADER)
    print(row("teacher", teacher, t_z, X_test, y_test) + " - |")
    D = teacher.config.hidden_size
    for fraction in (1.0, 0.75, 0.5):
        k = round(fraction * D)
        for refit in (False, True):
            student = copy.deepcopy(teacher)
            tick = time.perf_counter()
            report = hd.narrow_hidden(student, teacher, k, calib, refit=refit)
            secs = time.perf_counter() - tick
            name = f"hidden {k}/{D}{' + re-fit' if refit else ''} ({secs:.1f} s)"
            print(row(name, student, t_z, X_test, y_test) + f" {report.discarded:.4f} |")
        target = hd.params_after(teacher, hd.find_stream(teacher, calib), k)  # type: ignore[arg-type]
        widths = heads_ffn_widths(teacher, calib, target)
        student = copy.deepcopy(teacher)
        tick = time.perf_counter()
        tr.narrow(student, teacher, widths, calib)
        secs = time.perf_counter() - tick
        name = f"heads+FFN {list(widths.values())} ({secs:.1f} s)"
        print(row(name, student, t_z, X_test, y_test) + " - |")


if __name__ == "__main__":
    main()

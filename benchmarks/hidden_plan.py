"""The width plan with and without the hidden size, through reconstruct and a short KD.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hidden_plan.py [--epochs 30] [--kd-epochs 20]

The digits ViT of benchmarks/hidden.py (2 layers, hidden 64, 4 heads, FFN 128), trained here. At
2x and 4x fewer parameters (`reduce.budget.ratio`), the reduce and reconstruct stages' own
functions plan and build the student twice: heads / FFN / depth only (the plan before the hidden
size joined it: `reduce.plan_hidden` switched off) and with the hidden size, and beside them the
hidden size alone (the widest stream within the budget); then the same KD
(the pipeline's loss and defaults: T 4, alpha 0.9, Adam 3e-3 with a cosine schedule, batch 64)
for each. Test accuracy before and after KD, on the 360 test rows.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

# the repository, not benchmarks/ (whose transformers.py would shadow the library)
sys.path.remove(str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.tasks.compress import hidden as hd
from distill.tasks.compress import reduce as rd
from distill.tasks.compress.finetune import kd_loss
from distill.tasks.compress.reconstruct import reconstruct
from distill.tasks.platform.config import BudgetConfig, ReconstructConfig, ReduceConfig

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("bench_hidden", HERE / "hidden.py")
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.path.insert(0, str(HERE))  # benchmarks/hidden.py takes it out again
_spec.loader.exec_module(bench)


def kd(student, teacher, X: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(epochs, 1))
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    with torch.no_grad():
        zt = bench.logits(teacher, X)
    student.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(X)).split(64):
            loss = kd_loss(student(Xt[idx]).logits, zt[idx], yt[idx], 4.0, 0.9)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    student.eval()


def accuracy(model, X: np.ndarray, y: np.ndarray) -> float:
    return 100 * float((bench.logits(model, X).argmax(1).numpy() == y).mean())


def without_hidden(teacher, X, cfg, groups, plan, too_small=None):
    if too_small is not None:
        raise too_small
    return plan


def hidden_only(teacher, calib: np.ndarray, red: rd.Reduction) -> rd.Reduction:
    """The widest stream (in the plan's steps) within `red`'s parameter budget, nothing else."""
    stream = hd.find_stream(teacher, calib)
    assert isinstance(stream, hd.Stream)
    step, target = (
        hd.plan_step(stream.width),
        rd.target_params(BudgetConfig(ratio=red.budget_value), red.teacher_params),
    )
    k = max(
        k for k in range(step, stream.width, step) if hd.params_after(teacher, stream, k) <= target
    )
    plan = rd.LayerPlan(hd.NAME, 0, stream.width, k, variance=1.0)
    return replace(red, layers=[plan], student_params=hd.params_after(teacher, stream, k))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--kd-epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    X_train, X_test, y_train, y_test = bench.digits()
    torch.manual_seed(args.seed)
    teacher = bench.vit()
    bench.train(teacher, X_train, y_train, args.epochs, args.seed)
    calib = X_train[:512]
    print(f"teacher: {bench.params(teacher):,} params, {accuracy(teacher, X_test, y_test):.2f} %")
    print("| ratio | plan | widths | params | acc. before KD % | acc. after KD % | s |")
    print("|---|---|---|---|---|---|---|")
    plan_hidden = rd.plan_hidden
    for ratio in (2, 4):
        cfg = ReduceConfig(budget=BudgetConfig(ratio=ratio), calibration_samples=512)
        for name, planner in (
            ("heads/FFN/depth", without_hidden),
            ("+ hidden", plan_hidden),
            ("hidden only", without_hidden),
        ):
            tick = time.perf_counter()
            rd.plan_hidden = planner  # type: ignore[assignment]
            try:
                red = rd.reduce_model(teacher, calib, cfg, "width")
            finally:
                rd.plan_hidden = plan_hidden  # type: ignore[assignment]
            if name == "hidden only":
                red = hidden_only(teacher, calib, red)
            student = reconstruct(teacher, red, calib, ReconstructConfig(mode="width"))
            assert bench.params(student) == red.student_params
            before = accuracy(student, X_test, y_test)
            kd(student, teacher, X_train, y_train, args.kd_epochs, args.seed)
            widths = ", ".join(f"{p.name.split('.')[-1]} {p.rank}" for p in red.layers if p.rank)
            secs = time.perf_counter() - tick
            print(
                f"| {ratio}x | {name} | {widths} | {red.student_params:,} | {before:.2f} | "
                f"{accuracy(student, X_test, y_test):.2f} | {secs:.0f} |"
            )


if __name__ == "__main__":
    main()

"""Is the target's accuracy guard optimistic? (issue 28, item 2.) The guard judges the student on
the validation rows; if fine-tuning also chose its epoch on those rows, the drop it sees is
biased low. Per run this prints the drop the guard saw (validation rows) beside the drop on the
test rows no stage looked at, for the shipped model and for the first fine-tuned student, plus
each one's score gap (validation minus test) for teacher and student.

Teachers and targets as in benchmarks/targets.py (each teacher trained once per seed, loaded
from its file, `target.max_accuracy_drop=0.01`); the runs call `compress` directly (no Prefect,
no MLflow). Rows: one per (teacher, target, seed), appended as JSON lines to `--out`.

`--per-fit`: the bias of each epoch rule in one fit, with less noise. The CNN1d's teacher (a
fresh one) and a student reduced to a tenth of its parameters each train one seeded trajectory
(10 % of the training rows held out, every epoch run) twice: scored each epoch on the validation
rows, then on the test rows in their place (the trajectory is the same: the validation rows do
not choose). Per rule (best validation epoch with the configured patience, best held-out epoch,
last epoch): "optimism" = validation minus test accuracy at the epoch it restores, less that
difference averaged over all epochs, and the test accuracy there.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/guard_rows.py \
        --seeds 0 1 --out guard_rows.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from targets import CONFIG, MAX_DROP, teachers, trained_teacher  # noqa: E402 -- after the insert

# target overrides per teacher; "params" is a tenth of the teacher's parameters, filled in
TARGETS = {
    "MLP 64-512-512-10, digits": ["target=null", "ratio=10", "smallest"],
    "CNN1d 32-64, signals": ["ratio=4", "ratio=10", "params", "smallest"],
}


def overrides_of(target: str, params: int) -> list[str]:
    if target == "target=null":  # the untargeted pipeline (reduce.budget, prune.amount)
        return ["target=null"]
    drop = f"target.max_accuracy_drop={MAX_DROP}"
    if target == "smallest":
        return ["target=null", drop]
    if target == "params":
        return ["target=null", f"target.params={params // 10}", drop]
    kind, value = target.split("=")
    return ["target=null", f"target.{kind}={value}", drop]


def accuracy(model, X: np.ndarray, y: np.ndarray) -> float:
    from distill.tasks.compress.finetune import predict_logits

    return float((predict_logits(model, X).argmax(1) == y).mean())


def one(overrides: list[str], seed: int) -> dict:
    from distill.tasks.compress.data import load_dataset
    from distill.tasks.compress.pipeline import compress
    from distill.tasks.platform.config import load_config

    cfg = load_config(
        CONFIG,
        [f"seed={seed}", "evaluate.plots=false", "evaluate.latency_repeats=20", *overrides],
    )
    data = load_dataset(cfg.data, seed)
    start = time.perf_counter()
    out = compress(cfg, data)
    wall = time.perf_counter() - start
    teacher_val = accuracy(out.teacher, data.X_val, data.y_val)
    teacher_test = out.stages["teacher"]["accuracy"]
    served_test = out.stages["quantized"]["accuracy"]
    record = {
        "teacher_val_minus_test": teacher_val - teacher_test,
        "finetuned_val_drop": teacher_val - accuracy(out.finetuned, data.X_val, data.y_val),
        "finetuned_test_drop": teacher_test - out.stages["finetuned"]["accuracy"],
        "test_drop": teacher_test - served_test,
        "test_accuracy": served_test,
        "size_kb": out.stages["quantized"]["size_kb"],
        "wall": wall,
    }
    if out.target is not None:
        record |= {"val_drop": out.target.fitted.accuracy_drop(), "met": out.target.met}
    return record


def _first_best(curve: np.ndarray, patience: int) -> int:
    """The epoch `fit` restores choosing on `curve` (ties: the first), stopping after `patience`
    stale epochs."""
    best, score, stale = -1, -1.0, 0
    for epoch, value in enumerate(curve):
        if value > score:
            best, score, stale = epoch, value, 0
        else:
            stale += 1
            if stale >= patience:
                break
    return best


def per_fit(seed: int) -> None:
    import copy
    import dataclasses

    from distill.tasks.compress.data import load_dataset
    from distill.tasks.compress.finetune import HELD_OUT, FitSettings, fit
    from distill.tasks.compress.recipe import recipe_for, with_recipe
    from distill.tasks.compress.reconstruct import reconstruct_with_notes
    from distill.tasks.compress.reduce import calibration_rows, reduce_model
    from distill.tasks.compress.teacher import train_teacher
    from distill.tasks.platform.config import BudgetConfig, load_config

    with tempfile.TemporaryDirectory() as tmp:
        overrides = teachers(Path(tmp))["CNN1d 32-64, signals"]
        cfg = load_config(CONFIG, [f"seed={seed}", *overrides, "target=null"])
        data = load_dataset(cfg.data, seed)
    on_test = dataclasses.replace(data, X_val=data.X_test, y_val=data.y_test)
    teacher = train_teacher(cfg.teacher, data, seed)  # as a run trains it: the student's teacher
    cfg = with_recipe(cfg, recipe_for(teacher))  # finetune keys left out: as a run fills them
    params = sum(p.numel() for p in teacher.parameters())
    fresh = copy.deepcopy(teacher)
    for module in fresh.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    t = cfg.teacher
    calib = calibration_rows(data.X_train, cfg.reduce.calibration_samples, seed)
    reduce_cfg = cfg.reduce.model_copy(update={"budget": BudgetConfig(params=params // 10)})
    student, _ = reconstruct_with_notes(
        teacher,
        reduce_model(teacher, calib, reduce_cfg, cfg.reconstruct.mode),
        calib,
        cfg.reconstruct,
    )
    fits = {
        "teacher": (
            fresh,
            None,
            t.patience,
            FitSettings(
                epochs=t.epochs,
                lr=t.lr,
                batch_size=t.batch_size,
                patience=t.epochs,
                weight_decay=t.weight_decay,
                seed=seed,
                held_out=HELD_OUT,
            ),
        ),
        "student": (
            student,
            teacher,
            cfg.finetune.patience,
            FitSettings.of(cfg.finetune, seed, "cpu", patience=cfg.finetune.epochs),
        ),
    }
    for name, (model, kd, patience, settings) in fits.items():
        _, h = fit(copy.deepcopy(model), data, settings, teacher=kd)
        _, h_test = fit(copy.deepcopy(model), on_test, settings, teacher=kd)
        val, test = np.array(h.val_accuracy), np.array(h_test.val_accuracy)
        common = float(np.mean(val - test))
        rules = {
            "validation": _first_best(val, patience),
            "held_out": _first_best(np.array(h.select_accuracy), patience),
            "last": len(val) - 1,
        }
        record = {"model": name, "seed": seed}
        for rule, e in rules.items():
            optimism = float(val[e] - test[e]) - common
            record[rule] = {"epoch": e, "optimism": optimism, "test": float(test[e])}
        print(json.dumps(record), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--teachers", nargs="*", help="name prefixes (default: all)")
    parser.add_argument("--targets", nargs="*", help="only these (e.g. ratio=10 smallest)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--per-fit", action="store_true", help="each epoch rule's bias per fit")
    args = parser.parse_args()
    import distill

    print(f"distill from {Path(distill.__file__).parent}", flush=True)
    if args.per_fit:
        for seed in args.seeds:
            per_fit(seed)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for i, (name, teacher_overrides) in enumerate(teachers(Path(tmp)).items()):
                if name not in TARGETS or (
                    args.teachers and not any(name.startswith(p) for p in args.teachers)
                ):
                    continue
                loaded, _, _, params = trained_teacher(
                    teacher_overrides, Path(tmp) / f"{seed}-{i}.pt", seed
                )
                for target in TARGETS[name]:
                    if args.targets and target not in args.targets:
                        continue
                    record = {"teacher": name, "seed": seed, "target": target}
                    record |= one([*loaded, *overrides_of(target, params)], seed)
                    print(json.dumps(record), flush=True)
                    if args.out:
                        with args.out.open("a") as f:
                            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()

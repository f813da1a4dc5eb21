"""Does agreement on held-out rows let a drop-only target ship smaller? (issue 28, item 2)

A drop-only target (`target=null`, `target.max_accuracy_drop=0.01`) ships the smallest candidate
whose drop the rows *show* within the allowance (tasks/compress/smallest.py). With 180 labeled
validation rows (digits) one row is 0.56 points, so a candidate that loses a single row the
teacher gets right is never shown within a point. `target.agreement_rows=N` holds N training
rows out of every fit of the student and bounds the drop by the student's disagreement with the
teacher on them (tasks/compress/guard.py): no labels needed, but the rows come out of KD's.

Per case and seed, the same run with and without held-out rows, side by side: the served file
(KB, ratio to the teacher's file), the validation drop and its upper bound at 90 % (the
interval's end, or the agreement's where lower), whether the run called it shown within, and
the drop on the test rows no stage looked at (the honest figure). Runs call `compress` directly
(no Prefect, no MLflow).

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/agreement.py \
        --seeds 0 1 2 --rows 400
    ... benchmarks/agreement.py --unlabeled digits|digits-shifted --seeds 0 1 2 3

`--unlabeled`: the rows come from `target.unlabeled` instead, KD's rows untouched; the table
adds how many of them the shipped student answers differently from the teacher (its share is
what bounds the drop: under the allowance, or nothing is shown).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ship_rule import (  # noqa: E402 -- after the sys.path inserts
    CASES,
    MAX_DROP,
    _signals,
    drop_only_config,
)

from distill.tasks.compress.data import load_dataset  # noqa: E402


def digits_split(tmp: Path, seed: int) -> tuple[list[str], str]:
    """A user's split of the 1,797 digits with labels for 1,440 rows (900 train, 180 val, 360
    test) and 357 more rows whose labels are thrown away: (the data overrides, the unlabeled
    rows' npz source)."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    bounds = {"train": (0, 900), "val": (900, 1080), "test": (1080, 1440)}
    arrays = {}
    for part, (a, b) in bounds.items():
        arrays[f"X_{part}"], arrays[f"y_{part}"] = X[order[a:b]], y[order[a:b]]
    np.savez(tmp / f"split{seed}.npz", **arrays)
    np.savez(tmp / f"unlabeled{seed}.npz", X=X[order[1440:]])
    return [f"data.source=npz:{tmp / f'split{seed}.npz'}", "data.standardize=true"], (
        f"npz:{tmp / f'unlabeled{seed}.npz'}"
    )


def shifted(images: np.ndarray) -> np.ndarray:
    """Each 8x8 digit moved one pixel up, down, left and right (the edge row or column that
    comes in is blank): 4 augmented rows per row."""
    grid = images.reshape(-1, 8, 8)
    moved = []
    for axis, step in ((1, 1), (1, -1), (2, 1), (2, -1)):
        out = np.roll(grid, step, axis=axis)
        edge = [slice(None)] * 3
        edge[axis] = 0 if step == 1 else -1
        out[tuple(edge)] = 0
        moved.append(out.reshape(len(images), 64))
    return np.concatenate(moved)


def digits_shifted_split(tmp: Path, seed: int) -> tuple[list[str], str]:
    """`digits_split`, its unlabeled rows grown by augmentation: the 357 rows plus every
    training and unlabeled row shifted by one pixel four ways (5,385 rows, none from the
    validation or test rows)."""
    overrides, unlabeled = digits_split(tmp, seed)
    extra_path = unlabeled.removeprefix("npz:")
    with np.load(tmp / f"split{seed}.npz") as split, np.load(extra_path) as extra:
        rows = np.concatenate([split["X_train"], extra["X"]])
        grown = np.concatenate([extra["X"], shifted(rows)])
    np.savez(tmp / f"shifted{seed}.npz", X=grown)
    return overrides, f"npz:{tmp / f'shifted{seed}.npz'}"


SPLITS = {
    "digits": digits_split,
    "digits-shifted": digits_shifted_split,
}


def one(case: str, overrides: list[str], seed: int, rows: int, unlabeled: str = "") -> dict:
    from distill.tasks.compress.pipeline import compress

    more = [f"target.agreement_rows={rows}"] + ([f"target.unlabeled={unlabeled}"] * bool(unlabeled))
    cfg = drop_only_config(seed, [*more, *overrides])
    data = load_dataset(cfg.data, seed)
    start = time.perf_counter()
    out = compress(cfg, data)
    wall = time.perf_counter() - start
    assert out.target is not None
    served = out.target.fitted.served_check
    decision = served.decision if served is not None else None
    teacher, final = out.stages["teacher"], out.stages["quantized"]
    return {
        "case": case,
        "seed": seed,
        "rows": rows,
        "unlabeled": decision.agreement.rows - rows if decision and decision.agreement else 0,
        "differ": decision.agreement.differ if decision and decision.agreement else 0,
        "kb": final["size_kb"],
        "ratio": teacher["size_kb"] / final["size_kb"],
        "val_drop": served.drop if served is not None else float("nan"),
        "bound": decision.bound if decision is not None else float("nan"),
        "shown": bool(decision is not None and decision.shown_within(MAX_DROP)),
        "test_drop": teacher["accuracy"] - final["accuracy"],
        "met": out.target.met,
        "wall": wall,
        "train_rows": len(data.X_train) - rows,
        "val_rows": len(data.y_val),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", type=int, default=400, help="target.agreement_rows")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument(
        "--unlabeled",
        choices=list(SPLITS),
        help="instead: few labeled rows, with and without more rows as target.unlabeled (the "
        "same KD rows either way): digits with labels for 1,440 rows and its other 357 rows "
        "(digits-shifted: and 5,028 one-pixel shifts of its training and unlabeled rows);",
    )
    args = parser.parse_args()
    if args.unlabeled:
        unlabeled_ab(args.unlabeled, args.seeds)
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            overrides = list(CASES[case])
            if "signals" in case:
                overrides += _signals(Path(tmp))
            for seed in args.seeds:
                for rows in (0, args.rows):
                    r = one(case, overrides, seed, rows)
                    results.append(r)
                    print(
                        f"{case} seed {seed} rows {rows}: {r['kb']:.1f} KB {r['ratio']:.1f}x, "
                        f"val drop {100 * r['val_drop']:+.2f} (bound {100 * r['bound']:.2f}), "
                        f"test drop {100 * r['test_drop']:+.2f}, {r['wall']:.0f} s",
                        file=sys.stderr,
                        flush=True,
                    )
    print(
        "\n| case | seed | held-out rows | KD rows | file KB | ratio | val drop pt | bound pt "
        "| shown within | test drop pt | wall s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in results:
        print(
            f"| {r['case']} | {r['seed']} | {r['rows']} | {r['train_rows']} | {r['kb']:.1f} "
            f"| {r['ratio']:.1f}x | {100 * r['val_drop']:+.2f} | {100 * r['bound']:.2f} "
            f"| {'yes' if r['shown'] else 'no'} | {100 * r['test_drop']:+.2f} | {r['wall']:.0f} |"
        )
    print("\nmeans over seeds:")
    for case in args.cases:
        for rows in (0, args.rows):
            rs = [r for r in results if r["case"] == case and r["rows"] == rows]
            mean_ratio = statistics.mean(r["ratio"] for r in rs)
            print(
                f"  {case}, {rows} held-out rows: ratio {mean_ratio:.1f}x"
                f" (geometric {statistics.geometric_mean(r['ratio'] for r in rs):.1f}x), test drop "
                f"{100 * statistics.mean(r['test_drop'] for r in rs):+.2f} pt, shown within "
                f"{sum(r['shown'] for r in rs)}/{len(rs)}, test drop > 1 pt "
                f"{sum(r['test_drop'] > MAX_DROP for r in rs)}/{len(rs)}, wall "
                f"{statistics.mean(r['wall'] for r in rs):.0f} s"
            )


def unlabeled_ab(task: str, seeds: list[int]) -> None:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            overrides, unlabeled = SPLITS[task](Path(tmp), seed)
            for source in ("", unlabeled):
                r = one(task, overrides, seed, 0, source)
                results.append(r)
                print(
                    f"seed {seed} unlabeled {r['unlabeled']} (differ {r['differ']}): "
                    f"{r['kb']:.1f} KB {r['ratio']:.1f}x,"
                    f" val drop {100 * r['val_drop']:+.2f} (bound {100 * r['bound']:.2f}), test "
                    f"drop {100 * r['test_drop']:+.2f}, {r['wall']:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
    print(
        "\n| seed | unlabeled rows | differ | file KB | ratio | val drop pt | bound pt "
        "| shown within | test drop pt |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in results:
        share = r["differ"] / r["unlabeled"] if r["unlabeled"] else 0.0
        differ = f"{r['differ']} ({100 * share:.1f} %)" if r["unlabeled"] else ""
        print(
            f"| {r['seed']} | {r['unlabeled']} | {differ} | {r['kb']:.1f} | {r['ratio']:.1f}x "
            f"| {100 * r['val_drop']:+.2f} | {100 * r['bound']:.2f} "
            f"| {'yes' if r['shown'] else 'no'} | {100 * r['test_drop']:+.2f} |"
        )
    for with_rows in (False, True):
        rs = [r for r in results if bool(r["unlabeled"]) == with_rows]
        if not rs:
            continue
        print(
            f"{'with' if with_rows else 'without'} the unlabeled rows: ratio "
            f"{statistics.mean(r['ratio'] for r in rs):.1f}x (geometric "
            f"{statistics.geometric_mean(r['ratio'] for r in rs):.1f}x), test drop "
            f"{100 * statistics.mean(r['test_drop'] for r in rs):+.2f} pt, shown within "
            f"{sum(r['shown'] for r in rs)}/{len(rs)}, > 1 pt on test "
            f"{sum(r['test_drop'] > MAX_DROP for r in rs)}/{len(rs)}"
        )


if __name__ == "__main__":
    main()

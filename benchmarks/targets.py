"""Targets on what ships, measured against a by-hand sweep (issue 28, item 6): `distill run --set
target.…` for three teachers x seven targets, and for each teacher a by-hand sweep of
`reduce.budget.params` x `compress.prune.amount` x int8 on/off (`target=null`) that picks, per
target, the best configuration meeting the same target.

Teachers: the default MLP 64-512-512-10 on digits; on the generated signals of
benchmarks/architectures.py a plain 1-D CNN (the built-in `teacher.arch=cnn`, channels 32, 64:
conv-ReLU x2, flatten, linear) and a 1-D ResNet (tests/zoo.py, 32 channels); and a Hugging Face
`BertForSequenceClassification` (benchmarks/transformers.py's: 4 layers, hidden 128, 823,174
parameters, on 6,000 generated rows of 28 token ids whose class is the order of three marker
words), its KD the transformer recipe distill picks for it. Each teacher is trained once and
loaded from its file by every run (`teacher.source: file:`, the BERT's `hf:DIR` from
`save_pretrained`); every run recomputes its stages (no cache).

Targets, each with the issue's 1-point guard (`target.max_accuracy_drop=0.01`, decided by the
run on validation rows): `size_kb` = 1/20 of the teacher's state_dict file; `ratio` 4, 10, 30
(teacher file / served file); `params` = 1/10 of the teacher's parameters; `latency_ms_b1` = the
midpoint of the fastest served format's batch-1 latency at the smallest and at the teacher's
widths, measured first (it moves with the load); drop-only (`target=null`,
`target.max_accuracy_drop=0.01`: the smallest served file within the point).

The sweep (per teacher, `target=null`): `reduce.budget.params` at 1/4, 1/12 and 1/40 of the
teacher's parameters x `compress.prune.amount` 0 and 0.5 x `compress.quantize.enabled` true
and false: 12 runs. A sweep configuration meets a target when its served file meets the limit
(size, ratio, params; batch-1 latency as the evaluate stage measured it) and its accuracy drop on
the test rows is at most 1 point: the sweep picks with hindsight on the test rows, an optimistic
baseline. Its best: the most accurate such configuration (drop-only: the smallest file).

Per (teacher, target): met (the run's own verdict), feasible (met, or some sweep configuration
meets it), the targeted run's file and test drop vs the sweep's best's, "worse" (some sweep
configuration meeting the target has a served file no larger and a higher test accuracy; the
p after it: an exact McNemar test on the test rows between the two registered models, asked
through their MLflow pyfunc, so that a gap of a row or two reads as what it is), "worse
than the pick on validation" (the configuration a user picks by hand without spending the test
rows: served file no larger than the targeted run's, within the limit and within the point on
the validation rows the targeted run's guard decides on, the most accurate there; worse where
it is more accurate on the test rows), and the run's wall time over the median wall time of one
sweep run. Every run appends a JSON line to
`--out`; `--report FILE` prints the tables from such a file without running anything.

Replicates (`--replicates K`, default 0): each targeted run a sweep configuration beats by the
paired test is run again beside that configuration at K more seeds (the same teacher; each seed
its own split, KD and search), and the report gives the gap per seed and its mean: one seed's
gap is one draw of the KD, and of the sweep's pick, the best of 12 configurations with hindsight
on the test rows. `--replicate-from FILE` takes the targeted runs and the sweep from a grid's
records instead of running them again.

Cost of planning (`--repeats N`, default 0): the 10x run against the same pipeline sized by hand
to the same final model (`reduce.budget.params` and int8 or not as the plan chose, no pruning),
alternating, median of N runs each.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/targets.py \
        --out targets.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from architectures import signals  # noqa: E402 -- importable only after the sys.path inserts

# benchmarks/transformers.py would shadow the Hugging Face library for the BERT teacher's loader
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]

if TYPE_CHECKING:
    from distill.flows.summary import RunSummary
    from distill.tasks.platform.config import PipelineConfig

CONFIG = str(ROOT / "configs" / "digits.yaml")
COMMON = [
    "evaluate.plots=false",
    "evaluate.latency_repeats=200",
    "register.model_name=bench-targets",
]
RESNET = {"channels": 32, "n_classes": 8}
BERT = "BERT 4x128, token order"  # a Hugging Face teacher (`trained_bert`)
MAX_DROP = 0.01  # the guard: 1 point
PAIRED_P = 0.05  # a "worse" gap counts as shown where the McNemar test on the test rows is below
KINDS = ("size_kb", "ratio", "params", "latency_ms_b1", "smallest")
SWEEP_FRACTIONS = (4, 12, 40)  # reduce.budget.params = teacher params / this
SWEEP_PRUNE = (0.0, 0.5)
SWEEP_INT8 = (True, False)


def teachers(tmp: Path) -> dict[str, list[str]]:
    X, y = signals(0)
    np.savez(tmp / "signals.npz", X=X.astype(np.float32), y=y)
    on_signals = [
        f"data.source=npz:{tmp / 'signals.npz'}",
        "data.shape=[1, 64]",
        "data.standardize=true",
    ]
    # `data.standardize` left out is on for a teacher distill trains and off for a loaded one:
    # the runs load the teacher trained here, so both say it (else it is fed unscaled rows)
    return {
        "MLP 64-512-512-10, digits": ["data.standardize=true"],
        "CNN1d 32-64, signals": [
            *on_signals,
            "teacher.arch=cnn",
            "teacher.channels=[32, 64]",
            "teacher.epochs=40",
            "teacher.lr=0.003",
        ],
        "ResNet1d-32, signals": [
            *on_signals,
            "teacher.arch=tests.zoo:ResNet1d",
            f"teacher.init_args={json.dumps(RESNET)}",
            "teacher.epochs=40",
            "teacher.lr=0.003",
        ],
    }


def _transformers_benchmark() -> ModuleType:
    """benchmarks/transformers.py, loaded under another name: as `transformers` it would shadow
    the Hugging Face library."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "transformers_benchmark", ROOT / "benchmarks" / "transformers.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def trained_bert(tmp: Path, seed: int) -> tuple[list[str], list[str], float, float, int]:
    """The Hugging Face BERT of benchmarks/transformers.py (4 layers, hidden 128, on the order of
    three marker tokens), trained there and `save_pretrained`: (the data's overrides, those and
    the teacher's `hf:` source, the latency target (ms), the teacher's file KB, its parameters),
    as `trained_teacher`."""
    from distill.tasks.compress.data import load_dataset
    from distill.tasks.compress.evaluate import saved_size
    from distill.tasks.compress.hf import load_hf_teacher
    from distill.tasks.platform.config import load_config

    bench = _transformers_benchmark()
    spec = bench.SPECS["BERT"]
    X, y = spec.data(seed, False)
    np.savez(tmp / "bert.npz", X=X, y=y)
    on_tokens = [
        f"data.source=npz:{tmp / 'bert.npz'}",
        f"data.test_size={spec.test_size:.6f}",
        "data.standardize=false",  # token ids (on by default where distill trains the teacher)
        "evaluate.large_batch=64",
    ]
    cfg = load_config(CONFIG, [f"seed={seed}", *on_tokens])
    data = load_dataset(cfg.data, seed)
    bench.train_teacher(spec, data, seed, spec.teacher_epochs, tmp / "bert")
    teacher = load_hf_teacher(f"hf:{tmp / 'bert'}", data)
    latency = _latency_target(teacher, data.X_train[:512], cfg, seed)
    params = sum(p.numel() for p in teacher.parameters())
    loaded = [*on_tokens, f"teacher.source=hf:{tmp / 'bert'}"]
    return on_tokens, loaded, latency, saved_size(teacher)[0] / 1024, params


def _latency_target(
    teacher: torch.nn.Module, X: np.ndarray, cfg: PipelineConfig, seed: int
) -> float:
    """The midpoint of the fastest served format's batch-1 latency at the smallest and at the
    teacher's widths (it moves with the load: measured where the grid runs)."""
    from distill.tasks.compress.plan import measure_costs

    costs = measure_costs(teacher, X, cfg.compress.quantize, seed, 300, (0.0, 1.0))
    fastest = [min(c.latency_ms[i] for c in costs.values()) for i in (0, -1)]  # smallest, teacher
    return round(sum(fastest) / 2, 4)


def trained_teacher(
    overrides: list[str], path: Path, seed: int
) -> tuple[list[str], float, float, int]:
    """Train once, save the state_dict; -> overrides loading it, the latency target (ms), the
    saved file's KB and the teacher's parameters."""
    from distill.tasks.compress.data import load_dataset
    from distill.tasks.compress.teacher import train_teacher
    from distill.tasks.platform.config import load_config

    cfg = load_config(CONFIG, [f"seed={seed}", *overrides])
    data = load_dataset(cfg.data, seed)
    teacher = train_teacher(cfg.teacher, data, seed)
    torch.save(teacher.state_dict(), path)
    latency = _latency_target(teacher, data.X_train[:512], cfg, seed)
    params = sum(p.numel() for p in teacher.parameters())
    return [*overrides, f"teacher.source=file:{path}"], latency, path.stat().st_size / 1024, params


def run(overrides: list[str]) -> tuple[dict[str, float], dict | None, float]:
    summary, wall = run_summary(overrides)
    return summary.metrics, summary.target, wall


def run_summary(overrides: list[str]) -> tuple[RunSummary, float]:
    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

    from distill.flows.distill import distill_flow

    start = time.perf_counter()
    with temporary_settings(updates={PREFECT_TASKS_REFRESH_CACHE: True}):
        summary = distill_flow(CONFIG, [*COMMON, *overrides])
    return summary, time.perf_counter() - start


def user_test_rows(overrides: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The test rows as a user holds them (the split's standardization undone) and their labels:
    what the registered model is asked, to compare two runs row by row."""
    from distill.tasks.compress.data import load_dataset
    from distill.tasks.platform.config import load_config

    data = load_dataset(load_config(CONFIG, [f"seed={seed}", *overrides]).data, seed)
    raw = data.X_test.reshape(len(data.X_test), -1) * data.scale + data.mean
    return raw, np.asarray(data.classes)[data.y_test]


def right_rows(summary: RunSummary, rows: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Which test rows the registered model answers right (through its MLflow pyfunc)."""
    import mlflow

    model = mlflow.pyfunc.load_model(f"models:/{summary.model_name}/{summary.model_version}")
    X, labels = rows
    schema = model.metadata.get_input_schema()
    dtype = schema.numpy_types()[0] if schema is not None else X.dtype  # as the user's file has it
    return np.asarray(model.predict(X.astype(dtype))["prediction"]) == labels


def attempt(
    overrides: list[str],
    record: dict,
    out: Path | None,
    rows: tuple[np.ndarray, np.ndarray] | None = None,
    sets: list[str] | None = None,
) -> dict:
    """One `run`, its figures added to `record` (or the error's first line), appended to `out`;
    with `rows` (`user_test_rows`), which test rows its registered model answers right (hex of the
    packed bits: a paired test between two runs, `mcnemar_p`). `sets` (`--set`): overrides after
    the run's own, named in the record."""
    start = time.perf_counter()
    if sets:
        record["sets"] = sets
    try:
        summary, wall = run_summary([*overrides, *(sets or [])])
        m, target = summary.metrics, summary.target
    except Exception as error:  # noqa: BLE001 -- a crash is a finding: recorded, the grid goes on
        head = (str(error).splitlines() or [""])[0][:300]
        record.update(error=f"{type(error).__name__}: {head}")
        record["wall"] = time.perf_counter() - start
    else:
        record.update(
            teacher_kb=m["teacher/size_kb"],
            teacher_params=m["teacher/params"],
            teacher_accuracy=m["teacher/accuracy"],
            teacher_val_accuracy=m.get("teacher/validation_accuracy"),
            val_accuracy=m.get("final/validation_accuracy"),
            size_kb=m["final/size_kb"],
            params=m["final/params"],
            accuracy=m["final/accuracy"],
            drop=m["accuracy_drop"],
            latency_ms_b1=m["final/latency_ms_b1"],
            int8_served=m["final/size_kb"] == m.get("final/int8_size_kb"),
            pruning_rounds=m.get("target/pruning_rounds"),
            achieved=m.get("target/achieved"),
            met=None if target is None else bool(target["met"]),
            line=None if target is None else target["line"],
            wall=wall,
        )
        if target is not None:
            record["stages"] = stage_params(summary.run_id)
        if rows is not None and summary.model_version is not None:
            right = right_rows(summary, rows)
            record["right"] = np.packbits(right).tobytes().hex()
            # the served model answers the user's rows as the evaluate stage measured it
            record["rows_match"] = bool(abs(right.mean() - m["final/accuracy"]) < 1e-9)
    if out is not None:
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")
    return record


def stage_params(run_id: str) -> dict[str, str]:
    """What a targeted run's stage runs say it built and served: the target run's `build_N`
    lines (each build's budget, parameters, predicted and measured, and the int8 method its
    export was served with) and the quantized run's `method` (fp32, static, static with the
    weighted ops alone, N layers fp32): the format that ships moves a size or latency more than
    the parameters do."""
    import mlflow

    runs = mlflow.search_runs(
        filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
        search_all_experiments=True,
        output_format="list",
    )
    out: dict[str, str] = {}
    for run in runs:
        params = run.data.params
        if run.info.run_name == "target":
            out |= {k: v for k, v in params.items() if k.startswith("build_") or k == "shapes"}
        elif run.info.run_name == "quantized" and "method" in params:
            out["method"] = params["method"]
    return out


def mcnemar_p(a: dict, b: dict) -> float | None:
    """Exact McNemar p (two-sided) that `a` and `b` are as accurate on the same test rows: a
    binomial test on the rows exactly one of them answers right. None where a record lacks rows
    or its served answers did not match its measured accuracy."""
    if not all(r.get("right") and r.get("rows_match") for r in (a, b)):
        return None
    from scipy.stats import binomtest

    # the same rows for both: packbits pads both to the same whole byte with zeros (wrong)
    ra, rb = (np.unpackbits(np.frombuffer(bytes.fromhex(r["right"]), np.uint8)) > 0 for r in (a, b))
    only_a, only_b = int((ra & ~rb).sum()), int((rb & ~ra).sum())
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def target_overrides(kind: str, value: float) -> list[str]:
    """The `--set`s that ask for a target (drop-only: `target=null` and the drop alone)."""
    if kind == "smallest":
        return ["target=null", f"target.max_accuracy_drop={value}"]
    return [f"target.{kind}={value}"]


def sweep_overrides(budget: int, amount: float, int8: bool) -> list[str]:
    """The `--set`s of one by-hand sweep configuration."""
    return [
        "target=null",
        f"reduce.budget.params={budget}",
        f"compress.prune.amount={amount}",
        f"compress.quantize.enabled={'true' if int8 else 'false'}",
    ]


def same_size_overrides(targeted: dict) -> list[str]:
    """A by-hand run (`target=null`) of the model a targeted run shipped: its parameters as the
    reduce budget, no pruning, int8 on where it served int8: what the run would have cost a user
    who knew the size beforehand."""
    return [
        "target=null",
        "compress.prune.amount=0",
        f"reduce.budget.params={int(targeted['params'])}",
        f"compress.quantize.enabled={'true' if targeted['int8_served'] else 'false'}",
    ]


def same_size_report(records: list[dict]) -> None:
    """Each targeted run's wall against the by-hand run of its shipped size (`--same-size`):
    what finding the size costs, apart from what the size itself costs to distil."""
    pairs = [
        (t, h)
        for h in records
        if h["arm"] == "same_size" and "error" not in h
        for t in records
        if t["arm"] == "targeted"
        and (t["teacher"], t["kind"], t["value"]) == (h["teacher"], h["kind"], h["value"])
        and "error" not in t
    ]
    if not pairs:
        return
    print(
        "\nWhat finding the size costs: each targeted run against a by-hand run of the model it "
        "shipped (`target=null`, its parameters as `reduce.budget.params`, no pruning, int8 as "
        "it served), run right after it\n"
    )
    print(
        "| teacher | target | targeted: params / KB | wall s | by hand, same size: "
        "params / KB | wall s | **targeted / by hand** |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    ratios = []
    for t, h in pairs:
        ratios.append(t["wall"] / h["wall"])
        print(
            f"| {t['teacher']} | {show_target(t['kind'], t['value'])} | "
            f"{t['params']:,.0f} / {t['size_kb']:.1f} | {t['wall']:.1f} | "
            f"{h['params']:,.0f} / {h['size_kb']:.1f} | {h['wall']:.1f} | "
            f"**{ratios[-1]:.2f}** |"
        )
    print(
        f"\ntargeted wall / the same size by hand: median {statistics.median(ratios):.2f}, "
        f"max {max(ratios):.2f} ({len(ratios)} targets)"
    )


def shown_worse(records: list[dict], below: float = PAIRED_P) -> list[tuple[dict, dict]]:
    """(targeted record, the sweep configuration) for each targeted run of one teacher that a
    sweep configuration beats at no larger a file with the paired test's p below `below`."""
    sweep = [r for r in records if r["arm"] == "sweep"]
    pairs = []
    for t in (r for r in records if r["arm"] == "targeted" and "error" not in r):
        better, _, p = beaten_by(t["kind"], t["value"], sweep, t)
        if better is not None and p is not None and p < below:
            pairs.append((t, better))
    return pairs


def replicate(
    name: str,
    pairs: list[tuple[dict, dict]],
    loaded: list[str],
    teacher_overrides: list[str],
    seeds: list[int],
    out: Path | None,
    sets: list[str] | None = None,
) -> list[dict]:
    """Each (targeted run, sweep configuration that beat it) run again at `seeds`, both on the
    same teacher and the same rows per seed: one seed's gap is one draw of the KD (and of the
    sweep's pick: the best of 12 configurations on the test rows), not the method's."""
    records = []
    for t, better in pairs:
        for seed in seeds:
            base = [f"seed={seed}", f"target.max_accuracy_drop={MAX_DROP}", *loaded]
            rows = user_test_rows(teacher_overrides, seed)
            common = {
                "teacher": name,
                "arm": "replicate",
                "kind": t["kind"],
                "value": t["value"],
                "seed": seed,
            }
            overrides = [*base, *target_overrides(t["kind"], t["value"])]
            records.append(attempt(overrides, common | {"role": "targeted"}, out, rows, sets))
            config = {k: better[k] for k in ("budget", "prune", "int8")}
            overrides = [*base, *sweep_overrides(config["budget"], config["prune"], config["int8"])]
            records.append(attempt(overrides, common | {"role": "sweep"} | config, out, rows, sets))
            what = show_target(t["kind"], t["value"])
            print(f"replicated {name}, {what}, seed {seed}", flush=True)
    return records


def replicated_report(records: list[dict]) -> None:
    """The gaps `replicate` measured, beside the grid's own (its seed)."""
    reps = [r for r in records if r["arm"] == "replicate"]
    if not reps:
        return
    print(
        "\nReplicated: targeted runs a sweep configuration beat (the paired test's p below "
        "`--replicate-p`, default 0.05), run "
        "again beside that configuration at other seeds (the same teacher; each seed its own "
        "split, KD and search; KB / test drop in points; gap: the configuration's test accuracy "
        "minus the targeted run's, on the same rows)\n"
    )
    print(
        "| teacher | target | seed | targeted: KB / drop | configuration | its KB / drop | gap "
        "| p |"
    )
    print("|---|---|---:|---:|---|---:|---:|---:|")
    cases = dict.fromkeys((r["teacher"], r["kind"], r["value"]) for r in reps)
    for name, kind, value in cases:
        grid = [r for r in records if r["teacher"] == name and r["arm"] in ("targeted", "sweep")]
        pairs = [  # the grid's own gap, whatever its p
            (t, b)
            for t, b in shown_worse(grid, math.inf)
            if (t["kind"], t["value"]) == (kind, value)
        ]
        for seed in sorted({r["seed"] for r in reps if (r["teacher"], r["kind"]) == (name, kind)}):
            of = {
                r["role"]: r
                for r in reps
                if (r["teacher"], r["kind"], r["value"], r["seed"]) == (name, kind, value, seed)
            }
            if "targeted" in of and "sweep" in of:
                pairs.append((of["targeted"], of["sweep"]))
        gaps = []
        for t, b in pairs:
            seed = t.get("seed", "the grid's")
            if "error" in t or "error" in b:
                failed = t.get("error") or b.get("error")
                print(f"| {name} | {show_target(kind, value)} | {seed} | **failed**: {failed} |")
                continue
            gap, p = b["accuracy"] - t["accuracy"], mcnemar_p(b, t)
            gaps.append(gap)
            over = "" if within_limit(kind, value, b) else " (over the limit)"
            print(
                f"| {name} | {show_target(kind, value)} | {seed} | "
                f"{t['size_kb']:.1f} / {100 * t['drop']:+.2f} | {show_config(b)} | "
                f"{b['size_kb']:.1f} / {100 * b['drop']:+.2f}{over} | {100 * gap:+.2f} | "
                f"{'' if p is None else f'{p:.2f}'} |"
            )
        if gaps:
            print(
                f"| {name} | {show_target(kind, value)} | mean of {len(gaps)} | | | | "
                f"**{100 * statistics.mean(gaps):+.2f}** | |"
            )


def show_target(kind: str, value: float) -> str:
    return {
        "smallest": f"smallest within {100 * value:g} point",
        "ratio": f"{value:g}x smaller file",
        "size_kb": f"{value:g} KB file",
        "params": f"{value:,.0f} params",
        "latency_ms_b1": f"{value:g} ms at batch 1",
    }[kind]


def meets(kind: str, value: float, r: dict) -> bool:
    """A sweep configuration meets the target: the limit by its served model, the drop on test."""
    if "error" in r or r["drop"] > MAX_DROP + 1e-9:
        return False
    return within_limit(kind, value, r)


def within_limit(kind: str, value: float, r: dict) -> bool:
    """The served model meets the target's limit (drop-only: any)."""
    return {
        "size_kb": lambda: r["size_kb"] <= value,
        "ratio": lambda: r["teacher_kb"] / r["size_kb"] >= value,
        "params": lambda: r["params"] <= value,
        "latency_ms_b1": lambda: r["latency_ms_b1"] <= value,
        "smallest": lambda: True,
    }[kind]()


def picked_on_validation(kind: str, value: float, sweep: list[dict], t: dict) -> dict | None:
    """What a by-hand user picks from the sweep at no larger a file than the targeted run's,
    without spending the test rows: the configurations that meet the limit and lose at most the
    point on the validation rows (the rows the targeted run's guard decides on), the most
    accurate there (then the smallest). None: no such configuration, or records without
    validation scores (before 2026-12-06)."""
    if t.get("val_accuracy") is None:
        return None
    eligible = [
        r
        for r in sweep
        if "error" not in r
        and r.get("val_accuracy") is not None
        and r["size_kb"] <= t["size_kb"]
        and within_limit(kind, value, r)
        and r["teacher_val_accuracy"] - r["val_accuracy"] <= MAX_DROP + 1e-9
    ]
    return max(eligible, key=lambda r: (r["val_accuracy"], -r["size_kb"]), default=None)


def sweep_best(kind: str, value: float, sweep: list[dict]) -> dict | None:
    meeting = [r for r in sweep if meets(kind, value, r)]
    if not meeting:
        return None
    if kind == "smallest":
        return min(meeting, key=lambda r: (r["size_kb"], -r["accuracy"]))
    return max(meeting, key=lambda r: (r["accuracy"], -r["size_kb"]))


def beaten_by(
    kind: str, value: float, sweep: list[dict], t: dict
) -> tuple[dict | None, float, float | None]:
    """(the most accurate sweep configuration meeting the target with a file no larger than the
    targeted run's, how much more accurate it is on the test rows, the McNemar p of the gap
    where it is more accurate)."""
    better = max(
        (r for r in sweep if meets(kind, value, r) and r["size_kb"] <= t["size_kb"]),
        key=lambda r: r["accuracy"],
        default=None,
    )
    gap = better["accuracy"] - t["accuracy"] if better else 0.0
    return better, gap, mcnemar_p(better, t) if better and gap > 1e-9 else None


def show_p(p: float | None) -> str:
    """A paired test's p after a gap in the report ('' where the records hold no rows)."""
    return "" if p is None else f" (p {p:.2f})"


def show_config(r: dict) -> str:
    return f"{r['budget']:,} p, prune {r['prune']:g}, int8 {'on' if r['int8'] else 'off'}"


def report(records: list[dict]) -> None:
    sets = sorted({" ".join(r["sets"]) for r in records if r.get("sets")})
    if sets:  # the runs' `--set` overrides: not the grid's defaults
        print(f"\nRun with `--set` overrides: {'; '.join(sets)}")
    names = list(dict.fromkeys(r["teacher"] for r in records))
    for name in names:
        sweep = [r for r in records if r["teacher"] == name and r["arm"] == "sweep"]
        if not sweep:
            continue
        print(f"\nBy-hand sweep, {name} (`target=null`; drop on the test rows, points)\n")
        print(
            "| reduce.budget.params | prune.amount | int8 | served | params | KB | drop | "
            "b1 ms | wall s |"
        )
        print("|---:|---:|---|---|---:|---:|---:|---:|---:|")
        for r in sweep:
            if "error" in r:
                print(
                    f"| {r['budget']:,} | {r['prune']:g} | {'on' if r['int8'] else 'off'} | "
                    f"**failed**: {r['error']} | | | | | {r['wall']:.1f} |"
                )
                continue
            print(
                f"| {r['budget']:,} | {r['prune']:g} | {'on' if r['int8'] else 'off'} | "
                f"{'int8' if r['int8_served'] else 'fp32'} | {r['params']:,.0f} | "
                f"{r['size_kb']:.1f} | {100 * r['drop']:+.2f} | {r['latency_ms_b1']:.4f} | "
                f"{r['wall']:.1f} |"
            )
    print(
        "\nTargeted runs vs the sweep's best (KB / test drop in points; worse: a sweep "
        "configuration meeting the target is no larger and more accurate on the test rows, by "
        "the points shown; picked on validation: the no larger configuration a user picks "
        "without the test rows (within the limit and the point on validation, the most accurate "
        "there), more accurate on test by the points shown)\n"
    )
    print(
        "| teacher | target | met | feasible | targeted: KB / drop | achieved | sweep's best | "
        "its KB / drop | worse | picked on validation: worse | wall s | / by-hand run |"
    )
    print("|---|---|---|---|---:|---:|---|---:|---|---|---:|---:|")
    met = feasible = worse = n = met_on_test = shown = shown_val = 0
    judged_rows = any("right" in r for r in records)  # records with per-row answers
    worse_val: list[float] = []  # the test gap to the validation pick, where one is beaten
    judged_val = 0  # targeted runs whose records hold validation scores
    ratios, gaps = [], []
    for name in names:
        sweep = [r for r in records if r["teacher"] == name and r["arm"] == "sweep"]
        walls = [r["wall"] for r in sweep if "error" not in r]
        by_hand = statistics.median(walls) if walls else float("nan")
        for t in (r for r in records if r["teacher"] == name and r["arm"] == "targeted"):
            n += 1
            kind, value = t["kind"], t["value"]
            best = sweep_best(kind, value, sweep)
            if "error" in t:
                feasible += best is not None
                print(
                    f"| {name} | {show_target(kind, value)} | **failed**: {t['error']} | "
                    f"{'yes' if best else 'no'} | | | | | | | {t['wall']:.1f} | |"
                )
                continue
            ok = bool(t["met"])
            met += ok
            met_on_test += ok and t["drop"] <= MAX_DROP + 1e-9
            feasible += ok or best is not None
            _, gap, p_worse = beaten_by(kind, value, sweep, t)
            beaten = gap > 1e-9
            worse += beaten
            shown += p_worse is not None and p_worse < PAIRED_P
            pick = picked_on_validation(kind, value, sweep, t)
            judged_val += t.get("val_accuracy") is not None
            val_gap = pick["accuracy"] - t["accuracy"] if pick else 0.0
            p_val = mcnemar_p(pick, t) if pick and val_gap > 1e-9 else None
            if val_gap > 1e-9:
                worse_val.append(val_gap)
                shown_val += p_val is not None and p_val < PAIRED_P
            by_validation = (
                "-"
                if t.get("val_accuracy") is None
                else f"**yes**, {100 * val_gap:.2f}{show_p(p_val)} ({show_config(pick)})"
                if pick and val_gap > 1e-9
                else "no"
            )
            gaps.append(gap)
            if walls:
                ratios.append(t["wall"] / by_hand)
            achieved = (
                f"{t['achieved']:.4f} ms"
                if kind == "latency_ms_b1"
                else f"{t['params']:,.0f} p"
                if kind == "params"
                else f"{t['teacher_kb'] / t['size_kb']:.1f}x"
            )
            theirs = f"{best['size_kb']:.1f} / {100 * best['drop']:+.2f}" if best else "-"
            print(
                f"| {name} | {show_target(kind, value)} | {'yes' if ok else '**no**'} | "
                f"{'yes' if ok or best else 'no'} | {t['size_kb']:.1f} / {100 * t['drop']:+.2f} | "
                f"{achieved} | {show_config(best) if best else 'none meets it'} | {theirs} | "
                f"{f'**yes**, {100 * gap:.2f}{show_p(p_worse)}' if beaten else 'no'} | "
                f"{by_validation} | "
                f"{t['wall']:.1f} | "
                f"{f'{ratios[-1]:.2f}' if walls else '-'} |"
            )
    print("\nWhy each targeted run stopped (`target` stage record):\n")
    for t in (r for r in records if r["arm"] == "targeted"):
        print(
            f"- {t['teacher']}, {show_target(t['kind'], t['value'])}: "
            f"{t.get('line') or t.get('error')}"
        )
    spent = sum(r["wall"] for r in records)
    if not ratios:
        print(f"\n{met} of {feasible} feasible targets met ({n} targets; no sweep to judge by)")
        replicated_report(records)
        same_size_report(records)
        return
    paired = (
        f"{shown} of them shown by a paired test on the test rows at p < {PAIRED_P:g})"
        if judged_rows
        else "no per-row answers recorded)"
    )
    against_pick = (
        f"{len(worse_val)} of {judged_val}"
        + (
            f" (by at most {100 * max(worse_val):.2f} points"
            + (f"; {shown_val} shown by the paired test)" if judged_rows else ")")
            if worse_val
            else ""
        )
        if judged_val
        else "not recorded"
    )
    print(
        f"\n**{met} of {feasible} feasible targets met** ({n} targets; feasible: met, or some "
        f"sweep configuration meets it; {met_on_test} of the {met} met within 1 point on the test "
        f"rows too); worse than the sweep's best at equal or smaller size: "
        f"{worse} (by at most {100 * max(gaps):.2f} points; "
        f"{paired}; worse than what a user picks from "
        f"the sweep on validation rows: {against_pick}; "
        f"targeted wall / median by-hand run: median {statistics.median(ratios):.2f}, "
        f"max {max(ratios):.2f}; {len(records)} runs, {spent:.0f} s of runs"
    )
    replicated_report(records)
    same_size_report(records)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats", type=int, default=0, help="of the planning-cost runs (0: none)"
    )
    parser.add_argument("--kinds", nargs="*", help=f"only these: {' '.join(KINDS)} (default: all)")
    parser.add_argument(
        "--teachers", nargs="*", help="only these: MLP CNN1d ResNet1d BERT (default: all four)"
    )
    parser.add_argument("--no-sweep", action="store_true", help="the targeted runs only")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every run, after the grid's own (repeatable; named in "
        "each record): e.g. compress.prune.recovery_epochs=3 to compare a default",
    )
    parser.add_argument(
        "--same-size",
        action="store_true",
        help="after each targeted run, a by-hand run of the size it shipped (what finding the "
        "size costs)",
    )
    parser.add_argument("--out", type=Path, help="append each run's record (a JSON line) here")
    parser.add_argument(
        "--report", type=Path, nargs="*", help="print the tables from these files; run nothing"
    )
    parser.add_argument(
        "--replicates",
        type=int,
        default=0,
        help="run each targeted run a sweep configuration beat by the paired test again beside "
        "that configuration at this many more seeds (0: none)",
    )
    parser.add_argument(
        "--replicate-p",
        type=float,
        default=PAIRED_P,
        help=f"replicate the gaps whose paired test's p is below this (default {PAIRED_P:g})",
    )
    parser.add_argument(
        "--replicate-from",
        type=Path,
        nargs="*",
        help="with --replicates: the grid's records (JSON lines) to replicate from; the "
        "targeted runs and the sweep are not run again",
    )
    args = parser.parse_args()
    grid = (
        [json.loads(line) for f in args.replicate_from for line in f.read_text().splitlines()]
        if args.replicate_from
        else None
    )
    if args.report:
        report([json.loads(line) for f in args.report for line in f.read_text().splitlines()])
        return
    tmp = Path(tempfile.mkdtemp(prefix="distill-targets-"))
    os.environ.update(
        {
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
            "DISTILL_MLFLOW_CONFIG": f"{tmp}/none",
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "MLFLOW_LOGGING_LEVEL": "ERROR",
            "DO_NOT_TRACK": "true",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
    )
    from distill.flows.distill import local_settings

    records, costs, begin = [], [], time.perf_counter()
    seeds = list(range(args.seed + 1, args.seed + 1 + args.replicates))  # of the replicates
    with local_settings():
        run(
            ["target=null", "teacher.epochs=1", "finetune.epochs=0"]
        )  # starts Prefect, warms every import
        for i, (name, plain) in enumerate([*teachers(tmp).items(), (BERT, [])]):
            if args.teachers and not any(name.startswith(t) for t in args.teachers):
                continue
            teacher_overrides = plain
            if name == BERT:
                teacher_overrides, loaded, latency, teacher_kb, teacher_params = trained_bert(
                    tmp, args.seed
                )
            else:
                loaded, latency, teacher_kb, teacher_params = trained_teacher(
                    teacher_overrides, tmp / f"{i}.pt", args.seed
                )
            if grid is not None:  # the grid's own runs, read: only the replicates run
                own = [r for r in grid if r["teacher"] == name and r["arm"] != "replicate"]
                records += own
                pairs = shown_worse(own, args.replicate_p)
                records += replicate(
                    name, pairs, loaded, teacher_overrides, seeds, args.out, args.set
                )
                continue
            # the default guard, 1 point (configs/digits.yaml ships 2 for the demo)
            base = [f"seed={args.seed}", f"target.max_accuracy_drop={MAX_DROP}", *loaded]
            rows = user_test_rows(teacher_overrides, args.seed)
            for kind, value in (
                ("size_kb", round(teacher_kb / 20, 1)),
                ("ratio", 4),
                ("ratio", 10),
                ("ratio", 30),
                ("params", teacher_params // 10),
                ("latency_ms_b1", latency),
                ("smallest", MAX_DROP),  # drop-only: the smallest file within the 1 point
            ):
                if args.kinds and kind not in args.kinds:
                    continue
                record = {"teacher": name, "arm": "targeted", "kind": kind, "value": value}
                overrides = [*base, *target_overrides(kind, value)]
                records.append(attempt(overrides, record, args.out, rows, args.set))
                print(f"[{time.perf_counter() - begin:.0f} s] {record}", flush=True)
                if args.same_size and "error" not in record:
                    hand = {"teacher": name, "arm": "same_size", "kind": kind, "value": value}
                    records.append(
                        attempt(
                            [*base, *same_size_overrides(record)], hand, args.out, None, args.set
                        )
                    )
                    print(f"[{time.perf_counter() - begin:.0f} s] {hand}", flush=True)
            for fraction in () if args.no_sweep else SWEEP_FRACTIONS:
                for amount in SWEEP_PRUNE:
                    for int8 in SWEEP_INT8:
                        budget = teacher_params // fraction
                        by_hand = [*base, *sweep_overrides(budget, amount, int8)]
                        record = {
                            "teacher": name,
                            "arm": "sweep",
                            "budget": budget,
                            "prune": amount,
                            "int8": int8,
                        }
                        records.append(attempt(by_hand, record, args.out, rows, args.set))
                        print(f"[{time.perf_counter() - begin:.0f} s] {record}", flush=True)
            if seeds:
                own = [r for r in records if r["teacher"] == name]
                pairs = shown_worse(own, args.replicate_p)
                records += replicate(
                    name, pairs, loaded, teacher_overrides, seeds, args.out, args.set
                )
            tenx = next((r for r in records if r["teacher"] == name and r.get("value") == 10), None)
            if args.repeats == 0 or tenx is None or "error" in tenx:
                continue
            # planning's cost: the 10x run vs the same pipeline sized by hand to its plan,
            # alternating, median of `--repeats` each
            m = run([*base, "target.ratio=10"])[0]
            same_plan = [
                *base,
                "target=null",
                "compress.prune.amount=0",
                f"reduce.budget.params={int(m['target/reduce_params'])}",
                f"compress.quantize.enabled={'true' if m['target/int8'] else 'false'}",
            ]
            walls: dict[str, list[float]] = {"targeted": [], "by hand": []}
            sizes = {}
            for _ in range(args.repeats):
                for arm, overrides in (
                    ("targeted", [*base, "target.ratio=10"]),
                    ("by hand", same_plan),
                ):
                    metrics, _, wall = run(overrides)
                    walls[arm].append(wall)
                    sizes[arm] = metrics["final/size_kb"]
            costs.append((name, sizes, {arm: statistics.median(w) for arm, w in walls.items()}))

    print(
        f"\nseed {args.seed}, {torch.get_num_threads()} threads; accuracy drop = teacher - final "
        "on the test rows, in points (the targeted runs' guard, max 1 point, is decided on "
        "validation rows)"
    )
    report(records)
    if costs:
        print(
            f"\nmedian wall s of {args.repeats} runs each, alternating\n\n"
            "| teacher | 10x targeted: final KB | wall s | by hand, same plan: final KB | wall s | "
            "**targeted / by hand** |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        for name, sizes_of, wall_of in costs:
            print(
                f"| {name} | {sizes_of['targeted']:.1f} | {wall_of['targeted']:.1f} | "
                f"{sizes_of['by hand']:.1f} | {wall_of['by hand']:.1f} | "
                f"**{wall_of['targeted'] / wall_of['by hand']:.2f}** |"
            )
    print(f"\n({time.perf_counter() - begin:.0f} s in all)")


if __name__ == "__main__":
    main()

"""Targets on what ships (tasks/compress/target.py): the plan's arithmetic, the accuracy guard's rollback,
and, through the CLI, a met target met by the registered file and a missed one registered,
tagged and refused by `distill promote`."""

import copy
import itertools
import json
import re
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

from distill.flows.cli import app
from distill.flows.distill import distill_flow
from distill.tasks.compress import quantize
from distill.tasks.compress.architectures import build_mlp
from distill.tasks.compress.evaluate import TorchScriptModel
from distill.tasks.compress.graph import param_model, trace
from distill.tasks.compress.guard import Guard
from distill.tasks.compress.plan import Costs, plan_target, smallest_params
from distill.tasks.compress.quantize import Quantized
from distill.tasks.compress.target import Search, fit_to_target, keep_fraction_for
from distill.tasks.platform.config import (
    PipelineConfig,
    QuantizeConfig,
    ReconstructConfig,
    ReduceConfig,
    TargetConfig,
    build_config,
)
from distill.tasks.platform.errors import UserError
from tests.conftest import ROOT, fresh_process

CONFIG = str(ROOT / "configs" / "digits.yaml")
FAST = [
    "teacher.hidden=[64, 64]",
    "teacher.epochs=8",
    "reduce.calibration_samples=256",
    "finetune.epochs=3",
    "compress.prune.recovery_epochs=1",
    "evaluate.latency_repeats=3",
    "evaluate.large_batch=32",
    "evaluate.plots=false",
]
# int8: file 5,000 B + 1 B/param, latency 0.01 ms + 1e-6 ms/param (from 100 and 10,100 params);
# fp32: file 1,000 B + 4 B/param, latency 0.005 ms + 2e-6 ms/param
COSTS = {
    "int8": Costs((100, 10_100), (5_100, 15_100), (0.0101, 0.0201), "onnxruntime int8"),
    "fp32": Costs((100, 10_100), (1_400, 41_400), (0.0052, 0.0252), "onnxruntime fp32"),
}


# --- config ---------------------------------------------------------------------------------


def test_default_config_ships_a_target():
    cfg = build_config({}, [])
    assert cfg.target is None  # the schema's default: hand-sized stages
    from distill.tasks.platform.config import load_config

    target = load_config(CONFIG).target
    assert (target.kind, target.value, target.max_accuracy_drop) == ("size_kb", 100.0, 0.02)


def test_a_target_kind_override_replaces_the_kind_and_keeps_the_guard():
    cfg = build_config({"target": {"size_kb": 100, "max_accuracy_drop": 0.02}}, ["target.ratio=10"])
    assert (cfg.target.kind, cfg.target.value, cfg.target.max_accuracy_drop) == (
        "ratio",
        10.0,
        0.02,
    )
    assert build_config({"target": {"size_kb": 100}}, ["target=null"]).target is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["target.size_kb=20", "target.params=1000"],
            "config key 'target': give one of size_kb, ratio, params, latency_ms_b1, not 2",
        ),
        (["target.ratio=0.5"], "config key 'target.ratio': Input should be greater than 1"),
        (["target.size_kb=20", "reconstruct.mode=low_rank"], "it needs reconstruct.mode=width"),
        (
            ["target.size_kb=20", "compress.prune.method=unstructured"],
            "it needs compress.prune.method=structured",
        ),
    ],
)
def test_bad_targets_name_the_key(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_config({}, overrides)


# --- the plan -------------------------------------------------------------------------------


def test_plan_meets_a_size_with_the_format_that_fits_the_most_parameters():
    assert COSTS["int8"].line("bytes") == pytest.approx((5_000, 1.0))
    plan = plan_target(
        TargetConfig(size_kb=10),
        COSTS,
        teacher_params=50_000,
        smallest_params=100,
        teacher_file_bytes=200_000,
    )
    # 10 KB = 10,240 B, aimed 1 % under: int8 (10,137.6 - 5,000) / 1 beats fp32 (10,137.6 - 1,000) / 4
    assert (plan.fmt, plan.final_params, plan.reduce_params, plan.limit) == (
        "int8",
        5_137,
        5_137,
        10_240,
    )
    assert plan.reachable
    # 4 KB: int8's fixed 5,000 B do not fit at all, fp32 fits (4,055.04 - 1,000) / 4 params
    small = plan_target(TargetConfig(size_kb=4), COSTS, 50_000, 100, 200_000)
    assert (small.fmt, small.final_params) == ("fp32", 763)
    ratio = plan_target(TargetConfig(ratio=20), COSTS, 50_000, 100, teacher_file_bytes=200_000)
    assert ratio.limit == 10_000 and ratio.final_params == int(10_000 * 0.99 - 5_000)
    big = plan_target(TargetConfig(size_kb=1_000), COSTS, 50_000, 100, 200_000)
    assert (big.final_params, big.fmt) == (
        50_000,
        "fp32",
    )  # never more than the teacher; fp32 is lossless
    # 0.02 ms: int8 (0.02 - 0.01) / 1e-6 = 10,000 params beats fp32 (0.02 - 0.005) / 2e-6 = 7,500
    fast = plan_target(TargetConfig(latency_ms_b1=0.02), COSTS, 50_000, 100, 200_000)
    assert fast.fmt == "int8" and fast.final_params == pytest.approx(10_000, abs=1)
    assert plan_target(TargetConfig(params=777), COSTS, 50_000, 100, 200_000).final_params == 777


def test_a_target_below_the_smallest_model_is_unreachable():
    plan = plan_target(
        TargetConfig(size_kb=1), COSTS, 50_000, smallest_params=100, teacher_file_bytes=200_000
    )
    assert not plan.reachable and plan.final_params == 100
    assert "below the smallest reachable model (100 params)" in plan.why
    # int8 tried on every candidate of the search (a tie of two formats that cannot fit went to
    # fp32 before: 44.4 KB shipped where int8 was 17.1 KB); each ships only where it measures so
    assert plan.fmt == "int8"
    assert plan_target(TargetConfig(size_kb=1), {"fp32": COSTS["fp32"]}, 50_000, 100, 1).fmt == (
        "fp32"
    )


def test_a_latency_limit_a_measured_copy_meets_is_reachable():
    """The least-squares line through three latencies, the half-width copy's measured slow,
    passes above the smallest copy: a limit that copy meets is reachable, at its size at least
    (the line alone called it unreachable, and a search built below it)."""
    costs = {
        "fp32": Costs(
            (100, 5_000, 10_000), (1_400, 21_000, 41_000), (0.010, 0.025, 0.028), "onnxruntime fp32"
        )
    }
    fixed, slope = costs["fp32"].line("latency")
    assert fixed + slope * 100 > 0.011  # the line: over the limit at the smallest copy
    plan = plan_target(TargetConfig(latency_ms_b1=0.011), costs, 10_000, 100, 41_000)
    assert plan.reachable and plan.final_params == 100
    # a limit the line meets further up keeps the line's answer
    assert plan_target(TargetConfig(latency_ms_b1=0.02), costs, 10_000, 100, 1).final_params == int(
        (0.02 - fixed) / slope
    )
    # and one no copy meets is not reachable
    assert not plan_target(TargetConfig(latency_ms_b1=0.0095), costs, 10_000, 100, 1).reachable


def test_smallest_model_and_prune_fraction_count_real_parameters():
    model = build_mlp(64, [32, 16], 10)
    example = torch.zeros(2, 64)
    assert smallest_params(model, example) == (64 + 1) * 1 + (1 + 1) * 1 + (1 + 1) * 10
    groups = trace(model, example).reducible()
    f = keep_fraction_for(model, example, groups, 1_000)
    cost = param_model(model, example, groups)

    def at(x):
        return cost.params({g.name: int(np.ceil(x * g.width)) for g in groups})

    assert at(f) <= 1_000 < at(f + 1 / 32)  # the largest uniform cut within the count


def test_the_served_onnx_file_carries_no_debugging_metadata(digits):
    import onnx
    import onnxruntime as ort

    from distill.tasks.compress.quantize import export_onnx

    model = build_mlp(64, [32], 10).eval()
    raw = export_onnx(model, 64)
    proto = onnx.load_from_string(raw)
    assert not proto.graph.value_info and all(
        not n.metadata_props and not n.doc_string for n in proto.graph.node
    )
    params = sum(p.numel() for p in model.parameters())
    assert (
        len(raw) < 4 * params + 1_500
    )  # float32 weights plus a small graph (was ~5 KB of stack traces)
    session = ort.InferenceSession(raw, providers=["CPUExecutionProvider"])
    out = session.run(None, {"x": digits.X_test[:50]})[0]
    assert np.abs(out - model(torch.from_numpy(digits.X_test[:50])).detach().numpy()).max() < 1e-5


# --- the guard ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RefusesBelow(Guard):
    """The real guard, except that any model with fewer than `floor` parameters breaks it."""

    floor: int = 0

    def check(self, step, predict, params):
        real = super().check(step, predict, params)
        return type(real)(real.step, real.params, real.accuracy, real.drop, params >= self.floor)


def _params_export(model):  # the size a params target reads, without an ONNX export
    n = sum(p.numel() for p in model.parameters())
    return Quantized(TorchScriptModel(b"", n, n), None, 0.0, None, "none")


def test_a_pruning_round_that_breaks_the_guard_is_rolled_back(digits):
    cfg = PipelineConfig()
    torch.manual_seed(0)
    student = build_mlp(64, [40, 40], 10)
    before = copy.deepcopy(student.state_dict())
    n = sum(p.numel() for p in student.parameters())
    plan = plan_target(
        TargetConfig(params=n // 8), COSTS, n, smallest_params(student, torch.zeros(2, 64)), 4 * n
    )
    # accuracy never breaks it here; the first round (to about n/2) keeps it, the second (n/4) does not
    guard = RefusesBelow(0.0, 1.0, digits.X_val, digits.y_val, floor=n // 3)

    search = Search(
        student,
        digits,
        plan,
        COSTS,
        guard,
        cfg.compress.prune,
        cfg.finetune,
        cfg.compress.quantize,
        seed=0,
        export=_params_export,
    )
    fitted = fit_to_target(search, student)
    steps = [(c.step, c.ok) for c in fitted.checks]
    assert steps == [("reduction", True), ("prune round 1", True), ("prune round 2", False)]
    kept = fitted.checks[1].params
    assert n // 3 <= kept < n and fitted.checks[2].params < n // 3
    assert (
        sum(p.numel() for p in fitted.model.parameters()) == kept
    )  # round 1's model, not round 2's
    assert fitted.quantized.served.params == kept and fitted.achieved == kept
    assert fitted.rolled_back == ["prune round 2"] and not fitted.met
    assert "prune round 2" in fitted.bound and "rolled back" in fitted.bound
    assert all(
        torch.equal(v, student.state_dict()[k]) for k, v in before.items()
    )  # input untouched


def test_the_flow_registers_the_model_before_the_rolled_back_round(
    prefect_server, mlflow_store, monkeypatch
):
    # a params target below the smallest model: pruning rounds run toward it from a 4x larger
    # reduction; the guard is the real one, except that it lets the reduction and round 1 pass
    # and refuses round 2
    real_check = Guard.check

    def check(self, step, predict, params):
        real = real_check(self, step, predict, params)
        return type(real)(real.step, real.params, real.accuracy, real.drop, step != "prune round 2")

    monkeypatch.setattr(Guard, "check", check)
    run = distill_flow(
        CONFIG,
        [
            *FAST,
            "target.params=10",
            "compress.prune.rounds=3",
            "compress.quantize.enabled=false",
            "register.model_name=rolled-back",
            "seed=7",
        ],
    )
    m = run.metrics
    assert m["target/params.prune_round_1"] < m["target/params.reduction"]
    assert m["target/params.prune_round_2"] < m["target/params.prune_round_1"]
    assert m["final/params"] == m["pruned/params"] == m["target/params.prune_round_1"]
    assert m["target_met"] == 0.0 and run.target["met"] is False
    client = MlflowClient()
    stage = client.search_runs(
        [client.get_run(run.run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{run.run_id}' and tags.mlflow.runName = 'target'",
    )
    assert stage[0].data.params["rolled_back"] == "prune round 2"
    # the registered file is round 1's model
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/rolled-back/{run.model_version}"))
    onnx = next(folder.rglob("model.onnx"))
    assert onnx.stat().st_size / 1024 == pytest.approx(m["final/size_kb"])


# --- through the CLI ------------------------------------------------------------------------


def _distill(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return fresh_process(tmp_path, *args, store=f"sqlite:///{tmp_path}/mlflow.db", timeout=600)


def _sets(pairs: list[str]) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


def _registered_file(tmp_path: Path, name: str, version: str) -> Path:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    folder = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{name}/{version}", dst_path=str(tmp_path / "dl")
        )
    )
    return next(folder.rglob("model.onnx"))


@pytest.mark.slow
def test_a_met_size_target_is_met_by_the_registered_file(tmp_path, mlflow_store):
    # the teacher's int8 file is ~14 KB: 8 KB needs a student of about a sixth of its parameters
    proc = _distill(
        [
            "run",
            CONFIG,
            *_sets(
                [
                    *FAST,
                    "target.size_kb=8",
                    "target.max_accuracy_drop=0.5",
                    "register.model_name=small",
                    # int8 whatever its latency: at this size the measured rule's call is a
                    # near-tie that flips between runs (fp32 then: a smaller student, ~4 KB)
                    "compress.quantize.format=int8",
                ]
            ),
            "--json",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["target"]["met"] is True and out["metrics"]["target_met"] == 1.0
    size = _registered_file(tmp_path, "small", out["model_version"]).stat().st_size
    assert size <= 8 * 1024 and size == out["metrics"]["target/achieved"]
    assert out["metrics"]["final/size_kb"] == pytest.approx(size / 1024)
    assert out["metrics"]["final/size_kb"] > 6  # the largest student that fits, not any small one
    tags = MlflowClient().get_model_version("small", out["model_version"]).tags
    assert tags["distill.target_met"] == "true" and tags["distill.target"] == "size_kb=8"


@pytest.mark.slow
def test_the_issues_digits_size_target_is_met_within_a_point(tmp_path, mlflow_store):
    """Issue 28's own case, the default digits config at its defaults: `target.size_kb=30
    target.max_accuracy_drop=0.01` once shipped 31.4 KB, "not met", a pruning round rolled back
    on 2 of 180 validation rows. Met: the registered file within 30 KB, the guard's validation
    rows not showing the drop over the point (measured here: 1.11, one row over it, its 90 %
    interval 0.00..2.22; no larger student fits the limit, so none is built), and within the
    point on the test rows (360: one row is 0.28 points; measured here: 29.7 KB, 0.00)."""
    sets = ["target.size_kb=30", "target.max_accuracy_drop=0.01", "register.model_name=kb30"]
    proc = _distill(["run", CONFIG, *_sets(sets), "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    m = out["metrics"]
    lows = [v for k, v in m.items() if k.startswith("target/val_drop_low.")]  # every step's
    assert out["target"]["met"] is True and lows and max(lows) <= 0.01
    assert m["accuracy_drop"] <= 0.01  # on the test rows
    size = _registered_file(tmp_path, "kb30", out["model_version"]).stat().st_size
    assert size <= 30 * 1024 and m["final/size_kb"] > 20  # near the limit, not any small file


@pytest.mark.slow
def test_an_unreachable_target_registers_the_best_model_tagged_and_promote_refuses_it(
    tmp_path, mlflow_store
):
    # 0.3 KB: less than the weights of a one-unit digits student (85 parameters); 1 KB was
    # unreachable until the traced ONNX graph's smaller overhead put a tiny student at 1,003 B
    proc = _distill(
        ["run", CONFIG, *_sets([*FAST, "target.size_kb=0.3", "register.model_name=tiny"])], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr.splitlines()
    at = [i for i, x in enumerate(err) if x.startswith("target NOT met")]
    assert len(at) == 1 and "size_kb=0.3 ->" in err[at[0]] and "(limit 0.3 KB)" in err[at[0]]
    # the verdict's first clause, wrapped to the 80 columns of a pipe, as one line
    wrapped = itertools.takewhile(lambda x: x.startswith("  "), err[at[0] + 1 :])
    line = [" ".join([err[at[0]], *(x.strip() for x in wrapped)])]
    assert "Traceback" not in proc.stderr
    client = MlflowClient()
    version = client.get_model_version("tiny", "1")
    tags = version.tags
    assert tags["distill.target_met"] == "false" and tags["distill.target"] == "size_kb=0.3"
    assert (
        "KB (limit 0.3 KB)" in tags["distill.target_achieved"]
        and "max 0.0200" in tags["distill.target_accuracy_drop"]
    )
    m = client.get_run(tags["mlflow.run_id"]).data.metrics
    assert m["target_met"] == 0.0 and m["target/achieved"] > m["target/limit"] == pytest.approx(
        0.3 * 1024
    )
    # the best model found: at most the smallest reduction that kept the guard (the start,
    # where the reduce stage built the search's first rebuild below it)
    start = m.get("target/start_params", m["target/reduce_params"])
    assert m["target/final_params"] == m["final/params"] <= start
    assert m["target/pruning_rounds"] >= 1
    # the served model is not shown to lose more than allowed: its interval starts within 0.02
    # (its point estimate may be a row above: the guard does not decide on single rows)
    interval = re.search(r"90% interval (-?[0-9.]+)\.\.(-?[0-9.]+), (\d+) rows", line[0])
    assert interval is not None, line[0]
    low, high = float(interval[1]), float(interval[2])
    assert low <= 0.02 + 1e-9 and low <= m["target/val_accuracy_drop"] <= high

    # promote in this process (its store is this test's): the refusal, then the override
    promote = ["promote", "--model", "tiny", "--set", "promote.max_accuracy_drop=null"]
    refused = CliRunner().invoke(app, promote)
    assert refused.exit_code == 1 and "gate allow_target_missed" in refused.stderr, refused.output
    allowed = CliRunner().invoke(app, [*promote, "--allow-target-missed"])
    assert allowed.exit_code == 0, allowed.output
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == "1"


def test_agreement_rows_are_held_out_of_every_fit_and_bound_the_guards_drop(digits, tmp_path):
    """target.agreement_rows=300: no fit of the student (calibration, KD, the search's rebuilds
    and recovery) sees those training rows; with target.unlabeled's 200 rows, every guard
    decision carries the student's disagreement with the teacher on all 500, and the target's
    record says how many there were."""
    from dataclasses import replace

    from distill.tasks.compress.pipeline import PLAIN_STEPS, Recorder, compress

    np.savez(tmp_path / "u.npz", X=digits.X_test[:200] * digits.scale + digits.mean)
    cfg = build_config(
        {},
        [
            *FAST,
            "target=null",
            "target.max_accuracy_drop=0.02",
            "target.agreement_rows=300",
            f"target.unlabeled=npz:{tmp_path / 'u.npz'}",
            "target.max_builds=2",
        ],
    )
    fits: list[int] = []

    def finetune(teacher, student, data, *rest):
        fits.append(len(data.X_train))
        return PLAIN_STEPS.finetune(teacher, student, data, *rest)

    class Records(Recorder):
        def __init__(self) -> None:
            self.records: dict[str, tuple[dict, dict]] = {}

        def record(self, stage, metrics, params, started):
            self.records[stage] = (metrics, params)

    recorder = Records()
    out = compress(cfg, digits, replace(PLAIN_STEPS, finetune=finetune), recorder)
    assert fits and set(fits) == {len(digits.X_train) - 300}, fits
    metrics, params = recorder.records["target"]
    assert params["guard_agreement_rows"] == 500
    highs = {k: v for k, v in metrics.items() if k.startswith("disagreement_high.")}
    assert highs and all(0 < v < 1 for v in highs.values())
    checks = out.target.fitted.checks
    assert all(c.decision is not None and c.decision.agreement.rows == 500 for c in checks)
    assert "held-out rows" in out.target.line, out.target.line


def test_the_plan_does_not_plan_int8_where_the_teachers_own_int8_breaks(digits, monkeypatch):
    """A teacher whose classes differ by less than an int8 step (the last layer's rows equal up
    to 1e-4 of a range of 10): its int8 export answers one class. The per-layer fallback leaves
    that layer in fp32 and restores it, so int8 stays planned; where no fallback restores it,
    the plan's costs leave int8 out and say why. A plain MLP keeps both formats."""
    from distill.tasks.compress import plan
    from distill.tasks.compress.plan import int8_breaks, measure_costs

    torch.manual_seed(0)
    plain = build_mlp(64, [32], 10).eval()
    broken = copy.deepcopy(plain)
    with torch.no_grad():
        last = broken[-1]
        last.weight.copy_(10.0 + 1e-4 * torch.randn_like(last.weight))
        last.bias.zero_()
    cfg = QuantizeConfig()
    X = digits.X_train
    assert int8_breaks(broken, X, cfg, seed=0) == ""  # the head left in fp32 answers as fp32
    assert int8_breaks(plain, X, cfg, seed=0) == ""
    monkeypatch.setattr(plan, "agreeing_int8", lambda *_: None)  # no fallback restores it
    why = int8_breaks(broken, X, cfg, seed=0)
    assert why.startswith("the teacher's int8 answers as its fp32 export on only "), why
    assert "1,024 training rows (compress.quantize.min_agreement 0.95), nor with" in why
    assert int8_breaks(broken, X, cfg.model_copy(update={"min_agreement": 0.0}), seed=0) == ""
    monkeypatch.setattr(quantize, "agreeing_int8", lambda *_: None)
    assert set(measure_costs(broken, X, cfg, seed=0, latency_repeats=3)) == {"fp32"}


def test_the_teachers_int8_counts_as_broken_only_where_the_rows_show_it(digits, monkeypatch):
    """94.9 % of 512 rows (the targets grid's ResNet1d once) is not shown below the 95 % rule
    at 99 %: int8 stays in the plan; 90 % of 512 is (where no per-layer fallback restores it)."""
    from distill.tasks.compress import plan

    teacher, X = build_mlp(64, [16], 10).eval(), digits.X_train[:512]
    monkeypatch.setattr(plan, "agreeing_int8", lambda *_: None)
    monkeypatch.setattr(plan, "agreement", lambda *_: 486 / 512)  # 94.9 %
    assert plan.int8_breaks(teacher, X, QuantizeConfig(), seed=0) == ""
    monkeypatch.setattr(plan, "agreement", lambda *_: 461 / 512)  # 90.0 %
    assert "on only 90.0 % of 512 training rows" in plan.int8_breaks(
        teacher, X, QuantizeConfig(), seed=0
    )


def test_the_plan_counts_on_int8_only_where_it_would_ship():
    """int8 is planned where the quantize stage's rule (smaller and no slower) ships it on one
    of the narrowed copies the costs measured, and never under format=fp32; a pinned int8 is
    planned whatever the latency said."""
    from types import SimpleNamespace

    from distill.tasks.compress.plan import unplanned_int8
    from distill.tasks.compress.quantize import Choice, Measured

    def copy_with(int8_bytes: int, slower: int) -> SimpleNamespace:
        """fp32 4,000 B, 1 ms; int8 slower by its median in `slower` of 20 paired calls."""
        ms = 1.5 if slower > 10 else 1.0
        choice = Choice(256, Measured(4000, 1.0), Measured(int8_bytes, ms), (slower, 20))
        return SimpleNamespace(choice=choice)

    teacher, X = build_mlp(8, [4], 3).eval(), np.zeros((4, 8), np.float32)
    larger = {0.0: copy_with(6000, 0), 0.5: copy_with(5000, 0)}  # int8's fixed cost dominates
    slower = {0.0: copy_with(3000, 20), 0.5: copy_with(2000, 20)}  # every pair: int8 slower
    ships = {0.0: copy_with(6000, 0), 0.5: copy_with(2000, 3)}
    cfg = QuantizeConfig(min_agreement=0.0)  # the teacher's own int8 is not asked here
    for made in (larger, slower):
        why = unplanned_int8(teacher, X, cfg, 0, made)
        assert why.startswith("int8 would ship on none of the narrowed copies measured"), why
        assert unplanned_int8(teacher, X, cfg.model_copy(update={"format": "int8"}), 0, made) == ""
    assert unplanned_int8(teacher, X, cfg, 0, ships) == ""
    fp32 = cfg.model_copy(update={"format": "fp32"})
    assert unplanned_int8(teacher, X, fp32, 0, ships) == "compress.quantize.format=fp32"


def test_a_narrowed_copy_is_found_at_about_the_parameters_asked(digits):
    from distill.tasks.compress.plan import narrowed_to

    teacher = build_mlp(64, [128, 64], 10).eval()
    example = torch.from_numpy(digits.X_train[:2])
    full = sum(p.numel() for p in teacher.parameters())
    for want in (full // 3, full // 10):
        got = sum(p.numel() for p in narrowed_to(teacher, example, want).parameters())
        assert 0.9 * want <= got <= want, (want, got)


def _teacher_and_costs(fp32_ms: float) -> tuple[torch.nn.Module, dict[str, Costs]]:
    """A small MLP teacher and the costs its plan reads: int8 files far smaller than fp32's, both
    0.01 ms at 100 params; at 4,000, int8 0.02 ms and fp32 `fp32_ms`."""
    return build_mlp(64, [64], 10).eval(), {
        "fp32": Costs((100, 4_000), (2_000, 18_000), (0.01, fp32_ms), "onnxruntime fp32"),
        "int8": Costs((100, 4_000), (3_000, 7_000), (0.01, 0.02), "onnxruntime int8"),
    }


def test_the_plan_leaves_int8_out_where_it_would_not_ship_at_the_planned_size(digits, monkeypatch):
    """int8 planned from the costs' copies (it ships at half width) is checked on a copy of the
    planned size; where it would not ship there (a CNN's static int8, 5x slower at a few
    thousand params), the plan is made again in fp32 and says why."""
    from distill.tasks.compress import plan

    teacher, costs = _teacher_and_costs(fp32_ms=0.02)
    monkeypatch.setattr(plan, "measure_costs", lambda *a, **k: dict(costs))
    asked = []

    def slower(teacher_, X, cfg, seed, params):
        asked.append(params)
        return f"at {params:,} params fp32 ships, int8 is slower: measured"

    monkeypatch.setattr(plan, "int8_ships_at", slower)
    target = TargetConfig(size_kb=6.0)
    args = (ReduceConfig(), ReconstructConfig(), QuantizeConfig(), 0, 3)
    made, left, _ = plan.plan_for_target(teacher, digits, target, *args)
    assert asked and made.fmt == "fp32" and set(left) == {"fp32"}
    assert f"int8 left out: at {asked[0]:,} params fp32 ships, int8 is slower" in made.why
    monkeypatch.setattr(plan, "int8_ships_at", lambda *a: "")
    made, left, _ = plan.plan_for_target(teacher, digits, target, *args)
    assert made.fmt == "int8" and set(left) == {"fp32", "int8"}


def test_a_latency_target_decides_its_format_at_batch_1(digits, monkeypatch):
    """A batch-1 latency target asks whether int8 is no slower at batch 1, not at the configured
    `compress.quantize.batch`: the plan's costs and its int8 check, and the fit's exports
    (`Search.planned_quantize`), are made at batch 1; a size target keeps the batch."""
    from distill.tasks.compress import plan

    teacher, costs = _teacher_and_costs(fp32_ms=0.03)
    batches: list[tuple[str, int]] = []
    monkeypatch.setattr(
        plan,
        "measure_costs",
        lambda t, X, cfg, *a, **k: batches.append(("costs", cfg.batch)) or dict(costs),
    )
    monkeypatch.setattr(
        plan, "int8_ships_at", lambda t, X, cfg, *a: batches.append(("int8", cfg.batch)) or ""
    )
    monkeypatch.setattr(plan, "shaped", lambda p, *a, **k: p)  # a size plan's reconstructions
    args = (ReduceConfig(), ReconstructConfig(), QuantizeConfig(batch=256), 0, 3)
    made, _, _ = plan.plan_for_target(teacher, digits, TargetConfig(latency_ms_b1=0.015), *args)
    assert made.fmt == "int8" and batches == [("costs", 1), ("int8", 1)]
    cfg = PipelineConfig()
    search = Search(
        teacher, digits, made, costs, None, cfg.compress.prune, cfg.finetune,
        QuantizeConfig(batch=256), seed=0,
    )  # fmt: skip
    assert (search.planned_quantize.batch, search.planned_quantize.enabled) == (1, True)
    batches.clear()
    sized, _, _ = plan.plan_for_target(teacher, digits, TargetConfig(size_kb=6.0), *args)
    assert batches == [("costs", 256), ("int8", 256)]
    assert replace(search, plan=sized).planned_quantize.batch == 256


def test_a_widened_plan_is_shaped_as_any_size_plan(digits, monkeypatch):
    """A widened plan's student is built at twice the budget `shaped` corrects, and still needs
    it: with one reconstruction instead of up to three, the BERT's 30x target's line (one int8
    point, the costs' slope) put its budget at 6,234 params, a student that broke the guard,
    where three found 24,435. The same tries, the budget doubled after."""
    from distill.tasks.compress import plan

    teacher, costs = _teacher_and_costs(fp32_ms=0.02)
    monkeypatch.setattr(plan, "measure_costs", lambda *a, **k: dict(costs))
    monkeypatch.setattr(plan, "int8_ships_at", lambda *a: "")
    tries: list[int] = []
    monkeypatch.setattr(plan, "shaped", lambda p, c, m, n=plan.SHAPE_TRIES: tries.append(n) or p)
    args = (ReduceConfig(), ReconstructConfig(), QuantizeConfig(), 0, 3)
    once, _, _ = plan.plan_for_target(teacher, digits, TargetConfig(size_kb=3.5), *args)
    wide, _, _ = plan.plan_for_target(teacher, digits, TargetConfig(size_kb=3.5, widen=2), *args)
    assert tries == [plan.SHAPE_TRIES] * 2 and (once.widen, wide.widen) == (1, 2)
    assert wide.reduce_params == 2 * once.reduce_params and "target.widen" in wide.why

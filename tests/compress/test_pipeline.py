"""The pipeline as one plain function (tasks/compress/pipeline.py): each stage's model and its
metrics come back, a recorder hears of the stages in order, and a replaced step is the one run."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from distill.tasks.compress.evaluate import evaluate_model
from distill.tasks.compress.finetune import History
from distill.tasks.compress.pipeline import PLAIN_STEPS, STAGES, Recorder, Steps, compress
from distill.tasks.platform.config import build_config
from distill.tasks.platform.errors import UserError
from tests.conftest import TINY


class Log(Recorder):
    """Writes down what it is told, in order; measures each stage twice, as a recorder retrying
    a failed write does."""

    def __init__(self):
        self.events: list[tuple[str, str]] = []

    def stage(self, result, measure):
        measure()
        metrics = super().stage(result, measure)  # measures again, adds `seconds`
        self.events.append(("stage", result.name))
        return metrics | {"recorded": 1.0}

    def record(self, stage, metrics, params, started):
        self.events.append(("record", stage))

    def plots(self, stages, *figure_inputs):
        self.events.append(("plots", ",".join(stages)))


def counted(calls: list[str]) -> Steps:
    """The plain steps, each call's step name appended to `calls`."""

    def wrap(name, fn):
        def step(*args):
            calls.append(name)
            return fn(*args)

        return step

    return Steps(
        **{f.name: wrap(f.name, getattr(PLAIN_STEPS, f.name)) for f in dataclasses.fields(Steps)}
    )


@pytest.fixture(scope="module")
def tiny(digits):
    cfg = build_config({}, [*TINY, "evaluate.plots=true"])  # the recorder's hook draws nothing
    calls: list[str] = []
    log = Log()
    return cfg, compress(cfg, digits, counted(calls), log), log, calls


def test_each_stage_returns_its_model_and_the_metrics_of_that_model(tiny, digits):
    cfg, out, _, _ = tiny
    assert list(out.stages) == list(STAGES)
    models = {
        "teacher": out.teacher,
        "reconstructed": out.reconstructed,
        "finetuned": out.finetuned,
        "pruned": out.pruned,
        "quantized": out.quantized.served,
    }
    for stage, model in models.items():
        again = evaluate_model(model, digits, None, cfg.evaluate)
        for key in ("accuracy", "params", "size_kb"):
            assert out.stages[stage][key] == pytest.approx(again[key]), (stage, key)
        assert out.stages[stage]["seconds"] >= 0
    # fine-tuning trained a copy: the reconstructed student is still the one reconstruction made
    assert any(
        not torch.equal(a, b)
        for a, b in zip(
            out.reconstructed.state_dict().values(),
            out.finetuned.state_dict().values(),
            strict=True,
        )
    )
    assert out.stages["pruned"]["params"] < out.stages["finetuned"]["params"]  # structured: 30 %
    assert out.reduction.budget_kind == "size_kb" and out.reduction.budget_value == 12
    assert out.curves["finetuned"]["best_epoch"] == [out.curves["finetuned"]["best_epoch"][0]]
    assert len(out.curves["teacher"]["train_loss"]) == 8  # teacher.epochs
    assert out.summary["final/accuracy"] == out.stages["quantized"]["accuracy"]
    assert out.summary["final/size_kb"] < out.stages["pruned"]["size_kb"]  # int8
    assert "final/seconds" not in out.summary and out.target is None


def test_a_recorder_hears_of_the_stages_in_order_and_its_metrics_are_returned(tiny):
    _, out, log, calls = tiny
    assert log.events == [
        ("stage", "teacher"),
        ("record", "reduce"),
        ("stage", "reconstructed"),
        ("stage", "finetuned"),
        ("stage", "pruned"),
        ("stage", "quantized"),
        ("plots", ",".join(STAGES)),
    ]
    assert all(m["recorded"] == 1.0 for m in out.stages.values())
    # measuring a stage again (a retried write) evaluates again and never re-runs the stage's work
    assert [c for c in calls if c != "evaluate"] == [
        "teacher",
        "reduce",
        "reconstruct",
        "finetune",
        "prune",
        "quantize",
    ]
    assert calls.count("evaluate") == 2 * len(STAGES)


def test_a_replaced_step_is_the_one_that_runs(tiny, digits):
    cfg, first, _, _ = tiny
    cfg = build_config({}, TINY)

    def given_teacher(*args):  # no training: the teacher of the first run
        return first.teacher, History()

    def no_pruning(teacher, student, *args):
        return copy.deepcopy(student), History()

    steps = dataclasses.replace(PLAIN_STEPS, teacher=given_teacher, prune=no_pruning)
    out = compress(cfg, digits, steps)
    assert out.teacher is first.teacher and out.curves["teacher"]["train_loss"] == []
    assert out.stages["teacher"]["accuracy"] == first.stages["teacher"]["accuracy"]
    assert out.stages["pruned"]["params"] == out.stages["finetuned"]["params"]
    assert out.stages["pruned"]["params"] > first.stages["pruned"]["params"]


def test_a_nan_model_stops_the_pipeline_before_its_recorder_writes_it(tiny, digits):
    _, first, _, _ = tiny

    def diverged(teacher, student, *args):
        broken = copy.deepcopy(student)
        with torch.no_grad():
            next(broken.parameters()).fill_(np.nan)
        return broken, History()

    log = Log()
    steps = dataclasses.replace(
        PLAIN_STEPS, teacher=lambda *args: (first.teacher, History()), finetune=diverged
    )
    with pytest.raises(UserError, match="finetuned"):
        compress(build_config({}, TINY), digits, steps, log)
    assert log.events == [("stage", "teacher"), ("record", "reduce"), ("stage", "reconstructed")]


def test_a_target_plans_the_stages_and_its_outcome_comes_back(digits):
    cfg = build_config(
        {},
        [
            *(o for o in TINY if not o.startswith(("target", "reduce.budget"))),
            "target.size_kb=8",
            "target.max_accuracy_drop=0.5",
            "evaluate.plots=false",
        ],
    )
    log = Log()
    out = compress(cfg, digits, recorder=log)
    assert log.events == [
        ("stage", "teacher"),
        ("record", "reduce"),
        ("stage", "reconstructed"),
        ("stage", "finetuned"),
        ("record", "target"),
        ("stage", "pruned"),
        ("stage", "quantized"),
    ]
    assert out.target is not None and out.target.met
    assert out.summary["target_met"] == 1.0 and out.target.line.startswith("target met")
    assert out.target.tags["distill.target"] == "size_kb=8"
    assert out.reduction.budget_kind == "params"  # the plan chose the reduce budget
    assert out.stages["quantized"]["size_kb"] <= 8
    assert out.quantized is out.target.fitted.quantized

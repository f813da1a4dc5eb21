"""One error path for every stage (tasks/compress/failures.py), and NaN or inf caught where it
starts (tasks/compress/finite.py): in a KD epoch's batch, in an evaluation's row."""

from __future__ import annotations

import dataclasses
import errno
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from distill.tasks.compress.evaluate import evaluate_model
from distill.tasks.compress.failures import StageGuard
from distill.tasks.compress.finetune import FitSettings, fit
from distill.tasks.compress.finite import NonFinite
from distill.tasks.compress.pipeline import PLAIN_STEPS, Recorder, compress
from distill.tasks.platform.config import EvaluateConfig, build_config
from distill.tasks.platform.errors import StageFailed, UserError
from tests.conftest import TINY


class Notes(Recorder):
    def __init__(self) -> None:
        self.failures: list[tuple[str, str, str]] = []

    def failed(self, stage: str, line: str, trace: str, started: float | None) -> None:
        self.failures.append((stage, line, trace))


class Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Boom()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def _model() -> nn.Module:
    return nn.Sequential(OrderedDict(input=nn.Identity(), model=Block()))


def test_any_exception_becomes_one_line_naming_module_and_model():
    notes, model = Notes(), _model()
    guard = StageGuard(notes)
    with pytest.raises(StageFailed) as failed, guard("reconstruct"):
        model(torch.zeros(1, 2))
    line = (
        "stage reconstruct: RuntimeError: boom in model.inner (Boom) of the student "
        "(config key 'reconstruct.mode')"
    )
    assert failed.value.line == line and failed.value.stage == "reconstruct"
    assert isinstance(failed.value.__cause__, RuntimeError)
    [(stage, recorded, trace)] = notes.failures
    assert (stage, recorded) == ("reconstruct", line)
    assert "Traceback" in trace and 'raise RuntimeError("boom")' in trace

    guard.teacher = model  # the same module called as the teacher
    guard.alternative = lambda stage: "reconstruct.mode=low_rank"
    with pytest.raises(StageFailed) as failed, guard("reduce"):
        model(torch.zeros(1, 2))
    assert failed.value.line == (
        "stage reduce: RuntimeError: boom in model.inner (Boom) of the teacher (config key "
        "'reconstruct.mode'); reconstruct.mode=low_rank handles this model (pre-flight on 2 rows)"
    )


def test_user_errors_and_faults_go_on_as_they_are_but_are_recorded():
    notes = Notes()
    guard = StageGuard(notes)
    bad = UserError("config key 'reduce.budget.size_kb': too small")
    with pytest.raises(UserError) as raised, guard("reduce"):
        raise bad
    assert raised.value is bad
    full = OSError(errno.ENOSPC, "No space left on device", "/tmp/x")
    with pytest.raises(OSError) as raised, guard("quantize"):
        raise full
    assert raised.value is full
    assert [(s, line) for s, line, _ in notes.failures] == [
        ("reduce", str(bad)),
        ("quantize", "cannot write /tmp/x: No space left on device"),
    ]


def test_non_finite_outputs_get_the_stage_and_the_model():
    guard = StageGuard(Notes())
    with pytest.raises(UserError) as raised, guard("finetune"):
        raise NonFinite("epoch 3, batch 12", None, "it starts in body.0 (Linear)")
    assert str(raised.value) == (
        "stage finetune, epoch 3, batch 12: the student's outputs hold NaN or inf; it starts in "
        "body.0 (Linear); the run stops before registration"
    )


def test_a_recorder_that_cannot_write_does_not_hide_the_error():
    class Broken(Recorder):
        def failed(self, *args: object) -> None:
            raise ConnectionError("tracking server gone")

    with (
        pytest.raises(StageFailed, match="stage prune: RuntimeError: boom"),
        StageGuard(Broken())("prune"),
    ):
        raise RuntimeError("boom")


# --- NaN or inf where it starts ----------------------------------------------------------------


class NaNFrom(nn.Module):
    """Finite until its `start`-th call, NaN from then on."""

    def __init__(self, start: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
        self.start, self.calls = start, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.body(x)
        return out * float("nan") if self.calls >= self.start else out


def _settings(**changes: object) -> FitSettings:
    return FitSettings(**{"epochs": 2, "lr": 1e-3, "batch_size": 64, "patience": 5, **changes})


def test_a_training_batch_gone_nan_names_epoch_batch_and_model(digits):
    with pytest.raises(NonFinite) as raised:
        fit(NaNFrom(start=25), digits, _settings(), role="the teacher", lr_key="teacher.lr")
    batches = -(-len(digits.y_train) // 64)  # then one validation pass per epoch
    assert raised.value.where == f"epoch 2, batch {25 - batches - 1}"
    assert raised.value.model == "the teacher"
    assert raised.value.detail == "it starts in NaNFrom"  # its weights are finite: its forward


def test_a_diverging_student_points_to_the_learning_rate(digits):
    student = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with pytest.raises(NonFinite) as raised:
        fit(student, digits, _settings(lr=1e30))
    assert raised.value.where.startswith("epoch 1, batch ")
    assert raised.value.model == "the student"
    assert raised.value.detail.endswith("(finetune.lr too high?)"), raised.value.detail


def test_the_teachers_outputs_are_checked_before_the_first_epoch(digits):
    student = nn.Sequential(nn.Linear(64, 10))
    with pytest.raises(NonFinite) as raised:
        fit(student, digits, _settings(), teacher=NaNFrom(start=1))
    assert (raised.value.where, raised.value.model) == ("training row 0", "the teacher")


def test_evaluation_names_the_first_row(digits):
    class RowFive(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(len(x), 10)
            hit = (x == torch.from_numpy(digits.X_test[5])).all(1)
            out[hit] = float("inf")
            return out

    with pytest.raises(NonFinite) as raised:
        evaluate_model(RowFive(), digits, None, EvaluateConfig(latency_repeats=1, large_batch=8))
    assert (
        raised.value.where
        == f"test row {int(np.flatnonzero((digits.X_test == digits.X_test[5]).all(1))[0])}"
    )


def test_compress_stops_at_the_failing_stage_and_tells_the_recorder(digits):
    def broken_reduce(*args: object, **kwargs: object) -> None:
        raise KeyError("no such layer")

    notes = Notes()
    steps = dataclasses.replace(PLAIN_STEPS, reduce=broken_reduce)
    with pytest.raises(StageFailed) as failed:
        compress(build_config({}, TINY), digits, steps, notes)
    assert failed.value.line == (
        "stage reduce: KeyError: 'no such layer' (config key 'reconstruct.mode'); "
        "reconstruct.mode=low_rank handles this model (pre-flight on 2 rows)"
    )
    assert [stage for stage, _, _ in notes.failures] == ["reduce"]

"""Failures inside the pipeline, through `distill run` as a user meets them: one line on stderr
and no traceback (Prefect's log of the failed task run included), the exit code of its kind, the
parent run and the failed stage run FAILED in MLflow with the line as their description and the
full trace in `error.txt`, nothing registered; and a model the configured mode cannot handle
stopped by the pre-flight in seconds, before Prefect or MLflow start."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from distill.flows.cli import app
from tests.conftest import ROOT, TINY, child_runs, fresh_process

CONFIG = str(ROOT / "configs" / "digits.yaml")
MODULE_ARCH = [s for s in TINY if not s.startswith("teacher.hidden")]  # an mlp-only key

# a user's model that fails on purpose, counting this instance's forward calls: the teacher the
# flow trains is built fresh (its calls start at 1), and TINY trains it for 8 epochs of about 21
FAULTY = """
from torch import nn


class Faulty(nn.Module):
    def __init__(self, raise_on_call=0, nan_from_call=0):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.raise_on_call, self.nan_from_call, self.calls = raise_on_call, nan_from_call, 0

    def forward(self, x):
        self.calls += 1
        if self.raise_on_call and self.calls >= self.raise_on_call:
            raise RuntimeError(f"injected fault on call {self.calls}")
        out = self.body(x)
        return out * float("nan") if self.nan_from_call and self.calls >= self.nan_from_call else out
"""


def _sets(*extra: str) -> list[str]:
    return [a for s in [*MODULE_ARCH, *extra] for a in ("--set", s)]


def _faulty_run(tmp_path: Path, store: str, init_args: str, *flags: str):
    (tmp_path / "faulty.py").write_text(FAULTY)
    sets = _sets("teacher.arch=faulty:Faulty", f"teacher.init_args={init_args}")
    return fresh_process(tmp_path, "run", CONFIG, *sets, *flags, store=store)


def _only_distill_lines(stderr: str) -> None:
    """Nothing on stderr but distill's own lines: progress, then the one error line."""
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in stderr, stderr
    assert all(line.startswith("distill: ") for line in lines[:-1]), stderr


def _failed_runs(store: str, stage: str, line: str) -> None:
    client = MlflowClient(store, registry_uri=store)
    experiment = client.get_experiment_by_name("distill")
    [parent] = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`distill.stage` IS NULL"
    )
    assert parent.info.status == "FAILED"
    assert parent.data.tags["mlflow.note.content"] == line
    failed = [r for r in child_runs(client, parent.info.run_id) if r.info.status == "FAILED"]
    assert [r.data.tags["distill.stage"] for r in failed] == [stage]
    assert failed[0].data.tags["mlflow.note.content"] == line
    for run in (parent, failed[0]):
        assert "error.txt" in [a.path for a in client.list_artifacts(run.info.run_id)]
        text = Path(client.download_artifacts(run.info.run_id, "error.txt")).read_text()
        assert text.startswith(line + "\n") and "Traceback (most recent call last)" in text
    assert client.search_registered_models() == []


@pytest.mark.slow
def test_a_teacher_that_raises_mid_stage(prefect_server, mlflow_store, tmp_path):
    proc = _faulty_run(tmp_path, mlflow_store, '{"raise_on_call": 30}')
    line = (
        "stage teacher: RuntimeError: injected fault on call 30 in Faulty of the teacher "
        "(config key 'teacher.arch')"
    )
    assert proc.returncode == 4, proc.stderr[-3000:]
    _only_distill_lines(proc.stderr)
    assert proc.stderr.strip().splitlines()[-1] == f"error: {line}"
    _failed_runs(mlflow_store, "teacher", line)


@pytest.mark.slow
def test_a_teacher_gone_nan_mid_epoch(prefect_server, mlflow_store, tmp_path):
    proc = _faulty_run(tmp_path, mlflow_store, '{"nan_from_call": 30}')
    assert proc.returncode == 2, proc.stderr[-3000:]
    _only_distill_lines(proc.stderr)
    line = proc.stderr.strip().splitlines()[-1].removeprefix("error: ")
    assert re.fullmatch(
        r"stage teacher, epoch 2, batch \d+: the teacher's outputs hold NaN or inf; it starts in "
        r"Faulty; the run stops before registration",
        line,
    ), line
    _failed_runs(mlflow_store, "teacher", line)


def test_debug_prints_the_trace(prefect_server, mlflow_store, tmp_path, monkeypatch):
    (tmp_path / "faulty_debug.py").write_text(FAULTY)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = _sets("teacher.arch=faulty_debug:Faulty", 'teacher.init_args={"raise_on_call": 30}')
    result = CliRunner().invoke(app, ["run", CONFIG, *args, "--debug"])
    assert result.exit_code == 4, result.output
    assert "Traceback (most recent call last)" in result.stderr
    assert 'raise RuntimeError(f"injected fault on call {self.calls}")' in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: stage teacher: RuntimeError")


def test_hand_written_attention_fails_in_seconds_before_any_stage(tmp_path, monkeypatch):
    """Before: the teacher trained, then the reduce stage failed with an IndexError traceback
    (54 s with TINY on this machine). Now: the pre-flight, in the CLI's own process."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    sets = _sets("teacher.arch=tests.zoo:HeadsAttentionNet", "data.shape=[8, 8]")
    start = time.monotonic()
    proc = fresh_process(tmp_path, "run", CONFIG, *sets, store=f"sqlite:///{tmp_path}/mlflow.db")
    took = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip()
    assert line.startswith(
        "error: pre-flight: reconstruct.mode=width cannot narrow model.attn (HeadsAttention): "
        "with model.attn.qkv narrowed, its forward reshapes to a fixed shape (shape "
        "'[2, 8, 3, 4, 8]' is invalid for input of size "  # how many units are left varies
    ), line
    assert line.endswith(
        "); reconstruct.mode=low_rank and compress.prune.method=unstructured handle it"
    ), line
    assert "\n" not in line
    assert not (tmp_path / "prefect" / "prefect.db").exists()  # no server started
    assert not (tmp_path / "mlflow.db").exists()  # no run recorded
    assert took < 60, took  # imports and the data: about 6 s on an idle machine


@pytest.mark.parametrize("flag", ["--help"])
def test_help_documents_the_exit_codes(flag):
    result = CliRunner().invoke(app, ["run", flag], terminal_width=200)
    text = " ".join(result.output.split())
    for code in ("0 done", "1 promotion refused", "2 bad input", "3 a fault", "4 a stage failed"):
        assert code in text, result.output

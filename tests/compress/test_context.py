"""A run's context (tasks/compress/context.py): the dataset prepared and the pre-flight flown once
per run, and nothing remembered in the process from one run to the next."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from distill.flows.cli import app
from distill.tasks.compress import context as context_module
from distill.tasks.compress.context import RunContext
from distill.tasks.compress.data import load_dataset
from distill.tasks.platform.config import DataConfig, build_config
from tests.conftest import ROOT, TINY


def _table(path, seed: int) -> DataConfig:
    X = np.random.default_rng(seed).normal(size=(120, 4))
    pd.DataFrame(X, columns=list("abcd")).assign(label=(X[:, 0] > 0).astype(int)).to_csv(
        path, index=False
    )
    return DataConfig(source=f"csv:{path}", label="label")


def test_a_run_prepares_its_data_once_and_the_next_run_anew(tmp_path):
    cfg = _table(tmp_path / "t.csv", 0)
    run = RunContext()
    first = run.dataset(cfg, 0)
    assert run.dataset(cfg, 0) is first
    assert run.dataset(cfg, 1) is not first  # another seed: another split
    # two runs in one process, the second on other rows at the same path: nothing of the first
    other = _table(tmp_path / "t.csv", 1)
    second = RunContext().dataset(other, 0)
    assert second.digest != first.digest
    assert not np.array_equal(second.X_train, first.X_train)
    assert run.dataset(cfg, 0) is not first  # the file changed under the run: read again
    assert load_dataset(cfg, 0) is not load_dataset(cfg, 0)  # no module-level memo


def test_a_failed_pre_flight_is_not_kept(digits, monkeypatch):
    calls = []

    def fails(cfg, data, config_dir=None):
        calls.append(cfg.digest())
        raise RuntimeError("broken")

    monkeypatch.setattr(context_module, "preflight_config", fails)
    run, cfg = RunContext(), build_config({}, TINY)
    for _ in range(2):
        with pytest.raises(RuntimeError):
            run.preflight(cfg, digits)
    assert len(calls) == 2


def test_a_context_pickles_empty(digits):
    """A sweep's Dask worker gets the context as a parameter: it prepares its own there."""
    run = RunContext()
    run.dataset(DataConfig(), 0)
    back = pickle.loads(pickle.dumps(run))
    assert isinstance(back, RunContext) and back.dataset(DataConfig(), 0) is not run.dataset(
        DataConfig(), 0
    )


def test_distill_run_prepares_the_data_and_flies_the_pre_flight_once(
    prefect_server, mlflow_store, monkeypatch
):
    """The CLI checks the inputs, then the flow run's name, the flow and `compress` ask again:
    one config parse, one dataset and one pre-flight per run."""
    parsed, prepared, flown = [], [], []
    read, load, fly = (
        context_module.load_config,
        context_module.load_dataset,
        context_module.preflight_config,
    )
    monkeypatch.setattr(context_module, "load_config", lambda *a: parsed.append(a) or read(*a))
    monkeypatch.setattr(context_module, "load_dataset", lambda *a: prepared.append(a) or load(*a))
    monkeypatch.setattr(context_module, "preflight_config", lambda *a: flown.append(a) or fly(*a))
    sets = [a for s in [*TINY, "register.enabled=false"] for a in ("--set", s)]
    result = CliRunner().invoke(app, ["run", str(ROOT / "configs" / "digits.yaml"), *sets])
    assert result.exit_code == 0, result.output
    assert len(parsed) == 1 and len(prepared) == 1 and len(flown) == 1, (parsed, prepared, flown)


def test_a_run_parses_its_config_once_while_the_file_is_unchanged(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\n")
    run = RunContext()
    first = run.config(path, ["finetune.epochs=2"])
    assert first.seed == 3 and first.finetune.epochs == 2
    assert run.config(str(path), ["finetune.epochs=2"]) is first  # str or Path: one file
    assert run.config(path, ["finetune.epochs=3"]).finetune.epochs == 3  # other overrides
    path.write_text("seed: 4\n# a longer file: another size\n")
    assert run.config(path, ["finetune.epochs=2"]).seed == 4  # changed under the run: re-read
    assert RunContext().config(path, ["finetune.epochs=2"]) is not first

"""Large tables streamed from disk (tasks/compress/stream.py, rows.py) give exactly the rows, the
labels, the standardization and the digest of the in-memory path, and the training loop gives
the same model from either."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill.tasks.compress import data as D
from distill.tasks.compress import sources as S
from distill.tasks.compress import stream
from distill.tasks.compress.rows import Rows
from distill.tasks.platform.config import DataConfig
from distill.tasks.platform.errors import UserError


@pytest.fixture(autouse=True)
def small_blocks(tmp_path, monkeypatch):
    """Blocks of 64 rows, so that a few hundred rows cross many blocks and row groups."""
    monkeypatch.setenv("DISTILL_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(stream, "CHUNK_ROWS", 64)


def _table(n: int = 500, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({f"f{i}": rng.normal(size=n) * (i + 1) + i for i in range(4)})
    frame["colour"] = rng.choice(["red", "green", "blue"], n)
    frame.loc[rng.choice(n, 20, replace=False), "f1"] = np.nan
    frame.loc[rng.choice(n, 10, replace=False), "colour"] = None
    frame["label"] = rng.choice(["x", "y", "z"], n)
    return frame


def _parquet(frame: pd.DataFrame, path, row_group_size: int = 100) -> str:
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, row_group_size=100)
    assert pq.ParquetFile(path).num_row_groups > 1
    return str(path)


def _both(cfg: DataConfig) -> tuple[D.Dataset, D.Dataset]:
    memory = D.prepare(S.read_source(cfg.source, cfg.label, cfg.split_column), cfg, 0)
    return memory, stream.prepare_streamed(cfg, 0)


def _same(memory: D.Dataset, streamed: D.Dataset) -> None:
    for part in S.SPLITS:
        rows = getattr(streamed, f"X_{part}")
        assert isinstance(rows, Rows)
        assert np.array_equal(getattr(memory, f"X_{part}"), rows[:]), part
        assert np.array_equal(getattr(memory, f"y_{part}"), getattr(streamed, f"y_{part}"))
    assert np.array_equal(memory.mean, streamed.mean)
    assert np.array_equal(memory.scale, streamed.scale)
    assert memory.digest == streamed.digest and memory.user_split == streamed.user_split
    assert memory.encoding == streamed.encoding and memory.classes == streamed.classes
    assert memory.input_shape == streamed.input_shape
    assert memory.feature_names == streamed.feature_names


@pytest.mark.parametrize("split_column", [None, "part"])
def test_streamed_parquet_is_the_in_memory_table(tmp_path, split_column):
    frame = _table()
    if split_column:
        frame[split_column] = np.array(["train"] * 350 + ["val"] * 50 + ["test"] * 100)
    path = _parquet(frame, tmp_path / "t.parquet")
    cfg = DataConfig(source=f"parquet:{path}", label="label", split_column=split_column)
    memory, streamed = _both(cfg)
    _same(memory, streamed)
    pd.testing.assert_frame_equal(memory.raw_rows("test", 7), streamed.raw_rows("test", 7))
    pd.testing.assert_frame_equal(memory.raw_frame(5), streamed.raw_frame(5))
    again = stream.prepare_streamed(cfg, 0)  # read back from the conversion, not converted again
    assert again.X_train.content_key() == streamed.X_train.content_key()


@pytest.mark.parametrize("split", [False, True])
def test_streamed_npz_is_the_in_memory_table(tmp_path, split):
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(400, 2, 3)) * 5 + 1, rng.integers(0, 3, 400)
    path = tmp_path / "t.npz"
    if split:
        np.savez(path, X_train=X[:300], y_train=y[:300], X_test=X[300:], y_test=y[300:])
    else:
        np.savez(path, X=X, y=y)
    memory, streamed = _both(DataConfig(source=f"npz:{path}"))
    _same(memory, streamed)
    assert streamed.input_shape == (2, 3)


def test_large_splits_merge_block_moments(tmp_path, monkeypatch):
    """Beyond EXACT_STATS_ROWS the moments of blocks are merged: equal to float rounding."""
    monkeypatch.setattr(stream, "EXACT_STATS_ROWS", 10)
    path = _parquet(_table(), tmp_path / "t.parquet")
    memory, streamed = _both(DataConfig(source=f"parquet:{path}", label="label"))
    np.testing.assert_allclose(memory.mean, streamed.mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(memory.scale, streamed.scale, rtol=1e-6)
    np.testing.assert_allclose(memory.X_train, streamed.X_train[:], atol=1e-5)


def test_streamed_sources_refuse_as_the_in_memory_ones(tmp_path):
    frame = _table().drop(columns="colour")
    frame.loc[123, "f2"] = np.inf
    path = _parquet(frame, tmp_path / "inf.parquet")
    with pytest.raises(UserError, match=r"column 'f2' holds inf in row 123"):
        stream.prepare_streamed(DataConfig(source=f"parquet:{path}", label="label"), 0)
    leak = _table().assign(copy=lambda f: f.label)
    path = _parquet(leak, tmp_path / "leak.parquet")
    with pytest.raises(UserError, match="repeats the label column"):
        stream.prepare_streamed(DataConfig(source=f"parquet:{path}", label="label"), 0)
    with pytest.raises(UserError, match="label column 'nope' not found"):
        stream.prepare_streamed(DataConfig(source=f"parquet:{path}", label="nope"), 0)


def test_rows_read_like_an_array(tmp_path):
    X = np.arange(60, dtype=np.float32).reshape(20, 3)
    np.save(tmp_path / "z.npy", X)
    index = np.array([5, 3, 19, 0, 7, 8, 9])
    rows = Rows(tmp_path / "z.npy", index, "k/train")
    assert len(rows) == 7 and rows.shape == (7, 3) and rows.dtype == np.float32
    assert np.array_equal(rows[:], X[index])
    assert np.array_equal(rows[4:7], X[[7, 8, 9]])
    assert np.array_equal(rows[np.array([2, 0, 0, 6])], X[[19, 5, 5, 9]])
    assert np.array_equal(rows[1], X[3]) and np.array_equal(np.asarray(rows), X[index])
    back = pickle.loads(pickle.dumps(rows))
    assert np.array_equal(back[:], rows[:]) and back.content_key() == rows.content_key()


def test_training_takes_the_same_batches_from_disk(tmp_path):
    """`fit` on rows on disk (a DataLoader over RowsDataset) = `fit` on the arrays in memory."""
    import dataclasses

    import torch

    from distill.tasks.compress.architectures import build_mlp
    from distill.tasks.compress.finetune import FitSettings, fit

    path = _parquet(_table(), tmp_path / "t.parquet")
    memory, streamed = _both(DataConfig(source=f"parquet:{path}", label="label"))
    settings = FitSettings(epochs=2, lr=1e-2, batch_size=32, patience=5, seed=0)
    models = []
    for data in (memory, streamed):
        torch.manual_seed(0)
        model, history = fit(build_mlp(data.n_features, [16], data.n_classes), data, settings)
        models.append((model.state_dict(), history))
    (a, ha), (b, hb) = models
    assert all(torch.equal(a[k], b[k]) for k in a)
    untimed = lambda h: dataclasses.asdict(h) | {"epoch_seconds": None}  # noqa: E731
    assert untimed(ha) == untimed(hb)


@pytest.mark.slow
def test_a_pipeline_runs_on_a_parquet_streamed_from_disk(tmp_path):
    """`distill run` on a parquet of several row groups, streamed (the threshold lowered): the
    stages take their rows from disk, the registered model its input example from the file,
    and each stage's line shows on a stderr that is not a terminal."""
    import json
    import os
    import re
    import subprocess
    import sys

    from tests.conftest import ROOT, TINY

    path = _parquet(_table(600), tmp_path / "t.parquet")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = os.environ | {
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_REGISTRY_URI": uri,
        "PYTHONPATH": str(ROOT),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "prefect-results"),
        "DISTILL_STREAM_MIN_CELLS": "1",
        "DISTILL_DATA_CACHE": str(tmp_path / "cache"),
    }
    sets = [*TINY, f"data.source=parquet:{path}", "data.label=label"]
    args = ["run", str(ROOT / "configs" / "digits.yaml"), "--json"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill.flows.cli",
            *args,
            *[a for s in sets for a in ("--set", s)],
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["model_version"] == "1" and 0 < out["metrics"]["final/accuracy"] <= 1
    assert re.search(r"^distill: data parquet:\S+ converted to .* in \d", proc.stderr, re.MULTILINE)
    stages = re.findall(r"^distill: ([\w-]+) done in \d+\.\d s", proc.stderr, re.MULTILINE)
    assert {"teacher", "finetune", "prune", "quantize", "evaluate-quantized"} <= set(stages)
    assert list((tmp_path / "cache").glob("*/z.npy"))  # the rows came from the converted file


def test_a_streamed_regression_target_is_standardized_like_in_memory(tmp_path):
    """A float label streams as the regression target the in-memory path makes: not stratified,
    standardized on the training rows, its mean and scale carried for the label's units."""
    frame = _table().drop(columns="label")
    frame["price"] = 3.0 * frame["f0"].to_numpy() + np.random.default_rng(1).normal(size=len(frame))
    path = _parquet(frame, tmp_path / "r.parquet")
    memory, streamed = _both(DataConfig(source=f"parquet:{path}", label="price"))
    _same(memory, streamed)
    assert streamed.is_regression and streamed.classes == []
    assert (streamed.target_mean, streamed.target_scale) == (
        memory.target_mean,
        memory.target_scale,
    )
    assert abs(float(np.mean(streamed.y_train))) < 1e-6

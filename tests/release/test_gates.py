"""Promotion gates: absolute limits, a missing metric, and the champion comparison on rows held
out from both runs."""

import numpy as np
from mlflow import MlflowClient

from tasks.compress.data import load_dataset
from tasks.compress.sources import read_table
from tasks.platform.config import DataConfig
from tasks.release.gates import (
    Candidate,
    absolute_gates,
    champion_gate,
    common_held_out_accuracy,
    held_out_rows,
    load_candidate,
)
from tests.release.conftest import GATES, NAME, make_version, tags


def test_missing_metric_fails_its_gate(registry_store):
    v1 = make_version(0.95)
    run = MlflowClient().get_run(tags(v1)["mlflow.run_id"])
    candidate = Candidate(
        NAME,
        v1,
        run.info.run_id,
        {k: v for k, v in run.data.metrics.items() if k != "final/size_kb"},
        run.data.tags,
        run.data.params,
    )
    gate = absolute_gates(candidate, GATES)[2]
    assert gate.name == "max_size_kb" and not gate.passed and gate.detail == "size KB not logged"


def test_held_out_rows_are_the_test_split_of_prepare():
    X, y, _, _ = read_table("sklearn:digits", "target")
    for seed, size in ((0, 0.2), (3, 0.3)):
        data = load_dataset(DataConfig(test_size=size), seed)
        rows = held_out_rows(y, size, seed)
        raw = np.rint(data.X_test.astype(np.float64) * data.scale + data.mean)
        assert sorted(map(tuple, raw)) == sorted(map(tuple, X[rows]))


def test_different_split_is_compared_on_rows_held_out_from_both(registry_store):
    """Seeds 0 and 1 hold out different rows: the champion trained on some of the challenger's
    test rows, so both are scored only on rows neither saw (~0.2 x 0.2 of the data)."""
    champion, challenger = make_version(0.99, seed=0), make_version(0.90, seed=1)
    client = MlflowClient()
    a, b = (load_candidate(client, NAME, v) for v in (challenger, champion))
    _X, y, _, _ = read_table("sklearn:digits", "target")
    common = np.intersect1d(held_out_rows(y, 0.2, 1), held_out_rows(y, 0.2, 0))
    assert 0.02 * len(y) < len(common) < 0.07 * len(y)
    seen = []

    def predict(c, frame):  # the challenger is right on every row, the champion on none
        seen.append(len(frame))
        truth = y[common]
        return truth if c.version == challenger else (truth + 1) % 10

    mine, theirs, n = common_held_out_accuracy(a, b, predict)
    assert (mine, theirs, n) == (1.0, 0.0, len(common)) and seen == [len(common)] * 2
    gate = champion_gate(a, b, GATES, predict)
    assert (
        gate.passed and f"re-evaluated on {len(common)} rows held out from both runs" in gate.detail
    )

"""Promotion gates: absolute limits, a missing metric, and the champion comparison on rows held
out from both runs."""

import numpy as np
from mlflow import MlflowClient

from distill.tasks.compress.data import load_dataset
from distill.tasks.compress.sources import read_table
from distill.tasks.platform.config import DataConfig
from distill.tasks.release.gates import (
    Candidate,
    absolute_gates,
    champion_gate,
    common_held_out_accuracy,
    held_out_rows,
    load_candidate,
    same_test_split,
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


def _candidate(version: str, accuracy: float, seed: int, split: str, digest: str) -> Candidate:
    return Candidate(
        NAME,
        version,
        f"run-{version}",
        {"final/accuracy": accuracy},
        {"distill.dataset_digest": digest, "distill.split": split},
        {"seed": str(seed), "data.test_size": "0.2"},
    )


def test_a_split_given_with_the_data_is_the_same_test_split_whatever_the_seed():
    """The user's split (data.split_column, npz split arrays) fixes the test rows: runs with other
    seeds are compared on their logged scores, not re-split by seed."""
    champion = _candidate("1", 0.90, seed=0, split="user", digest="d-with-split")
    challenger = _candidate("2", 0.92, seed=7, split="user", digest="d-with-split")

    def never(c, frame):
        raise AssertionError("the same test rows need no re-evaluation")

    gate = champion_gate(challenger, champion, GATES, never)
    assert gate.passed and gate.detail.endswith("(same test split)"), gate.detail
    assert (gate.value, gate.limit) == (0.92, 0.90)
    assert same_test_split(challenger, champion)
    # seeds decide the rows only where distill drew them
    drawn = [_candidate(v, 0.9, seed, "seeded", "d") for v, seed in (("3", 0), ("4", 7))]
    assert not same_test_split(*drawn)
    assert same_test_split(drawn[0], _candidate("5", 0.8, 0, "seeded", "d"))


def test_a_user_split_against_a_drawn_one_has_no_common_rows():
    champion = _candidate("1", 0.90, seed=0, split="seeded", digest="d")
    challenger = _candidate("2", 0.99, seed=0, split="user", digest="d-with-split")
    gate = champion_gate(challenger, champion, GATES)
    assert not gate.passed and "the runs' test rows differ" in gate.detail, gate.detail

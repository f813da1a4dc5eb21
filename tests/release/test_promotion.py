"""Promotion gates, rollback and racing promotions, on versions made directly in a temporary
MLflow store (a run with the metrics and tags the pipeline logs, and a version pointing at it)."""

import shutil
import threading
import time
from datetime import datetime

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from tasks.compress.data import load_dataset, read_table, table_digest
from tasks.platform.config import DataConfig, PromoteConfig
from tasks.platform.errors import UserError
from tasks.release import promotion
from tasks.release.promotion import (
    CHAMPION,
    Candidate,
    champion_gate,
    common_held_out_accuracy,
    held_out_rows,
    promote_version,
    rollback,
)

NAME = "gated"


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory):
    """An MLflow database with its tables made once (~5 s): each test gets a copy."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_store(empty_db, tmp_path, monkeypatch):
    """conftest's fresh store, from the template."""
    shutil.copy(empty_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv(
        "MLFLOW_REGISTRY_URI", uri
    )  # mlflow.set_registry_uri writes it to os.environ: undo after
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(autouse=True)
def versions_without_files(monkeypatch):
    """The versions here point at runs with no model files: promotion's load check (tested in
    tests/release/test_registration.py) would refuse them all."""
    from tasks.release import registry

    monkeypatch.setattr(registry, "load_version", lambda name, version: None)


DIGITS_DIGEST = table_digest(*read_table("sklearn:digits", "target")[:2])


def make_version(
    accuracy: float,
    teacher: float = 0.96,
    size_kb: float = 70.0,
    latency: float = 0.01,
    digest: str = DIGITS_DIGEST,
    seed: int = 0,
    test_size: float = 0.2,
    name: str = NAME,
) -> str:
    """A registered version whose parent run carries the pipeline's keys; alias challenger moves to it."""
    client = MlflowClient()
    with mlflow.start_run(tags={"distill.dataset_digest": digest}) as run:
        mlflow.log_params(
            {
                "seed": seed,
                "data.test_size": test_size,
                "data.source": "sklearn:digits",
                "data.label": "target",
            }
        )
        mlflow.log_metrics(
            {
                "final/accuracy": accuracy,
                "teacher/accuracy": teacher,
                "accuracy_drop": teacher - accuracy,
                "final/size_kb": size_kb,
                "final/latency_ms_b1": latency,
            }
        )
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(
        name,
        f"runs:/{run.info.run_id}/model",
        run_id=run.info.run_id,
        tags={"mlflow.run_id": run.info.run_id},
    ).version
    client.set_registered_model_alias(name, "challenger", version)
    return str(version)


def aliases(name: str = NAME) -> dict[str, str]:
    return {k: str(v) for k, v in MlflowClient().get_registered_model(name).aliases.items()}


def tags(version: str, name: str = NAME) -> dict[str, str]:
    return MlflowClient().get_model_version(name, version).tags


GATES = PromoteConfig(
    max_accuracy_drop=0.01, min_accuracy=0.9, max_size_kb=100, max_latency_ms_b1=0.05
)


def test_first_promotion_needs_only_the_absolute_gates(mlflow_store):
    v1 = make_version(0.955)
    decision = promote_version(NAME, None, GATES)  # default: the challenger
    assert decision.status == "promoted" and decision.version == v1 and decision.champion == v1
    assert [g.name for g in decision.gates] == [
        "max_accuracy_drop",
        "min_accuracy",
        "max_size_kb",
        "max_latency_ms_b1",
    ]
    assert all(g.passed for g in decision.gates)
    drop = next(g for g in decision.gates if g.name == "max_accuracy_drop")
    assert drop.value == pytest.approx(0.96 - 0.955) and drop.limit == 0.01
    assert aliases() == {"challenger": v1, CHAMPION: v1}
    t = tags(v1)
    assert t["promotion.status"] == "promoted" and t["promotion.previous_champion"] == ""
    assert "first champion" in t["promotion.reason"]
    datetime.fromisoformat(t["promotion.promoted_at"])


def test_better_challenger_replaces_the_champion(mlflow_store):
    v1 = make_version(0.95)
    promote_version(NAME, v1, GATES)
    v2 = make_version(0.958)
    decision = promote_version(NAME, None, GATES)
    assert decision.status == "promoted" and decision.previous_champion == v1
    assert aliases()[CHAMPION] == v2
    assert tags(v2)["promotion.previous_champion"] == v1
    gate = decision.gates[-1]
    assert (
        gate.name == "vs_champion"
        and gate.value == pytest.approx(0.958)
        and gate.limit == pytest.approx(0.95)
    )
    assert "same test split" in gate.detail


def test_worse_challenger_is_refused_and_nothing_changes(mlflow_store):
    v1 = make_version(0.958)
    promote_version(NAME, v1, GATES)
    v2 = make_version(0.952)
    before = aliases()
    champion_tags = tags(v1)
    decision = promote_version(NAME, v2, GATES)
    assert decision.status == "refused" and not decision.ok
    assert decision.reason == (
        "gate vs_champion: accuracy 0.9520 < champion version 1 0.9580 (same test split)"
    )
    assert aliases() == before and tags(v1) == champion_tags
    assert (
        tags(v2)["promotion.status"] == "refused"
        and tags(v2)["promotion.reason"] == decision.reason
    )
    assert "promotion.promoted_at" not in tags(v2)


def test_champion_tolerance_lets_a_slightly_worse_one_through(mlflow_store):
    v1 = make_version(0.958)
    promote_version(NAME, v1, GATES)
    v2 = make_version(0.955)
    assert (
        promote_version(NAME, v2, GATES.model_copy(update={"champion_tolerance": 0.005})).status
        == "promoted"
    )


def test_failed_absolute_gates_name_the_gate_and_both_numbers(mlflow_store):
    make_version(0.93, teacher=0.96, size_kb=120.0)
    decision = promote_version(NAME, None, GATES)
    assert decision.status == "refused"
    assert decision.reason == (
        "gate max_accuracy_drop: accuracy drop vs teacher 0.0300 > 0.0100 (and 1 more: max_size_kb)"
    )
    assert CHAMPION not in aliases()


def test_switched_off_gates_are_not_checked(mlflow_store):
    v1 = make_version(0.97)
    promote_version(NAME, v1, PromoteConfig())
    v2 = make_version(0.80, teacher=0.96)
    gates = PromoteConfig(max_accuracy_drop=None, vs_champion=False)
    decision = promote_version(NAME, v2, gates)
    assert decision.status == "promoted" and decision.gates == []
    assert "champion comparison off" in decision.reason


def test_missing_metric_fails_its_gate(mlflow_store):
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
    gate = promotion.absolute_gates(candidate, GATES)[2]
    assert gate.name == "max_size_kb" and not gate.passed and gate.detail == "size KB not logged"


def test_rollback_restores_the_previous_champion(mlflow_store):
    v1, v2 = make_version(0.95), make_version(0.96)
    promote_version(NAME, v1, GATES)
    promote_version(NAME, v2, GATES)
    decision = rollback(NAME)
    assert (
        decision.status == "rolled_back"
        and decision.champion == v1
        and decision.previous_champion == v2
    )
    assert aliases()[CHAMPION] == v1
    assert tags(v2)["promotion.status"] == "rolled_back"
    assert tags(v1)["promotion.reason"] == f"restored by rollback of version {v2}"
    with pytest.raises(UserError, match="first champion"):
        rollback(NAME)
    assert aliases()[CHAMPION] == v1


def test_user_errors(mlflow_store):
    with pytest.raises(UserError, match="registered model 'absent' not found"):
        promote_version("absent", None, GATES)
    make_version(0.95)
    with pytest.raises(UserError, match="no version 9"):
        promote_version(NAME, "9", GATES)
    with pytest.raises(UserError, match="nothing to roll back"):
        rollback(NAME)


def test_racing_promotions_end_with_one_consistent_champion(mlflow_store, monkeypatch):
    """Both start with no champion. Serialized, v2 (better) is champion whichever runs first."""
    v1, v2 = make_version(0.95), make_version(0.96)
    slow_alias = MlflowClient.set_registered_model_alias

    def slow(self, *args, **kwargs):  # widen the read-decide-write window
        time.sleep(0.3)
        return slow_alias(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", slow)
    barrier, decisions = threading.Barrier(2), {}

    def go(version):
        barrier.wait()
        decisions[version] = promote_version(NAME, version, GATES)

    threads = [threading.Thread(target=go, args=(v,)) for v in (v1, v2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert aliases()[CHAMPION] == v2
    assert decisions[v2].status == "promoted"
    if decisions[v1].status == "promoted":  # v1 went first: v2 replaced it
        assert (
            tags(v2)["promotion.previous_champion"] == v1 and decisions[v2].previous_champion == v1
        )
    else:  # v2 went first: v1 was compared with it and refused
        assert decisions[v1].status == "refused" and "vs_champion" in decisions[v1].reason
        assert tags(v2)["promotion.previous_champion"] == ""


def test_held_out_rows_are_the_test_split_of_prepare():
    X, y, _, _ = read_table("sklearn:digits", "target")
    for seed, size in ((0, 0.2), (3, 0.3)):
        data = load_dataset(DataConfig(test_size=size), seed)
        rows = held_out_rows(y, size, seed)
        raw = np.rint(data.X_test.astype(np.float64) * data.scale + data.mean)
        assert sorted(map(tuple, raw)) == sorted(map(tuple, X[rows]))


def test_different_split_is_compared_on_rows_held_out_from_both(mlflow_store):
    """Seeds 0 and 1 hold out different rows: the champion trained on some of the challenger's
    test rows, so both are scored only on rows neither saw (~0.2 x 0.2 of the data)."""
    champion, challenger = make_version(0.99, seed=0), make_version(0.90, seed=1)
    client = MlflowClient()
    a, b = (promotion.load_candidate(client, NAME, v) for v in (challenger, champion))
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


def test_other_data_cannot_be_compared_with_the_champion(mlflow_store):
    v1 = make_version(0.95)
    promote_version(NAME, v1, GATES)
    v2 = make_version(0.99, digest="0123456789abcdef")
    decision = promote_version(NAME, v2, GATES)
    assert decision.status == "refused" and "different data" in decision.reason
    assert aliases()[CHAMPION] == v1


def test_teacher_lineage_pins_files_and_aliases(mlflow_store, tmp_path):
    import hashlib

    from tasks.release.registry import teacher_lineage

    path = tmp_path / "teacher.pt"
    path.write_bytes(b"weights")
    assert teacher_lineage(f"file:{path}") == {
        "distill.teacher_source": f"file:{path}",
        "distill.teacher_sha256": hashlib.sha256(b"weights").hexdigest(),
    }
    v = make_version(0.9, name="teachers")
    run_id = tags(v, "teachers")["mlflow.run_id"]
    assert teacher_lineage("models:/teachers@challenger") == {
        "distill.teacher_source": "models:/teachers@challenger",
        "distill.teacher_uri": f"models:/teachers/{v}",
        "distill.teacher_run_id": run_id,
    }
    assert teacher_lineage("runs:/abc123/teacher") == {
        "distill.teacher_source": "runs:/abc123/teacher",
        "distill.teacher_run_id": "abc123",
    }
    # unresolvable sources add nothing: the teacher stage reports them with its own error
    assert teacher_lineage(f"file:{tmp_path}/none.pt") == {
        "distill.teacher_source": f"file:{tmp_path}/none.pt"
    }
    assert teacher_lineage("models:/teachers@nobody") == {
        "distill.teacher_source": "models:/teachers@nobody"
    }


def test_a_refused_promotion_ends_its_flow_run_failed_with_the_reason(
    prefect_server, mlflow_store, monkeypatch
):
    from flows.promote import promote_flow, run_promotion

    monkeypatch.setenv("DISTILL_MLFLOW_CONFIG", str(mlflow_store) + ".absent.yaml")
    make_version(0.90)  # 6 points below the teacher: the 1-point gate refuses it
    state = promote_flow(NAME, None, GATES, return_state=True)
    assert state.is_failed()
    assert state.message.startswith("refused") and "max_accuracy_drop" in state.message
    decision = run_promotion(NAME, None, GATES)  # the CLI's call: the decision, not an error
    assert not decision.ok and decision.line() == state.message
    assert CHAMPION not in aliases()

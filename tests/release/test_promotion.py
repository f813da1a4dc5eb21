"""Promotion, rollback and racing promotions, on versions made directly in a temporary MLflow
store (tests/release/conftest.py)."""

import threading
import time
from datetime import datetime

import pytest
from mlflow import MlflowClient

from distill.tasks.platform.config import PromoteConfig
from distill.tasks.platform.errors import UserError
from distill.tasks.release.aliases import CHAMPION
from distill.tasks.release.promotion import promote_version, rollback
from tests.release.conftest import GATES, NAME, aliases, make_version, tags


@pytest.fixture(autouse=True)
def versions_without_files(monkeypatch):
    """The versions here point at runs with no model files: promotion's load check (tested in
    tests/release/test_registration.py) would refuse them all."""
    from distill.tasks.release import registry

    monkeypatch.setattr(registry, "load_version", lambda name, version: None)


def test_first_promotion_needs_only_the_absolute_gates(registry_store):
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


def test_better_challenger_replaces_the_champion(registry_store):
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


def test_worse_challenger_is_refused_and_nothing_changes(registry_store):
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


def test_champion_tolerance_lets_a_slightly_worse_one_through(registry_store):
    v1 = make_version(0.958)
    promote_version(NAME, v1, GATES)
    v2 = make_version(0.955)
    assert (
        promote_version(NAME, v2, GATES.model_copy(update={"champion_tolerance": 0.005})).status
        == "promoted"
    )


def test_failed_absolute_gates_name_the_gate_and_both_numbers(registry_store):
    make_version(0.93, teacher=0.96, size_kb=120.0)
    decision = promote_version(NAME, None, GATES)
    assert decision.status == "refused"
    assert decision.reason == (
        "gate max_accuracy_drop: accuracy drop vs teacher 0.0300 > 0.0100 (and 1 more: max_size_kb)"
    )
    assert CHAMPION not in aliases()


def test_switched_off_gates_are_not_checked(registry_store):
    v1 = make_version(0.97)
    promote_version(NAME, v1, PromoteConfig())
    v2 = make_version(0.80, teacher=0.96)
    gates = PromoteConfig(max_accuracy_drop=None, vs_champion=False)
    decision = promote_version(NAME, v2, gates)
    assert decision.status == "promoted" and decision.gates == []
    assert "champion comparison off" in decision.reason


def test_rollback_restores_the_previous_champion(registry_store):
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


def test_user_errors(registry_store):
    with pytest.raises(UserError, match="registered model 'absent' not found"):
        promote_version("absent", None, GATES)
    make_version(0.95)
    with pytest.raises(UserError, match="no version 9"):
        promote_version(NAME, "9", GATES)
    with pytest.raises(UserError, match="nothing to roll back"):
        rollback(NAME)


def test_racing_promotions_end_with_one_consistent_champion(registry_store, monkeypatch):
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


def test_other_data_cannot_be_compared_with_the_champion(registry_store):
    v1 = make_version(0.95)
    promote_version(NAME, v1, GATES)
    v2 = make_version(0.99, digest="0123456789abcdef")
    decision = promote_version(NAME, v2, GATES)
    assert decision.status == "refused" and "different data" in decision.reason
    assert aliases()[CHAMPION] == v1


def test_teacher_lineage_pins_files_and_aliases(registry_store, tmp_path):
    import hashlib

    from distill.tasks.release.registry import teacher_lineage

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
    prefect_server, registry_store, monkeypatch
):
    from distill.flows.promote import promote_flow, run_promotion

    monkeypatch.setenv("DISTILL_MLFLOW_CONFIG", str(registry_store) + ".absent.yaml")
    make_version(0.90)  # 6 points below the teacher: the 1-point gate refuses it
    state = promote_flow(NAME, None, GATES, return_state=True)
    assert state.is_failed()
    assert state.message.startswith("refused") and "max_accuracy_drop" in state.message
    decision = run_promotion(NAME, None, GATES)  # the CLI's call: the decision, not an error
    assert not decision.ok and decision.line() == state.message
    assert CHAMPION not in aliases()

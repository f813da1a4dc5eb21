"""Promotion: move alias `champion` to a model version only when its gates pass; roll it back.

A version's numbers come from the MLflow parent run that registered it (version tag
`mlflow.run_id`): `final/accuracy`, `final/size_kb`, `final/latency_ms_b1`, `accuracy_drop`.

Gates (config section `promote:`, CLI flags override): max accuracy drop vs its own
teacher, min accuracy, max size, max batch-1 latency, and "no worse than the current
champion". The last one only compares accuracies measured on the same rows:

- same dataset digest, split seed and test_size -> the same test split: the logged
  `final/accuracy` of both runs are compared as they are;
- same dataset digest, different split -> both registered models are re-evaluated through
  `mlflow.pyfunc` on the rows held out from *both* runs (the intersection of their test
  splits). The challenger's whole test split would be unfair: the champion trained on
  some of those rows;
- different data -> there are no common held-out rows, the gate fails and says so
  (`vs_champion: false` / `--ignore-champion` promotes on the absolute gates alone).

Audit: every decision is written on the version as tags `promotion.status`,
`promotion.reason`, and for a promotion `promoted_at` and `previous_champion`. Decisions
on one registered model are serialized (a lock in this process, plus a file lock beside a
SQLite registry for other processes): two racing promotions end with one consistent
champion. A remote registry has no lock MLflow offers; there the champion is re-read just
before the alias moves, which narrows the race but cannot close it.
"""

from __future__ import annotations

import fcntl
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.platform.config import PromoteConfig
from tasks.platform.errors import UserError

CHAMPION = "champion"
CHALLENGER = "challenger"
STATUS, REASON, PROMOTED_AT, PREVIOUS = (
    "promotion.status",
    "promotion.reason",
    "promoted_at",
    "previous_champion",
)
DECIDED_AT = "promotion.decided_at"
TARGET_MET = "distill.target_met"  # "false": the run missed its `target:` (compress/target.py)
EPS = 1e-9  # metrics are float64 fractions: 0.96 - 0.95 must not fail a 0.01 gate


@dataclass(frozen=True)
class Candidate:
    """A model version and the record of the pipeline run that made it."""

    name: str
    version: str
    run_id: str
    metrics: dict[str, float]
    tags: dict[str, str]  # the run's tags
    params: dict[str, str]  # the run's params (the flattened config)
    version_tags: dict[str, str] = field(default_factory=dict)  # the model version's

    @property
    def label(self) -> str:
        return f"{self.name} version {self.version}"

    def test_split(self) -> tuple[str | None, int | None, float | None]:
        """What fixes the test rows: the data (digest), the split seed, the test fraction."""
        seed, size = self.params.get("seed"), self.params.get("data.test_size")
        return (
            self.tags.get("distill.dataset_digest"),
            int(seed) if seed is not None else None,
            float(size) if size is not None else None,
        )


@dataclass(frozen=True)
class Gate:
    name: str  # the config key under `promote:`
    passed: bool
    value: float  # the candidate's number
    limit: float  # what it is held against
    detail: str  # "accuracy drop 0.0223 > 0.0100"


@dataclass(frozen=True)
class Decision:
    name: str
    version: str
    status: str  # promoted | refused | unchanged | rolled_back
    reason: str
    previous_champion: str | None  # champion before the decision
    champion: str | None  # champion after it
    at: str
    gates: list[Gate] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status != "refused"

    def line(self) -> str:
        return f"{self.status.replace('_', ' ')}: {self.name} version {self.version}: {self.reason}"

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        for gate in out["gates"]:  # NaN (a metric not logged) is not JSON
            gate.update({k: None for k in ("value", "limit") if gate[k] != gate[k]})
        return out


class HeldOutUnavailable(Exception):
    """The champion comparison cannot be made honestly; the message says why."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --- reading the registry -------------------------------------------------------------------


def alias_version(client: Any, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _check_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        raise UserError(f"registered model {name!r} not found (option --model)") from None


def resolve_version(client: Any, name: str, version: str | None) -> str:
    """The version to promote: the one given, else the one with alias `challenger`."""
    from mlflow.exceptions import MlflowException

    _check_model(client, name)
    if version is None:
        found = alias_version(client, name, CHALLENGER)
        if found is None:
            raise UserError(
                f"registered model {name!r} has no version with alias {CHALLENGER!r} "
                "(give --version)"
            )
        return found
    try:
        return str(client.get_model_version(name, str(version)).version)
    except MlflowException:
        raise UserError(
            f"registered model {name!r} has no version {version} (option --version)"
        ) from None


def load_candidate(client: Any, name: str, version: str) -> Candidate:
    from mlflow.exceptions import MlflowException

    mv = client.get_model_version(name, version)
    run_id = mv.tags.get("mlflow.run_id") or mv.run_id
    if not run_id:
        raise UserError(
            f"{name} version {version} has no MLflow run (tag mlflow.run_id): nothing to gate on"
        )
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UserError(f"{name} version {version}: its MLflow run {run_id} is gone") from None
    return Candidate(
        name,
        str(version),
        run_id,
        dict(run.data.metrics),
        dict(run.data.tags),
        dict(run.data.params),
        dict(mv.tags),
    )


# --- gates ----------------------------------------------------------------------------------


def _upper(name: str, what: str, value: float | None, limit: float) -> Gate:
    if value is None:
        return Gate(name, False, float("nan"), limit, f"{what} not logged")
    ok = value <= limit + EPS
    return Gate(name, ok, value, limit, f"{what} {value:.4f} {'<=' if ok else '>'} {limit:.4f}")


def _lower(name: str, what: str, value: float | None, limit: float) -> Gate:
    if value is None:
        return Gate(name, False, float("nan"), limit, f"{what} not logged")
    ok = value >= limit - EPS
    return Gate(name, ok, value, limit, f"{what} {value:.4f} {'>=' if ok else '<'} {limit:.4f}")


def absolute_gates(c: Candidate, gates: PromoteConfig) -> list[Gate]:
    """The gates that need no champion; a gate set to None is off."""
    m = c.metrics
    out = []
    if c.version_tags.get(TARGET_MET) == "false" and not gates.allow_target_missed:
        out.append(
            Gate(
                "allow_target_missed",
                False,
                float("nan"),
                float("nan"),
                f"its run missed the target {c.version_tags.get('distill.target', '')}: "
                f"{c.version_tags.get('distill.target_achieved', '?')}, accuracy drop "
                f"{c.version_tags.get('distill.target_accuracy_drop', '?')} "
                "(--allow-target-missed)",
            )
        )
    if gates.max_accuracy_drop is not None:
        out.append(
            _upper(
                "max_accuracy_drop",
                "accuracy drop vs teacher",
                m.get("accuracy_drop"),
                gates.max_accuracy_drop,
            )
        )
    if gates.min_accuracy is not None:
        out.append(_lower("min_accuracy", "accuracy", m.get("final/accuracy"), gates.min_accuracy))
    if gates.max_size_kb is not None:
        out.append(_upper("max_size_kb", "size KB", m.get("final/size_kb"), gates.max_size_kb))
    if gates.max_latency_ms_b1 is not None:
        out.append(
            _upper(
                "max_latency_ms_b1",
                "latency b1 ms",
                m.get("final/latency_ms_b1"),
                gates.max_latency_ms_b1,
            )
        )
    return out


def same_test_split(a: Candidate, b: Candidate) -> bool:
    split = a.test_split()
    return None not in split and split == b.test_split()


def held_out_rows(y_raw: np.ndarray, test_size: float, seed: int) -> np.ndarray:
    """The test rows `tasks.compress.data.prepare` holds out (same calls;
    tests/release/test_promotion.py checks they agree)."""
    from sklearn.model_selection import train_test_split

    _, y = np.unique(y_raw, return_inverse=True)
    _, test = train_test_split(
        np.arange(len(y)), test_size=test_size, stratify=y, random_state=seed
    )
    return np.sort(test)


def common_held_out_accuracy(
    challenger: Candidate,
    champion: Candidate,
    predict: Callable[[Candidate, Any], np.ndarray] | None = None,
) -> tuple[float, float, int]:
    """Both models re-evaluated through mlflow.pyfunc on the rows neither run trained or
    validated on: -> (challenger accuracy, champion accuracy, rows)."""
    import pandas as pd

    from tasks.compress.data import read_table, table_digest

    digest, seed_a, size_a = challenger.test_split()
    other, seed_b, size_b = champion.test_split()
    if digest is None or other is None or None in (seed_a, seed_b, size_a, size_b):
        raise HeldOutUnavailable(
            "a run lacks its dataset digest or split params: no common held-out rows known"
        )
    if digest != other:
        raise HeldOutUnavailable(
            f"trained on different data (dataset digest {digest} vs {other}): "
            "no common held-out rows"
        )
    source, label = (
        challenger.params.get("data.source", ""),
        challenger.params.get("data.label", "target"),
    )
    try:
        X, y_raw, names, _ = read_table(source, label)
    except UserError as err:
        raise HeldOutUnavailable(f"cannot re-read the data to compare: {err}") from None
    if table_digest(X, y_raw) != digest:
        raise HeldOutUnavailable(
            f"data {source} has changed since the run (digest {table_digest(X, y_raw)}, "
            f"logged {digest})"
        )
    rows = np.intersect1d(
        held_out_rows(y_raw, size_a, seed_a), held_out_rows(y_raw, size_b, seed_b)
    )
    if len(rows) == 0:
        raise HeldOutUnavailable("the two runs' test splits share no rows")
    frame = pd.DataFrame(X[rows], columns=names)
    predict = predict or _pyfunc_predict
    truth = np.asarray(y_raw[rows]).astype(str)
    acc = [
        float((np.asarray(predict(c, frame)).astype(str) == truth).mean())
        for c in (challenger, champion)
    ]
    return acc[0], acc[1], len(rows)


def _pyfunc_predict(c: Candidate, frame: Any) -> np.ndarray:
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(f"models:/{c.name}/{c.version}")
    return model.predict(frame)["prediction"].to_numpy()


def champion_gate(
    c: Candidate,
    champion: Candidate,
    gates: PromoteConfig,
    predict: Callable[[Candidate, Any], np.ndarray] | None = None,
) -> Gate:
    """No worse than the champion (less `champion_tolerance`), on the same rows."""
    tol = gates.champion_tolerance
    if same_test_split(c, champion):
        mine, theirs = c.metrics.get("final/accuracy"), champion.metrics.get("final/accuracy")
        if mine is None or theirs is None:
            return Gate(
                "vs_champion", False, float("nan"), float("nan"), "final/accuracy not logged"
            )
        where = "same test split"
    else:
        try:
            mine, theirs, n = common_held_out_accuracy(c, champion, predict)
        except HeldOutUnavailable as err:
            return Gate(
                "vs_champion",
                False,
                float("nan"),
                float("nan"),
                f"vs champion version {champion.version}: {err}",
            )
        where = f"re-evaluated on {n} rows held out from both runs"
    ok = mine >= theirs - tol - EPS
    bound = f"{theirs:.4f}" + (f" - tolerance {tol:.4f}" if tol else "")
    return Gate(
        "vs_champion",
        ok,
        mine,
        theirs - tol,
        f"accuracy {mine:.4f} {'>=' if ok else '<'} champion version {champion.version} {bound} "
        f"({where})",
    )


def evaluate_gates(
    c: Candidate,
    champion: Candidate | None,
    gates: PromoteConfig,
    predict: Callable[[Candidate, Any], np.ndarray] | None = None,
) -> list[Gate]:
    out = absolute_gates(c, gates)
    if champion is not None and gates.vs_champion:
        out.append(champion_gate(c, champion, gates, predict))
    return out


def refusal_reason(failed: list[Gate]) -> str:
    first = failed[0]
    more = (
        f" (and {len(failed) - 1} more: {', '.join(g.name for g in failed[1:])})"
        if len(failed) > 1
        else ""
    )
    return f"gate {first.name}: {first.detail}{more}"


# --- serializing decisions ------------------------------------------------------------------

_GUARD = threading.Lock()
_LOCKS: dict[str, threading.Lock] = {}


def _sqlite_file(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


@contextmanager
def registry_lock(name: str) -> Iterator[None]:
    """One promotion decision at a time per registered model (threads, and processes on a SQLite
    registry)."""
    import mlflow

    uri = mlflow.get_registry_uri()
    with _GUARD:
        lock = _LOCKS.setdefault(f"{uri}::{name}", threading.Lock())
    with lock:
        db = _sqlite_file(uri)
        if db is None:
            yield
            return
        path = db.parent / f".{db.name}.promote-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.lock"
        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _set_tags(client: Any, name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def _move_champion(
    client: Any, name: str, version: str, previous: str | None, tags: dict[str, str]
) -> None:
    """Alias first, then the audit tags; if the tags cannot be written, the alias goes back."""
    client.set_registered_model_alias(name, CHAMPION, version)
    try:
        _set_tags(client, name, version, tags)
    except Exception:
        if previous is None:
            client.delete_registered_model_alias(name, CHAMPION)
        else:
            client.set_registered_model_alias(name, CHAMPION, previous)
        raise


def promote_version(
    name: str,
    version: str | None,
    gates: PromoteConfig,
    predict: Callable[[Candidate, Any], np.ndarray] | None = None,
) -> Decision:
    """Gate `version` (default: the challenger) and move `champion` to it only if every gate
    passes."""
    from mlflow import MlflowClient

    from tasks.release import registry  # torch and pandas: only when a decision is made

    client = MlflowClient()
    with registry_lock(name):
        version = resolve_version(client, name, version)
        previous = alias_version(client, name, CHAMPION)
        if previous == version:
            return Decision(
                name, version, "unchanged", "already the champion", previous, previous, _now()
            )
        registry.check_promotable(name, version)  # finished, its run FINISHED, and it loads
        candidate = load_candidate(client, name, version)
        champion = load_candidate(client, name, previous) if previous is not None else None
        results = evaluate_gates(candidate, champion, gates, predict)
        failed = [g for g in results if not g.passed]
        at = _now()
        if failed:
            reason = refusal_reason(failed)
            _set_tags(client, name, version, {STATUS: "refused", REASON: reason, DECIDED_AT: at})
            return Decision(name, version, "refused", reason, previous, previous, at, results)
        if (
            alias_version(client, name, CHAMPION) != previous
        ):  # only possible without a lock (remote registry)
            raise RuntimeError(
                f"{name}: champion moved while version {version} was being gated; try again"
            )
        passed = ", ".join(g.name for g in results) or "none configured"
        reason = (
            f"gates passed ({passed})"
            + ("" if previous else "; first champion")
            + ("; champion comparison off" if previous and not gates.vs_champion else "")
        )
        _move_champion(
            client,
            name,
            version,
            previous,
            {
                STATUS: "promoted",
                REASON: reason,
                PROMOTED_AT: at,
                DECIDED_AT: at,
                PREVIOUS: previous or "",
            },
        )
        return Decision(name, version, "promoted", reason, previous, version, at, results)


def rollback(name: str) -> Decision:
    """Move `champion` back to the version it replaced (the tag `previous_champion` of the current
    one)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from tasks.release import registry

    client = MlflowClient()
    with registry_lock(name):
        _check_model(client, name)
        current = alias_version(client, name, CHAMPION)
        if current is None:
            raise UserError(f"registered model {name!r} has no {CHAMPION!r}: nothing to roll back")
        previous = client.get_model_version(name, current).tags.get(PREVIOUS, "")
        if not previous:
            raise UserError(
                f"{name} version {current} was the first champion: no previous champion "
                "to roll back to"
            )
        try:
            client.get_model_version(name, previous)
        except MlflowException:
            raise UserError(
                f"{name}: previous champion version {previous} no longer exists"
            ) from None
        registry.check_promotable(name, previous)
        at = _now()
        reason = f"champion rolled back from version {current} to version {previous}"
        _move_champion(
            client,
            name,
            previous,
            current,
            {
                STATUS: "promoted",
                REASON: f"restored by rollback of version {current}",
                PROMOTED_AT: at,
                DECIDED_AT: at,
            },
        )
        _set_tags(client, name, current, {STATUS: "rolled_back", REASON: reason, DECIDED_AT: at})
        return Decision(name, current, "rolled_back", reason, current, previous, at)


def decision_markdown(d: Decision) -> str:
    rows = ["| gate | value | limit | passed | detail |", "|---|---:|---:|---|---|"]
    rows += [
        f"| {g.name} | {g.value:.4f} | {g.limit:.4f} | {'yes' if g.passed else '**no**'} "
        f"| {g.detail} |"
        for g in d.gates
    ]
    return (
        f"# Promotion of {d.name} version {d.version}: {d.status}\n\n{d.reason}\n\n"
        f"- champion before: {d.previous_champion or 'none'}\n"
        f"- champion after: {d.champion or 'none'}\n"
        f"- decided at: {d.at}\n\n" + ("\n".join(rows) if d.gates else "")
    )


@task(name="promote", cache_policy=NO_CACHE)
def promote_task(name: str, version: str | None, gates: PromoteConfig) -> Decision:
    return promote_version(name, version, gates)


@task(name="rollback", cache_policy=NO_CACHE)
def rollback_task(name: str) -> Decision:
    return rollback(name)

"""Promotion: move alias `champion` to a model version only when its gates pass; roll it back.

The gates a version must pass are tasks/release/gates.py.

Audit: every decision is written on the version as tags `promotion.status`,
`promotion.reason`, `promotion.decided_at`, and for a promotion `promotion.promoted_at` and
`promotion.previous_champion` (one prefix: the registry UI lists them together). Decisions
on one registered model are serialized (a lock in this process, plus a file lock beside a
SQLite registry for other processes): two racing promotions end with one consistent
champion. A remote registry has no lock MLflow offers; there the champion is re-read just
before the alias moves, which narrows the race but cannot close it.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from distill.tasks.platform import locks
from distill.tasks.platform.config import PromoteConfig
from distill.tasks.platform.errors import UserError
from distill.tasks.release.aliases import CHALLENGER, CHAMPION
from distill.tasks.release.gates import (
    Candidate,
    Gate,
    evaluate_gates,
    load_candidate,
    refusal_reason,
)

STATUS, REASON, PROMOTED_AT, PREVIOUS = (
    "promotion.status",
    "promotion.reason",
    "promotion.promoted_at",
    "promotion.previous_champion",
)
LEGACY_PREVIOUS = "previous_champion"  # versions tagged before the `promotion.` prefix
DECIDED_AT = "promotion.decided_at"


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


# --- serializing decisions ------------------------------------------------------------------

_GUARD = threading.Lock()
_LOCKS: dict[str, threading.Lock] = {}


@contextmanager
def registry_lock(name: str) -> Iterator[None]:
    """One promotion decision at a time per registered model (threads, and processes on a SQLite
    registry)."""
    import mlflow

    uri = mlflow.get_registry_uri()
    with _GUARD:
        lock = _LOCKS.setdefault(f"{uri}::{name}", threading.Lock())
    with lock, locks.beside_store(uri, "promote-" + re.sub(r"[^A-Za-z0-9_.-]", "_", name)):
        yield


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

    from distill.tasks.release import registry  # torch and pandas: only when a decision is made

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

    from distill.tasks.release import registry

    client = MlflowClient()
    with registry_lock(name):
        _check_model(client, name)
        current = alias_version(client, name, CHAMPION)
        if current is None:
            raise UserError(f"registered model {name!r} has no {CHAMPION!r}: nothing to roll back")
        tags = client.get_model_version(name, current).tags
        previous = tags.get(PREVIOUS, tags.get(LEGACY_PREVIOUS, ""))
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

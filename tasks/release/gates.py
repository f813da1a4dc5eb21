"""Promotion gates: what a model version must pass before alias `champion` moves to it.

A version's numbers come from the MLflow parent run that registered it (version tag
`mlflow.run_id`; `load_candidate`): `final/accuracy`, `final/size_kb`, `final/latency_ms_b1`,
`accuracy_drop`.

Gates (config section `promote:`, CLI flags override): max accuracy drop vs its own
teacher, min accuracy, max size, max batch-1 latency, and "no worse than the current
champion". A regression model (its run logged `final/r2`) is held to `max_r2_drop` and `min_r2`
instead of the accuracy gates (and the accuracy gates of a classifier are not the R² ones): the
gates of the other task do not apply to it. The champion comparison uses test R² for
regression (rows split without stratification, as tasks/compress/dataset.py splits them). It only
compares scores measured on the same rows:

- same dataset digest, split seed and test_size, or the same split given with the data
  (`data.split_column`, npz split arrays; its digest covers the split) -> the same test split:
  the logged `final/accuracy` of both runs are compared as they are;
- same dataset digest, different split -> both registered models are re-evaluated through
  `mlflow.pyfunc` on the rows held out from *both* runs (the intersection of their test
  splits). The challenger's whole test split would be unfair: the champion trained on
  some of those rows;
- different data -> there are no common held-out rows, the gate fails and says so
  (`vs_champion: false` / `--ignore-champion` promotes on the absolute gates alone).

Moving the alias, its audit tags and rollback are tasks/release/promotion.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distill.tasks.platform.config import PromoteConfig
from distill.tasks.platform.errors import UserError
from distill.tasks.release.signature import model_input

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

    @property
    def regression(self) -> bool:
        """Its run measured R² (a regression target), not accuracy."""
        return "final/r2" in self.metrics or "r2_drop" in self.metrics

    @property
    def score_key(self) -> str:
        return "final/r2" if self.regression else "final/accuracy"

    def test_split(self) -> tuple | None:
        """What fixes the test rows, None where the run did not log it: `("user", digest)` for the
        user's own split (run tag `distill.split`; the digest covers it), else `("seeded",
        digest, seed, test fraction)`: the split distill drew."""
        digest = self.tags.get("distill.dataset_digest")
        if digest is None:
            return None
        if self.tags.get("distill.split") == "user":
            return ("user", digest)
        seed, size = self.params.get("seed"), self.params.get("data.test_size")
        if seed is None or size is None:
            return None
        return ("seeded", digest, int(seed), float(size))


@dataclass(frozen=True)
class Gate:
    name: str  # the config key under `promote:`
    passed: bool
    value: float  # the candidate's number
    limit: float  # what it is held against
    detail: str  # "accuracy drop 0.0223 > 0.0100"


class HeldOutUnavailable(Exception):
    """The champion comparison cannot be made honestly; the message says why."""


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
        metric = "r2" if c.regression else "accuracy"
        out.append(
            Gate(
                "allow_target_missed",
                False,
                float("nan"),
                float("nan"),
                f"its run missed the target {c.version_tags.get('distill.target', '')}: "
                f"{c.version_tags.get('distill.target_achieved', '?')}, "
                f"{'R²' if c.regression else 'accuracy'} drop "
                f"{c.version_tags.get(f'distill.target_{metric}_drop', '?')} "
                "(--allow-target-missed)",
            )
        )
    if c.regression:
        if gates.max_r2_drop is not None:
            out.append(
                _upper("max_r2_drop", "R² drop vs teacher", m.get("r2_drop"), gates.max_r2_drop)
            )
        if gates.min_r2 is not None:
            out.append(_lower("min_r2", "R²", m.get("final/r2"), gates.min_r2))
    if not c.regression and gates.max_accuracy_drop is not None:
        out.append(
            _upper(
                "max_accuracy_drop",
                "accuracy drop vs teacher",
                m.get("accuracy_drop"),
                gates.max_accuracy_drop,
            )
        )
    if not c.regression and gates.min_accuracy is not None:
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
    return split is not None and split == b.test_split()


def held_out_rows(
    y_raw: np.ndarray, test_size: float, seed: int, regression: bool = False
) -> np.ndarray:
    """The test rows `distill.tasks.compress.dataset.prepare` held out of these labels (its own
    split function; tests/release/test_gates.py checks they agree)."""
    from distill.tasks.compress.data import seeded_test_split

    y = y_raw.astype(np.float64) if regression else np.unique(y_raw, return_inverse=True)[1]
    return np.sort(seeded_test_split(y, test_size, seed)[1])


def common_held_out_accuracy(
    challenger: Candidate,
    champion: Candidate,
    predict: Callable[[Candidate, Any], np.ndarray] | None = None,
) -> tuple[float, float, int]:
    """Both models re-evaluated through mlflow.pyfunc on the rows neither run trained or
    validated on: -> (challenger accuracy, champion accuracy, rows); test R² for regression."""
    import pandas as pd

    from distill.tasks.compress.sources import read_table, table_digest

    mine, theirs = challenger.test_split(), champion.test_split()
    if mine is None or theirs is None:
        raise HeldOutUnavailable(
            "a run lacks its dataset digest or split params: no common held-out rows known"
        )
    if "user" in (mine[0], theirs[0]):  # (the same user split is the same test split)
        raise HeldOutUnavailable(
            "the runs' test rows differ (a split given with the data is kept as it is, the "
            "other run's was different or drawn by distill): no common held-out rows known"
        )
    (_, digest, seed_a, size_a), (_, other, seed_b, size_b) = mine, theirs
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
    regression = challenger.regression
    if champion.regression != regression:
        kinds = {True: "a regression model", False: "a classifier"}
        raise HeldOutUnavailable(
            f"the champion is {kinds[champion.regression]}, this version {kinds[regression]}"
        )
    rows = np.intersect1d(
        held_out_rows(y_raw, size_a, seed_a, regression),
        held_out_rows(y_raw, size_b, seed_b, regression),
    )
    if len(rows) == 0:
        raise HeldOutUnavailable("the two runs' test splits share no rows")
    frame = pd.DataFrame(X[rows], columns=names)
    predict = predict or _pyfunc_predict
    if regression:
        from sklearn.metrics import r2_score

        truth = np.asarray(y_raw[rows], dtype=np.float64)
        r2 = [
            float(r2_score(truth, np.asarray(predict(c, frame), dtype=np.float64)))
            for c in (challenger, champion)
        ]
        return r2[0], r2[1], len(rows)
    truth = np.asarray(y_raw[rows]).astype(str)
    acc = [
        float((np.asarray(predict(c, frame)).astype(str) == truth).mean())
        for c in (challenger, champion)
    ]
    return acc[0], acc[1], len(rows)


def _pyfunc_predict(c: Candidate, frame: Any) -> np.ndarray:
    import mlflow.pyfunc

    try:
        model = mlflow.pyfunc.load_model(f"models:/{c.name}/{c.version}")
    except Exception as err:  # noqa: BLE001 -- whatever stops it loading (artifacts gone, ...)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise HeldOutUnavailable(
            f"version {c.version} does not load ({first}); --ignore-champion promotes "
            "without comparing"
        ) from None
    try:
        rows = model_input(model, frame, f"{c.label}: the held-out rows")
    except UserError as err:  # a tokenized text column re-read as text, ...
        raise HeldOutUnavailable(str(err)) from None
    return model.predict(rows)["prediction"].to_numpy()


def champion_gate(
    c: Candidate,
    champion: Candidate,
    gates: PromoteConfig,
    predict: Callable[[Candidate, Any], np.ndarray] | None = None,
) -> Gate:
    """No worse than the champion (less `champion_tolerance`), on the same rows."""
    tol = gates.champion_tolerance
    what = "R²" if c.regression else "accuracy"
    if same_test_split(c, champion) and c.regression == champion.regression:
        key = c.score_key
        mine, theirs = c.metrics.get(key), champion.metrics.get(key)
        if mine is None or theirs is None:
            return Gate("vs_champion", False, float("nan"), float("nan"), f"{key} not logged")
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
        f"{what} {mine:.4f} {'>=' if ok else '<'} champion version {champion.version} {bound} "
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

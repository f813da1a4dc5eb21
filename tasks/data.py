"""Stage 0 — data: read a table, split it stratified, standardize on the training split only.

Sources (no network): `sklearn:NAME` (digits, iris, wine, breast_cancer), `csv:PATH`,
`parquet:PATH` (pandas; `data.label` names the label column), `npz:PATH` (arrays X, y).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from sklearn.model_selection import train_test_split

from tasks.config import DataConfig
from tasks.errors import UserError

SKLEARN_DATASETS = ("digits", "iris", "wine", "breast_cancer")


@dataclass(frozen=True)
class Dataset:
    """Standardized float32 splits; rows of X are reshaped to `input_shape` by the model."""

    name: str
    source: str
    feature_names: list[str]
    input_shape: tuple[int, ...]
    classes: list  # original label values; class i of the model is classes[i]
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    digest: str  # of the raw table, before splitting: identifies the data a run saw

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def n_features(self) -> int:
        return self.X_train.shape[1]

    def raw_frame(self) -> pd.DataFrame:
        """The un-standardized table (all splits), for MLflow's dataset record."""
        X = np.concatenate([self.X_train, self.X_val, self.X_test]) * self.scale + self.mean
        y = np.concatenate([self.y_train, self.y_val, self.y_test])
        frame = pd.DataFrame(X, columns=self.feature_names)
        frame["label"] = y
        return frame


def read_table(source: str, label: str) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """-> (X float64, y labels as given, feature names, dataset name)."""
    kind, sep, ref = source.partition(":")
    if not sep:
        raise UserError(f"config key 'data.source': expected KIND:REF (e.g. sklearn:digits), got {source!r}")
    if kind == "sklearn":
        return _read_sklearn(ref)
    if kind in ("csv", "parquet"):
        return _read_frame(kind, Path(ref), label)
    if kind == "npz":
        return _read_npz(Path(ref))
    raise UserError(f"config key 'data.source': unknown kind {kind!r} (sklearn, csv, parquet, npz)")


def _read_sklearn(name: str) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    from sklearn import datasets

    if name not in SKLEARN_DATASETS:
        raise UserError(f"config key 'data.source': unknown sklearn dataset {name!r} ({', '.join(SKLEARN_DATASETS)})")
    bunch = getattr(datasets, f"load_{name}")()
    names = [str(n) for n in getattr(bunch, "feature_names", [])] or [f"x{i}" for i in range(bunch.data.shape[1])]
    return bunch.data.astype(np.float64), bunch.target, names, name


def _read_frame(kind: str, path: Path, label: str) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    try:
        frame = pd.read_csv(path) if kind == "csv" else pd.read_parquet(path)
    except Exception as err:  # pandas raises many types for unreadable files
        raise UserError(f"data file {path} could not be read as {kind}: {str(err).splitlines()[0]}") from None
    if label not in frame.columns:
        raise UserError(f"data file {path}: label column {label!r} not found (config key 'data.label')")
    features = frame.drop(columns=[label])
    bad = [c for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
    if bad:
        raise UserError(f"data file {path}: column {bad[0]!r} is not numeric")
    return features.to_numpy(np.float64), frame[label].to_numpy(), [str(c) for c in features.columns], path.stem


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    try:
        arrays = np.load(path, allow_pickle=False)
        missing = [name for name in ("X", "y") if name not in arrays.files]
        if not missing:
            X, y = arrays["X"], arrays["y"]
    except Exception as err:
        raise UserError(f"data file {path} could not be read as npz: {str(err).splitlines()[0]}") from None
    if missing:
        raise UserError(f"data file {path}: missing array {missing[0]!r} (expected X and y)")
    X = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
    return X, np.asarray(y), [f"x{i}" for i in range(X.shape[1])], path.stem


def table_digest(X: np.ndarray, y: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(X, dtype=np.float64).tobytes())
    h.update(np.asarray(y).astype(str).astype("U").tobytes())
    return h.hexdigest()[:16]


def _check(X: np.ndarray, y: np.ndarray, cfg: DataConfig, where: str) -> tuple[int, ...]:
    if len(X) != len(y):
        raise UserError(f"{where}: X has {len(X)} rows but y has {len(y)}")
    if not np.isfinite(X).all():
        col = int(np.argwhere(~np.isfinite(X))[0, 1])
        raise UserError(f"{where}: feature column {col} holds NaN or inf")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise UserError(f"{where}: the label has a single class; need at least 2")
    if counts.min() < 3:
        rare = classes[counts.argmin()]
        rare = rare.item() if hasattr(rare, "item") else rare
        raise UserError(f"{where}: class {rare!r} has {counts.min()} rows; need at least 3 per class to split")
    shape = tuple(cfg.shape) if cfg.shape else (X.shape[1],)
    if int(np.prod(shape)) != X.shape[1]:
        raise UserError(f"config key 'data.shape': {list(shape)} holds {int(np.prod(shape))} values but the data has {X.shape[1]} features")
    return shape


def prepare(X: np.ndarray, y_raw: np.ndarray, names: list[str], name: str, cfg: DataConfig, seed: int) -> Dataset:
    """Stratified train/val/test split, then standardization fitted on train only."""
    shape = _check(X, y_raw, cfg, f"data {cfg.source}")
    digest = table_digest(X, y_raw)
    classes, y = np.unique(y_raw, return_inverse=True)
    idx = np.arange(len(X))
    try:
        rest, test = train_test_split(idx, test_size=cfg.test_size, stratify=y, random_state=seed)
        val_fraction = cfg.val_size / (1 - cfg.test_size)
        train, val = train_test_split(rest, test_size=val_fraction, stratify=y[rest], random_state=seed)
    except ValueError as err:
        raise UserError(f"data {cfg.source}: too few rows to split ({len(X)}): {err}") from None
    mean = X[train].mean(axis=0)
    scale = X[train].std(axis=0)
    scale[scale < 1e-12] = 1.0  # constant columns (digits' border pixels) pass through
    z = ((X - mean) / scale).astype(np.float32)
    return Dataset(
        name=name, source=cfg.source, feature_names=names, input_shape=shape,
        classes=classes.tolist(),
        X_train=z[train], y_train=y[train], X_val=z[val], y_val=y[val], X_test=z[test], y_test=y[test],
        mean=mean.astype(np.float32), scale=scale.astype(np.float32), digest=digest,
    )


def load_dataset(cfg: DataConfig, seed: int) -> Dataset:
    X, y, names, name = read_table(cfg.source, cfg.label)
    return prepare(X, y, names, name, cfg, seed)


@task(name="data", cache_policy=NO_CACHE)
def data_task(cfg: DataConfig, seed: int) -> Dataset:
    return load_dataset(cfg, seed)

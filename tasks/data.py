"""Stage 0 — data: read a table, keep or make the train/val/test split, standardize on train.

Sources (no network): `sklearn:NAME` (digits, iris, wine, breast_cancer), `csv:PATH`,
`parquet:PATH` (pandas; `data.label` names the label column), `npz:PATH` (arrays X, y).

A split the user made is kept, rows in their order: an npz with arrays X_train, y_train,
X_test, y_test (X_val, y_val optional), or a csv/parquet column named by `data.split_column`
holding train / val / test. Without validation rows, they are carved from train (stratified,
`data.val_size` of all rows, seeded). Otherwise distill splits the table itself, stratified and
seeded (`data.test_size`, `data.val_size`). Standardization is fitted on the training rows;
`data.standardize: false` feeds the features as given (mean 0, scale 1).
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
SPLITS = ("train", "val", "test")
NPZ_SPLIT_ARRAYS = ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test")


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
    mean: np.ndarray  # the model sees (X - mean) / scale; zeros and ones if not standardized
    scale: np.ndarray
    digest: str  # of the raw table and the user's split, if any: identifies the data a run saw

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


@dataclass(frozen=True)
class Table:
    """What a source holds, before splitting: one flat float64 row per sample, all splits."""

    X: np.ndarray
    y: np.ndarray  # labels as given
    names: list[str]
    name: str
    where: str  # the source, for messages: "data file PATH" or "data sklearn:NAME"
    row_shape: tuple[int, ...]  # one row as stored: (F,), or e.g. (C, L) for an npz array
    split: np.ndarray | None = None  # "train" / "val" / "test" per row if the user split it
    split_column: str | None = None  # the csv/parquet column the split came from

    def origin(self, part: str, array: str) -> str:
        """Where the user's `part` split lives, for messages: a column value or an npz array."""
        if self.split_column:
            return f"column {self.split_column!r} value {part!r}"
        return f"array '{array}_{part}'"

    @property
    def split_key(self) -> str:
        return "data.split_column" if self.split_column else "data.source"


def read_source(source: str, label: str, split_column: str | None = None) -> Table:
    kind, sep, ref = source.partition(":")
    if not sep:
        raise UserError(f"config key 'data.source': expected KIND:REF (e.g. sklearn:digits), "
                        f"got {source!r}")
    if split_column is not None and kind not in ("csv", "parquet"):
        raise UserError(f"config key 'data.split_column': only csv and parquet sources have "
                        f"columns, not {kind!r} (an npz gives X_train, X_test, ... arrays)")
    if split_column is not None and split_column == label:
        raise UserError(f"config key 'data.split_column': {split_column!r} is the label column "
                        f"(config key 'data.label')")
    if kind == "sklearn":
        return _read_sklearn(ref)
    if kind in ("csv", "parquet"):
        return _read_frame(kind, Path(ref), label, split_column)
    if kind == "npz":
        return _read_npz(Path(ref))
    raise UserError(f"config key 'data.source': unknown kind {kind!r} (sklearn, csv, parquet, npz)")


def read_table(source: str, label: str) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """-> (X float64, y labels as given, feature names, dataset name): all rows of a source."""
    table = read_source(source, label)
    return table.X, table.y, table.names, table.name


def _read_sklearn(name: str) -> Table:
    from sklearn import datasets

    if name not in SKLEARN_DATASETS:
        raise UserError(f"config key 'data.source': unknown sklearn dataset {name!r} "
                        f"({', '.join(SKLEARN_DATASETS)})")
    bunch = getattr(datasets, f"load_{name}")()
    X = bunch.data.astype(np.float64)
    names = [str(n) for n in getattr(bunch, "feature_names", [])]
    names = names or [f"x{i}" for i in range(X.shape[1])]
    return Table(X, bunch.target, names, name, f"data sklearn:{name}", (X.shape[1],))


def _read_frame(kind: str, path: Path, label: str, split_column: str | None) -> Table:
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    try:
        frame = pd.read_csv(path) if kind == "csv" else pd.read_parquet(path)
    except Exception as err:  # pandas raises many types for unreadable files
        raise UserError(f"data file {path} could not be read as {kind}: "
                        f"{str(err).splitlines()[0]}") from None
    where = f"data file {path}"
    if frame.empty:
        raise UserError(f"{where}: no rows" + (" (only a header)" if len(frame.columns) else ""))
    for role, column, key in (("label", label, "data.label"),
                              ("split", split_column, "data.split_column")):
        if column is not None and column not in frame.columns:
            raise UserError(f"{where}: {role} column {column!r} not found (config key {key!r})")
    split = None if split_column is None else _split_values(frame[split_column], where)
    features = frame.drop(columns=[c for c in (label, split_column) if c is not None])
    bad = [c for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
    if bad:
        hint = (f" (a split? set config key 'data.split_column' to {bad[0]!r})"
                if set(features[bad[0]]) <= set(SPLITS) else "")
        raise UserError(f"{where}: column {bad[0]!r} is not numeric{hint}")
    X = features.to_numpy(np.float64)
    names = [str(c) for c in features.columns]
    return Table(X, frame[label].to_numpy(), names, path.stem, where, (X.shape[1],),
                 split, split_column)


def _split_values(column: pd.Series, where: str) -> np.ndarray:
    """The split column as "train" / "val" / "test" per row, or one line naming a bad value."""
    for value in pd.unique(column.to_numpy(dtype=object)):
        if value not in SPLITS:
            shown = "an empty cell" if pd.isna(value) else repr(value)
            raise UserError(f"{where}: column {column.name!r} holds {shown}; expected train, "
                            f"val or test (config key 'data.split_column')")
    return column.to_numpy(dtype=object).astype("U5")


def _read_npz(path: Path) -> Table:
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {n: npz[n] for n in npz.files if n in ("X", "y", *NPZ_SPLIT_ARRAYS)}
    except Exception as err:
        raise UserError(f"data file {path} could not be read as npz: "
                        f"{str(err).splitlines()[0]}") from None
    where = f"data file {path}"
    if not any(n in arrays for n in NPZ_SPLIT_ARRAYS):
        X, y, row_shape = _npz_pair(arrays, where, "X", "y")
        return Table(X, y, [f"x{i}" for i in range(X.shape[1])], path.stem, where, row_shape)
    parts = [s for s in SPLITS if s != "val" or {"X_val", "y_val"} & arrays.keys()]
    pairs = [_npz_pair(arrays, where, f"X_{s}", f"y_{s}") for s in parts]
    for part, (_, _, row_shape) in zip(parts, pairs, strict=True):
        if row_shape != pairs[0][2]:
            raise UserError(f"{where}: rows of array 'X_{part}' have shape {list(row_shape)} "
                            f"but those of 'X_train' have {list(pairs[0][2])}")
    X = np.concatenate([X for X, _, _ in pairs])
    y = np.concatenate([y for _, y, _ in pairs])
    split = np.repeat(np.array(parts, dtype="U5"), [len(y) for _, y, _ in pairs])
    return Table(X, y, [f"x{i}" for i in range(X.shape[1])], path.stem, where, pairs[0][2],
                 split)


def _npz_pair(arrays: dict[str, np.ndarray], where: str, x_name: str, y_name: str,
              ) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """-> (rows of X flattened in C order as float64, y, the shape of one row of X)."""
    for name in (x_name, y_name):
        if name not in arrays:
            raise UserError(f"{where}: missing array {name!r} (expected X and y, or X_train, "
                            f"y_train, X_test, y_test and optionally X_val, y_val)")
    X, y = arrays[x_name], arrays[y_name]
    if X.ndim == 0 or not (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
        raise UserError(f"{where}: array {x_name!r} must be numeric with one row per sample, "
                        f"got {X.dtype} of shape {list(X.shape)}")
    if y.ndim == 0 or y.size != len(y):
        raise UserError(f"{where}: array {y_name!r} must hold one label per row, "
                        f"got shape {list(y.shape)}")
    if len(X) != len(y):
        raise UserError(f"{where}: array {x_name!r} has {len(X)} rows but {y_name!r} has {len(y)}")
    flat = X.reshape(len(X), int(np.prod(X.shape[1:]))).astype(np.float64)
    return flat, y.reshape(-1), X.shape[1:] or (1,)


def table_digest(X: np.ndarray, y: np.ndarray, split: np.ndarray | None = None) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(X, dtype=np.float64).tobytes())
    h.update(np.asarray(y).astype(str).astype("U").tobytes())
    if split is not None:  # the user's split is part of what a run saw
        h.update(np.asarray(split, dtype="U5").tobytes())
    return h.hexdigest()[:16]


def _plain(value):
    """A numpy scalar as the Python value, for messages (7, not np.int64(7))."""
    return value.item() if hasattr(value, "item") else value


def _check_finite(X: np.ndarray, where: str) -> None:
    if not np.isfinite(X).all():
        col = int(np.argwhere(~np.isfinite(X))[0, 1])
        raise UserError(f"{where}: feature column {col} holds NaN or inf")


def _input_shape(table: Table, shape: list[int] | None) -> tuple[int, ...]:
    shape = tuple(shape) if shape else table.row_shape
    n = table.X.shape[1]
    if int(np.prod(shape)) != n:
        raise UserError(f"config key 'data.shape': {list(shape)} holds {int(np.prod(shape))} "
                        f"values but the data has {n} features")
    return shape


def _check_splittable(table: Table, where: str) -> None:
    """Distill splits the table: finite, at least 2 classes, at least 3 rows of each."""
    _check_finite(table.X, where)
    classes, counts = np.unique(table.y, return_counts=True)
    if len(classes) < 2:
        raise UserError(f"{where}: the label has a single class; need at least 2")
    if counts.min() < 3:
        raise UserError(f"{where}: class {_plain(classes[counts.argmin()])!r} has "
                        f"{counts.min()} rows; need at least 3 per class to split")


def _check_user_split(table: Table) -> None:
    """The user split the table: train and test rows, finite, val/test labels seen in train."""
    rows = {part: np.flatnonzero(table.split == part) for part in SPLITS}
    for part in SPLITS:
        if part != "val" and len(rows[part]) == 0:
            raise UserError(f"{table.where}: no {part} rows ({table.origin(part, 'X')}; "
                            f"config key {table.split_key!r})")
        where = f"{table.where}, {part} split ({table.origin(part, 'X')})"
        _check_finite(table.X[rows[part]], where)
    train_labels = table.y[rows["train"]]
    if len(np.unique(train_labels)) < 2:
        raise UserError(f"{table.where}: the training split holds a single class; need at least 2")
    for part in ("val", "test"):
        unseen = np.setdiff1d(table.y[rows[part]], train_labels)
        if len(unseen):
            raise UserError(f"{table.where}: label {_plain(unseen[0])!r} is in the {part} split "
                            f"({table.origin(part, 'y')}) but never in the training split "
                            f"(config key {table.split_key!r})")


def split_rows(table: Table, y: np.ndarray, cfg: DataConfig, seed: int,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices (train, val, test): the user's split, else a stratified seeded one."""
    if table.split is None:
        if cfg.test_size + cfg.val_size >= 1:
            raise UserError(f"config keys 'data.test_size' ({cfg.test_size:g}) + 'data.val_size' "
                            f"({cfg.val_size:g}) leave no training rows: their sum must be below 1")
        try:
            rest, test = train_test_split(np.arange(len(y)), test_size=cfg.test_size, stratify=y,
                                          random_state=seed)
            val_fraction = cfg.val_size / (1 - cfg.test_size)
            train, val = train_test_split(rest, test_size=val_fraction, stratify=y[rest],
                                          random_state=seed)
        except ValueError as err:
            raise UserError(f"data {cfg.source}: too few rows to split ({len(y)}): {err}") from None
        return train, val, test
    train, val, test = (np.flatnonzero(table.split == part) for part in SPLITS)
    if len(val) == 0:
        train, val = _carve_val(table, y, train, cfg.val_size, seed)
    return train, val, test


def _carve_val(table: Table, y: np.ndarray, train: np.ndarray, val_size: float, seed: int,
               ) -> tuple[np.ndarray, np.ndarray]:
    """Validation rows out of the user's training rows (`val_size` of all rows, rounded),
    stratified and seeded; both keep the user's row order."""
    n_val = max(1, round(val_size * len(y)))
    try:
        if n_val >= len(train):
            raise ValueError(f"{n_val} rows asked of {len(train)}")
        train, val = train_test_split(train, test_size=n_val, stratify=y[train],
                                      random_state=seed)
    except ValueError as err:
        raise UserError(f"{table.where}: cannot carve {n_val} validation rows ({val_size:g} of "
                        f"all rows) from the training split: {str(err).splitlines()[0]}; give a "
                        f"val split or change config key 'data.val_size'") from None
    return np.sort(train), np.sort(val)


def standardizer(X_train: np.ndarray, enabled: bool) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) per feature, fitted on the training rows; the identity when disabled."""
    if not enabled:
        return np.zeros(X_train.shape[1]), np.ones(X_train.shape[1])
    mean = X_train.mean(axis=0)
    scale = X_train.std(axis=0)
    scale[scale < 1e-12] = 1.0  # constant columns (digits' border pixels) pass through
    return mean, scale


def prepare(table: Table, cfg: DataConfig, seed: int) -> Dataset:
    """Check the table, split it (or keep the user's split), standardize on train only."""
    shape = _input_shape(table, cfg.shape)
    if table.split is None:
        _check_splittable(table, f"data {cfg.source}")
    else:
        _check_user_split(table)
    classes, y = np.unique(table.y, return_inverse=True)  # one encoding for all splits
    train, val, test = split_rows(table, y, cfg, seed)
    mean, scale = standardizer(table.X[train], cfg.standardize)
    z = ((table.X - mean) / scale).astype(np.float32)
    return Dataset(
        name=table.name, source=cfg.source, feature_names=table.names, input_shape=shape,
        classes=classes.tolist(),
        X_train=z[train], y_train=y[train], X_val=z[val], y_val=y[val],
        X_test=z[test], y_test=y[test],
        mean=mean.astype(np.float32), scale=scale.astype(np.float32),
        digest=table_digest(table.X, table.y, table.split),
    )


def load_dataset(cfg: DataConfig, seed: int) -> Dataset:
    return prepare(read_source(cfg.source, cfg.label, cfg.split_column), cfg, seed)


@task(name="data", cache_policy=NO_CACHE)
def data_task(cfg: DataConfig, seed: int) -> Dataset:
    return load_dataset(cfg, seed)

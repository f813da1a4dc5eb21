"""Stage 0 — data in memory: keep or make the train/val/test split, standardize on train.

The table comes from tasks/compress/sources.py (sklearn, csv, parquet, npz). A split the user
made is kept, rows in their order: an npz with arrays X_train, y_train, X_test, y_test (X_val,
y_val optional), or a csv/parquet column named by `data.split_column` holding train / val /
test. Without validation rows, they are carved from train (stratified, `data.val_size` of all
rows, seeded). Otherwise distill splits the table itself, stratified and seeded
(`data.test_size`, `data.val_size`). Standardization is fitted on the training rows;
`data.standardize: false` (the default for a loaded teacher) feeds the features as given (mean
0, scale 1): floats as float32, integers (an npz of token ids) as int64, never cast to float.

A csv/parquet table is taken as it is: text columns are categories and empty numeric cells
are imputed, both fitted on the training rows (tasks/compress/tabular.py) and carried by the
registered model, which takes the raw columns.

The task (`data.task`): text and integral labels are classes; a label of non-integer numbers is
a regression target (`auto`), as is any numeric label under `regression`. A label with many
distinct integers (an age, a count) stops under `auto` and asks which it is. A regression target
is standardized on the training rows (`target_mean`, `target_scale`: the model learns
`(y - mean) / scale`, its answers go back to the label's units with `to_units`), and the splits
are drawn without stratification.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd

from distill.tasks.compress import tabular
from distill.tasks.compress.readers import open_npz, parquet_rows
from distill.tasks.compress.rows import take
from distill.tasks.compress.sources import SPLITS, Table
from distill.tasks.platform.config import DataConfig
from distill.tasks.platform.errors import UserError

RAW_BATCH = 32_768  # rows per Parquet batch when a streamed table's raw rows are read back
MAX_INTEGER_CLASSES = 10  # more distinct integer labels: classes or a quantity? the user says


@dataclass(frozen=True)
class Dataset:
    """Standardized float32 splits (integer features not standardized, token ids: int64); rows
    of X are reshaped to `input_shape` by the model. A large table's X splits are `Rows` on disk
    (tasks/compress/rows.py, stream.py), read by batch.

    `feature_names` are the raw columns a user gives (the registered model's input);
    `encoding` (tasks/compress/tabular.py) turns them into the model's `n_features` columns."""

    name: str
    # where the rows were read from, not what they are: no part of a stage's cache key (the
    # arrays and `digest` are), so the same rows from another path (the Python API's temporary
    # npz) reuse the cached stages
    source: str = field(metadata={"content": False})
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
    encoding: dict = field(default_factory=dict)  # compress/tabular.py spec; {}: columns as given
    raw: pd.DataFrame | None = None  # the raw feature columns, rows in split order (csv/parquet)
    # regression: y_* are float32 targets standardized on train, `classes` is empty; the label's
    # units are y * target_scale + target_mean
    task: str = "classification"  # classification | regression
    target_mean: float = 0.0
    target_scale: float = 1.0
    user_split: bool = False  # the rows came split by the user (npz arrays or data.split_column)
    # X_* hold token ids with their attention masks folded in (tasks/compress/masks.py): from an
    # npz's X_*_mask arrays or a tokenizer's padding; only a Hugging Face teacher reads them
    masked: bool = False

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def is_regression(self) -> bool:
        return self.task == "regression"

    @property
    def n_outputs(self) -> int:
        """The model's outputs per row: one logit per class, or one value for regression."""
        return 1 if self.is_regression else self.n_classes

    def to_units(self, z: np.ndarray) -> np.ndarray:
        """Standardized regression targets (or a model's outputs) in the label's units, float64."""
        return np.asarray(z, dtype=np.float64) * self.target_scale + self.target_mean

    @property
    def n_features(self) -> int:
        return self.X_train.shape[1]

    def raw_rows(self, part: str = "all", n: int | None = None) -> pd.DataFrame:
        """The raw feature columns of a split ("train", "val", "test") or of all rows; only the
        first `n` when given (rows on disk are read only then: tasks/compress/stream.py)."""
        parts = list(SPLITS) if part == "all" else [part]
        if self.raw is not None:
            bounds = np.cumsum([0, len(self.X_train), len(self.X_val), len(self.X_test)])
            i = SPLITS.index(part) if part != "all" else 0
            stop = bounds[i + 1] if part != "all" else bounds[-1]
            stop = stop if n is None else min(stop, bounds[i] + n)
            frame = self.raw.iloc[bounds[i] : stop]
            return frame if part == "all" and n is None else frame.reset_index(drop=True)
        blocks, left = [], n
        for p in parts:
            X = getattr(self, f"X_{p}")
            blocks.append(X[: len(X) if left is None else min(left, len(X))])
            left = None if left is None else left - len(blocks[-1])
        if tabular.needs_sklearn(self.encoding):  # a streamed table with text or empty cells
            parts_rows = [
                getattr(self, f"X_{p}").origin[: len(b)] for p, b in zip(parts, blocks, strict=True)
            ]
            path = Path(self.source.partition(":")[2])
            return parquet_rows(path, np.concatenate(parts_rows), self.feature_names, RAW_BATCH)
        X = np.concatenate(blocks) * self.scale + self.mean
        return pd.DataFrame(X.astype(np.float64), columns=self.feature_names)

    def raw_frame(self, n: int | None = None) -> pd.DataFrame:
        """The raw table (all splits, or its first `n` rows) with its labels, for MLflow's
        dataset record."""
        y = np.concatenate([self.y_train, self.y_val, self.y_test])
        frame = self.raw_rows("all", n)
        y = y[: len(frame)]
        if self.is_regression:
            return frame.assign(label=self.to_units(y))
        return frame.assign(label=np.asarray(self.classes, dtype=object)[y])


def check_hold_out(n: int, total: int) -> None:
    """`target.agreement_rows` = `n` of `total` training rows: at most half of them."""
    if n > total // 2:
        raise UserError(
            f"config key 'target.agreement_rows': {n} of the {total} training rows would leave "
            f"too few to fit the student on; hold out at most {total // 2}"
        )


def hold_out(data: Dataset, n: int, seed: int) -> tuple[Dataset, np.ndarray]:
    """`n` training rows, drawn with `seed`, set aside: (the data without them, their X). What a
    target's agreement guard asks teacher and student about (`target.agreement_rows`,
    tasks/compress/guard.py): no fit of the student sees them, and no label of theirs is read."""
    total = len(data.X_train)
    check_hold_out(n, total)
    order = np.random.default_rng(seed).permutation(total)
    held, kept = np.sort(order[:n]), np.sort(order[n:])
    # rows on disk (tasks/compress/rows.py) stay there, standing in for the array as in
    # stream.py; the held-out ones are read
    fit, agree = cast(np.ndarray, take(data.X_train, kept)), np.asarray(data.X_train[held])
    raw = data.raw
    if raw is not None:  # its rows follow the splits: train, val, test
        rest = total + np.arange(len(data.X_val) + len(data.X_test))
        raw = raw.iloc[np.concatenate([kept, rest])].reset_index(drop=True)
    return replace(data, X_train=fit, y_train=data.y_train[kept], raw=raw), agree


def unlabeled_rows(source: str, data: Dataset) -> np.ndarray:
    """`target.unlabeled: npz:PATH`: its array X as the model sees the data's rows (flattened,
    standardized as the training rows were; integer token ids as int64), checked against the
    data: one line naming the key and the file for anything else."""
    key = "config key 'target.unlabeled'"
    kind, _, ref = source.partition(":")
    if kind != "npz" or not ref:
        raise UserError(f"{key}: expected npz:PATH (an array X of rows, no labels), got {source!r}")
    path = Path(ref)
    where = f"{key}: {path}"
    if not path.is_file():
        raise UserError(f"{key}: file not found: {path}")
    with open_npz(path, where) as npz:
        if "X" not in npz.files:
            raise UserError(f"{where} has no array 'X' (it has {', '.join(npz.files) or 'none'})")
        X = npz["X"]
    if (data.encoding and tabular.needs_sklearn(data.encoding)) or data.masked:
        what = "token ids with attention masks" if data.masked else "encoded columns"
        raise UserError(
            f"{where}: this data's rows are {what}; unlabeled rows are taken as plain arrays "
            "only (use target.agreement_rows)"
        )
    if X.ndim < 2 or not np.issubdtype(X.dtype, np.number) or len(X) == 0:
        raise UserError(f"{where}: array 'X' must be numeric rows, got {X.dtype} {list(X.shape)}")
    flat = X.reshape(len(X), -1)
    if flat.shape[1] != data.n_features:
        raise UserError(
            f"{where}: its rows have {flat.shape[1]} values ({list(X.shape[1:])}), the data's "
            f"{data.n_features}"
        )
    if data.X_train.dtype == np.int64:  # token ids, fed as given
        if flat.dtype.kind not in "iu":
            raise UserError(f"{where}: the data's rows are integer token ids, X holds {X.dtype}")
        return flat.astype(np.int64)
    bad = ~np.isfinite(flat).all(axis=1)
    if bad.any():
        raise UserError(f"{where}: row {int(np.argmax(bad))} of X is not finite")
    return ((flat - data.mean) / data.scale).astype(np.float32)


def _plain(value):
    """A numpy scalar as the Python value, for messages (7, not np.int64(7))."""
    return value.item() if hasattr(value, "item") else value


def _labels(table: Table, task: str) -> tuple[np.ndarray, str]:
    """-> (labels, the task). Classes: no empty ones; integral floats as integers; a label with
    many integer values (an age, a count) stops unless `data.task` says which it is. Regression
    (`data.task: regression`, or non-integer numbers under `auto`): finite numbers, float64."""
    y = np.asarray(table.y)
    what = f"label column {table.label!r}" if table.label else "the labels (array 'y')"
    empty = pd.isna(y)
    if empty.any():
        raise UserError(
            f"{table.where}: {what} is empty in {int(empty.sum())} row(s) (first: row "
            f"{int(np.argmax(empty))}); fill or drop those rows"
        )
    if y.dtype == object:
        y = y.astype(str)
    numeric = y.dtype.kind in "iufb"
    if task == "regression":
        if not numeric or y.dtype.kind == "b":
            raise UserError(
                f"{table.where}: {what} holds {'booleans' if numeric else 'text'} (e.g. "
                f"{_plain(y[0])!r}), not numbers: data.task regression needs a numeric label"
            )
        y = y.astype(np.float64)
        if not np.isfinite(y).all():
            raise UserError(
                f"{table.where}: {what} holds inf in row {int(np.argmax(~np.isfinite(y)))}"
            )
        return y, "regression"
    if y.dtype.kind in "fc":
        if not np.isfinite(y).all():
            raise UserError(
                f"{table.where}: {what} holds inf in row {int(np.argmax(~np.isfinite(y)))}"
            )
        if (y != np.round(y)).any():
            if task == "auto":
                return y.astype(np.float64), "regression"
            value = y[y != np.round(y)][0]
            raise UserError(
                f"{table.where}: {what} holds non-integer numbers (e.g. {value:g}), a "
                f"quantity, not classes: set config key 'data.task' to regression (or auto)"
            )
        y = y.astype(np.int64)
    if y.dtype.kind in "iu" and task == "auto":
        values = np.unique(y)
        if len(values) > MAX_INTEGER_CLASSES:
            raise UserError(
                f"{table.where}: {what} holds {len(values)} distinct integers "
                f"({values[0]} to {values[-1]}): classes or a quantity? set config key "
                f"'data.task' to classification to train {len(values)} classes, or to "
                f"regression to predict the number"
            )
    return y, "classification"


def _check_splittable(classes: np.ndarray, y: np.ndarray, where: str) -> None:
    """Distill splits the table: at least 2 classes, at least 3 rows of each."""
    counts = np.bincount(y, minlength=len(classes))
    if len(classes) < 2:
        raise UserError(f"{where}: the label has a single class; need at least 2")
    if counts.min() < 3:
        raise UserError(
            f"{where}: class {_plain(classes[counts.argmin()])!r} has "
            f"{counts.min()} rows; need at least 3 per class to split"
        )


def _check_user_split(table: Table, labels: np.ndarray) -> None:
    """The user split the table: train and test rows, val/test labels seen in train."""
    rows = {part: np.flatnonzero(table.split == part) for part in SPLITS}
    for part in SPLITS:
        if part != "val" and len(rows[part]) == 0:
            raise UserError(
                f"{table.where}: no {part} rows ({table.origin(part, 'X')}; "
                f"config key {table.split_key!r})"
            )
    if labels.dtype.kind == "f":  # a regression target: no classes to check
        return
    train_labels = labels[rows["train"]]
    if len(np.unique(train_labels)) < 2:
        raise UserError(f"{table.where}: the training split holds a single class; need at least 2")
    for part in ("val", "test"):
        unseen = np.setdiff1d(labels[rows[part]], train_labels)
        if len(unseen):
            raise UserError(
                f"{table.where}: label {_plain(unseen[0])!r} is in the {part} split "
                f"({table.origin(part, 'y')}) but never in the training split "
                f"(config key {table.split_key!r})"
            )


def _encoding(table: Table, train: np.ndarray) -> dict:
    """The compress/tabular.py spec, fitted on the training rows; plain columns for an array."""
    if not table.encode:
        return {"columns": [{"name": n, "kind": "numeric", "fill": None} for n in table.names]}
    features = table.features
    gaps = set(features.columns[features.isna().any()])
    for name in features.columns:
        column = features[name]
        if tabular.column_kind(column) != "numeric":
            continue
        if name in gaps and column.iloc[train].isna().all():
            raise UserError(
                f"{table.where}: column {name!r} is empty in every training row; drop it"
            )
        inf = np.isinf(column.to_numpy(np.float64))
        if inf.any():  # before the imputer's fit, which refuses it with no column named
            raise UserError(
                f"{table.where}: column {name!r} holds inf in row {int(np.argmax(inf))}"
            )
    return tabular.fit_spec(features.iloc[train], gaps)


def _encoded_owner(spec: dict) -> list[str]:
    """For each encoded column, the raw column it comes from."""
    return [c["name"] for c in spec["columns"] for _ in tabular.feature_names({"columns": [c]})]


def _check_finite(X: np.ndarray, spec: dict, table: Table, start: int = 0) -> None:
    """Every encoded value finite, else one line naming the raw column, the split and the row.
    `start`: the table row of X's first row (a block of a streamed table)."""
    bad = ~np.isfinite(X)
    if not bad.any():
        return
    row, col = (int(i) for i in np.argwhere(bad)[0])
    what = "NaN (an empty cell)" if np.isnan(X[row, col]) else "inf"
    hint = "; array rows are not imputed" if not table.encode and np.isnan(X[row, col]) else ""
    row += start
    where = table.where
    if table.split is not None:  # the row within the user's split
        part = str(table.split[row])
        row = int(np.sum(table.split[:row] == part))
        where += f", {part} split ({table.origin(part, 'X')})"
    raise UserError(
        f"{where}: column {_encoded_owner(spec)[col]!r} holds {what} in row {row}{hint}"
    )


def _input_shape(table: Table, shape: list[int] | None, n: int) -> tuple[int, ...]:
    if shape:
        dims = tuple(shape)
    else:  # the rows' own shape, unless encoding changed the width
        dims = table.row_shape if n == int(np.prod(table.row_shape)) else (n,)
    if int(np.prod(dims)) != n:
        raw = len(table.names)
        extra = f" ({raw} columns, {n} after encoding text and empty cells)" if raw != n else ""
        raise UserError(
            f"config key 'data.shape': {list(dims)} holds {int(np.prod(dims))} "
            f"values but the data has {n} features{extra}"
        )
    return dims


def split_rows(
    table: Table,
    y: np.ndarray,
    cfg: DataConfig,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices (train, val, test): the user's split, else a seeded one, stratified by class
    (a regression target, float `y`, is not stratified)."""
    from sklearn.model_selection import train_test_split

    strata = None if y.dtype.kind == "f" else y
    if table.split is None:
        if cfg.test_size + cfg.val_size >= 1:
            raise UserError(
                f"config keys 'data.test_size' ({cfg.test_size:g}) + 'data.val_size' "
                f"({cfg.val_size:g}) leave no training rows: their sum must be below 1"
            )
        try:
            rest, test = seeded_test_split(y, cfg.test_size, seed)
            val_fraction = cfg.val_size / (1 - cfg.test_size)
            train, val = train_test_split(
                rest,
                test_size=val_fraction,
                stratify=None if strata is None else y[rest],
                random_state=seed,
            )
        except ValueError as err:
            raise UserError(f"data {cfg.source}: too few rows to split ({len(y)}): {err}") from None
        return train, val, test
    train, val, test = (np.flatnonzero(table.split == part) for part in SPLITS)
    if len(val) == 0:
        train, val = _carve_val(table, y, train, cfg.val_size, seed)
    return train, val, test


def _carve_val(
    table: Table,
    y: np.ndarray,
    train: np.ndarray,
    val_size: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Validation rows out of the user's training rows (`val_size` of all rows, rounded),
    stratified and seeded; both keep the user's row order."""
    from sklearn.model_selection import train_test_split

    n_val = max(1, round(val_size * len(y)))
    try:
        if n_val >= len(train):
            raise ValueError(f"{n_val} rows asked of {len(train)}")
        strata = None if y.dtype.kind == "f" else y[train]
        train, val = train_test_split(train, test_size=n_val, stratify=strata, random_state=seed)
    except ValueError as err:
        raise UserError(
            f"{table.where}: cannot carve {n_val} validation rows ({val_size:g} of "
            f"all rows) from the training split: {str(err).splitlines()[0]}; give a "
            f"val split or change config key 'data.val_size'"
        ) from None
    return np.sort(train), np.sort(val)


def seeded_test_split(y: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (rest, test) of the seeded split: stratified by class (integer codes), not
    for a regression target (float `y`). Promotion re-derives a run's test rows with it."""
    from sklearn.model_selection import train_test_split

    strata = None if y.dtype.kind == "f" else y
    rest, test = train_test_split(
        np.arange(len(y)), test_size=test_size, stratify=strata, random_state=seed
    )
    return rest, test


def keeps_integers(dtype: np.dtype, standardize: bool) -> bool:
    """Integer features (token ids, an npz's integer arrays) reach the model as int64 unless
    they are standardized (then float32, like every other feature)."""
    return np.dtype(dtype).kind in "iu" and not standardize


def standardizer(X_train: np.ndarray, enabled: bool) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) per feature, fitted on the training rows; the identity when disabled."""
    if not enabled:
        return np.zeros(X_train.shape[1]), np.ones(X_train.shape[1])
    with np.errstate(over="ignore", invalid="ignore"):
        mean = X_train.mean(axis=0)
        scale = X_train.std(axis=0)
    scale[scale < 1e-12] = 1.0  # constant columns (digits' border pixels) pass through
    return mean, scale


def check_mean_scale(
    mean: np.ndarray, scale: np.ndarray, peak: Callable[[int], float], spec: dict, where: str
) -> None:
    """A mean or scale overflowed by values like 1e300: one line naming the column (`peak(col)`:
    its largest absolute value)."""
    bad = ~(np.isfinite(mean) & np.isfinite(scale))
    if bad.any():
        col = int(np.argmax(bad))
        raise UserError(
            f"{where}: column {_encoded_owner(spec)[col]!r} has values up to "
            f"{peak(col):.3g}: its mean or scale is not a finite number; rescale the column"
        )


def _check_scaled(
    X: np.ndarray, mean: np.ndarray, scale: np.ndarray, z: np.ndarray, spec: dict, where: str
) -> None:
    """Values like 1e300 overflow the mean or the scale, or float32: one line naming the column."""
    check_mean_scale(mean, scale, lambda col: float(np.abs(X[:, col]).max()), spec, where)
    bad = ~np.isfinite(z).all(axis=0)
    if bad.any():
        col = int(np.argmax(bad))
        raise UserError(
            f"{where}: column {_encoded_owner(spec)[col]!r} has values up to "
            f"{np.abs(X[:, col]).max():.3g}, beyond float32 once standardized; "
            f"rescale the column"
        )


def checked_labels(table: Table, cfg: DataConfig) -> tuple[np.ndarray, str, np.ndarray, np.ndarray]:
    """-> (labels, task, classes, y): y the class codes (classes sorted), or the regression
    target as given (no classes); the table checked to split, or its own split checked."""
    where = f"data {cfg.source}"
    labels, task = _labels(table, cfg.task)
    if task == "regression":
        classes, y = np.array([]), labels
        if table.split is None and len(y) < 10:
            raise UserError(f"{where}: {len(y)} rows; need at least 10 to split")
    else:
        classes, y = np.unique(labels, return_inverse=True)  # one encoding for all splits
    if table.split is not None:
        _check_user_split(table, labels)
    elif task != "regression":
        _check_splittable(classes, y, where)
    return labels, task, classes, y


def standardized_target(
    y: np.ndarray, train: np.ndarray, task: str, where: str
) -> tuple[np.ndarray, float, float]:
    """-> (y, mean, scale): a regression target standardized on the training rows (the model
    learns that; predictions come back as y * scale + mean); class codes as they are."""
    if task != "regression":
        return y, 0.0, 1.0
    mean, scale = float(y[train].mean()), float(y[train].std())
    if not np.isfinite(scale) or scale < 1e-12:
        raise UserError(
            f"{where}: the label is constant on the training rows ({mean:g}): nothing to regress"
        )
    return ((y - mean) / scale).astype(np.float32), mean, scale


def prepare(table: Table, cfg: DataConfig, seed: int) -> Dataset:
    """Check the table, split it (or keep the user's split), fit the encoding of text columns
    and empty cells and the standardization on train only."""
    _, task, classes, y = checked_labels(table, cfg)
    train, val, test = split_rows(table, y, cfg, seed)
    spec = _encoding(table, train)
    X = table.X if not tabular.needs_sklearn(spec) else tabular.encode(spec, table.features)
    assert X is not None  # a table without X has text columns: encoded above
    _check_finite(X, spec, table)
    shape = _input_shape(table, cfg.shape, X.shape[1])
    mean, scale = standardizer(X[train], cfg.standardize)
    if keeps_integers(X.dtype, cfg.standardize):  # token ids: int64, as the model takes them
        z = X.astype(np.int64, copy=False)
    elif table.masked:
        raise UserError(
            f"{table.where}: attention masks go with token ids fed as given, and config key "
            "'data.standardize' is true (it would turn the ids into scaled floats): set it to false"
        )
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            z = ((X - mean) / scale).astype(np.float32)
        _check_scaled(X, mean, scale, z, spec, table.where)
    order = np.concatenate([train, val, test])
    raw = table.features.iloc[order].reset_index(drop=True) if tabular.needs_sklearn(spec) else None
    y, target_mean, target_scale = standardized_target(y, train, task, table.where)
    return Dataset(
        name=table.name,
        source=cfg.source,
        feature_names=table.names,
        input_shape=shape,
        classes=classes.tolist(),
        X_train=z[train],
        y_train=y[train],
        X_val=z[val],
        y_val=y[val],
        X_test=z[test],
        y_test=y[test],
        mean=mean.astype(np.float32),
        scale=scale.astype(np.float32),
        digest=table.digest(),
        user_split=table.split is not None,
        encoding=spec,
        raw=raw,
        task=task,
        target_mean=target_mean,
        target_scale=target_scale,
        masked=table.masked,
    )

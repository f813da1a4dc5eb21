"""Where the data comes from (no network): `sklearn:NAME` (digits, iris, wine, breast_cancer;
diabetes, a regression target), `csv:PATH`, `parquet:PATH` (pandas; `data.label` names the label
column), `npz:PATH` (arrays X, y; or X_train, y_train, X_test, y_test and optionally X_val,
y_val: the user's split; each X may come with its attention mask, `X_mask` or `X_train_mask`
..., int or bool of X's shape, folded into the ids: tasks/compress/masks.py). A csv/parquet
column named by `data.split_column` holds the user's split as train / val / test. `read_source`
returns a `Table`: every row, not yet split (tasks/compress/dataset.py splits and standardizes
it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from distill.tasks.compress import masks as masks_module
from distill.tasks.compress import readers, tabular
from distill.tasks.platform.errors import UserError

SKLEARN_DATASETS = ("digits", "iris", "wine", "breast_cancer", "diabetes")  # diabetes: regression
SPLITS = ("train", "val", "test")
NPZ_SPLIT_ARRAYS = ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test")
NPZ_MASKS = ("X_mask", "X_train_mask", "X_val_mask", "X_test_mask")  # an X's attention mask


@dataclass(frozen=True)
class Table:
    """What a source holds, before splitting: one flat row per sample, all splits.

    An array source (sklearn, npz) or an all-numeric csv/parquet holds float64 `X` (an npz's
    integer arrays, token ids, int64); a table with text columns holds `frame` instead (X is
    None). `encode`: text columns and empty
    cells are encoded (csv/parquet); an array's NaN is refused."""

    X: np.ndarray | None
    y: np.ndarray  # labels as given
    names: list[str]
    name: str
    where: str  # the source, for messages: "data file PATH" or "data sklearn:NAME"
    row_shape: tuple[int, ...]  # one row as stored: (F,), or e.g. (C, L) for an npz array
    split: np.ndarray | None = None  # "train" / "val" / "test" per row if the user split it
    split_column: str | None = None  # the csv/parquet column the split came from
    frame: pd.DataFrame | None = None  # raw feature columns of a table with text columns
    encode: bool = False
    label: str | None = None  # the label column's name, for messages
    masked: bool = False  # X holds token ids with their attention masks folded in (masks.py)

    @property
    def features(self) -> pd.DataFrame:
        return self.frame if self.frame is not None else pd.DataFrame(self.X, columns=self.names)

    @property
    def values(self) -> np.ndarray:
        """The raw features as one array: float64, or object where there are text columns."""
        if self.X is not None:
            return self.X
        assert self.frame is not None  # a table without X holds its frame
        return self.frame.to_numpy(object)

    def digest(self) -> str:
        return table_digest(self.values, self.y, self.split)

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
        raise UserError(
            f"config key 'data.source': expected KIND:REF (e.g. sklearn:digits), got {source!r}"
        )
    if split_column is not None and kind not in ("csv", "parquet"):
        raise UserError(
            f"config key 'data.split_column': only csv and parquet sources have "
            f"columns, not {kind!r} (an npz gives X_train, X_test, ... arrays)"
        )
    if split_column is not None and split_column == label:
        raise UserError(
            f"config key 'data.split_column': {split_column!r} is the label column "
            f"(config key 'data.label')"
        )
    if kind == "sklearn":
        return _read_sklearn(ref)
    if kind in ("csv", "parquet"):
        return _read_frame(kind, Path(ref), label, split_column)
    if kind == "npz":
        return _read_npz(Path(ref))
    raise UserError(f"config key 'data.source': unknown kind {kind!r} (sklearn, csv, parquet, npz)")


def read_table(source: str, label: str) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """-> (X: float64, or object where there are text columns; y labels as given; feature
    names; dataset name): all rows of a source."""
    table = read_source(source, label)
    return table.values, table.y, table.names, table.name


def _read_sklearn(name: str) -> Table:
    from sklearn import datasets

    if name not in SKLEARN_DATASETS:
        raise UserError(
            f"config key 'data.source': unknown sklearn dataset {name!r} "
            f"({', '.join(SKLEARN_DATASETS)})"
        )
    bunch = getattr(datasets, f"load_{name}")()
    X = bunch.data.astype(np.float64)
    names = [str(n) for n in getattr(bunch, "feature_names", [])]
    names = names or [f"x{i}" for i in range(X.shape[1])]
    return Table(X, bunch.target, names, name, f"data sklearn:{name}", (X.shape[1],))


def _read_frame(kind: str, path: Path, label: str, split_column: str | None) -> Table:
    readers.require_file(path, "data file")
    where = f"data file {path}"
    readers.read_header(path, kind, where)  # first: a nested column is refused by its name
    frame = readers.read_frame(path, kind, where)
    if frame.empty:
        raise UserError(f"{where}: no rows" + (" (only a header)" if len(frame.columns) else ""))
    check_roles(list(frame.columns), label, split_column, where)
    split = None if split_column is None else _split_values(frame[split_column], where)
    features = frame.drop(columns=[c for c in (label, split_column) if c is not None])
    if features.shape[1] == 0:
        raise UserError(f"{where}: no feature columns besides the label {label!r}")
    if len(frame) == 0:
        raise UserError(f"{where}: no rows (only a header)")
    _check_no_label_copy(features, frame[label], where)
    text = [c for c in features.columns if tabular.column_kind(features[c]) == "category"]
    for column in text:
        if split_column is None and set(features[column].dropna()) <= set(SPLITS):
            raise UserError(
                f"{where}: column {column!r} holds only train / val / test: a split? "
                f"set config key 'data.split_column' to {column!r}"
            )
    X = None if text else features.to_numpy(np.float64)
    return Table(
        X,
        frame[label].to_numpy(),
        list(features.columns),
        path.stem,
        where,
        (features.shape[1],),
        split,
        split_column,
        frame=features if text else None,
        encode=True,
        label=label,
    )


def check_roles(names: list[str], label: str, split_column: str | None, where: str) -> None:
    """The label column and the split column (if any) the config names are in the table."""
    readers.require_column(names, label, "label", where, "config key 'data.label'")
    if split_column is not None:
        readers.require_column(
            names, split_column, "split", where, "config key 'data.split_column'"
        )


def _check_no_label_copy(features: pd.DataFrame, label: pd.Series, where: str) -> None:
    """A feature that repeats the label row for row is a label leak, not a feature."""
    y = label.to_numpy()
    for column in features.columns:
        values = features[column].to_numpy()
        kinds = {values.dtype.kind, y.dtype.kind}
        if (len(kinds) == 1 or kinds <= set("iuf")) and np.array_equal(values, y):
            raise UserError(
                f"{where}: column {column!r} repeats the label column "
                f"{label.name!r} row for row (a label leak); drop it"
            )


def _split_values(column: pd.Series, where: str) -> np.ndarray:
    """The split column as "train" / "val" / "test" per row, or one line naming a bad value."""
    for value in pd.unique(column.to_numpy(dtype=object)):
        if value not in SPLITS:
            shown = "an empty cell" if pd.isna(value) else repr(value)
            raise UserError(
                f"{where}: column {column.name!r} holds {shown}; expected train, "
                f"val or test (config key 'data.split_column')"
            )
    return column.to_numpy(dtype=object).astype("U5")


def _read_npz(path: Path) -> Table:
    readers.require_file(path, "data file")
    where = f"data file {path}"
    with readers.open_npz(path, where) as npz:
        wanted = ("X", "y", *NPZ_SPLIT_ARRAYS, *NPZ_MASKS)
        arrays = {n: npz[n] for n in npz.files if n in wanted}
    masks = {n: arrays.pop(n) for n in NPZ_MASKS if n in arrays}
    if not any(n in arrays for n in NPZ_SPLIT_ARRAYS):
        X, y, row_shape = _npz_pair(arrays, where, "X", "y")
        masked = _with_masks(masks, {"X": X}, arrays, where)
        X = masked.get("X", X)
        names = [f"x{i}" for i in range(X.shape[1])]
        return Table(X, y, names, path.stem, where, row_shape, masked=bool(masks))
    parts = [s for s in SPLITS if s != "val" or {"X_val", "y_val"} & arrays.keys()]
    pairs = [_npz_pair(arrays, where, f"X_{s}", f"y_{s}") for s in parts]
    for part, (_, _, row_shape) in zip(parts, pairs, strict=True):
        if row_shape != pairs[0][2]:
            raise UserError(
                f"{where}: rows of array 'X_{part}' have shape {list(row_shape)} "
                f"but those of 'X_train' have {list(pairs[0][2])}"
            )
    folded = _with_masks(
        masks, {f"X_{p}": X for p, (X, _, _) in zip(parts, pairs, strict=True)}, arrays, where
    )
    X = np.concatenate([folded.get(f"X_{p}", X) for p, (X, _, _) in zip(parts, pairs, strict=True)])
    y = np.concatenate([y for _, y, _ in pairs])
    split = np.repeat(np.array(parts, dtype="U5"), [len(y) for _, y, _ in pairs])
    names = [f"x{i}" for i in range(X.shape[1])]
    return Table(X, y, names, path.stem, where, pairs[0][2], split, masked=bool(masks))


def _with_masks(
    masks: dict[str, np.ndarray],
    flat: dict[str, np.ndarray],
    arrays: dict[str, np.ndarray],
    where: str,
) -> dict[str, np.ndarray]:
    """Each X of `flat` (its rows flattened) with its `<X>_mask` folded in, checked: every X has
    one or none has; a mask has its X's shape and 0/1 values; X holds token ids (integers >= 0).
    {} when the file has no masks."""
    if not masks:
        return {}
    for name in masks:
        if name.removesuffix("_mask") not in flat:
            raise UserError(
                f"{where}: array {name!r} is an attention mask with no token ids "
                f"{name.removesuffix('_mask')!r} beside it"
            )
    out = {}
    for x_name, X in flat.items():
        name = f"{x_name}_mask"
        if name not in masks:
            raise UserError(
                f"{where}: array {x_name!r} has no attention mask {name!r} while "
                f"{next(iter(masks))!r} is one: give every X its mask, or none"
            )
        mask, shape = masks[name], arrays[x_name].shape
        if mask.shape != shape:
            raise UserError(
                f"{where}: attention mask {name!r} has shape {list(mask.shape)} but its token "
                f"ids {x_name!r} have {list(shape)}"
            )
        if np.dtype(arrays[x_name].dtype).kind not in "iu":
            raise UserError(
                f"{where}: attention mask {name!r} is for {x_name!r}, which holds "
                f"{arrays[x_name].dtype} values: a mask goes with integer token ids"
            )
        if np.dtype(mask.dtype).kind not in "iub" or not np.isin(mask, (0, 1)).all():
            raise UserError(f"{where}: attention mask {name!r} must hold 0 and 1 (or booleans)")
        if (X < 0).any():
            raise UserError(
                f"{where}: array {x_name!r} holds a negative token id "
                f"({int(X.min())}); token ids with a mask are >= 0"
            )
        out[x_name] = masks_module.fold(X, mask.reshape(X.shape))
    return out


def npz_masks(source: str) -> list[str]:
    """The attention-mask arrays an `npz:PATH` source holds (by their names, without reading
    them); [] for another kind of source or a file that does not open."""
    import zipfile

    kind, _, ref = source.partition(":")
    if kind != "npz":
        return []
    try:
        with zipfile.ZipFile(Path(ref).expanduser()) as z:
            members = {m.removesuffix(".npy") for m in z.namelist()}
    except (OSError, zipfile.BadZipFile):
        return []
    return [n for n in NPZ_MASKS if n in members]


def _npz_pair(
    arrays: dict[str, np.ndarray],
    where: str,
    x_name: str,
    y_name: str,
) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """-> (rows of X flattened in C order: int64 for integer arrays, else float64; y; the shape
    of one row of X)."""
    for name in (x_name, y_name):
        if name not in arrays:
            raise UserError(
                f"{where}: missing array {name!r} (expected X and y, or X_train, "
                f"y_train, X_test, y_test and optionally X_val, y_val)"
            )
    X, y = arrays[x_name], arrays[y_name]
    if X.ndim == 0 or not (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
        raise UserError(
            f"{where}: array {x_name!r} must be numeric with one row per sample, "
            f"got {X.dtype} of shape {list(X.shape)}"
        )
    if y.ndim == 0 or y.size != len(y):
        raise UserError(
            f"{where}: array {y_name!r} must hold one label per row, got shape {list(y.shape)}"
        )
    if len(X) != len(y):
        raise UserError(f"{where}: array {x_name!r} has {len(X)} rows but {y_name!r} has {len(y)}")
    flat = X.reshape(len(X), int(np.prod(X.shape[1:])))
    return flat.astype(row_dtype(X.dtype)), y.reshape(-1), X.shape[1:] or (1,)


def row_dtype(dtype: np.dtype) -> type:
    """How an array's values are held before they are split: integers (token ids, counts) as
    int64, anything else (floats, booleans) as float64."""
    return np.int64 if np.dtype(dtype).kind in "iu" else np.float64


def table_digest(X: np.ndarray, y: np.ndarray, split: np.ndarray | None = None) -> str:
    """X: float64 rows, or an object array where there are text columns (hashed as text)."""
    h = hashlib.sha256()
    if X.dtype == object:
        h.update(np.asarray(X, dtype=object).astype(str).astype("U").tobytes())
    else:
        h.update(np.ascontiguousarray(X, dtype=np.float64).tobytes())
    h.update(np.asarray(y).astype(str).astype("U").tobytes())
    if split is not None:  # the user's split is part of what a run saw
        h.update(np.asarray(split, dtype="U5").tobytes())
    return h.hexdigest()[:16]

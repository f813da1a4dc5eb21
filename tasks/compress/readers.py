"""Reading a user's table files (CSV, Parquet, NPZ), for training (dataset.py, stream.py) and
for prediction (tasks/release/predict.py): the header checked as the file writes it, an .npz opened
without pickles, CSV and Parquet read whole or in chunks of rows. Every failure is one line
naming the file: `where` is how the caller names it ("data file PATH", "input PATH").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from distill.tasks.platform.errors import UserError, first_line


def require_file(path: Path, what: str) -> None:
    """`what` ("data file", "input file") is a file that exists."""
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")


def unreadable(where: str, kind: str, err: BaseException) -> UserError:
    """The one line for a file its reader refused: the reader's first line says why."""
    return UserError(f"{where} could not be read as {kind}: {first_line(err)}")


SEPARATORS = (",", ";", "\t", "|")  # tried in this order; the first that splits every line alike
SNIFF_LINES = 50


def csv_separator(path: Path) -> str:
    """The CSV's field separator: the first of `SEPARATORS` that splits the header and the next
    lines into the same number (more than one) of fields, quotes respected; `,` when none does
    (a one-column file). A `;`-separated file (a spreadsheet's export in many locales) reads as
    it is, for training as for prediction."""
    import csv
    import itertools

    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        lines = list(itertools.islice(f, SNIFF_LINES))
    for sep in SEPARATORS:
        widths = {len(row) for row in csv.reader(lines, delimiter=sep) if row}
        if len(widths) == 1 and widths.pop() > 1:
            return sep
    return ","


def header_names(path: Path, kind: str) -> list[str]:
    """The column names exactly as the file has them (pandas renames a repeated `a` to `a.1`)."""
    if _is_parquet(path, kind):
        import pyarrow.parquet as pq

        return [str(n) for n in pq.read_schema(path).names if not n.startswith("__index_level_")]
    import csv

    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        return next(csv.reader(f, delimiter=csv_separator(path)), [])


def _is_parquet(path: Path, kind: str) -> bool:
    return kind == "parquet" or path.suffix.lower() == ".parquet"


def check_flat(path: Path, kind: str, where: str) -> None:
    """A Parquet column of lists, structs or maps is refused by name: distill reads numbers and
    text, one value per cell."""
    if not _is_parquet(path, kind):
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    for field in pq.read_schema(path):
        if pa.types.is_nested(field.type):
            raise UserError(
                f"{where}: column {field.name!r} is nested ({field.type}); distill reads one "
                "number or text per cell: flatten it into columns, or drop it"
            )


def check_header(names: list[str], where: str) -> None:
    """Each column named, and named once: a repeated or empty name would be guessed at."""
    seen: set[str] = set()
    for i, name in enumerate(names):
        if not name.strip():
            raise UserError(
                f"{where}: column {i} has no name in the header (a saved index? "
                f"write the file with index=False, or name the column)"
            )
        if name in seen:
            raise UserError(
                f"{where}: column name {name!r} appears more than once in the "
                f"header; give each column its own name"
            )
        seen.add(name)


def read_header(path: Path, kind: str, where: str) -> list[str]:
    """The header of a CSV or Parquet file, checked (`check_header`)."""
    try:
        names = header_names(path, kind)
    except Exception as err:  # noqa: BLE001 -- pyarrow and csv raise many types
        raise unreadable(where, kind, err) from None
    check_header(names, where)
    check_flat(path, kind, where)
    return names


def require_column(names: list[str], column: str, role: str, where: str, given_by: str) -> None:
    """A column the user named (`given_by`: "config key 'data.label'", "option --label")."""
    if column not in names:
        raise UserError(f"{where}: {role} column {column!r} not found ({given_by})")


def read_frame(path: Path, kind: str, where: str) -> pd.DataFrame:
    """A whole CSV or Parquet file, column names as text."""
    try:
        frame = (
            pd.read_csv(path, sep=csv_separator(path)) if kind == "csv" else pd.read_parquet(path)
        )
    except Exception as err:  # noqa: BLE001 -- pandas raises many types
        raise unreadable(where, kind, err) from None
    frame.columns = [str(c) for c in frame.columns]
    return frame


def read_frames(
    path: Path, kind: str, where: str, columns: list[str], text: list[str], chunk_rows: int
) -> Iterator[pd.DataFrame]:
    """`columns` of a CSV or Parquet file, `chunk_rows` rows at a time (`text` columns read as
    text); each chunk keeps the file's row numbers as its index, column names as text."""
    start = 0
    try:
        if kind == "csv":
            with pd.read_csv(
                path,
                sep=csv_separator(path),
                usecols=columns,
                dtype=dict.fromkeys(text, str),
                chunksize=chunk_rows,
            ) as reader:
                for frame in reader:
                    frame.columns = [str(c) for c in frame.columns]
                    yield frame
            return
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows, columns=columns):
            frame = batch.to_pandas()
            frame.index = pd.RangeIndex(start, start + len(frame))
            frame.columns = [str(c) for c in frame.columns]
            start += len(frame)
            yield frame
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 -- pandas and pyarrow raise many types
        raise unreadable(where, kind, err) from None


def parquet_rows(
    path: Path, positions: np.ndarray, names: list[str], batch_rows: int
) -> pd.DataFrame:
    """Columns `names` of the rows at `positions` (any order) of a Parquet file, in that order,
    read `batch_rows` rows at a time: a streamed table's raw rows (a model's input example)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    order = np.argsort(positions, kind="stable")
    pos = np.asarray(positions)[order]
    out, start = [], 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=names):
        stop = start + batch.num_rows
        lo, hi = np.searchsorted(pos, [start, stop])
        if hi > lo:
            out.append(pa.Table.from_batches([batch]).to_pandas().iloc[pos[lo:hi] - start])
        start = stop
        if hi == len(pos):
            break
    frame = pd.concat(out).reset_index(drop=True)
    frame.columns = [str(c) for c in frame.columns]
    return frame.iloc[np.argsort(order)].reset_index(drop=True)


@contextlib.contextmanager
def open_npz(path: Path, where: str) -> Iterator[Any]:
    """An .npz opened without pickles (an object array is refused, never unpickled); a failure to
    open it or to read its arrays inside the block is one line `WHERE could not be read as npz`."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            yield npz
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 -- numpy and zipfile raise many types
        raise unreadable(where, "npz", err) from None

"""Large tables, streamed: a parquet or npz source of `STREAM_MIN_CELLS` cells or more is
converted once, a block of rows at a time, into a standardized float32 `.npy` file, and the
splits become `Rows` over it (tasks/compress/rows.py). Memory holds a block, not the table.

The steps and the checks are those of tasks/compress/dataset.py's `prepare`, over blocks:
labels (read alone, a column) -> the split -> one pass for the checks (label copies, a split
column in disguise, inf, empty columns), the digest and a sample of training rows -> the
encoding of text columns and empty cells, fitted on that sample (at most
`ENCODING_SAMPLE_ROWS` training rows, seeded) -> a pass for the standardization of the
training rows -> a pass that writes the standardized rows. A table whose training split has
at most `EXACT_STATS_ROWS` rows is standardized exactly as in memory (the same numbers); a
larger one by merging per-block means and variances (Chan et al.), equal to float rounding.

The conversion is kept in `DISTILL_DATA_CACHE` (default: the temporary folder's
`distill-data`), named by the source file's identity (path, size, mtime), the data config and
the seed: a second run on the same file reads it back. The newest `KEEP_CONVERSIONS` stay.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd

from distill.tasks.compress import dataset as D
from distill.tasks.compress import readers, tabular
from distill.tasks.compress import sources as S
from distill.tasks.compress.rows import Rows, npy_header
from distill.tasks.platform.config import DataConfig
from distill.tasks.platform.errors import UserError
from distill.tasks.platform.progress import note

STREAM_MIN_CELLS = 4_000_000  # rows x columns (32 MB as float64) from which a source streams
CHUNK_ROWS = 32_768
ENCODING_SAMPLE_ROWS = 100_000
EXACT_STATS_ROWS = 131_072
KEEP_CONVERSIONS = 3
FORMAT = 3  # of the conversion folder; bump when its content changes


def cache_root() -> Path:
    return Path(
        os.environ.get("DISTILL_DATA_CACHE") or Path(tempfile.gettempdir()) / "distill-data"
    )


def source_cells(source: str) -> int | None:
    """Rows x columns of a parquet or npz file, from its metadata; None for other sources."""
    kind, _, ref = source.partition(":")
    path = Path(ref)
    if kind not in ("parquet", "npz") or not path.is_file():
        return None
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path).metadata
            return meta.num_rows * meta.num_columns
        return sum(int(np.prod(s)) for s in _npz_shapes(path).values() if s)
    except Exception:  # noqa: BLE001 -- unreadable: the in-memory reader says why, in one line
        return None


def should_stream(source: str) -> bool:
    """`DISTILL_STREAM_MIN_CELLS` in the environment moves the threshold (tests, benchmarks)."""
    cells = source_cells(source)
    least = int(os.environ.get("DISTILL_STREAM_MIN_CELLS") or STREAM_MIN_CELLS)
    return cells is not None and cells >= least


# --- the sources, a block at a time ----------------------------------------------------------


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each X array of an npz, from the headers (nothing else read)."""
    out = {}
    with zipfile.ZipFile(path) as z:
        for member in z.namelist():
            name = member.removesuffix(".npy")
            if name in ("X", "X_train", "X_val", "X_test"):
                with z.open(member) as f:
                    shape, _, dtype = npy_header(f)
                out[name] = (shape, dtype)
    return out


def _npz_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Shape of each X array of an npz, from the headers (nothing else read)."""
    return {name: shape for name, (shape, _) in _npz_headers(path).items()}


def integer_npz(source: str) -> bool:
    """An npz source whose X arrays hold integers (token ids): unstandardized, they stay int64
    in memory; the float32 conversion of a streamed table is for standardized features."""
    kind, _, ref = source.partition(":")
    if kind != "npz" or not Path(ref).is_file():
        return False
    try:
        headers = _npz_headers(Path(ref))
    except Exception:  # noqa: BLE001 -- unreadable: the in-memory reader says why, in one line
        return False
    return bool(headers) and all(dtype.kind in "iu" for _, dtype in headers.values())


class _Source:
    """A table's labels and split up front; its feature rows as blocks (`chunks`)."""

    table: S.Table
    n: int

    def chunks(self, columns: list[str] | None = None) -> Iterator[pd.DataFrame | np.ndarray]:
        raise NotImplementedError


class _Parquet(_Source):
    def __init__(self, path: Path, label: str, split_column: str | None) -> None:
        import pyarrow.parquet as pq

        readers.require_file(path, "data file")
        where = f"data file {path}"
        names = readers.read_header(path, "parquet", where)
        S.check_roles(names, label, split_column, where)
        self.path, self.file = path, pq.ParquetFile(path)
        self.n = self.file.metadata.num_rows
        if self.n == 0:
            raise UserError(f"{where}: no rows (only a header)")
        self.features = [n for n in names if n not in (label, split_column)]
        if not self.features:
            raise UserError(f"{where}: no feature columns besides the label {label!r}")
        given = [c for c in (label, split_column) if c is not None]
        frame = pq.read_table(path, columns=given).to_pandas()
        split = None if split_column is None else S._split_values(frame[split_column], where)
        empty = self.file.schema_arrow.empty_table().select(self.features).to_pandas()
        self.kinds = {c: tabular.column_kind(empty[c]) for c in self.features}
        self.table = S.Table(
            None,
            frame[label].to_numpy(),
            list(self.features),
            path.stem,
            where,
            (len(self.features),),
            split,
            split_column,
            encode=True,
            label=label,
        )

    def chunks(self, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
        """Blocks of the feature columns (or of `columns`), in row order."""
        import pyarrow as pa

        columns = self.features if columns is None else columns

        # row group by row group: one `iter_batches` over the whole file holds on to what it
        # read (1 GB of Arrow memory at 1M x 100), and the pool keeps freed pages unless told
        pool, meta = pa.default_memory_pool(), self.file.metadata
        for group in range(self.file.num_row_groups):
            if meta.row_group(group).num_rows <= 4 * CHUNK_ROWS:
                whole = self.file.read_row_group(group, columns=columns)
                blocks = iter(whole.to_batches(CHUNK_ROWS))
                del whole
            else:  # a huge row group: read it in batches
                blocks = self.file.iter_batches(
                    batch_size=CHUNK_ROWS, row_groups=[group], columns=columns
                )
            for batch in blocks:
                frame = pa.Table.from_batches([batch]).to_pandas()
                frame.columns = [str(c) for c in frame.columns]
                del batch
                yield frame
                del frame
            del blocks
            pool.release_unused()


class _Npz(_Source):
    def __init__(self, path: Path) -> None:
        readers.require_file(path, "data file")
        where = f"data file {path}"
        shapes = _npz_shapes(path)
        with readers.open_npz(path, where) as npz:
            labels = {n: npz[n] for n in npz.files if n in ("y", "y_train", "y_val", "y_test")}
        if "X" in shapes and not (set(shapes) - {"X"}):
            self.members, parts = ["X"], None
        else:
            parts = [
                s for s in S.SPLITS if s != "val" or {"X_val", "y_val"} & (shapes | labels).keys()
            ]
            self.members = [f"X_{s}" for s in parts]
        ys = []
        for member in self.members:
            y_name = "y" + member.removeprefix("X")
            if member not in shapes or y_name not in labels:
                raise UserError(
                    f"{where}: missing array {member if member not in shapes else y_name!r} "
                    f"(expected X and y, or X_train, y_train, X_test, y_test and optionally "
                    f"X_val, y_val)"
                )
            y = labels[y_name]
            if y.ndim == 0 or y.size != len(y):
                raise UserError(
                    f"{where}: array {y_name!r} must hold one label per row, got shape "
                    f"{list(y.shape)}"
                )
            if shapes[member][0] != len(y):
                raise UserError(
                    f"{where}: array {member!r} has {shapes[member][0]} rows but {y_name!r} "
                    f"has {len(y)}"
                )
            if shapes[member][1:] != shapes[self.members[0]][1:]:
                raise UserError(
                    f"{where}: rows of array {member!r} have shape {list(shapes[member][1:])} "
                    f"but those of 'X_train' have {list(shapes[self.members[0]][1:])}"
                )
            ys.append(y.reshape(-1))
        self.path = path
        row_shape = shapes[self.members[0]][1:] or (1,)
        self.width = int(np.prod(row_shape))
        self.n = sum(len(y) for y in ys)
        split = (
            None if parts is None else np.repeat(np.array(parts, dtype="U5"), [len(y) for y in ys])
        )
        self.table = S.Table(
            None,
            np.concatenate(ys),
            [f"x{i}" for i in range(self.width)],
            path.stem,
            where,
            tuple(row_shape),
            split,
        )

    def chunks(self, columns: list[str] | None = None) -> Iterator[np.ndarray]:
        with zipfile.ZipFile(self.path) as z:
            for member in self.members:
                with z.open(member + ".npy") as f:
                    shape, fortran, dtype = npy_header(f)
                    if fortran or not (np.issubdtype(dtype, np.number) or dtype.kind == "b"):
                        if not fortran:
                            raise UserError(
                                f"{self.table.where}: array {member!r} must be numeric with "
                                f"one row per sample, got {dtype} of shape {list(shape)}"
                            )
                        whole = np.lib.format.read_array(f, allow_pickle=False)  # rare
                        whole = whole.reshape(len(whole), self.width)
                        for start in range(0, len(whole), CHUNK_ROWS):
                            yield whole[start : start + CHUNK_ROWS].astype(np.float64)
                        continue
                    for start in range(0, shape[0], CHUNK_ROWS):
                        k = min(CHUNK_ROWS, shape[0] - start)
                        block = np.frombuffer(f.read(k * self.width * dtype.itemsize), dtype)
                        yield block.reshape(k, self.width).astype(np.float64)


def _open(source: str, label: str, split_column: str | None) -> _Source:
    kind, _, ref = source.partition(":")
    if split_column is not None and kind != "parquet":
        S.read_source(source, label, split_column)  # its one-line refusal
    return _Parquet(Path(ref), label, split_column) if kind == "parquet" else _Npz(Path(ref))


# --- the conversion ---------------------------------------------------------------------------


def _conversion_key(cfg: DataConfig, seed: int) -> str:
    path = Path(cfg.source.partition(":")[2])
    st = path.stat()
    ident = [FORMAT, str(path.resolve()), st.st_size, st.st_mtime_ns, cfg.model_dump_json(), seed]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:24]


def prepare_streamed(cfg: DataConfig, seed: int) -> D.Dataset:
    """`data.prepare` for a large parquet / npz source, through a file (read back if made)."""
    key = _conversion_key(cfg, seed)
    folder = cache_root() / key
    if not (folder / "meta.json").is_file():
        start = time.perf_counter()
        _convert(cfg, seed, folder)
        note(f"data {cfg.source} converted to {folder} in {time.perf_counter() - start:.1f} s")
    os.utime(folder)  # the newest conversions are kept
    return _load(cfg, folder)


def _load(cfg: DataConfig, folder: Path) -> D.Dataset:
    meta = json.loads((folder / "meta.json").read_text())
    with np.load(folder / "arrays.npz", allow_pickle=False) as arrays:
        a = {n: arrays[n] for n in arrays.files}
    z, rows_key = folder / "z.npy", meta["rows_key"]
    bounds = np.cumsum([0, *(len(a[f"rows_{p}"]) for p in S.SPLITS)])
    # each split one range of the file, in split order; `origin`: source rows. Rows stand in for
    # the X arrays (dataset.Dataset: "a large table's X splits are Rows"), as its fields don't say
    split = {
        p: cast(
            np.ndarray,
            Rows(z, np.arange(bounds[i], bounds[i + 1]), f"{rows_key}/{p}", a[f"rows_{p}"]),
        )
        for i, p in enumerate(S.SPLITS)
    }
    return D.Dataset(
        name=meta["name"],
        source=cfg.source,
        feature_names=meta["feature_names"],
        input_shape=tuple(meta["input_shape"]),
        classes=meta["classes"],
        X_train=split["train"],
        y_train=a["y"][a["rows_train"]],
        X_val=split["val"],
        y_val=a["y"][a["rows_val"]],
        X_test=split["test"],
        y_test=a["y"][a["rows_test"]],
        mean=a["mean"].astype(np.float32),
        scale=a["scale"].astype(np.float32),
        digest=meta["digest"],
        user_split=meta["user_split"],
        encoding=meta["encoding"],
        task=meta["task"],
        target_mean=meta["target_mean"],
        target_scale=meta["target_scale"],
    )


def _convert(cfg: DataConfig, seed: int, folder: Path) -> None:
    src = _open(cfg.source, cfg.label, cfg.split_column)
    table = src.table
    _, task, classes, y = D.checked_labels(table, cfg)
    train, val, test = D.split_rows(table, y, cfg, seed)
    y, target_mean, target_scale = D.standardized_target(y, train, task, table.where)
    in_train = np.zeros(src.n, dtype=bool)
    in_train[train] = True

    spec, width = _first_pass(src, cfg, seed, train, in_train)
    transformer = tabular.build(spec) if tabular.needs_sklearn(spec) else None

    def encoded() -> Iterator[tuple[int, np.ndarray, pd.DataFrame | np.ndarray]]:
        start = 0
        for chunk in src.chunks():
            X = chunk if isinstance(chunk, np.ndarray) else tabular.encode(spec, chunk, transformer)
            yield start, X, chunk
            start += len(X)

    digest = _digest_hasher(src, width)
    mean, scale, peak = _standardization(encoded(), spec, table, train, in_train, cfg, digest)
    shape = D._input_shape(table, cfg.shape, len(mean))
    D.check_mean_scale(mean, scale, lambda col: float(peak[col]), spec, table.where)
    digest = digest.hexdigest()[:16]
    rows_key = hashlib.sha256(
        json.dumps([digest, cfg.model_dump_json(), seed]).encode()
    ).hexdigest()[:16]

    work = Path(tempfile.mkdtemp(prefix=f"{folder.name}.", dir=_made(folder.parent)))
    try:
        with open(work / "z.npy", "wb") as f:
            header = {"descr": "<f4", "fortran_order": False, "shape": (src.n, len(mean))}
            np.lib.format.write_array_header_1_0(f, header)
            # the splits' rows together, in split order: a split is one range of the file
            dest = np.empty(src.n, dtype=np.int64)
            dest[np.concatenate([train, val, test])] = np.arange(src.n)
            offset, row_bytes = f.tell(), len(mean) * 4
            f.truncate(offset + src.n * row_bytes)
            for start, X, _ in encoded():
                with np.errstate(over="ignore", invalid="ignore"):
                    z = ((X - mean) / scale).astype(np.float32)
                bad = ~np.isfinite(z).all(axis=0)
                if bad.any():
                    col = int(np.argmax(bad))
                    raise UserError(
                        f"{table.where}: column {D._encoded_owner(spec)[col]!r} has values up "
                        f"to {peak[col]:.3g}, beyond float32 once standardized; rescale the column"
                    )
                z = np.ascontiguousarray(z)
                at = dest[start : start + len(z)]
                for row, to in zip(z, at.tolist(), strict=True):
                    os.pwrite(f.fileno(), row, offset + to * row_bytes)
        np.savez(
            work / "arrays.npz",
            y=y,
            rows_train=train,
            rows_val=val,
            rows_test=test,
            mean=mean,
            scale=scale,
        )
        meta = {
            "name": table.name,
            "feature_names": table.names,
            "input_shape": list(shape),
            "classes": classes.tolist(),
            "task": task,
            "target_mean": target_mean,
            "target_scale": target_scale,
            "digest": digest,
            "user_split": table.split is not None,
            "encoding": spec,
            "rows_key": rows_key,
        }
        (work / "meta.json").write_text(json.dumps(meta))
        if folder.exists():
            shutil.rmtree(folder)
        work.rename(folder)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _prune(folder)


def _made(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _prune(keep: Path) -> None:
    """Keep the newest `KEEP_CONVERSIONS` conversions (by last use)."""
    done = [p for p in keep.parent.iterdir() if (p / "meta.json").is_file()]
    for old in sorted(done, key=lambda p: p.stat().st_mtime, reverse=True)[KEEP_CONVERSIONS:]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def _first_pass(
    src: _Source, cfg: DataConfig, seed: int, train: np.ndarray, in_train: np.ndarray
) -> tuple[dict, int]:
    """The checks of `sources._read_frame` / `data._encoding` over blocks, and the encoding fitted
    on a seeded sample of training rows; -> (spec, widest text cell for the digest)."""
    table = src.table
    where = table.where
    y_all = np.asarray(table.y)
    names = table.names
    copies = set(names) if table.encode else set()  # columns equal to the label in every block
    column_kinds: dict[str, str] = getattr(src, "kinds", {})  # a parquet's; an array has none
    text = [c for c, k in column_kinds.items() if k == "category"]
    split_like = set(text) if table.split_column is None else set()
    gaps: set[str] = set()
    train_filled = dict.fromkeys(names, 0)
    width, start = 0, 0
    for chunk in src.chunks():
        stop = start + len(chunk)
        frame = chunk if isinstance(chunk, pd.DataFrame) else None
        y = y_all[start:stop]
        for name in list(copies):
            values = frame[name].to_numpy() if frame is not None else chunk[:, names.index(name)]
            kinds = {values.dtype.kind, y.dtype.kind}
            if not ((len(kinds) == 1 or kinds <= set("iuf")) and np.array_equal(values, y)):
                copies.discard(name)
        if frame is None:
            start = stop
            continue
        for name in list(split_like):
            if not set(frame[name].dropna()) <= set(S.SPLITS):
                split_like.discard(name)
        for name in names:
            if column_kinds[name] != "numeric":
                continue
            values = frame[name].to_numpy(np.float64)
            inf = np.isinf(values)
            if inf.any():
                raise UserError(
                    f"{where}: column {name!r} holds inf in row {start + int(np.argmax(inf))}"
                )
            empty = np.isnan(values)
            if empty.any():
                gaps.add(name)
            train_filled[name] += int((~empty & in_train[start:stop]).sum())
        if text:
            cells = frame.to_numpy(object).astype(str)
            width = max(width, cells.dtype.itemsize // 4)
        start = stop
    if copies:
        name = min(copies, key=names.index)
        raise UserError(
            f"{where}: column {name!r} repeats the label column {table.label!r} row for row "
            f"(a label leak); drop it"
        )
    for name in sorted(split_like, key=names.index):
        raise UserError(
            f"{where}: column {name!r} holds only train / val / test: a split? "
            f"set config key 'data.split_column' to {name!r}"
        )
    if not table.encode:  # an array: columns as given
        return {"columns": [{"name": n, "kind": "numeric", "fill": None} for n in names]}, 0
    for name in sorted(gaps, key=names.index):
        if train_filled[name] == 0:
            raise UserError(f"{where}: column {name!r} is empty in every training row; drop it")
    fitted = [n for n in names if n in gaps or column_kinds[n] != "numeric"]
    if not fitted:  # numbers without gaps pass through: nothing to fit
        return tabular.fit_spec(pd.DataFrame({n: [0.0] for n in names}), set()), width
    # a second pass for the sample, of the columns that are encoded only
    n_sample = min(len(train), ENCODING_SAMPLE_ROWS)
    sample = np.sort(np.random.default_rng(seed).choice(train, size=n_sample, replace=False))
    in_sample = np.zeros(src.n, dtype=bool)
    in_sample[sample] = True
    picked, start = [], 0
    for chunk in src.chunks(fitted):
        assert isinstance(chunk, pd.DataFrame)  # only a parquet source encodes its columns
        picked.append(chunk.iloc[np.flatnonzero(in_sample[start : start + len(chunk)])])
        start += len(chunk)
    sample_frame = pd.concat(picked)
    for name in names:  # the columns that pass through, as one row: only their kind is read
        if name not in fitted:
            sample_frame[name] = 0.0
    sample_frame = sample_frame[names]
    try:
        return tabular.fit_spec(sample_frame, gaps), width
    except ValueError as err:
        raise UserError(f"{where}: {err} of the {n_sample:,} sampled to fit the encoding") from None


def _digest_hasher(src: _Source, width: int):
    """`sources.table_digest`, fed block by block (`update`), the labels and split at the end."""
    h = hashlib.sha256()

    class Digest:
        def update(self, chunk: pd.DataFrame | np.ndarray) -> None:
            if isinstance(chunk, np.ndarray):
                h.update(np.ascontiguousarray(chunk, dtype=np.float64).tobytes())
            elif width:
                h.update(chunk.to_numpy(object).astype(str).astype(f"U{width}").tobytes())
            else:
                h.update(np.ascontiguousarray(chunk.to_numpy(np.float64)).tobytes())

        def hexdigest(self) -> str:
            y, step = np.asarray(src.table.y), CHUNK_ROWS
            # the labels as text of one width, block by block (not 84 MB at once for 1M int64)
            wide = max(
                y[i : i + step].astype(str).dtype.itemsize // 4 for i in range(0, len(y), step)
            )
            for i in range(0, len(y), step):
                h.update(y[i : i + step].astype(str).astype(f"U{wide}").tobytes())
            if src.table.split is not None:
                h.update(np.asarray(src.table.split, dtype="U5").tobytes())
            return h.hexdigest()

    return Digest()


def _standardization(
    blocks: Iterator[tuple[int, np.ndarray, pd.DataFrame | np.ndarray]],
    spec: dict,
    table: S.Table,
    train: np.ndarray,
    in_train: np.ndarray,
    cfg: DataConfig,
    digest,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, scale) of the training rows, and each column's largest |value| (for messages).
    Up to `EXACT_STATS_ROWS` training rows: `data.standardizer` on them in split order (the
    in-memory numbers); beyond: per-block moments merged (Chan, Golub & LeVeque)."""
    exact = len(train) <= EXACT_STATS_ROWS
    kept: list[tuple[np.ndarray, np.ndarray]] = []
    count = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None
    peak: np.ndarray | None = None
    for start, X, chunk in blocks:
        digest.update(chunk)
        D._check_finite(X, spec, table, start)
        top = np.abs(X).max(axis=0) if len(X) else np.zeros(X.shape[1])
        peak = top if peak is None else np.maximum(peak, top)
        rows = X[in_train[start : start + len(X)]]
        if exact:
            kept.append((np.flatnonzero(in_train[start : start + len(X)]) + start, rows))
            continue
        if not len(rows):
            continue
        with np.errstate(over="ignore", invalid="ignore"):
            b_mean = rows.mean(axis=0)
            b_m2 = ((rows - b_mean) ** 2).sum(axis=0)
            if mean is None:
                count, mean, m2 = len(rows), b_mean, b_m2
                continue
            assert m2 is not None  # set with `mean`
            total = count + len(rows)
            delta = b_mean - mean
            mean = mean + delta * (len(rows) / total)
            m2 = m2 + b_m2 + delta**2 * (count * len(rows) / total)
            count = total
    assert peak is not None  # a streamed table holds rows (STREAM_MIN_CELLS cells or more)
    if exact:
        positions = np.concatenate([p for p, _ in kept])
        X_train = np.concatenate([r for _, r in kept])
        rank = np.empty(len(in_train), dtype=np.int64)
        rank[train] = np.arange(len(train))
        X_train = X_train[np.argsort(rank[positions])]  # the rows in split order
        mean, scale = D.standardizer(X_train, cfg.standardize)
        return mean, scale, peak
    if not cfg.standardize:
        return np.zeros(len(peak)), np.ones(len(peak)), peak
    # more than EXACT_STATS_ROWS training rows were seen: the moments are set
    assert mean is not None and m2 is not None
    with np.errstate(over="ignore", invalid="ignore"):
        scale = np.sqrt(m2 / count)
    scale[scale < 1e-12] = 1.0
    return mean, scale, peak

"""Rows of a split, held in memory or read from disk a batch at a time.

A small table's splits are plain float32 arrays (int64 token ids are never streamed). A large
one (tasks/compress/stream.py) is standardized once into a float32 `.npy` file, each split's
rows together, and each split is a `Rows`: that file plus the split's row indices. `Rows`
answers `len`, `shape`, slices and index arrays like an array, returning plain arrays of just
the rows asked for, read with `pread`, so the process holds a batch, not the table, however
many rows there are.

The stages take rows through the same few calls for both kinds: `X[a:b]`, `X[idx]`,
`batches(X, n)`, `predict_batched(predict, X)`, and `TrainRows` / `RowsDataset` (a
`torch.utils.data.Dataset`) for the training loop.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

PREDICT_ROWS = 4_096  # rows per call when a whole split is predicted (activations, ORT arenas)
PREDICT_TOKENS = 65_536  # token ids per call for sequences: [N, T] int64 rows go T-sized
RELEASE_BYTES = 64 << 20  # read this much, then hand the heap's free pages back


def npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of the `.npy` stream `f`, left at the first value."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else None
    return (read or np.lib.format.read_array_header_2_0)(f)


class Rows:
    """One split of a standardized float32 `.npy`: row `i` of the split is row `index[i]` of the
    file (a stream.py conversion stores each split's rows together, in split order, so a split
    is one range of the file). `origin`: the split's row numbers in the source table. `key`
    names the content (the conversion's digest and the split) for cache keys, so the bytes are
    never hashed again. Rows are read with `pread`, not mapped: the process holds what it asked
    for, not the pages (or large folios) a mapping would fault in around it."""

    def __init__(
        self, path: str | Path, index: np.ndarray, key: str, origin: np.ndarray | None = None
    ) -> None:
        self.path = str(path)
        self.index = np.asarray(index, dtype=np.int64)
        self.key = key
        self.origin = self.index if origin is None else np.asarray(origin, dtype=np.int64)
        self._open()

    def _open(self) -> None:
        self._file = open(self.path, "rb")  # noqa: SIM115 -- held for the object's life
        shape, fortran, dtype = npy_header(self._file)
        if fortran or dtype != np.float32 or len(shape) != 2:
            raise ValueError(f"{self.path}: expected a C-order float32 2-D array")
        self._offset, self._width, self._dtype = self._file.tell(), shape[1], dtype
        self._row_bytes = shape[1] * dtype.itemsize
        self._read_bytes = 0

    def __getstate__(self) -> dict:
        return {"path": self.path, "index": self.index, "key": self.key, "origin": self.origin}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return len(self.index)

    def content_key(self) -> str:
        """What the rows hold, for cache keys (tasks/platform/caching.py), without reading them."""
        return f"{self.key}:{self.shape}"

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.index), self._width)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def nbytes(self) -> int:
        return len(self.index) * self._row_bytes

    def __getitem__(self, key: Any) -> np.ndarray:  # what an ndarray's rows take
        if isinstance(key, (int, np.integer)):
            return self._read(self.index[[int(key)]])[0]
        if isinstance(key, tuple):
            raise TypeError("Rows take a slice or an index array, not a tuple")
        return self._read(self.index[key])

    def __array__(self, dtype: Any = None, copy: object = None) -> np.ndarray:
        rows = self[:]
        return rows if dtype is None else rows.astype(dtype)

    def _read(self, pos: np.ndarray) -> np.ndarray:
        """A copy of the file's rows `pos`: one read for a range, one per row otherwise."""
        out = np.empty((len(pos), self._width), dtype=self._dtype)
        fd, size = self._file.fileno(), self._row_bytes
        if not len(pos):
            return out
        if pos[-1] - pos[0] + 1 == len(pos) and (np.diff(pos) == 1).all():
            _pread_into(fd, out.data.cast("B"), self._offset + int(pos[0]) * size)
        else:
            view = out.data.cast("B")
            for i, p in enumerate(pos.tolist()):
                _pread_into(fd, view[i * size : (i + 1) * size], self._offset + p * size)
        self._read_bytes += out.nbytes
        if self._read_bytes >= RELEASE_BYTES:
            self._read_bytes = 0
            trim_heap()
        return out


def take(X: np.ndarray | Rows, index: np.ndarray) -> np.ndarray | Rows:
    """Rows `index` of a split: an array's copy, or a `Rows` view of the same file on disk (its
    content key names the rows taken: the same rows, the same key)."""
    if isinstance(X, Rows):
        key = f"{X.key}:rows-{hashlib.sha1(index.tobytes()).hexdigest()[:16]}"
        return Rows(X.path, X.index[index], key, X.origin[index])
    return X[index]


def _pread_into(fd: int, buffer: memoryview, offset: int) -> None:
    done = 0
    while done < len(buffer):
        got = os.preadv(fd, [buffer[done:]], offset + done)
        if got == 0:
            raise EOFError(f"rows file ends at byte {offset + done}")
        done += got


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def trim_heap() -> None:
    """Hand the heap's free pages back to the system (glibc `malloc_trim`). Batch after batch of
    activations (MBs) freed between small objects that stay leaves the heap full of holes that
    glibc keeps: 1.4 GB after predicting 700k rows by blocks, 0.02 GB with this."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def batches(X: np.ndarray | Rows, size: int) -> Iterator[np.ndarray]:
    """Consecutive row blocks of an array or of `Rows`, as arrays."""
    for start in range(0, len(X), size):
        yield X[start : start + size]


def predict_rows(X: np.ndarray | Rows, rows: int = PREDICT_ROWS) -> int:
    """Rows per call when a split is predicted: `rows`, or for sequences of token ids (integer
    `[N, T]`) as many as hold `PREDICT_TOKENS` tokens, at least one."""
    if np.dtype(X.dtype).kind in "iu" and len(X.shape) == 2:
        return max(1, PREDICT_TOKENS // max(1, X.shape[1]))
    return rows


def predict_batched(
    predict: Callable[[np.ndarray], np.ndarray], X: np.ndarray | Rows, size: int | None = None
) -> np.ndarray:
    """`predict` over all rows, `size` at a time (default `predict_rows(X)`): one call for an
    in-memory split that fits."""
    size = size or predict_rows(X)
    if isinstance(X, np.ndarray) and len(X) <= size:
        return predict(X)
    out = None
    for start in range(0, len(X), size):
        got = predict(X[start : start + size])
        if out is None:  # filled in place: no list of small arrays pinning the heap
            out = np.empty((len(X), *got.shape[1:]), dtype=got.dtype)
        out[start : start + len(got)] = got
    return out if out is not None else predict(X[:0])  # no rows: as an in-memory split's call


class RowsDataset(Dataset):
    """A `torch.utils.data.Dataset` of (row, label[, teacher logits]) whose items are whole
    batches: `dataset[indices]` reads those rows at once (a `DataLoader` with `batch_size=None`
    and a sampler of index arrays asks for them)."""

    def __init__(self, X: np.ndarray | Rows, *arrays: np.ndarray) -> None:
        self.X, self.arrays = X, arrays

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, idx: np.ndarray) -> tuple:
        idx = np.asarray(idx, dtype=np.int64)
        return (torch.from_numpy(self.X[idx]), *(torch.from_numpy(a[idx]) for a in self.arrays))


class _Slices:
    """A batch sampler over a permutation: its consecutive slices, as index arrays (no list of
    a Python int per row)."""

    def __init__(self, order, size: int) -> None:
        self.order, self.size = order.numpy(), size

    def __len__(self) -> int:
        return (len(self.order) + self.size - 1) // self.size

    def __iter__(self) -> Iterator[np.ndarray]:
        for start in range(0, len(self.order), self.size):
            yield self.order[start : start + self.size]


class TrainRows:
    """The training split as a fit sees it. In memory: moved to the device once and indexed
    there (fast, on a GPU too). On disk: read batch by batch through a `torch.utils.data`
    `DataLoader` over `RowsDataset`. Both give the same batches for the same order."""

    def __init__(self, X: np.ndarray | Rows, y: np.ndarray, extra: np.ndarray | None, device):
        self.device, self.n = device, len(X)
        self.extra = extra is not None
        labels = np.asarray(y, dtype=np.float32 if y.dtype.kind == "f" else np.int64)  # regression
        arrays = [labels] + ([extra] if extra is not None else [])
        self.streamed = isinstance(X, Rows)
        if self.streamed:
            self.dataset = RowsDataset(X, *arrays)
        else:
            self.tensors = [torch.from_numpy(X).to(device)] + [
                torch.from_numpy(a).to(device) for a in arrays
            ]

    def __len__(self) -> int:
        return self.n

    def batches(self, order, batch_size: int) -> Iterator[tuple]:
        """(row indices, x, y, extra or None) per batch of `order` (a permutation tensor)."""
        if not self.streamed:
            order = order.to(self.device)
            for start in range(0, self.n, batch_size):
                idx = order[start : start + batch_size]
                got = [t[idx] for t in self.tensors]
                yield idx, got[0], got[1], got[2] if self.extra else None
            return
        sampler = _Slices(order, batch_size)
        loader = DataLoader(self.dataset, batch_size=None, sampler=sampler, num_workers=0)
        for idx, batch in zip(sampler, loader, strict=True):
            got = [t.to(self.device, non_blocking=True) for t in batch]
            yield torch.from_numpy(idx), got[0], got[1], got[2] if self.extra else None


def rows_on(X: np.ndarray | Rows, device, size: int | None = None) -> Iterator:
    """A split's rows as tensors on `device`: the whole in-memory split as one tensor when it
    fits in `size` rows (default `predict_rows(X)`), else `size` rows at a time."""
    size = size or predict_rows(X)
    if isinstance(X, np.ndarray) and len(X) <= size:
        yield torch.from_numpy(X).to(device)
        return
    for block in batches(X, size):
        yield torch.from_numpy(block).to(device)

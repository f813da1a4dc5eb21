"""Rows of a split, held in memory or read from disk a batch at a time.

A small table's splits are plain float32 arrays. A large one (tasks/compress/stream.py) is
standardized once into a float32 `.npy` file, all splits in the source's row order, and each
split is a `Rows`: that file plus the split's row indices. `Rows` answers `len`, `shape`,
slices and index arrays like an array, returning plain arrays of just the rows asked for: the
file is memory-mapped and the pages read are released again (`madvise(DONTNEED)`), so the
process holds a batch, not the table, however many rows there are.

The stages take rows through the same few calls for both kinds: `X[a:b]`, `X[idx]`,
`batches(X, n)`, `predict_batched(predict, X)`, and `TrainRows` / `RowsDataset` (a
`torch.utils.data.Dataset`) for the training loop.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

PREDICT_ROWS = 65_536  # rows per call when a whole split is predicted
RELEASE_BYTES = 64 << 20  # read this much from a mapping, then give its pages back


def npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of the `.npy` stream `f`, left at the first value."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else None
    return (read or np.lib.format.read_array_header_2_0)(f)


class Rows:
    """One split of a standardized float32 `.npy` (rows in source order): row `i` of the split is
    row `index[i]` of the file. `key` names the content (the conversion's digest and the split)
    for cache keys, so the bytes are never hashed again."""

    def __init__(self, path: str | Path, index: np.ndarray, key: str) -> None:
        self.path = str(path)
        self.index = np.asarray(index, dtype=np.int64)
        self.key = key
        self._open()

    def _open(self) -> None:
        with open(self.path, "rb") as f:
            shape, fortran, dtype = npy_header(f)
            offset = f.tell()
            if fortran or dtype != np.float32 or len(shape) != 2:
                raise ValueError(f"{self.path}: expected a C-order float32 2-D array")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._all = np.ndarray(shape, dtype, buffer=self._map, offset=offset)
        self._read_bytes = 0

    def __getstate__(self) -> dict:
        return {"path": self.path, "index": self.index, "key": self.key}

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
        return (len(self.index), self._all.shape[1])

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self) -> np.dtype:
        return self._all.dtype

    @property
    def nbytes(self) -> int:
        return len(self.index) * self._all.shape[1] * self._all.itemsize

    def __getitem__(self, key: object) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self._read(self.index[[int(key)]])[0]
        if isinstance(key, tuple):
            raise TypeError("Rows take a slice or an index array, not a tuple")
        return self._read(self.index[key])

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        rows = self[:]
        return rows if dtype is None else rows.astype(dtype)

    def _read(self, pos: np.ndarray) -> np.ndarray:
        """A copy of the file's rows `pos`, read in ascending order (one sweep of the file)."""
        if len(pos) and pos[-1] - pos[0] + 1 == len(pos) and (np.diff(pos) == 1).all():
            out = np.array(self._all[pos[0] : pos[-1] + 1])
        else:
            order = np.argsort(pos, kind="stable")
            out = np.empty((len(pos), self._all.shape[1]), dtype=self._all.dtype)
            out[order] = self._all[pos[order]]
        self._read_bytes += out.nbytes
        if self._read_bytes >= RELEASE_BYTES:
            self.release()
        return out

    def release(self) -> None:
        """Give the mapping's resident pages back: they stay in the page cache, not in this
        process's memory."""
        self._read_bytes = 0
        if hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)


def batches(X: np.ndarray | Rows, size: int) -> Iterator[np.ndarray]:
    """Consecutive row blocks of an array or of `Rows`, as arrays."""
    for start in range(0, len(X), size):
        yield X[start : start + size]


def predict_batched(
    predict: Callable[[np.ndarray], np.ndarray], X: np.ndarray | Rows, size: int = PREDICT_ROWS
) -> np.ndarray:
    """`predict` over all rows, `size` at a time: one call for an in-memory split that fits."""
    if isinstance(X, np.ndarray) and len(X) <= size:
        return predict(X)
    return np.concatenate([predict(block) for block in batches(X, size)])


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
        arrays = [np.asarray(y, dtype=np.int64)] + ([extra] if extra is not None else [])
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
        """(x, y, extra or None) per batch of `order` (a permutation tensor)."""
        if not self.streamed:
            order = order.to(self.device)
            for start in range(0, self.n, batch_size):
                idx = order[start : start + batch_size]
                got = [t[idx] for t in self.tensors]
                yield got[0], got[1], got[2] if self.extra else None
            return
        loader = DataLoader(
            self.dataset, batch_size=None, sampler=_Slices(order, batch_size), num_workers=0
        )
        for batch in loader:
            got = [t.to(self.device, non_blocking=True) for t in batch]
            yield got[0], got[1], got[2] if self.extra else None


def rows_on(X: np.ndarray | Rows, device, size: int = PREDICT_ROWS) -> Iterator:
    """A split's rows as tensors on `device`: the whole in-memory split as one tensor when it
    fits in `size` rows, else `size` rows at a time."""
    if isinstance(X, np.ndarray) and len(X) <= size:
        yield torch.from_numpy(X).to(device)
        return
    for block in batches(X, size):
        yield torch.from_numpy(block).to(device)

"""Stage 0 — data: read a source and prepare its splits, in memory (tasks/compress/dataset.py)
or, for a large parquet / npz, streamed from disk by batch (tasks/compress/stream.py).

Both preparers build on dataset.py; this module only picks one and keeps the last result, so
neither imports the other (no import cycle: .importlinter checks it).
"""

from __future__ import annotations

import threading
from pathlib import Path

from distill.tasks.compress.dataset import Dataset, prepare, seeded_test_split
from distill.tasks.compress.sources import read_source
from distill.tasks.compress.stream import integer_npz, prepare_streamed, should_stream
from distill.tasks.compress.tokens import tokenized
from distill.tasks.platform.config import DataConfig

__all__ = ["Dataset", "load_dataset", "prepare", "seeded_test_split", "stream_source"]

_LAST: dict[tuple, Dataset] = {}  # the last dataset prepared, by what it was made from
_LAST_LOCK = threading.Lock()


def load_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """Read and prepare a source. The last result is kept while its config, seed and file are
    unchanged: the CLI checks the data before the flow starts, and the flow reuses it."""
    key = (cfg.model_dump_json(), seed, _file_stamp(cfg.source))
    with _LAST_LOCK:
        if key in _LAST:
            return _LAST[key]
    if stream_source(cfg):  # a large parquet / npz: converted once, rows read by batch
        data = prepare_streamed(cfg, seed)
    else:
        table = read_source(cfg.source, cfg.label, cfg.split_column)
        if cfg.tokenizer is not None:  # its text column as token ids
            table = tokenized(table, cfg.tokenizer, cfg.max_length)
        data = prepare(table, cfg, seed)
    with _LAST_LOCK:
        _LAST.clear()
        _LAST[key] = data
    return data


def _file_stamp(source: str) -> tuple | None:
    kind, _, ref = source.partition(":")
    path = Path(ref)
    if kind == "sklearn" or not path.is_file():
        return None
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def stream_source(cfg: DataConfig) -> bool:
    """A parquet / npz source of `stream.STREAM_MIN_CELLS` cells or more: its rows stay on disk
    (as standardized float32: integer token ids fed as given are held in memory, as int64)."""
    if not cfg.source.startswith(("parquet:", "npz:")) or cfg.tokenizer is not None:
        return False
    return should_stream(cfg.source) and (cfg.standardize or not integer_npz(cfg.source))

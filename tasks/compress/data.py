"""Stage 0 — data: read a source and prepare its splits, in memory (tasks/compress/dataset.py)
or, for a large parquet / npz, streamed from disk by batch (tasks/compress/stream.py).

Both preparers build on dataset.py; this module only picks one, so neither imports the other (no
import cycle: .importlinter checks it). It remembers nothing: a run that asks twice (the CLI's
input check, then the flow) asks its `RunContext` (tasks/compress/context.py).
"""

from __future__ import annotations

from distill.tasks.compress.dataset import Dataset, prepare, seeded_test_split
from distill.tasks.compress.sources import npz_masks, read_source
from distill.tasks.compress.stream import integer_npz, prepare_streamed, should_stream
from distill.tasks.compress.tokens import tokenized
from distill.tasks.platform.config import DataConfig
from distill.tasks.platform.errors import UserError

__all__ = ["Dataset", "load_dataset", "prepare", "seeded_test_split", "stream_source"]


def load_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """Read and prepare a source (each call anew)."""
    masks = npz_masks(cfg.source)
    if masks and not cfg.standardize and stream_source(cfg):  # float rows, streamed as such
        raise UserError(
            f"data {cfg.source}: attention mask {masks[0]!r} is for X arrays that hold floats: "
            "a mask goes with integer token ids"
        )
    if masks and cfg.standardize:  # before a large npz would be streamed as scaled floats
        raise UserError(
            f"data {cfg.source}: attention mask {masks[0]!r} goes with token ids fed as given, "
            "and config key 'data.standardize' is true (it would turn the ids into scaled "
            "floats): set it to false"
        )
    if stream_source(cfg):  # a large parquet / npz: converted once, rows read by batch
        data = prepare_streamed(cfg, seed)
    else:
        table = read_source(cfg.source, cfg.label, cfg.split_column)
        if cfg.tokenizer is not None:  # its text column as token ids
            table = tokenized(table, cfg.tokenizer, cfg.max_length)
        data = prepare(table, cfg, seed)
    return data


def stream_source(cfg: DataConfig) -> bool:
    """A parquet / npz source of `stream.STREAM_MIN_CELLS` cells or more: its rows stay on disk
    (as standardized float32: integer token ids fed as given are held in memory, as int64)."""
    if not cfg.source.startswith(("parquet:", "npz:")) or cfg.tokenizer is not None:
        return False
    return should_stream(cfg.source) and (cfg.standardize or not integer_npz(cfg.source))

"""Attention masks carried inside the token ids: one int64 array per split, so a mask travels
with its rows through every split, slice, batch and cache key with no second array to keep
aligned.

A position the mask hides holds its id bit-flipped (`~id`, i.e. `-1 - id`, negative); a position
it shows holds the id as given. Token ids are never negative, so `fold` is exact and `unfold`
gives back the user's ids (whatever they hold at hidden positions) and their 0/1 mask. Only the
Hugging Face wrapper (tasks/compress/hf.py `HFLogits`, `masked=True`) reads folded rows; the
served model takes the two arrays (`input_ids`, `attention_mask`) and folds them in its graph
(tasks/compress/quantize.py `export_onnx`).
"""

from __future__ import annotations

import numpy as np
import torch

IDS, MASK = "input_ids", "attention_mask"  # the served model's input names (HF's)


def fold(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """int64 rows: `ids` where `mask` is non-zero, `~ids` where it is 0."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.where(np.asarray(mask) != 0, ids, ~ids)


def unfold(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) of folded rows, both int64 of their shape."""
    rows = np.asarray(rows, dtype=np.int64)
    shown = rows >= 0
    return np.where(shown, rows, ~rows), shown.astype(np.int64)


def unfold_tensor(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`unfold` in torch (exportable: a comparison and a `where`)."""
    shown = rows >= 0
    return torch.where(shown, rows, -1 - rows), shown.long()


def fold_tensor(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`fold` in torch (the served graph's first step)."""
    return torch.where(mask != 0, ids, -1 - ids)

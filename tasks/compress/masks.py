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

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Padding:
    """Where each row of token ids ends, for a model whose answer on a row never depends on the
    positions after it (a Hugging Face encoder or causal LM with an attention mask: what the mask
    hides is never attended to): after the last position the folded mask shows (`masked`), or
    the last id that is not `pad`. Evaluation cuts a batch of rows sorted by length to its
    longest real row (tasks/compress/evaluate.py `predict_trimmed`)."""

    masked: bool
    pad: int | None = None

    def lengths(self, X: np.ndarray) -> np.ndarray:
        """Per row, the length that holds every position the row's answer depends on (>= 1)."""
        pad = -1 if self.pad is None else self.pad  # no pad id: every id shown
        shown = np.greater_equal(X, 0) if self.masked else np.not_equal(X, pad)
        last = X.shape[1] - np.argmax(shown[:, ::-1], axis=1)
        return np.where(shown.any(axis=1), last, 1)

"""Vocabulary trimming (`reduce.vocab: data`): a token model keeps the embedding rows of the
token ids its training rows use, plus one row that stands for every other id.

A small BERT's embedding table is most of it (bert-tiny: 3.9 M of its 4.4 M parameters are
30,522 x 128 token rows) and no cut of heads, FFN units or layers touches it. The ids a task
uses are usually a few thousand. The trimmed table keeps

- every id in the training rows (and the model's config ids: pad, bos, eos, sep, cls), and
- one "other" row, the mean of the dropped rows: where an unseen id appears, the embedding that
  is closest on average (least squares) to the row it replaced, the drop being uniform.

The model still takes the user's ids: `TrimmedEmbedding` maps each id through a table (old id ->
row) before its lookup, so the served ONNX file holds that table (int32, 4 bytes an id) and a
Gather, and the user's `[N, T]` int64 ids go in unchanged. On ids seen in training the student
computes exactly what the teacher computes (tested); an unseen id gets the "other" row.

Only the input side is trimmed: a model whose output layer is the token table (a causal LM's
next-token head, tied or not) keeps its vocabulary, and image models have none: both are refused
in one line. `student_hf/` is written with the trimmed table and `vocab.json`, the map from the
user's ids to its rows (`save_pretrained` cannot hold it: see `plain_for_saving`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from distill.tasks.compress.transformer import hf_owner
from distill.tasks.platform.errors import UserError

KEY = "config key 'reduce.vocab'"
SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id")


class TrimmedEmbedding(nn.Embedding):
    """An `nn.Embedding` of the kept rows that takes the original ids: `ids` maps each of the
    original vocabulary's ids to its row (the last row: every id not kept). The map is a buffer
    left out of the state_dict (so the Hugging Face model's keys stay its own); its digest is in
    `extra_repr`, which the stage cache hashes with the weights."""

    ids: torch.Tensor  # a buffer: (vocab,) int32

    def __init__(self, weight: torch.Tensor, ids: torch.Tensor, padding_idx: int | None) -> None:
        super().__init__(
            weight.shape[0],
            weight.shape[1],
            padding_idx=padding_idx,
            dtype=weight.dtype,  # a bf16 teacher's table stays bf16
            device=weight.device,
        )
        with torch.no_grad():
            self.weight.copy_(weight)
        self.register_buffer("ids", ids.to(weight.device, torch.int32), persistent=False)
        self.digest = hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()[:16]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, of {self.ids.numel()} ids ({self.digest})"

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Embedding's name)
        return super().forward(self.ids[input].long())


@dataclass(frozen=True)
class Trim:
    """What `trim` did: `kept` ids of `vocab` (the "other" row not counted), `params_saved`."""

    path: str
    vocab: int
    kept: int
    params_saved: int

    def record(self) -> dict[str, float]:
        return {
            "vocab_size": float(self.vocab),
            "vocab_kept": float(self.kept),
            "vocab_params_saved": float(self.params_saved),
        }


def _pretrained(model: nn.Module) -> Any | None:
    """The outermost Hugging Face model in `model` (an `HFLogits`' `hf`, or the model), or None."""
    owner = hf_owner(model)
    return None if owner is None else owner[1]


def _token_embedding(hf: Any, where: str) -> tuple[str, nn.Embedding]:
    """The input token table of Hugging Face model `hf` and its path, or one line why not."""
    if getattr(hf, "main_input_name", "input_ids") != "input_ids":
        raise UserError(f"{KEY}=data: {where} takes {hf.main_input_name}, not token ids")
    if hf.get_output_embeddings() is not None:
        raise UserError(
            f"{KEY}=data: {type(hf).__name__} answers over its vocabulary (an output "
            "embedding): it keeps the whole vocabulary; set reduce.vocab=all"
        )
    table = hf.get_input_embeddings()
    if not isinstance(table, nn.Embedding):
        raise UserError(
            f"{KEY}=data: {type(hf).__name__}'s input embedding is a "
            f"{type(table).__name__}, not an nn.Embedding"
        )
    path = next(name for name, m in hf.named_modules() if m is table)
    return path, table


def used_ids(X: np.ndarray, config: Any) -> np.ndarray:
    """The ids rows `X` hold (a folded mask's hidden positions, `~id`, included: masks.py), and
    the config's special ids, sorted."""
    X = np.asarray(X).astype(np.int64, copy=False)
    ids = np.where(X < 0, ~X, X).ravel()
    special = [getattr(config, key, None) for key in SPECIAL_IDS]
    extra = np.array([s for s in special if isinstance(s, int) and s >= 0], dtype=np.int64)
    return np.unique(np.concatenate([ids, extra]))


def trim(
    model: nn.Module, X_train: np.ndarray, where: str = "the teacher"
) -> tuple[nn.Module, Trim]:
    """A copy of `model` (an `HFLogits` or a PreTrainedModel) whose token table keeps the rows of
    the ids in `X_train` and one "other" row; `config.vocab_size` says its rows. Raises
    UserError (one line) for a model it cannot trim or ids outside its vocabulary."""
    trimmed = copy.deepcopy(model)
    hf = _pretrained(trimmed)
    if hf is None:
        raise UserError(f"{KEY}=data: {where} is not a Hugging Face model (teacher.source: hf:DIR)")
    path, table = _token_embedding(hf, where)
    if isinstance(table, TrimmedEmbedding):
        raise UserError(f"{KEY}=data: {where}'s vocabulary is trimmed already")
    vocab, width = table.weight.shape
    keep = used_ids(X_train, hf.config)
    if keep.size and (keep[0] < 0 or keep[-1] >= vocab):
        raise UserError(
            f"data: token id {int(keep[-1] if keep[-1] >= vocab else keep[0])} is outside "
            f"{where}'s vocabulary of {vocab}"
        )
    dropped = np.setdiff1d(np.arange(vocab), keep)
    if not dropped.size:  # every id is used: nothing to trim
        return trimmed, Trim(path, int(vocab), int(vocab), 0)
    weight = table.weight.detach()
    other = weight[torch.from_numpy(dropped)].mean(0)
    rows = torch.cat([weight[torch.from_numpy(keep)], other[None]])
    ids = torch.full((vocab,), len(keep), dtype=torch.int32)
    ids[torch.from_numpy(keep)] = torch.arange(len(keep), dtype=torch.int32)
    pad = table.padding_idx
    new = TrimmedEmbedding(rows, ids, None if pad is None else int(ids[pad]))
    hf.set_input_embeddings(new)
    hf.config.vocab_size = rows.shape[0]
    for cfg in _text_configs(hf):
        cfg.vocab_size = rows.shape[0]
    return trimmed, Trim(path, int(vocab), len(keep), int((vocab - rows.shape[0]) * width))


def _text_configs(hf: Any) -> list[Any]:
    """The config objects that carry the vocabulary size (a composite config's text part too)."""
    text = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
    return [text] if text is not hf.config else []


def trimmed_of(model: nn.Module) -> TrimmedEmbedding | None:
    """The trimmed token table of `model`, or None."""
    return next((m for m in model.modules() if isinstance(m, TrimmedEmbedding)), None)


@contextlib.contextmanager
def plain_for_saving(hf: Any) -> Iterator[dict[str, Any] | None]:
    """Within: `hf`'s trimmed table as a plain nn.Embedding (what `from_pretrained` builds from a
    config of `vocab_size` rows), its config's special ids as rows of it; yields the map to
    write beside it (None: not trimmed). `save_pretrained` cannot hold the map, so a saved
    student takes row numbers: `vocab.json` says which row each of the user's ids is."""
    table = hf.get_input_embeddings()
    if not isinstance(table, TrimmedEmbedding):
        yield None
        return
    ids = table.ids.long()
    plain = nn.Embedding(table.num_embeddings, table.embedding_dim, padding_idx=table.padding_idx)
    plain.weight = table.weight  # the same parameter: nothing copied
    configs = [hf.config, *_text_configs(hf)]
    before = [{k: getattr(c, k, None) for k in SPECIAL_IDS} for c in configs]
    hf.set_input_embeddings(plain)
    for c, old in zip(configs, before, strict=True):
        for key, value in old.items():
            if isinstance(value, int) and 0 <= value < ids.numel():
                setattr(c, key, int(ids[value]))
    try:
        kept = torch.nonzero(ids < table.num_embeddings - 1).flatten()
        yield {
            "what": "row of the token table for each id of the teacher's vocabulary",
            "vocab_size": int(ids.numel()),
            "kept_ids": kept.tolist(),
            "other_row": table.num_embeddings - 1,
            "use": "t = np.full(vocab_size, other_row); t[kept_ids] = np.arange(len(kept_ids)); "
            "input_ids = t[input_ids]",
        }
    finally:
        hf.set_input_embeddings(table)
        for c, old in zip(configs, before, strict=True):
            for key, value in old.items():
                if value is not None:
                    setattr(c, key, value)


def hint(model: nn.Module) -> str:
    """What trimming would save on `model`, as a clause for a 'below the smallest reachable'
    line: '' where it does not apply (not a token model, trimmed already, a vocabulary head)."""
    hf = _pretrained(model)
    if hf is None:
        return ""
    try:
        _, table = _token_embedding(hf, "")
    except UserError:
        return ""
    if isinstance(table, TrimmedEmbedding):
        return ""
    rows, width = table.weight.shape
    return (
        f"; its token table alone is {rows * width:,} params ({rows:,} ids x {width}): "
        f"reduce.vocab=data keeps only the ids the data uses"
    )

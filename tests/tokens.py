"""Models of int64 token ids for tests: an embedding bag of our own, and a tiny Hugging Face BERT
wrapped as the pipeline sees any teacher (`model(ids) -> logits`, the `hf` child as in
coord/CONTRACT.md). No hub download: the BERT is built from a config object. Seed torch before
building one to get the same weights twice."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

VOCAB, LENGTH = 100, 16


class EmbeddingBag(nn.Module):
    """Token ids `[N, T]` -> embedding -> mean over the sequence -> Linear: takes any length."""

    def __init__(self, vocab: int = VOCAB, dim: int = 16, n_classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x).mean(dim=1))


class FlatTokens(nn.Module):
    """Token ids -> embedding -> a Linear over the flattened sequence: takes `length` only."""

    def __init__(self, vocab: int = VOCAB, dim: int = 4, length: int = LENGTH) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim * length, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x).flatten(1))


class HFWrap(nn.Module):
    """The contract's stand-in for the HF wrapper: ids in, `ModelOutput.logits` out, the attention
    mask from `config.pad_token_id`."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.hf.config.pad_token_id
        mask = None if pad is None else (x != pad).long()
        return self.hf(input_ids=x, attention_mask=mask).logits


def tiny_bert(
    hidden: int = 32, layers: int = 2, intermediate: int = 64, n_classes: int = 3, **config: Any
):
    """A BertForSequenceClassification of a few thousand parameters, in eval mode; `config`:
    other `BertConfig` keys, or these defaults replaced (`vocab_size`, `num_attention_heads`,
    `max_position_embeddings`, `pad_token_id`, ...)."""
    from transformers import BertConfig, BertForSequenceClassification

    settings = {
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "intermediate_size": intermediate,
        "max_position_embeddings": 64,
        "num_labels": n_classes,
    }
    return BertForSequenceClassification(BertConfig(**(settings | config))).eval()


def token_ids(rows: int, length: int = LENGTH, seed: int = 0) -> np.ndarray:
    """int64 ids in [1, VOCAB): no padding (id 0 is BERT's pad)."""
    return np.random.default_rng(seed).integers(1, VOCAB, size=(rows, length)).astype(np.int64)

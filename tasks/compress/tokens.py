"""A text column into token ids: `data.tokenizer: hf:DIR`, a tokenizer saved with
`save_pretrained` (tokenizer.json, or the vocabulary files its class reads).

The table's one feature column besides the label (and the split column) is the text; each row
becomes int64 token ids `[T]`, padded with the tokenizer's pad token to the longest row (at most
`data.max_length`, else the tokenizer's `model_max_length` capped at 512) and truncated there.
The tokenizer's attention mask is kept, folded into the ids (tasks/compress/masks.py: a padded
position holds `~id`), so a Hugging Face teacher attends to what the tokenizer said is text, on
whichever side it pads and whatever its pad id is (GPT-2 pads with its end-of-text token), and
the served model takes `input_ids` and `attention_mask`. Rows no tokenizer padded carry no mask.

Tokenizing runs once per content: the ids are kept in `DISTILL_DATA_CACHE` (the stream cache's
folder) under the sha256 of the texts, the tokenizer's files and the length; a later run on the
same data reads them back. Nothing is downloaded (`local_files_only`) and no code from the
directory runs (`trust_remote_code` off).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from distill.tasks.compress.masks import fold
from distill.tasks.compress.sources import Table
from distill.tasks.compress.stream import cache_root
from distill.tasks.platform.caching import file_sha256
from distill.tasks.platform.errors import UserError, first_line

KEY = "config key 'data.tokenizer'"
LONGEST = 512  # a tokenizer without a model_max_length (a huge sentinel) is capped here


def _directory(source: str) -> Path:
    if not source.startswith("hf:"):
        raise UserError(f"{KEY}: expected hf:DIR (a save_pretrained directory), got {source!r}")
    path = Path(source.removeprefix("hf:")).expanduser()
    if not path.is_dir():
        raise UserError(
            f"{KEY}: {path} is no directory (a hub id is not downloaded: save_pretrained the "
            "tokenizer into a directory and give that)"
        )
    return path


def _fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file() and not f.name.endswith(".safetensors"):  # the weights do not tokenize
            h.update(f"{f.name}\0{file_sha256(f)}\0".encode())
    return h.hexdigest()


def load_tokenizer(source: str) -> Any:
    """The fast tokenizer of `hf:DIR`; one line when it is missing or cannot load."""
    path = _directory(source)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UserError(f"{KEY}: needs transformers: pip install 'distill[hf]'") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, local_files_only=True, trust_remote_code=False
        )
    except Exception as err:  # noqa: BLE001 -- from_pretrained raises many types
        raise UserError(f"{KEY}: {path} holds no tokenizer that loads: {first_line(err)}") from None
    if tokenizer.pad_token_id is None:
        raise UserError(f"{KEY}: the tokenizer in {path} has no pad token to pad rows with")
    return tokenizer


def text_column(table: Table) -> pd.Series:
    """The one feature column that holds the text."""
    names = table.names
    if len(names) != 1:
        shown = ", ".join(repr(n) for n in names[:5]) + (", ..." if len(names) > 5 else "")
        raise UserError(
            f"{KEY}: {table.where} has {len(names)} feature columns ({shown}); a tokenized "
            "source has one text column besides the label (and data.split_column)"
        )
    column = table.features[names[0]]
    if column.isna().any():
        row = int(np.flatnonzero(column.isna().to_numpy())[0])
        raise UserError(f"{KEY}: {table.where} column {names[0]!r} row {row} has no text")
    return column.astype(str)


def token_ids(
    texts: list[str], tokenizer: Any, max_length: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """int64 ids `[N, T]` padded to the longest row, truncated at the length, and their
    attention mask (1: text, 0: padding)."""
    limit = max_length or min(int(getattr(tokenizer, "model_max_length", LONGEST)), LONGEST)
    encoded = tokenizer(
        texts,
        padding="longest",
        truncation=True,
        max_length=limit,
        return_attention_mask=True,
        return_tensors="np",
    )
    ids = np.asarray(encoded["input_ids"], dtype=np.int64)
    return ids, np.asarray(encoded["attention_mask"], dtype=np.int64)


def tokenized(table: Table, source: str, max_length: int | None) -> Table:
    """`table` with its text column replaced by token ids (cached by content), the padding's
    attention mask folded in where any row is padded."""
    texts = text_column(table)
    path = _directory(source)
    key = hashlib.sha256()
    for part in (_fingerprint(path), str(max_length), table.names[0], "ids+mask"):
        key.update(part.encode() + b"\0")
    for text in texts:
        key.update(text.encode("utf-8", "surrogatepass") + b"\0")
    cached = cache_root() / "tokens" / f"{key.hexdigest()}.npy"
    if cached.is_file():
        ids = np.load(cached, allow_pickle=False)  # folded: a padded position holds ~id
    else:
        ids = fold(*token_ids(texts.tolist(), load_tokenizer(source), max_length))
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{np.random.default_rng().integers(1 << 30)}.tmp")
        with open(partial, "wb") as out:
            np.save(out, ids, allow_pickle=False)
        partial.replace(cached)  # whole or absent: another run may read it at once
    masked = bool((ids < 0).any())
    names = [f"t{i}" for i in range(ids.shape[1])]
    return Table(
        ids,
        table.y,
        names,
        table.name,
        table.where,
        (ids.shape[1],),
        table.split,
        table.split_column,
        frame=None,
        encode=False,
        label=table.label,
        masked=masked,
    )

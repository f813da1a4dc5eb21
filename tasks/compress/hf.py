"""Hugging Face teachers: `teacher.source: hf:DIR`, a local directory written by
`save_pretrained` (config.json + *.safetensors).

The model is built by the Auto class of what its config's `architectures` names (sequence
classification, image classification, causal LM), from safetensors only: a directory with only
`pytorch_model.bin` is refused (loading it unpickles, which runs code), `trust_remote_code` is
never on, and nothing is downloaded (`local_files_only`): a hub id is refused with a line that
says to `save_pretrained` it into a directory first.

The pipeline calls every model as `model(x) -> logits` on rows of the data, so the model is
wrapped (`HFLogits`): int64 token ids `[N, T]` (the attention mask the data brings, folded into
the ids by tasks/compress/masks.py; else from `config.pad_token_id` when it is set, else none:
all ones) or pixels (`[N, C, H, W]`, or flat rows reshaped to the image);
`ModelOutput.logits` out; a causal LM answers with the logits of each row's last non-pad
position, over its vocabulary or over the token ids that are the data's classes.

transformers is optional (`pip install 'distill[hf]'`): it is imported only when an `hf:` teacher
loads, so every other path runs without it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distill.tasks.compress.architectures import logits_of
from distill.tasks.compress.data import Dataset
from distill.tasks.compress.masks import Padding, unfold_tensor
from distill.tasks.platform.errors import UserError, first_line

PREFIX = "hf:"
KEY = "config key 'teacher.source'"
INSTALL = "pip install 'distill[hf]'"
VOCAB_FILE = "vocab.json"  # a trimmed student's map from the user's ids to its rows (vocab.py)
# where a student_hf/ cannot be written: the setting that keeps a run to what the config describes
HINT = "; teacher.hf_loadable=true keeps the cuts to what the config describes"
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # weights torch.load would unpickle

# what distill takes a teacher for -> (transformers' names of its model classes, the Auto class)
TASKS = {
    "sequence classification": (
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
        "AutoModelForSequenceClassification",
    ),
    "image classification": (
        "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
        "AutoModelForImageClassification",
    ),
    "causal LM": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
}


class HFLogits(nn.Module):
    """A Hugging Face model as the pipeline sees any teacher: one tensor in, logits out.

    `hf`: the PreTrainedModel (dotted paths `hf.bert.encoder.layer.0...`). `input_shape`: one
    image's `[C, H, W]`, to which flat rows are reshaped. `columns`: for a causal LM whose
    classes are token ids, the logits kept (class i is token `columns[i]`); None: all of them.
    `masked`: the rows hold their attention masks folded in (the data's: masks.py), used as
    given; else the mask comes from `config.pad_token_id`. `hf_loadable` (teacher.hf_loadable):
    a student of it keeps to cuts its config describes (transformer.py `loadable_only`)."""

    columns: torch.Tensor | None  # a buffer (register_buffer below)

    def __init__(
        self,
        hf: nn.Module,
        task: str,
        input_shape: Sequence[int] = (),
        columns: Sequence[int] | None = None,
        masked: bool = False,
    ) -> None:
        super().__init__()
        self.hf = hf
        self.task = task
        self.masked = masked
        self.images = getattr(hf, "main_input_name", "input_ids") == "pixel_values"
        self.hf_loadable = False
        self.input_shape = tuple(int(n) for n in input_shape)
        self.register_buffer(
            "columns",
            None if columns is None else torch.as_tensor(list(columns), dtype=torch.long),
            persistent=False,  # the state_dict is the HF model's: `hf.*`
        )

    def extra_repr(self) -> str:  # what the forward does beyond the weights (cache keys hash it)
        columns = None if self.columns is None else self.columns.tolist()
        shape = list(self.input_shape)
        masked = ", masked=True" if self.masked else ""  # absent: keys of unmasked runs unchanged
        # the cuts a plan may make (getattr: an object pickled before the attribute existed)
        loadable = ", hf_loadable=True" if getattr(self, "hf_loadable", False) else ""
        return f"task={self.task!r}, input_shape={shape}, columns={columns}{masked}{loadable}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.images:
            if x.dim() == 2 and len(self.input_shape) > 1:
                x = x.reshape(x.shape[0], *self.input_shape)
            if not x.is_floating_point():  # integer pixels (an npz of uint8 images)
                x = x.float()
            return logits_of(self.hf(pixel_values=x))
        mask: torch.Tensor | None
        if self.masked:  # the data's own mask; the user's ids at its hidden positions
            x, mask = unfold_tensor(x)
        else:
            mask = self.attention_mask(x)
        causal = self.task == "causal LM"
        extra: dict[str, int] = {"logits_to_keep": 1} if causal and mask is None else {}
        logits = logits_of(self.hf(input_ids=x, attention_mask=mask, **extra))
        if causal:  # the next token after each row's last real token
            if mask is None:
                logits = logits[:, -1]
            else:
                positions = torch.arange(x.shape[1], device=x.device)
                last = (mask * positions).argmax(dim=1)
                logits = logits[torch.arange(x.shape[0], device=x.device), last]
        if self.columns is not None:
            logits = logits.index_select(1, self.columns)
        return logits

    def attention_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """The mask of token-id rows `x`: the one folded into them, else `pad_token_id`'s."""
        if self.masked:
            return unfold_tensor(x)[1]
        pad = config_of(self.hf).pad_token_id
        return None if pad is None else (x != pad).long()

    def padding(self) -> Padding | None:
        """Where a row of token ids ends for this model (masks.py `Padding`): the folded mask's
        last shown position, or the last non-pad id; None for images, or ids without a pad id
        (every position counts)."""
        if self.images:
            return None
        if self.masked:
            return Padding(masked=True)
        pad = config_of(self.hf).pad_token_id
        return None if pad is None else Padding(masked=False, pad=int(pad))


def config_of(hf: nn.Module) -> Any:
    """A PreTrainedModel's `config`: a PretrainedConfig whose fields differ per architecture
    (to mypy any attribute of an nn.Module is a Tensor or a Module)."""
    return hf.config


def is_pretrained(model: nn.Module) -> bool:
    """A transformers PreTrainedModel (told by its class's ancestry: transformers not imported)."""
    return any(
        c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.")
        for c in type(model).__mro__
    )


def hf_model(model: nn.Module) -> Any | None:
    """The wrapped PreTrainedModel of an `HFLogits` (or the model itself if it is one), or None."""
    if isinstance(model, HFLogits):
        return model.hf
    return model if is_pretrained(model) else None


# --- loading -------------------------------------------------------------------------------


def hf_directory(source: str) -> Path:
    """The `save_pretrained` directory `hf:DIR` names, checked without transformers: it exists,
    holds config.json and safetensors weights (never only pickled ones)."""
    ref = source.removeprefix(PREFIX)
    path = Path(ref).expanduser()
    if not ref or not path.exists():
        raise UserError(
            f"{KEY}: {source}: no directory {ref!r}; distill downloads no model (hub ids "
            "included): save_pretrained it into a directory first and give hf:DIR"
        )
    if not path.is_dir():
        raise UserError(
            f"{KEY}: {source} is a file; hf: takes a directory written by save_pretrained"
        )
    if not (path / "config.json").is_file():
        raise UserError(
            f"{KEY}: {path} holds no config.json: not a directory written by save_pretrained"
        )
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLED)
        if pickled:
            raise UserError(
                f"{KEY}: {path} holds {pickled[0]} but no *.safetensors: loading it would "
                "unpickle it (runs code); save the model with save_pretrained (safetensors, "
                "its default) and give that directory"
            )
        raise UserError(f"{KEY}: {path} holds no *.safetensors weights")
    return path


def _architecture(path: Path) -> str:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{KEY}: {path}/config.json could not be read: {first_line(err)}") from None
    names = config.get("architectures") if isinstance(config, dict) else None
    if not names or not isinstance(names, list) or not isinstance(names[0], str):
        raise UserError(
            f"{KEY}: {path}/config.json names no architectures (save the task model, e.g. "
            "BertForSequenceClassification, with save_pretrained)"
        )
    return names[0]


def import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise UserError(
            f"{KEY}: an hf: teacher needs transformers, which is not installed: {INSTALL}"
        ) from None
    return transformers


def task_of(architecture: str) -> str | None:
    """Which of `TASKS` a transformers model class is for, None if none."""
    from transformers.models.auto import modeling_auto

    for task, (names, _) in TASKS.items():
        for value in getattr(modeling_auto, names).values():
            if architecture in ((value,) if isinstance(value, str) else tuple(value)):
                return task
    return None


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """No progress bars or load reports: a missing weight is refused here in one line."""
    logging = transformers.utils.logging
    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def load_pretrained(source: str) -> tuple[nn.Module, str]:
    """-> (the PreTrainedModel of `hf:DIR` in float32, eval mode; its task)."""
    path = hf_directory(source)
    architecture = _architecture(path)
    transformers = import_transformers()
    if not isinstance(getattr(transformers, architecture, None), type):
        raise UserError(
            f"{KEY}: {path} is a {architecture}, which transformers "
            f"{transformers.__version__} does not have (custom model code is never run: "
            "trust_remote_code stays off)"
        )
    task = task_of(architecture)
    if task is None:
        raise UserError(
            f"{KEY}: {path} is a {architecture}; distill takes " + ", ".join(TASKS) + " models"
        )
    auto = getattr(transformers, TASKS[task][1])
    try:
        with _quiet(transformers):
            model, info = auto.from_pretrained(
                path,
                local_files_only=True,
                trust_remote_code=False,
                use_safetensors=True,
                dtype=torch.float32,
                output_loading_info=True,
            )
    except Exception as err:  # noqa: BLE001 -- from_pretrained raises many types
        raise UserError(f"{KEY}: {path} could not be loaded: {first_line(err)}") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise UserError(
            f"{KEY}: {path} has no weights for {missing[0]} of its {architecture} "
            f"({len(missing)} missing): they would be random (a base model saved without "
            "its head?)"
        )
    return model.eval(), task


def image_shape(hf: nn.Module, data: Dataset) -> tuple[int, ...]:
    """One image's `[C, H, W]`: the data's shape, or the model config's when the rows are flat."""
    if len(data.input_shape) > 1:
        return tuple(data.input_shape)
    config = hf.config
    size = getattr(config, "image_size", None)
    size = (size, size) if isinstance(size, int) else tuple(size or ())
    shape = (getattr(config, "num_channels", 3), *size)
    return shape if len(shape) == 3 and int(np.prod(shape)) == data.n_features else ()


def class_tokens(hf: nn.Module, data: Dataset, source: str) -> list[int] | None:
    """A causal LM's classes are token ids: the columns of its logits that are the data's
    classes (None when the classes are the whole vocabulary, in order)."""
    vocab = config_of(hf).get_text_config().vocab_size
    classes = data.classes
    if list(classes) == list(range(vocab)):
        return None
    if data.is_regression or not all(
        isinstance(c, (int, np.integer)) and 0 <= c < vocab for c in classes
    ):
        raise UserError(
            f"teacher {source} is a causal LM: its outputs are the next token's logits, so the "
            f"labels must be token ids below its vocabulary size {vocab}"
        )
    return [int(c) for c in classes]


def keep_loadable(model: nn.Module, where: str) -> None:
    """`teacher.hf_loadable: true`: every student of `model` keeps to the cuts its Hugging Face
    config describes (so `student_hf/` loads with from_pretrained); refused for a teacher that
    holds no Hugging Face model."""
    wrapped = [m for m in model.modules() if isinstance(m, HFLogits)]
    if not wrapped:
        raise UserError(
            f"config key 'teacher.hf_loadable': teacher {where} is not a Hugging Face model "
            "(hf:DIR or a transformers model object), so no config describes its student"
        )
    for m in wrapped:
        m.hf_loadable = True


def load_hf_teacher(source: str, data: Dataset) -> HFLogits:
    """`hf:DIR` wrapped for the pipeline (`HFLogits`), in eval mode."""
    model, task = load_pretrained(source)
    return wrap_pretrained(model, task, data, source)


def wrap_pretrained(model: nn.Module, task: str, data: Dataset, where: str) -> HFLogits:
    """A PreTrainedModel for `task` wrapped for the pipeline, in eval mode (`where`: what the
    user named it by, for messages)."""
    if task == "image classification":
        if data.masked:
            raise UserError(
                f"teacher {where} takes images: the data's attention masks (X_*_mask) are for "
                "token ids; drop them"
            )
        return HFLogits(model, task, image_shape(model, data)).eval()
    columns = class_tokens(model, data, where) if task == "causal LM" else None
    return HFLogits(model, task, columns=columns, masked=data.masked).eval()


def save_student(student: nn.Module, directory: Path) -> str:
    """`save_pretrained` the Hugging Face model inside `student` into `directory`, with its
    config as the cuts left it: '' when written, else why not (nothing is written). A directory
    is written only when the model rebuilt from its config has every parameter's shape, so that
    its Auto class loads it with no distill code; a cut the config cannot express (transformers
    5 derives BERT's and GPT-2's head size from hidden_size / num_attention_heads: a head cut
    there) or a layer replaced by another module (low-rank factors) is named instead. A trimmed
    vocabulary (vocab.py) is saved as its rows, with `vocab.json` mapping the user's ids to them."""
    from distill.tasks.compress.transformer import config_mismatch, loadable_only
    from distill.tasks.compress.vocab import plain_for_saving

    hf = hf_model(student)
    if hf is None:
        return "the student holds no Hugging Face model"
    mismatch = config_mismatch(hf)
    if mismatch:
        hint = "" if loadable_only(student) else HINT
        return (
            f"its {type(hf.config).__name__} cannot describe the student ({mismatch}): "
            f"from_pretrained would not load it{hint}"
        )
    with plain_for_saving(hf) as vocab:  # a trimmed vocabulary: its map beside the weights
        hf.save_pretrained(directory)
    if vocab is not None:
        (directory / VOCAB_FILE).write_text(json.dumps(vocab))
    return ""

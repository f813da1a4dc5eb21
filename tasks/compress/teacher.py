"""Stage 1 — teacher: train `teacher.arch` (tasks/compress/architectures.py) or load one
(`teacher.source`: `train`; `file:PATH` or `models:/...`, `runs:/...`: tasks/compress/weights.py;
`hf:DIR`, a Hugging Face `save_pretrained` directory: tasks/compress/hf.py), and check that it
takes the data's rows and gives one output per class (one value for a regression target) before
anything is recorded. A model answering with a tuple, a dict or a `ModelOutput` gets a last step
that takes its logits out (`architectures.with_logits`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from distill.tasks.compress.architectures import build_teacher, is_wrapped, with_logits
from distill.tasks.compress.data import Dataset
from distill.tasks.compress.export_lock import seed_torch
from distill.tasks.compress.finetune import HELD_OUT, FitSettings, History, fit
from distill.tasks.compress.finite import non_finite_tensor
from distill.tasks.compress.hf import PREFIX as HF_PREFIX
from distill.tasks.compress.hf import (
    is_pretrained,
    keep_loadable,
    load_hf_teacher,
    task_of,
    wrap_pretrained,
)
from distill.tasks.compress.weights import load_teacher_file, load_teacher_mlflow
from distill.tasks.platform.config import TeacherConfig
from distill.tasks.platform.errors import UserError, first_line

GIVEN = "python:"  # teacher.source of a module handed to distill.compress (the object is passed)


def train_teacher(
    cfg: TeacherConfig,
    data: Dataset,
    seed: int,
    device: str = "cpu",
    config_dir: Path | None = None,
    history: History | None = None,
) -> nn.Module:
    """`history`: filled with the training curves (the teacher's stage run logs them)."""
    seed_torch(seed)  # not while another thread exports (export_lock.py)
    model = with_logits(build_teacher(cfg, data, config_dir), _rows(data))
    _check_fits(model.eval(), data, cfg.arch)  # before training: a misfit fails in one line
    settings = FitSettings(
        epochs=cfg.epochs,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        patience=cfg.patience,
        weight_decay=cfg.weight_decay,
        seed=seed,
        device=device,
        held_out=HELD_OUT,  # as the students': the guard's rows never choose the epoch
    )
    model, fitted = fit(
        model,
        data,
        settings,
        description="training teacher",
        role="the teacher",
        lr_key="teacher.lr",
    )
    if history is not None:
        history.__dict__.update(fitted.__dict__)
    return model


# --- the stage ----------------------------------------------------------------------------


def load_teacher(
    cfg: TeacherConfig,
    data: Dataset,
    seed: int,
    device: str = "cpu",
    config_dir: Path | None = None,
    history: History | None = None,
) -> nn.Module:
    """The teacher `cfg` names, on CPU in eval mode, checked against the data's rows.

    `config_dir`: the config file's folder, searched for a `module:Name` arch's module.
    `history`: a trained teacher's curves go there."""
    source, whole = cfg.source, False
    if source == "train":
        model = train_teacher(cfg, data, seed, device, config_dir, history)
    elif source.startswith("file:"):
        path = Path(source.removeprefix("file:"))
        model, whole = load_teacher_file(path, cfg, data, config_dir)
    elif source.startswith(("models:/", "runs:/")):
        model, whole = load_teacher_mlflow(source, cfg, data, config_dir)
    elif source.startswith(HF_PREFIX):
        model, whole = load_hf_teacher(source, data), True
    elif source.startswith(GIVEN):
        raise UserError(
            f"config key 'teacher.source': {source!r} is a module handed to "
            "distill.compress(teacher=...), which a config file cannot name"
        )
    else:
        raise UserError(
            f"config key 'teacher.source': expected train, file:PATH, hf:DIR, "
            f"models:/NAME@ALIAS or runs:/ID/PATH, got {source!r}"
        )
    model = with_logits(model.float().eval(), _rows(data))
    _check_fits(model, data, source if whole else cfg.arch)
    if cfg.hf_loadable:
        keep_loadable(model, source if whole else cfg.arch)
    return model


def given_teacher(model: nn.Module, data: Dataset, hf_loadable: bool = False) -> nn.Module:
    """A module handed to `distill.compress`: a copy (the caller's own stays as it was), on CPU,
    float32, eval mode, wrapped as a loaded one would be (a transformers model object as an
    `hf:` directory's), checked against the data's rows (`hf_loadable`: teacher.hf_loadable)."""
    model = copy.deepcopy(model).cpu().float()
    name = type(model).__name__
    if is_pretrained(model):
        task = task_of(name)
        if task is None:
            raise UserError(f"teacher: a {name}, not a model class distill knows a task of")
        model = wrap_pretrained(model, task, data, name)
    model = with_logits(model.eval(), _rows(data))
    _check_fits(model, data, name)
    if hf_loadable:
        keep_loadable(model, name)
    return model


def _rows(data: Dataset, n: int = 2) -> torch.Tensor:
    """The first training rows, in the data's dtype (int64 token ids stay int64)."""
    return torch.from_numpy(data.X_train[:n])


def _check_fits(model: nn.Module, data: Dataset, name: str) -> None:
    """A teacher must take this data's rows and give one logit per class (one value for a
    regression target). Rows with attention masks go to Hugging Face teachers only."""
    if data.masked and not getattr(model, "masked", False):
        raise UserError(
            f"teacher {name} takes one array of token ids, and the data brings attention masks "
            "(npz arrays X_*_mask, or a tokenizer's padding): only an hf: teacher takes them; "
            "give the ids as an npz without masks"
        )
    rows = _rows(data)
    shape = [len(rows), *data.input_shape] if is_wrapped(model) else list(rows.shape)
    try:
        with torch.no_grad():
            out = model(rows)
    except Exception as err:  # noqa: BLE001 -- a teacher's forward raises anything
        integers = "" if rows.is_floating_point() else f" {str(rows.dtype).removeprefix('torch.')}"
        hint = (
            "; the data's integer features reach the model as int64 when not standardized "
            "(data.standardize: true gives float32)"
            if integers and "dtype" in str(err).lower()
            else ""
        )
        raise UserError(
            f"teacher {name} does not accept{integers} inputs of shape {shape} "
            f"(data.shape={list(data.input_shape)}): {first_line(err)}{hint}"
        ) from None
    if not isinstance(out, torch.Tensor):
        raise UserError(f"teacher {name} returns a {type(out).__name__}, not a tensor of logits")
    if out.ndim != 2 or out.shape[1] != data.n_outputs:
        wants = (
            "a regression target: one output per row, [N, 1]"
            if data.is_regression
            else f"{data.n_classes} classes"
        )
        raise UserError(
            f"teacher {name} outputs {list(out.shape[1:])} per row, the data has {wants}"
        )
    weights = non_finite_tensor(model)
    if weights is not None:
        raise UserError(f"teacher {name}: its {weights} holds NaN or inf")
    with torch.inference_mode():
        finite = bool(torch.isfinite(model(_rows(data, 256))).all())
    if not finite:
        raise UserError(
            f"teacher {name} outputs NaN or inf on the data's rows (weights too large for float32?)"
        )


def check_teacher(
    cfg: TeacherConfig, data: Dataset, config_dir: Path | None = None
) -> nn.Module | None:
    """Fail fast, before a run is recorded anywhere: a `module:Name` arch imports and builds
    with its init_args, a `file:` teacher fits it, an `hf:` directory loads, and it takes the
    data's rows. (Training, and
    MLflow sources, are the stage's work.) The arch's module stays imported, so a cached
    teacher of that class unpickles. Returns the model checked (fresh weights for a teacher
    that trains), or None where only the stage loads it (MLflow, a pickled file)."""
    if cfg.source == "train":
        model = with_logits(build_teacher(cfg, data, config_dir), _rows(data)).eval()
        _check_fits(model, data, cfg.arch)
        return model
    if cfg.source.startswith(("models:/", "runs:/", GIVEN)):
        return None
    # a file; any other scheme: load_teacher says what a source can be
    return load_teacher(cfg, data, seed=0, config_dir=config_dir)

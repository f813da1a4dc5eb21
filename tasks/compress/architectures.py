"""The teacher's architecture: a built-in (`mlp`, `cnn`: plain `nn.Sequential`s of standard
layers that take flat rows, `Unflatten` reshaping them for convolutions) or the user's own model,
`module:Name`: an `nn.Module` class or a function returning one, built with `teacher.init_args`
as keyword arguments. The pipeline feeds flat rows `[N, F]` (float32; integer token ids as
int64); a user model of a multi-dimensional `data.shape` is wrapped so that it receives
`[N, *shape]`: `Sequential(input=Unflatten(1, shape), model=<the user's module>)` (`wrap_input`,
`user_module`). A model that answers with a tuple, a dict or a transformers `ModelOutput` gets
a last step that takes its logits out (`with_logits`: `Sequential(..., logits=Logits())`), so
the pipeline sees one tensor, whatever the model returns.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.tasks.compress.data import Dataset
from distill.tasks.platform.config import TeacherConfig
from distill.tasks.platform.errors import UserError, first_line

INPUT = "input"  # the wrapper's Unflatten: flat rows -> [N, *data.shape]
USER_ROOT = "model"  # the wrapper's child holding the user's module
LOGITS = "logits"  # the wrapper's last step when the module answers more than a tensor


# --- built-in architectures ---------------------------------------------------------------


def build_mlp(n_features: int, hidden: list[int], n_classes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = n_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


def build_cnn(input_shape: tuple[int, ...], channels: list[int], n_classes: int) -> nn.Sequential:
    """1-D (`[C, L]`) or 2-D (`[C, H, W]`) conv stack, 3-wide 'same' kernels, then a linear head."""
    if len(input_shape) not in (2, 3):
        raise UserError(
            f"config key 'data.shape': a cnn needs [C, L] or [C, H, W], got {list(input_shape)}"
        )
    conv = nn.Conv1d if len(input_shape) == 2 else nn.Conv2d
    layers: list[nn.Module] = [nn.Unflatten(1, input_shape)]
    width = input_shape[0]
    for c in channels:
        layers += [conv(width, c, kernel_size=3, padding=1), nn.ReLU()]
        width = c
    spatial = int(torch.tensor(input_shape[1:]).prod())
    layers += [nn.Flatten(), nn.Linear(width * spatial, n_classes)]
    return nn.Sequential(*layers)


# --- the user's architecture: module:Name -------------------------------------------------


def is_builtin(arch: str) -> bool:
    return arch in BUILTIN_ARCHS


def import_arch(arch: str, config_dir: Path | None = None) -> Callable[..., Any]:
    """The class or function `module:Name` names, imported from the current directory, the
    config file's folder or PYTHONPATH; `sys.path` is left as it was."""
    module_name, _, name = arch.partition(":")
    roots = [Path.cwd()] + ([Path(config_dir).resolve()] if config_dir is not None else [])
    saved = list(sys.path)
    sys.path[:0] = [str(root) for root in roots]
    importlib.invalidate_caches()  # a module file written since the last import is seen
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if (
            err.name is not None
            and module_name != err.name
            and not module_name.startswith(err.name + ".")
        ):
            # found, but it imports something that is not installed
            raise UserError(
                f"config key 'teacher.arch': importing module {module_name!r} failed: "
                f"{first_line(err)}"
            ) from err
        where = ", ".join(str(root) for root in roots)
        raise UserError(
            f"config key 'teacher.arch': cannot import module {module_name!r} "
            f"(looked in {where} and PYTHONPATH)"
        ) from None
    except Exception as err:  # a syntax error, or code at import time that raised
        raise UserError(
            f"config key 'teacher.arch': importing module {module_name!r} failed: "
            f"{type(err).__name__}: {first_line(err)}"
        ) from err
    finally:
        sys.path[:] = saved
    missing = object()
    factory = getattr(module, name, missing)
    if factory is missing:
        raise UserError(
            f"config key 'teacher.arch': module {module_name!r} "
            f"({getattr(module, '__file__', None) or 'no file'}) has no {name!r}"
        )
    if not (inspect.isclass(factory) or inspect.isroutine(factory)):
        raise UserError(
            f"config key 'teacher.arch': {arch} is an object of type "
            f"{type(factory).__name__}, not a class or a function"
        )
    return factory


def build_user_module(cfg: TeacherConfig, config_dir: Path | None = None) -> nn.Module:
    """`teacher.arch` (`module:Name`) called with `teacher.init_args`, not wrapped."""
    factory = import_arch(cfg.arch, config_dir)
    rejected = f"config key 'teacher.init_args': {cfg.arch}(...) rejected them"
    try:
        inspect.signature(factory).bind(**cfg.init_args)
    except TypeError as err:
        raise UserError(f"{rejected}: {first_line(err)}") from None
    except ValueError:
        pass  # no signature to check (a builtin): calling it tells
    try:
        module = factory(**cfg.init_args)
    except TypeError as err:
        raise UserError(f"{rejected}: {first_line(err)}") from err
    except Exception as err:
        raise UserError(
            f"config key 'teacher.arch': {cfg.arch}(...) raised "
            f"{type(err).__name__}: {first_line(err)}"
        ) from err
    if not isinstance(module, nn.Module):
        raise UserError(
            f"config key 'teacher.arch': {cfg.arch}(...) returned a "
            f"{type(module).__name__}, not a torch.nn.Module"
        )
    return module


def wrap_input(module: nn.Module, shape: tuple[int, ...] | list[int]) -> nn.Module:
    """`module` fed `[N, *shape]` from flat rows `[N, F]`; a flat (1-D) shape needs no wrapper."""
    if len(shape) <= 1:
        return module
    return nn.Sequential(OrderedDict([(INPUT, nn.Unflatten(1, tuple(shape))), (USER_ROOT, module)]))


def logits_of(out: object) -> torch.Tensor:
    """The logits in what a model returned: the tensor itself, a `ModelOutput`'s (or any
    object's) `.logits`, a dict's "logits" (else its first tensor), a tuple's first element."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, Mapping):
        values = [out["logits"]] if "logits" in out else list(out.values())
        first = next((v for v in values if isinstance(v, torch.Tensor)), None)
        if first is not None:
            return first
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"returns a {type(out).__name__}, not a tensor of logits")


class Logits(nn.Module):
    """The wrapper's last step: the logits of what the user's module returned (`logits_of`)."""

    def forward(self, out: object) -> torch.Tensor:
        return logits_of(out)


def with_logits(model: nn.Module, rows: torch.Tensor) -> nn.Module:
    """`model`, ending in `Logits` when it answers `rows` with more than a tensor (a tuple, a dict,
    a `ModelOutput`) that holds its logits; as it is otherwise (a model that fails on the rows
    is left for the teacher's fit check to name)."""
    try:
        with torch.no_grad():
            out = model.eval()(rows)
        logits_of(out)
    except Exception:  # noqa: BLE001 -- a model's forward raises anything: the fit check says
        return model
    if isinstance(out, torch.Tensor):
        return model
    steps = list(model._modules.items()) if is_wrapped(model) else [(USER_ROOT, model)]
    return nn.Sequential(OrderedDict([*steps, (LOGITS, Logits())]))


def is_wrapped(model: nn.Module) -> bool:
    """The model is a wrapper that reshapes flat rows for the user's module (`wrap_input`)."""
    return _is_wrapper(model) and INPUT in model._modules


def _is_wrapper(model: nn.Module) -> bool:
    """`wrap_input`'s or `with_logits`'s Sequential around the user's module."""
    if not isinstance(model, nn.Sequential):
        return False
    steps = model._modules
    return (
        list(steps) in ([INPUT, USER_ROOT], [INPUT, USER_ROOT, LOGITS], [USER_ROOT, LOGITS])
        and (INPUT not in steps or isinstance(steps[INPUT], nn.Unflatten))
        and (LOGITS not in steps or isinstance(steps[LOGITS], Logits))
    )


def user_module(model: nn.Module) -> nn.Module:
    """The user's own module inside a `wrap_input` / `with_logits` wrapper; any other model as
    it is."""
    return model._modules[USER_ROOT] if _is_wrapper(model) else model  # type: ignore[return-value]


# `teacher.arch`'s built-in names -> their builder (any other arch is an import path module:Name;
# a test keeps config.BUILTIN_ARCHS equal to these keys)
BUILTIN_ARCHS: dict[str, Callable[[TeacherConfig, Dataset], nn.Module]] = {
    "mlp": lambda cfg, data: build_mlp(data.n_features, cfg.hidden, data.n_outputs),
    "cnn": lambda cfg, data: build_cnn(data.input_shape, cfg.channels, data.n_outputs),
}


def build_bare(cfg: TeacherConfig, data: Dataset, config_dir: Path | None) -> nn.Module:
    """The architecture before any input wrapper: the module a state_dict's keys belong to."""
    if is_builtin(cfg.arch):
        return BUILTIN_ARCHS[cfg.arch](cfg, data)
    return build_user_module(cfg, config_dir)


def wrap(module: nn.Module, cfg: TeacherConfig, data: Dataset) -> nn.Module:
    return module if is_builtin(cfg.arch) else wrap_input(module, data.input_shape)


def build_teacher(cfg: TeacherConfig, data: Dataset, config_dir: Path | None = None) -> nn.Module:
    """`teacher.arch` (fresh weights), taking the data's flat rows."""
    return wrap(build_bare(cfg, data, config_dir), cfg, data)

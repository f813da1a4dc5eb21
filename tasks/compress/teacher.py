"""Stage 1 — teacher: train an architecture or load one (file or MLflow URI).

`teacher.arch` is a built-in (`mlp`, `cnn`: plain `nn.Sequential`s of standard layers that
take flat rows, `Unflatten` reshaping them for convolutions) or the user's own model,
`module:Name`: an `nn.Module` class or a function returning one, built with
`teacher.init_args` as keyword arguments. The pipeline feeds flat float32 rows `[N, F]`; a
user model of a multi-dimensional `data.shape` is wrapped so that it receives `[N, *shape]`:
`Sequential(input=Unflatten(1, shape), model=<the user's module>)` (`wrap_input`,
`user_module`).

`teacher.source`: `train`; `file:PATH`, a state_dict or TorchScript file (`weights_only`)
or a `torch.export` program (`.pt2`), whose weights are loaded into `teacher.arch`;
`models:/...` or `runs:/...`, an MLflow PyTorch model: pickled (loads as its own class) or
in MLflow 3's default `pt2` format (its weights are loaded into `teacher.arch`).
"""

from __future__ import annotations

import importlib
import inspect
import io
import json
import re
import sys
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from tasks.compress.data import Dataset
from tasks.compress.finetune import FitSettings, History, fit
from tasks.compress.finite import non_finite_tensor
from tasks.platform.config import TeacherConfig
from tasks.platform.errors import UserError

INPUT = "input"  # the wrapper's Unflatten: flat rows -> [N, *data.shape]
USER_ROOT = "model"  # the wrapper's child holding the user's module


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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
                f"{_first_line(err)}"
            ) from err
        where = ", ".join(str(root) for root in roots)
        raise UserError(
            f"config key 'teacher.arch': cannot import module {module_name!r} "
            f"(looked in {where} and PYTHONPATH)"
        ) from None
    except Exception as err:  # a syntax error, or code at import time that raised
        raise UserError(
            f"config key 'teacher.arch': importing module {module_name!r} failed: "
            f"{type(err).__name__}: {_first_line(err)}"
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
        raise UserError(f"{rejected}: {_first_line(err)}") from None
    except ValueError:
        pass  # no signature to check (a builtin): calling it tells
    try:
        module = factory(**cfg.init_args)
    except TypeError as err:
        raise UserError(f"{rejected}: {_first_line(err)}") from err
    except Exception as err:
        raise UserError(
            f"config key 'teacher.arch': {cfg.arch}(...) raised "
            f"{type(err).__name__}: {_first_line(err)}"
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


def is_wrapped(model: nn.Module) -> bool:
    return (
        isinstance(model, nn.Sequential)
        and list(model._modules) == [INPUT, USER_ROOT]
        and isinstance(model._modules[INPUT], nn.Unflatten)
    )


def user_module(model: nn.Module) -> nn.Module:
    """The user's own module inside a `wrap_input` wrapper; any other model as it is."""
    return model._modules[USER_ROOT] if is_wrapped(model) else model  # type: ignore[return-value]


# `teacher.arch`'s built-in names -> their builder (any other arch is an import path module:Name;
# a test keeps config.BUILTIN_ARCHS equal to these keys)
BUILTIN_ARCHS: dict[str, Callable[[TeacherConfig, Dataset], nn.Module]] = {
    "mlp": lambda cfg, data: build_mlp(data.n_features, cfg.hidden, data.n_outputs),
    "cnn": lambda cfg, data: build_cnn(data.input_shape, cfg.channels, data.n_outputs),
}


def _build_bare(cfg: TeacherConfig, data: Dataset, config_dir: Path | None) -> nn.Module:
    """The architecture before any input wrapper: the module a state_dict's keys belong to."""
    if is_builtin(cfg.arch):
        return BUILTIN_ARCHS[cfg.arch](cfg, data)
    return build_user_module(cfg, config_dir)


def _wrap(module: nn.Module, cfg: TeacherConfig, data: Dataset) -> nn.Module:
    return module if is_builtin(cfg.arch) else wrap_input(module, data.input_shape)


def build_teacher(cfg: TeacherConfig, data: Dataset, config_dir: Path | None = None) -> nn.Module:
    """`teacher.arch` (fresh weights), taking the data's flat rows."""
    return _wrap(_build_bare(cfg, data, config_dir), cfg, data)


def train_teacher(
    cfg: TeacherConfig,
    data: Dataset,
    seed: int,
    device: str = "cpu",
    config_dir: Path | None = None,
    history: History | None = None,
) -> nn.Module:
    """`history`: filled with the training curves (the teacher's stage run logs them)."""
    torch.manual_seed(seed)
    model = build_teacher(cfg, data, config_dir)
    _check_fits(model.eval(), data, cfg.arch)  # before training: a misfit fails in one line
    settings = FitSettings(
        epochs=cfg.epochs,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        patience=cfg.patience,
        weight_decay=cfg.weight_decay,
        seed=seed,
        device=device,
    )
    model, fitted = fit(model, data, settings, description="training teacher")
    if history is not None:
        history.__dict__.update(fitted.__dict__)
    return model


# --- weights from files -------------------------------------------------------------------


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A `state_dict` file, or a TorchScript file's weights; never an arbitrary pickle."""
    if not path.is_file():
        raise UserError(f"config key 'teacher.source': file not found: {path}")
    try:
        scripted = torch.jit.load(str(path), map_location="cpu")
        return dict(scripted.state_dict())
    except Exception:  # noqa: BLE001, S110 -- jit.load raises many types
        pass  # not TorchScript: try a plain state_dict below
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- torch.load raises many types for unreadable files
        raise UserError(
            f"teacher file {path} is neither a state_dict nor TorchScript: {_first_line(err)}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"teacher file {path} does not hold a state_dict (name -> tensor)")
    return state


def load_pickled_module(path: Path) -> nn.Module | dict:
    """Only with `teacher.trust_pickle: true`: unpickling runs code stored in the file."""
    print(
        f"warning: teacher.trust_pickle is true: loading {path} runs any code stored in it; "
        "use it only for files you trust",
        file=sys.stderr,
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 -- unpickling runs code: raises anything
        raise UserError(f"teacher file {path} could not be unpickled: {_first_line(err)}") from None


def is_pt2_archive(path: Path) -> bool:
    """A PT2 archive (what `torch.export.save` writes): a zip whose `*/archive_format` is pt2."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(
            name.endswith("/archive_format") and archive.read(name).strip() == b"pt2"
            for name in archive.namelist()
        )


_PT2_TEXT = re.compile(rb"[A-Za-z0-9._-]{1,64}\n?")  # version, byteorder, serialization id
_PT2_PAYLOAD_CONFIG = re.compile(r"(?:^|/)data/(?:weights|constants)/[^/]+_config\.json$")
_PT2_RAW_PREFIXES = ("weight_", "tensor_")  # payloads read as raw bytes unless use_pickle


def pt2_pickled_record(path: Path) -> str | None:
    """The first record of a PT2 archive that `torch.export.load` would unpickle beyond what
    `torch.load(weights_only=True)` accepts (custom objects, pickled payloads), or None.

    Raw tensor payloads, JSON and short text records hold no pickle; anything else must load
    with `weights_only=True` (the sample inputs do)."""
    with zipfile.ZipFile(path) as archive:
        names = [info.filename for info in archive.infolist() if not info.is_dir()]
        raw: set[str] = set()
        for name in names:
            if not _PT2_PAYLOAD_CONFIG.search(name):
                continue
            try:
                entries = json.loads(archive.read(name))["config"].values()
                folder = name.rsplit("/", 1)[0]
                raw |= {
                    f"{folder}/{e['path_name']}"
                    for e in entries
                    if not e.get("use_pickle") and e["path_name"].startswith(_PT2_RAW_PREFIXES)
                }
            except (ValueError, KeyError, TypeError, AttributeError):
                return name
        for name in names:
            if name in raw:
                continue
            content = archive.read(name)
            if _PT2_TEXT.fullmatch(content):
                continue
            try:
                json.loads(content)
                continue
            except ValueError:
                pass
            try:
                torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001 -- unloadable: not weights
                return name
    return None


def load_exported_state(
    path: Path, trust_pickle: bool = False, what: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """An exported program's weights, keyed as in the module it was exported from:
    (`ExportedProgram.state_dict`: parameters and persistent buffers, its tensor `constants`:
    non-persistent buffers and lifted constants).

    `torch.export.load` unpickles some records without `weights_only`: unless `trust_pickle`,
    an archive with such a record is refused before it is loaded (`pt2_pickled_record`)."""
    if not trust_pickle:
        record = pt2_pickled_record(path)
        if record is not None:
            why = (
                f"{what} holds"
                if what
                else f"teacher file {path} is a torch.export program whose record"
            ) + f" {record}, a pickle: loading it runs code"
            raise UserError(
                why
                + ("" if what else " (teacher.trust_pickle: true allows it for a file you trust)")
            )
    what = what or f"teacher file {path}"
    with zipfile.ZipFile(path) as archive:
        programs = [n for n in archive.namelist() if re.search(r"(?:^|/)models/[^/]+\.json$", n)]
    if not programs:
        raise UserError(
            f"{what} is a PT2 archive without a torch.export program (an "
            "AOTInductor package holds compiled code, no weights to load)"
        )
    try:
        program = torch.export.load(str(path))
    except Exception as err:  # noqa: BLE001 -- torch.export.load raises many types
        raise UserError(
            f"{what} is a PT2 archive but not a torch.export program torch.export"
            f".load reads: {_first_line(err)}"
        ) from None

    def tensors(items: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in items.items() if isinstance(v, torch.Tensor)}

    return tensors(program.state_dict), tensors(program.constants)


def _fit_state(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    what: str,
    arch: str,
    hint: str = "",
    constants: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Load `state` into `model` or name the first key that does not fit (one line).

    Keys of a wrapped teacher (`model.*`, the wrapper's) fit the user's module too; `constants`
    (an exported program's) fill in keys the module expects that `state` lacks."""
    expected = model.state_dict()
    prefix = USER_ROOT + "."
    if set(state) != set(expected) and state and all(k.startswith(prefix) for k in state):
        state = {k.removeprefix(prefix): v for k, v in state.items()}
        constants = {k.removeprefix(prefix): v for k, v in (constants or {}).items()}
    state = dict(state)
    for key in expected.keys() - state.keys():
        if constants and key in constants:
            state[key] = constants[key]
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise UserError(
            f"{what} does not match teacher.arch={arch}: "
            + (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}")
            + hint
        )
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise UserError(
                f"{what}: {key} has shape {list(state[key].shape)}, "
                f"teacher.arch={arch} expects {list(tensor.shape)}" + hint
            )
        _check_values(state[key], tensor, f"{what}: {key}")
    model.load_state_dict(state)


def _check_values(given: torch.Tensor, expected: torch.Tensor, where: str) -> None:
    """Weights that load_state_dict would take but no float model can use: no data (meta),
    integers (a quantized state_dict) where floats belong, NaN or inf."""
    if given.is_meta:
        raise UserError(
            f"{where} is a meta tensor: it holds no data (saved from a model built "
            "on the meta device?)"
        )
    if expected.is_floating_point() and not given.is_floating_point():
        raise UserError(
            f"{where} is {str(given.dtype).removeprefix('torch.')}, not a float "
            "tensor (a quantized state_dict? give the float weights)"
        )
    if given.is_floating_point() and not torch.isfinite(given).all():
        raise UserError(f"{where} holds NaN or inf")


def _no_arch_hint(cfg: TeacherConfig) -> str:
    if not is_builtin(cfg.arch):
        return ""
    return (
        "; a torch.export program is a graph without nn layers to compress: set teacher.arch"
        " to the module:Name it was exported from"
    )


def load_teacher_file(
    path: Path, cfg: TeacherConfig, data: Dataset, config_dir: Path | None = None
) -> tuple[nn.Module, bool]:
    """-> (teacher, whether it was unpickled whole rather than built from teacher.arch)."""
    if path.is_file() and is_pt2_archive(path):
        state, constants = load_exported_state(path, cfg.trust_pickle)
        model = _build_bare(cfg, data, config_dir)
        _fit_state(
            model,
            state,
            f"teacher file {path} (a torch.export program)",
            cfg.arch,
            _no_arch_hint(cfg),
            constants,
        )
        return _wrap(model, cfg, data).eval(), False
    if cfg.trust_pickle and path.is_file():
        obj = load_pickled_module(path)
        if isinstance(obj, nn.Module):
            return obj.eval(), True
    state = load_state_dict_file(path)
    model = _build_bare(cfg, data, config_dir)
    _fit_state(model, state, f"teacher file {path}", cfg.arch)
    return _wrap(model, cfg, data).eval(), False


# --- MLflow models ------------------------------------------------------------------------


def pytorch_flavor(model_dir: Path) -> dict[str, Any] | None:
    """The `pytorch` flavor of a downloaded MLflow model's `MLmodel`, None without one."""
    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        return None
    try:
        spec = yaml.safe_load(mlmodel.read_text()) or {}
    except yaml.YAMLError:
        return None
    flavor = (spec.get("flavors") or {}).get("pytorch") if isinstance(spec, dict) else None
    return flavor if isinstance(flavor, dict) else None


def exported_program_file(model_dir: Path, flavor: Mapping[str, Any]) -> Path | None:
    """The `.pt2` file of an MLflow PyTorch model saved in the `pt2` format, None for the
    pickle format. MLmodel names no format: MLflow itself tells them apart by the file in the
    flavor's `model_data` folder (`model.pt2`, or `model.pth` + `pickle_module_info.txt`)."""
    data_dir = model_dir / str(flavor.get("model_data") or "data")
    if (data_dir / "model.pth").is_file():
        return None
    found = sorted(data_dir.rglob("*.pt2")) if data_dir.is_dir() else []
    return found[0] if found else None


def load_teacher_mlflow(
    uri: str, cfg: TeacherConfig, data: Dataset, config_dir: Path | None = None
) -> tuple[nn.Module, bool]:
    """-> (teacher, whether it was unpickled whole): a pickled MLflow PyTorch model as its own
    class; a `pt2` one's weights in teacher.arch (the GraphModule MLflow would load has no nn
    layers left to compress)."""
    import mlflow.artifacts
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    cannot = f"config key 'teacher.source': cannot load {uri}"
    with tempfile.TemporaryDirectory(prefix="distill-teacher-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        except MlflowException as err:
            raise UserError(f"{cannot}: {err.message.splitlines()[0]}") from None
        flavor = pytorch_flavor(local)
        if flavor is None:
            raise UserError(
                f"config key 'teacher.source': {uri} is not a PyTorch model "
                "(its MLmodel has no pytorch flavor)"
            )
        exported = exported_program_file(local, flavor)
        if exported is not None:
            state, constants = load_exported_state(exported, what=f"MLflow model {uri}")
    if exported is None:  # the pickle format: unpickling the module runs code stored in it
        if not cfg.trust_pickle:
            raise UserError(
                f"config key 'teacher.source': {uri} is a pickled MLflow PyTorch model; "
                "loading it runs code stored in it: log the teacher in MLflow's pt2 "
                "format, give its state_dict as file: with teacher.arch, or set "
                "teacher.trust_pickle: true for a model you trust"
            )
        print(
            f"warning: teacher.trust_pickle is true: loading {uri} runs any code stored in it",
            file=sys.stderr,
        )
        try:
            model = mlflow.pytorch.load_model(uri, map_location="cpu")
        except MlflowException as err:
            raise UserError(f"{cannot}: {err.message.splitlines()[0]}") from None
        if not isinstance(model, nn.Module):
            raise UserError(f"config key 'teacher.source': {uri} is not a PyTorch model")
        return model.eval(), True
    model = _build_bare(cfg, data, config_dir)
    _fit_state(
        model,
        state,
        f"MLflow model {uri} (pt2 format, a torch.export program)",
        cfg.arch,
        _no_arch_hint(cfg),
        constants,
    )
    return _wrap(model, cfg, data).eval(), False


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
    else:
        raise UserError(
            f"config key 'teacher.source': expected train, file:PATH, "
            f"models:/NAME@ALIAS or runs:/ID/PATH, got {source!r}"
        )
    model = model.float().eval()
    _check_fits(model, data, source if whole else cfg.arch)
    return model


def _check_fits(model: nn.Module, data: Dataset, name: str) -> None:
    """A teacher must take this data's rows and give one logit per class (one value for a
    regression target)."""
    rows = torch.from_numpy(data.X_train[:2])
    shape = [len(rows), *data.input_shape] if is_wrapped(model) else list(rows.shape)
    try:
        with torch.no_grad():
            out = model(rows)
    except Exception as err:  # noqa: BLE001 -- a teacher's forward raises anything
        raise UserError(
            f"teacher {name} does not accept inputs of shape {shape} "
            f"(data.shape={list(data.input_shape)}): {_first_line(err)}"
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
    with torch.no_grad():
        finite = bool(torch.isfinite(model(torch.from_numpy(data.X_train[:256]))).all())
    if not finite:
        raise UserError(
            f"teacher {name} outputs NaN or inf on the data's rows (weights too large for float32?)"
        )


def check_teacher(cfg: TeacherConfig, data: Dataset, config_dir: Path | None = None) -> None:
    """Fail fast, before a run is recorded anywhere: a `module:Name` arch imports and builds
    with its init_args, a `file:` teacher fits it, and it takes the data's rows. (Training, and
    MLflow sources, are the stage's work.) The arch's module stays imported, so a cached
    teacher of that class unpickles."""
    if cfg.source == "train":
        _check_fits(build_teacher(cfg, data, config_dir).eval(), data, cfg.arch)
    elif cfg.source.startswith("file:") and not cfg.trust_pickle:  # no second unpickling
        load_teacher(cfg, data, seed=0, config_dir=config_dir)
    elif not cfg.source.startswith(("models:/", "runs:/")):
        load_teacher(cfg, data, seed=0, config_dir=config_dir)  # says what a source can be

"""A teacher's weights from a file or an MLflow model, put into `teacher.arch`
(tasks/compress/architectures.py): a state_dict or TorchScript file (`weights_only`), a
`torch.export` program (`.pt2`), or an MLflow PyTorch model (`models:/...`, `runs:/...`), in
MLflow 3's default `pt2` format or pickled (then it loads as its own class, only with
`teacher.trust_pickle`: unpickling runs code stored in the file).
"""

from __future__ import annotations

import io
import json
import pickle
import re
import sys
import tempfile
import types
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from distill.tasks.compress.architectures import USER_ROOT, build_bare, is_builtin, wrap
from distill.tasks.compress.data import Dataset
from distill.tasks.platform.config import TeacherConfig
from distill.tasks.platform.errors import UserError, first_line

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
        with warnings.catch_warnings():  # "Detected pickle protocol 4": torch's, not the user's
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- torch.load raises many types for unreadable files
        raise UserError(
            f"teacher file {path} is neither a state_dict nor TorchScript: {_unreadable(err)}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"teacher file {path} does not hold a state_dict (name -> tensor)")
    return state


def _unreadable(err: Exception) -> str:
    """Why `torch.load(weights_only=True)` refused a file, in distill's terms: torch's own first
    line advises `weights_only=False` (unpickling, which runs code), whatever the file holds."""
    text = str(err)
    if not text.startswith("Weights only load failed"):
        return first_line(err)
    detail = text.partition("WeightsUnpickler error:")[2].strip().splitlines()
    first = detail[0].split(". ")[0].strip().rstrip(".") if detail else ""  # torch's advice cut
    why = f" ({first})" if first else ""
    return (
        f"torch.load(weights_only=True) cannot read it{why}: a truncated or foreign file, or a "
        "whole pickled module, which loads only with teacher.trust_pickle: true (unpickling runs "
        "code stored in the file)"
    )


class _Unpickler(pickle.Unpickler):
    """Modules pickled before distill was one installed package name distill's own classes
    `tasks.compress.…` (its models live there): they load from `distill.tasks.…`, not from a
    second copy that a repository root on sys.path would import. A user's own `tasks` package
    with other subpackages is left alone."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(_OLD_NAMES):
            module = f"distill.{module}"
        return super().find_class(module, name)


_OLD_NAMES = ("tasks.compress.", "tasks.platform.", "tasks.release.")


# for torch.load(pickle_module=): its Unpickler and load
RENAMED_PICKLE = types.ModuleType("distill_pickle")
RENAMED_PICKLE.Unpickler = _Unpickler  # type: ignore[attr-defined]
RENAMED_PICKLE.load = lambda f, **kwargs: _Unpickler(f, **kwargs).load()  # type: ignore[attr-defined]


def load_pickled_module(path: Path) -> nn.Module | dict:
    """Only with `teacher.trust_pickle: true`: unpickling runs code stored in the file."""
    print(
        f"warning: teacher.trust_pickle is true: loading {path} runs any code stored in it; "
        "use it only for files you trust",
        file=sys.stderr,
    )
    try:
        return torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=RENAMED_PICKLE
        )
    except Exception as err:  # noqa: BLE001 -- unpickling runs code: raises anything
        raise UserError(f"teacher file {path} could not be unpickled: {first_line(err)}") from None


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
            f".load reads: {first_line(err)}"
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
        model = build_bare(cfg, data, config_dir)
        _fit_state(
            model,
            state,
            f"teacher file {path} (a torch.export program)",
            cfg.arch,
            _no_arch_hint(cfg),
            constants,
        )
        return wrap(model, cfg, data).eval(), False
    if cfg.trust_pickle and path.is_file():
        obj = load_pickled_module(path)
        if isinstance(obj, nn.Module):
            return obj.eval(), True
    state = load_state_dict_file(path)
    model = build_bare(cfg, data, config_dir)
    _fit_state(model, state, f"teacher file {path}", cfg.arch)
    return wrap(model, cfg, data).eval(), False


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
            model = mlflow.pytorch.load_model(uri, map_location="cpu", pickle_module=RENAMED_PICKLE)
        except MlflowException as err:
            raise UserError(f"{cannot}: {err.message.splitlines()[0]}") from None
        if not isinstance(model, nn.Module):
            raise UserError(f"config key 'teacher.source': {uri} is not a PyTorch model")
        return model.eval(), True
    model = build_bare(cfg, data, config_dir)
    _fit_state(
        model,
        state,
        f"MLflow model {uri} (pt2 format, a torch.export program)",
        cfg.arch,
        _no_arch_hint(cfg),
        constants,
    )
    return wrap(model, cfg, data).eval(), False

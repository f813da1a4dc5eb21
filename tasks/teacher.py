"""Stage 1 — teacher: train a built-in architecture, or load one (file or MLflow URI).

Built-in architectures are plain `nn.Sequential`s of standard layers that take flat rows
(`Unflatten` reshapes them for convolutions), so students rebuilt from them, ONNX export
and MLflow's pickle format all work without custom classes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from prefect import task
from torch import nn

from tasks.caching import STAGE_CACHE
from tasks.config import TeacherConfig
from tasks.data import Dataset
from tasks.errors import UserError
from tasks.finetune import FitSettings, fit


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
        raise UserError(f"config key 'data.shape': a cnn needs [C, L] or [C, H, W], got {list(input_shape)}")
    conv = nn.Conv1d if len(input_shape) == 2 else nn.Conv2d
    layers: list[nn.Module] = [nn.Unflatten(1, input_shape)]
    width = input_shape[0]
    for c in channels:
        layers += [conv(width, c, kernel_size=3, padding=1), nn.ReLU()]
        width = c
    spatial = int(torch.tensor(input_shape[1:]).prod())
    layers += [nn.Flatten(), nn.Linear(width * spatial, n_classes)]
    return nn.Sequential(*layers)


def build_teacher(cfg: TeacherConfig, data: Dataset) -> nn.Sequential:
    if cfg.arch == "mlp":
        return build_mlp(data.n_features, cfg.hidden, data.n_classes)
    return build_cnn(data.input_shape, cfg.channels, data.n_classes)


def train_teacher(cfg: TeacherConfig, data: Dataset, seed: int, device: str = "cpu") -> nn.Module:
    torch.manual_seed(seed)
    model = build_teacher(cfg, data)
    settings = FitSettings(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, patience=cfg.patience,
                           weight_decay=cfg.weight_decay, seed=seed, device=device)
    model, _ = fit(model, data, settings, description="training teacher")
    return model


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A `state_dict` file, or a TorchScript file's weights; never an arbitrary pickle."""
    if not path.is_file():
        raise UserError(f"config key 'teacher.source': file not found: {path}")
    try:
        scripted = torch.jit.load(str(path), map_location="cpu")
        return dict(scripted.state_dict())
    except Exception:
        pass  # not TorchScript: try a plain state_dict below
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"teacher file {path} is neither a state_dict nor TorchScript: {str(err).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"teacher file {path} does not hold a state_dict (name -> tensor)")
    return state


def load_pickled_module(path: Path) -> nn.Module | dict:
    """Only with `teacher.trust_pickle: true`: unpickling runs code stored in the file."""
    print(f"warning: teacher.trust_pickle is true: loading {path} runs any code stored in it; "
          "use it only for files you trust", file=sys.stderr)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise UserError(f"teacher file {path} could not be unpickled: {str(err).splitlines()[0]}") from None


def load_teacher_file(path: Path, cfg: TeacherConfig, data: Dataset) -> nn.Module:
    if cfg.trust_pickle and path.is_file():
        obj = load_pickled_module(path)
        if isinstance(obj, nn.Module):
            return obj.eval()
    model = build_teacher(cfg, data)
    state = load_state_dict_file(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise UserError(f"teacher file {path} does not match teacher.arch={cfg.arch}: "
                        + (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"))
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise UserError(f"teacher file {path}: {key} has shape {list(state[key].shape)}, "
                            f"the configured architecture expects {list(tensor.shape)}")
    model.load_state_dict(state)
    return model.eval()


def load_teacher_mlflow(uri: str) -> nn.Module:
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    try:
        model = mlflow.pytorch.load_model(uri, map_location="cpu")
    except MlflowException as err:
        raise UserError(f"config key 'teacher.source': cannot load {uri}: {err.message.splitlines()[0]}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"config key 'teacher.source': {uri} is not a PyTorch model")
    return model.eval()


def load_teacher(cfg: TeacherConfig, data: Dataset, seed: int, device: str = "cpu") -> nn.Module:
    source = cfg.source
    if source == "train":
        model = train_teacher(cfg, data, seed, device)
    elif source.startswith("file:"):
        model = load_teacher_file(Path(source.removeprefix("file:")), cfg, data)
    elif source.startswith(("models:/", "runs:/")):
        model = load_teacher_mlflow(source)
    else:
        raise UserError(f"config key 'teacher.source': expected train, file:PATH, models:/NAME@ALIAS "
                        f"or runs:/ID/PATH, got {source!r}")
    model = model.float().eval()
    _check_fits(model, data, source)
    return model


def _check_fits(model: nn.Module, data: Dataset, source: str) -> None:
    """A loaded teacher must take this data's rows and give one logit per class."""
    try:
        with torch.no_grad():
            out = model(torch.from_numpy(data.X_train[:2]))
    except Exception as err:
        raise UserError(f"teacher {source} does not accept rows of {data.n_features} features: "
                        f"{str(err).splitlines()[0]}") from None
    if out.ndim != 2 or out.shape[1] != data.n_classes:
        raise UserError(f"teacher {source} outputs {list(out.shape[1:])} per row, the data has {data.n_classes} classes")


@task(name="teacher", cache_policy=STAGE_CACHE, persist_result=True)
def teacher_task(cfg: TeacherConfig, data: Dataset, seed: int, device: str) -> nn.Module:
    return load_teacher(cfg, data, seed, device)

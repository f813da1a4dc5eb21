"""The bad-input catalog, through the CLI as a user meets it: one line `error: ...` naming
what and where, exit code 2, no traceback, and the registry exactly as it was."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from tasks.teacher import build_mlp

from .conftest import ROOT, TINY

CONFIG = str(ROOT / "configs" / "digits.yaml")


def _files(tmp: Path) -> dict[str, str]:
    """Bad files of every kind, made once per test in tmp."""
    rng = np.random.default_rng(0)
    good = pd.DataFrame(rng.normal(size=(60, 4)), columns=list("abcd")).assign(label=np.repeat([0, 1, 2], 20))
    files = {}

    def csv(name: str, frame: pd.DataFrame) -> None:
        frame.to_csv(tmp / name, index=False)
        files[name] = str(tmp / name)

    csv("good.csv", good)
    csv("nan.csv", good.assign(b=good.b.where(good.index != 7)))
    csv("inf.csv", good.assign(c=good.c.where(good.index != 3, np.inf)))
    csv("text.csv", good.assign(d=["x"] * 60))
    csv("one_class.csv", good.assign(label=0))
    csv("tiny_class.csv", good.assign(label=[0] * 58 + [1, 1]))
    (tmp / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    files["corrupt.parquet"] = str(tmp / "corrupt.parquet")
    (tmp / "garbage.npz").write_bytes(b"\x00\x01 not a zip")
    files["garbage.npz"] = str(tmp / "garbage.npz")
    np.savez(tmp / "no_y.npz", X=rng.normal(size=(30, 4)))
    files["no_y.npz"] = str(tmp / "no_y.npz")
    torch.save(build_mlp(64, [48], 10).state_dict(), tmp / "wrong_arch.pt")
    files["wrong_arch.pt"] = str(tmp / "wrong_arch.pt")
    torch.save(build_mlp(64, [64, 64], 10), tmp / "pickled_module.pt")
    files["pickled_module.pt"] = str(tmp / "pickled_module.pt")
    (tmp / "corrupt.pt").write_bytes(pickle.dumps("x")[:3])
    files["corrupt.pt"] = str(tmp / "corrupt.pt")
    (tmp / "bad.yaml").write_text("teacher: [unclosed\n")
    files["bad.yaml"] = str(tmp / "bad.yaml")
    (tmp / "list.yaml").write_text("- a\n- b\n")
    files["list.yaml"] = str(tmp / "list.yaml")
    return files


# (name, CLI args after `run`, the message's start; {f[...]} names a file from _files)
CASES = [
    ("unknown top-level key", ["--set", "epochs=3"], "config key 'epochs': unknown key"),
    ("misspelled nested key", ["--set", "finetune.temprature=3"], "config key 'finetune.temprature': unknown key"),
    ("wrong type", ["--set", "finetune.epochs=many"], "config key 'finetune.epochs': Input should be a valid integer"),
    ("negative budget", ["--set", "reduce.budget.size_kb=-10"], "config key 'reduce.budget.size_kb': Input should be greater than 0"),
    ("zero budget", ["--set", "reduce.budget.params=0"], "config key 'reduce.budget.params': Input should be greater than 0"),
    ("ratio below 1", ["--set", "reduce.budget.ratio=0.5"], "config key 'reduce.budget.ratio'"),
    ("variance above 1", ["--set", "reduce.budget.variance=1.5"], "config key 'reduce.budget.variance'"),
    ("budget below reachable", ["--set", "reduce.budget.size_kb=0.1"], "config key 'reduce.budget.size_kb': 0.1 is below the smallest reachable student"),
    ("set without =", ["--set", "finetune.epochs"], "--set expects key=value"),
    ("invalid registry name", ["--set", "register.model_name=my model/v1"], "config key 'register.model_name'"),
    ("cuda without a GPU", ["--set", "device=cuda"], "config key 'device': cuda requested but no CUDA device"),
    ("empty calibration set", ["--set", "reduce.calibration_samples=0"], "config key 'reduce.calibration_samples'"),
    ("svd with width mode", ["--set", "reduce.method=svd"], "config key 'config': Value error, reduce.method=svd needs"),
    ("alpha out of range", ["--set", "finetune.alpha=2"], "config key 'finetune.alpha'"),
    ("unknown sklearn dataset", ["--set", "data.source=sklearn:mnist"], "config key 'data.source': unknown sklearn dataset 'mnist'"),
    ("source without kind", ["--set", "data.source=digits.csv"], "config key 'data.source': expected KIND:REF"),
    ("unknown source kind", ["--set", "data.source=xls:data.xls"], "config key 'data.source': unknown kind 'xls'"),
    ("missing data file", ["--set", "data.source=csv:absent.csv"], "data file not found: absent.csv"),
    ("corrupt parquet", ["--set", "data.source=parquet:{corrupt.parquet}"], "data file {corrupt.parquet} could not be read as parquet"),
    ("corrupt npz", ["--set", "data.source=npz:{garbage.npz}"], "data file {garbage.npz} could not be read as npz"),
    ("npz without y", ["--set", "data.source=npz:{no_y.npz}"], "data file {no_y.npz}: missing array 'y'"),
    ("label column absent", ["--set", "data.source=csv:{good.csv}", "--set", "data.label=target"], "data file {good.csv}: label column 'target' not found"),
    ("non-numeric feature", ["--set", "data.source=csv:{text.csv}", "--set", "data.label=label"], "data file {text.csv}: column 'd' is not numeric"),
    ("NaN in features", ["--set", "data.source=csv:{nan.csv}", "--set", "data.label=label"], "data csv:{nan.csv}: feature column 1 holds NaN or inf"),
    ("inf in features", ["--set", "data.source=csv:{inf.csv}", "--set", "data.label=label"], "data csv:{inf.csv}: feature column 2 holds NaN or inf"),
    ("single class", ["--set", "data.source=csv:{one_class.csv}", "--set", "data.label=label"], "data csv:{one_class.csv}: the label has a single class"),
    ("too few rows in a class", ["--set", "data.source=csv:{tiny_class.csv}", "--set", "data.label=label"], "data csv:{tiny_class.csv}: class 1 has 2 rows"),
    ("shape not matching features", ["--set", "data.shape=[1, 7, 7]"], "config key 'data.shape': [1, 7, 7] holds 49 values but the data has 64 features"),
    ("cnn without a shape", ["--set", "teacher.arch=cnn"], "config key 'data.shape': a cnn needs [C, L] or [C, H, W], got [64]"),
    ("teacher file missing", ["--set", "teacher.source=file:absent.pt"], "config key 'teacher.source': file not found: absent.pt"),
    ("teacher file corrupt", ["--set", "teacher.source=file:{corrupt.pt}"], "teacher file {corrupt.pt} is neither a state_dict nor TorchScript"),
    ("teacher wrong architecture", ["--set", "teacher.source=file:{wrong_arch.pt}"], "teacher file {wrong_arch.pt} does not match teacher.arch=mlp: missing 4.bias"),
    ("teacher pickled module", ["--set", "teacher.source=file:{pickled_module.pt}"], "teacher file {pickled_module.pt} is neither a state_dict nor TorchScript"),
    ("teacher unknown scheme", ["--set", "teacher.source=hub:resnet18"], "config key 'teacher.source': expected train, file:PATH"),
    ("MLflow model that does not exist", ["--set", "teacher.source=models:/no-such-model@champion"], "config key 'teacher.source': cannot load models:/no-such-model@champion"),
]


@pytest.fixture
def files(tmp_path):
    return _files(tmp_path)


def fill(text: str, files: dict[str, str]) -> str:
    return re.sub(r"\{([^}]+)\}", lambda m: files[m.group(1)], text)


def _registry() -> list[tuple[str, str, tuple[str, ...]]]:
    from mlflow import MlflowClient

    client = MlflowClient()
    return sorted((v.name, str(v.version), tuple(sorted(v.aliases)))
                  for m in client.search_registered_models() for v in client.search_model_versions(f"name='{m.name}'"))


def invoke(args: list[str]):
    return CliRunner().invoke(app, ["run", CONFIG, *[a for s in TINY for a in ("--set", s)], *args])


@pytest.fixture(scope="module")
def registry_with_a_version(prefect_server, tmp_path_factory):
    """One real registered version, so 'unchanged' is checked against something."""
    import os

    import mlflow

    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")  # mlflow.set_*_uri write these too
    old = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, uri))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    result = invoke([])
    assert result.exit_code == 0, result.output
    yield uri
    for name, value in old.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.mark.parametrize("name, args, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(registry_with_a_version, files, name, args, message):
    args = [fill(a, files) for a in args]
    before = _registry()
    result = invoke(args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: " + fill(message, files)), result.stderr
    assert "Traceback" not in result.output
    assert _registry() == before


def test_unreachable_tracking_server(prefect_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing listens
    result = invoke([])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: MLflow tracking server http://127.0.0.1:9 is not reachable")


def test_unwritable_artifact_location(prefect_server, tmp_path, monkeypatch):
    (tmp_path / "artifacts").write_text("a file where the artifact directory should be")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    monkeypatch.setenv("DISTILL_MLFLOW_CONFIG", str(tmp_path / "absent.yaml"))
    result = invoke([])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: artifact location file://{tmp_path}/artifacts is not writable")
    from mlflow import MlflowClient

    assert MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("distill").experiment_id]) == []


def test_bad_mlflow_yaml(prefect_server, tmp_path, monkeypatch):
    (tmp_path / "mlflow.yaml").write_text("server:\n  tracking_url: sqlite:///x.db\n")
    monkeypatch.setenv("DISTILL_MLFLOW_CONFIG", str(tmp_path / "mlflow.yaml"))
    result = invoke([])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'mlflow.yaml'}: key 'server.tracking_url': unknown key")


@pytest.mark.parametrize("config, message", [
    ("absent.yaml", "error: config file not found: absent.yaml"),
    ("{bad.yaml}", "error: config file {bad.yaml} is not valid YAML"),
    ("{list.yaml}", "error: config file {list.yaml} must hold a mapping at the top level"),
])
def test_bad_config_files(files, config, message):
    result = CliRunner().invoke(app, ["run", fill(config, files)])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith(fill(message, files))

"""The registered model answers what its user has: an npz source's own array (a tensor signature
in its shape and dtype; token ids of any length where the graph allows), a table's named columns
otherwise. Served by `mlflow.pyfunc` in a fresh process where neither torch nor transformers
(nor this project) can be imported."""

import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from tasks.compress.architectures import build_mlp
from tasks.compress.data import Dataset, load_dataset
from tasks.compress.evaluate import OnnxModel
from tasks.compress.quantize import export_onnx
from tasks.platform.config import DataConfig
from tasks.platform.errors import UserError
from tasks.release.gates import Candidate, _pyfunc_predict
from tasks.release.predict import predict_file
from tasks.release.registry import register_model
from tasks.release.signature import tensor_input_of
from tests.conftest import use_store
from tests.tokens import EmbeddingBag, HFWrap, tiny_bert, token_ids
from tests.zoo import ResNet1d

ROWS = 240


def _npz(path, X: np.ndarray, seed: int) -> str:
    y = np.random.default_rng(seed).integers(0, 3, size=len(X))
    np.savez(path, X=X, y=y)
    return f"npz:{path}"


class _Signal(nn.Module):
    """A user's ResNet1d on `[N, 2, 20]` signals, as the pipeline feeds it: flat rows."""

    def __init__(self) -> None:
        super().__init__()
        self.net = ResNet1d(in_channels=2, channels=4, n_classes=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(len(x), 2, 20))


def _cases(tmp) -> dict[str, tuple[nn.Module, DataConfig, np.ndarray]]:
    """name -> (model, data config, what its user predicts on)."""
    rng = np.random.default_rng(0)
    rows = rng.normal(3.0, 2.0, size=(ROWS, 40)).astype(np.float32)
    signal = rng.normal(size=(ROWS, 2, 20))  # float64, as numpy makes it
    ids = token_ids(ROWS)
    torch.manual_seed(0)
    return {
        "rows": (build_mlp(40, [16], 3), DataConfig(source=_npz(tmp / "rows.npz", rows, 1)), rows),
        "signal": (_Signal(), DataConfig(source=_npz(tmp / "signal.npz", signal, 2)), signal),
        "ids": (
            EmbeddingBag(),
            DataConfig(source=_npz(tmp / "ids.npz", ids, 3), standardize=False),
            ids,
        ),
        "bert": (
            HFWrap(tiny_bert()),
            DataConfig(source=_npz(tmp / "ids.npz", ids, 3), standardize=False),
            ids,
        ),
        "digits": (build_mlp(64, [8], 10), DataConfig(), None),
    }


def _expected(model: nn.Module, data: Dataset, X: np.ndarray) -> np.ndarray:
    """Class probabilities of the float model on the user's raw rows, standardized as trained."""
    flat = X.reshape(len(X), -1)
    if flat.dtype.kind == "f":
        flat = ((flat - data.mean) / data.scale).astype(np.float32)
    with torch.no_grad():
        return torch.softmax(model.eval()(torch.from_numpy(flat)), dim=1).numpy()


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """Each case registered as the pipeline registers its served model (fp32 ONNX)."""
    tmp = tmp_path_factory.mktemp("serving")
    out = {}
    with use_store(tmp):
        for name, (model, cfg, X) in _cases(tmp).items():
            data = load_dataset(cfg, seed=0)
            onnx = OnnxModel(export_onnx(model.eval(), data.X_train), 0, 0)
            with mlflow.start_run() as run:
                reg = register_model(onnx, data, name, {"mlflow.run_id": run.info.run_id})
            out[name] = (reg, model, data, X)
    return tmp, out


SERVE = """
import json, sys
for module in ("torch", "transformers", "tasks", "flows"):  # import torch -> ImportError
    sys.modules[module] = None
import mlflow.pyfunc, numpy as np
answers = {}
for name, uri, path in json.loads(sys.argv[1]):
    X = np.load(path)
    out = mlflow.pyfunc.load_model(uri).predict(X)
    answers[path] = out.filter(like="proba_").to_numpy().tolist()
print(json.dumps(answers))
"""


def _serve(tmp, jobs: list[tuple[str, str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Each (name, model uri, array) predicted in one fresh process: -> name: probabilities."""
    args = []
    for name, uri, X in jobs:
        np.save(tmp / f"{name}.npy", X)
        args.append((name, uri, str(tmp / f"{name}.npy")))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", SERVE, json.dumps(args)],
        cwd=tmp,
        env=env | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = json.loads(proc.stdout.strip().splitlines()[-1])
    return {name: np.asarray(answers[path]) for name, _, path in args}


def test_each_source_gets_the_signature_of_what_its_user_has(registered):
    _, models = registered
    with use_store(registered[0]):
        specs = {
            name: mlflow.models.get_model_info(reg.model_uri).signature.inputs
            for name, (reg, *_) in models.items()
        }
    shapes = {
        name: (s.inputs[0].shape, s.inputs[0].type)
        for name, s in specs.items()
        if s.is_tensor_spec()
    }
    assert shapes["rows"] == ((-1, 40), np.dtype("float32"))
    assert shapes["signal"] == ((-1, 2, 20), np.dtype("float64"))
    assert shapes["ids"] == shapes["bert"] == ((-1, -1), np.dtype("int64"))  # any length
    assert specs["digits"].has_input_names()  # scikit-learn's named columns
    assert specs["digits"].input_names()[:2] == ["pixel_0_0", "pixel_0_1"]


def test_the_registered_model_answers_its_users_array_without_torch(registered):
    tmp, models = registered
    jobs = [(name, reg.model_uri, X) for name, (reg, _, _, X) in models.items() if X is not None]
    shorter = models["bert"][3][:, :9]  # token ids of another length than the training rows
    jobs += [("ids_9", models["ids"][0].model_uri, shorter)]
    jobs += [("bert_9", models["bert"][0].model_uri, shorter)]
    with use_store(tmp):
        served = _serve(tmp, jobs)
    for name, (_, model, data, X) in models.items():
        if X is not None:
            np.testing.assert_allclose(served[name], _expected(model, data, X), atol=1e-5)
    for name in ("ids", "bert"):
        _, model, data, _ = models[name]
        np.testing.assert_allclose(served[f"{name}_9"], _expected(model, data, shorter), atol=1e-5)


def test_mlflow_holds_callers_to_the_signatures_dtype(registered):
    tmp, models = registered
    with use_store(tmp):
        model = mlflow.pyfunc.load_model(models["rows"][0].model_uri)
        X = models["rows"][3][:4]
        assert len(model.predict(X)) == 4
        with pytest.raises(mlflow.exceptions.MlflowException, match="dtype of input float64"):
            model.predict(X.astype(np.float64))


def test_predict_files_reach_a_tensor_model_as_its_rows(registered, tmp_path):
    """`distill predict`: a CSV's columns (all but the label, in order) or an npz's X, any
    trailing shape of the same size, cast to the model's dtype."""
    tmp, models = registered
    reg, model, data, X = models["signal"]
    expected = _expected(model, data, X).argmax(1)
    frame = pd.DataFrame(X.reshape(len(X), -1), columns=[f"v{i}" for i in range(40)])
    frame.assign(label=0).to_csv(tmp_path / "rows.csv", index=False)
    np.savez(tmp_path / "flat.npz", X=X.reshape(len(X), -1).astype(np.float32))
    with use_store(tmp):
        for path, label in ((tmp_path / "rows.csv", "label"), (tmp_path / "flat.npz", None)):
            report = predict_file(reg.model_uri, path, tmp_path / "out.csv", label=label)
            assert report.rows == len(X)
            assert (pd.read_csv(tmp_path / "out.csv")["prediction"] == expected).all()
        frame.iloc[:, :39].to_csv(tmp_path / "narrow.csv", index=False)
        with pytest.raises(UserError) as err:
            predict_file(reg.model_uri, tmp_path / "narrow.csv", tmp_path / "out.csv")
        assert str(err.value) == (
            f"input {tmp_path / 'narrow.csv'}: rows of shape [39] hold 39 values; the model "
            "takes rows of shape [2, 20] (40 values)"
        )
        reg, model, data, ids = models["ids"]
        np.savez(tmp_path / "ids.npz", X=ids[:5] + 0.5)
        with pytest.raises(UserError, match="the model takes int64 values .token ids., and these"):
            predict_file(reg.model_uri, tmp_path / "ids.npz", tmp_path / "out.csv")


def test_the_promotion_gate_scores_a_tensor_model_on_the_table_it_rereads(registered):
    """`common_held_out_accuracy` re-reads the source as flat rows with x0.. columns."""
    tmp, models = registered
    reg, model, data, X = models["signal"]
    frame = pd.DataFrame(X.reshape(len(X), -1), columns=[f"x{i}" for i in range(40)])
    candidate = Candidate(reg.name, reg.version, "", {}, {}, {})
    with use_store(tmp):
        assert tensor_input_of(mlflow.pyfunc.load_model(reg.model_uri)).shape == (2, 20)
        predicted = _pyfunc_predict(candidate, frame)
    assert (predicted == _expected(model, data, X).argmax(1)).all()

"""The registered model answers what its user has: their own array of numbers, in its shape and
dtype (a tensor signature: an npz's X, a numeric table's rows, token ids of any length where the
graph allows), or, for a table with text columns, the named columns. Served by `mlflow.pyfunc`
in a fresh process where neither distill, torch nor transformers can be imported, and compared
with the student's own torch logits."""

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

from distill.tasks.compress.architectures import build_mlp
from distill.tasks.compress.data import Dataset, load_dataset
from distill.tasks.compress.evaluate import OnnxModel
from distill.tasks.compress.hf import HFLogits
from distill.tasks.compress.quantize import export_onnx
from distill.tasks.platform.config import DataConfig
from distill.tasks.platform.errors import UserError
from distill.tasks.release.gates import Candidate, _pyfunc_predict
from distill.tasks.release.predict import predict_file
from distill.tasks.release.registry import register_model
from distill.tasks.release.signature import FEATURES, tensor_input_of
from tests.conftest import use_store
from tests.served import BLOCK_IMPORTS, NOTHING_BLOCKED_LOADED
from tests.tokens import EmbeddingBag, tiny_bert, token_ids
from tests.zoo import ResNet1d

ROWS = 240
COLUMNS = [f"f{i}" for i in range(40)]  # the numeric CSV's header


def _npz(path, X: np.ndarray, seed: int) -> str:
    y = np.random.default_rng(seed).integers(0, 3, size=len(X))
    np.savez(path, X=X, y=y)
    return f"npz:{path}"


class _Rows(nn.Module):
    """A user's ResNet1d as the pipeline feeds it: flat rows, reshaped to `data.shape`."""

    def __init__(self, shape: tuple[int, int]) -> None:
        super().__init__()
        self.shape = shape
        self.net = ResNet1d(in_channels=shape[0], channels=4, n_classes=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(len(x), *self.shape))


def _csv(tmp, rows: np.ndarray) -> str:
    """A 40-column numeric CSV with a label, as a user has it."""
    labels = (rows[:, 0] > 0).astype(int) + (rows[:, 1] > 0).astype(int)
    pd.DataFrame(rows, columns=COLUMNS).assign(label=labels).to_csv(tmp / "rows.csv", index=False)
    return f"csv:{tmp / 'rows.csv'}"


def _categorical(tmp, rng) -> str:
    """A table with a text column: the DataFrame is the natural input."""
    frame = pd.DataFrame(
        {
            "age": rng.normal(40, 10, ROWS),
            "colour": rng.choice(["red", "green", "blue"], ROWS),
            "score": rng.normal(size=ROWS),
        }
    )
    frame["label"] = (frame["colour"] == "red").astype(int)
    frame.to_csv(tmp / "table.csv", index=False)
    return f"csv:{tmp / 'table.csv'}"


def _cases(tmp) -> dict[str, tuple[nn.Module, DataConfig, np.ndarray | None]]:
    """name -> (student, data config, the array its user predicts on; None: a DataFrame)."""
    rng = np.random.default_rng(0)
    rows = rng.normal(3.0, 2.0, size=(ROWS, 40)).astype(np.float32)
    signal = rng.normal(size=(ROWS, 2, 20))  # float64, as numpy makes it
    table = rng.normal(size=(ROWS, 40))
    ids = token_ids(ROWS)
    torch.manual_seed(0)
    return {
        "rows": (build_mlp(40, [16], 3), DataConfig(source=_npz(tmp / "rows.npz", rows, 1)), rows),
        "signal": (
            _Rows((2, 20)),
            DataConfig(source=_npz(tmp / "signal.npz", signal, 2), shape=[2, 20]),
            signal,
        ),
        "resnet_csv": (
            _Rows((1, 40)),
            DataConfig(source=_csv(tmp, table), label="label", shape=[1, 40]),
            table,
        ),
        "ids": (
            EmbeddingBag(),
            DataConfig(source=_npz(tmp / "ids.npz", ids, 3), standardize=False),
            ids,
        ),
        "bert": (
            HFLogits(tiny_bert(), "sequence classification"),
            DataConfig(source=_npz(tmp / "ids.npz", ids, 3), standardize=False),
            ids,
        ),
        "digits": (build_mlp(64, [8], 10), DataConfig(), None),
        "categorical": (
            build_mlp(5, [8], 2),  # age, colour one-hot (3), score
            DataConfig(source=_categorical(tmp, rng), label="label"),
            None,
        ),
    }


def _expected(model: nn.Module, data: Dataset, X: np.ndarray) -> np.ndarray:
    """The student's own class probabilities (torch) on the user's raw rows, standardized as
    trained."""
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


# A fresh interpreter where distill, this repository, torch and transformers cannot be
# imported (tests/served.py); each job is an array (.npy) or a DataFrame (.csv) to predict.
SERVE = (
    BLOCK_IMPORTS
    + """
import json
import mlflow.pyfunc, numpy as np, pandas as pd
answers = {}
for name, uri, path in json.loads(sys.argv[1]):
    X = np.load(path) if path.endswith(".npy") else pd.read_csv(path)
    out = mlflow.pyfunc.load_model(uri).predict(X)
    answers[name] = out.filter(like="proba_").to_numpy().tolist()
"""
    + NOTHING_BLOCKED_LOADED
    + """
print(json.dumps(answers))
"""
)


def _serve(tmp, jobs: list[tuple[str, str, np.ndarray | pd.DataFrame]]) -> dict[str, np.ndarray]:
    """Each (name, model uri, input) predicted in one fresh process: -> name: probabilities."""
    args = []
    for name, uri, X in jobs:
        if isinstance(X, pd.DataFrame):
            path = tmp / f"{name}.csv"
            X.to_csv(path, index=False)
        else:
            path = tmp / f"{name}.npy"
            np.save(path, X)
        args.append((name, uri, str(path)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-I", "-c", SERVE, json.dumps(args)],
        cwd=tmp,
        env=env | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = json.loads(proc.stdout.strip().splitlines()[-1])
    return {name: np.asarray(p) for name, p in answers.items()}


def test_each_source_gets_the_signature_of_what_its_user_has(registered):
    tmp, models = registered
    with use_store(tmp):
        infos = {
            name: mlflow.models.get_model_info(reg.model_uri) for name, (reg, *_) in models.items()
        }
    specs = {name: info.signature.inputs for name, info in infos.items()}
    tensors = {
        name: (s.inputs[0].shape, s.inputs[0].type)
        for name, s in specs.items()
        if s.is_tensor_spec()
    }
    assert tensors == {
        "rows": ((-1, 40), np.dtype("float32")),  # the npz's own dtype
        "signal": ((-1, 2, 20), np.dtype("float64")),  # and its own shape
        "resnet_csv": ((-1, 40), np.dtype("float64")),  # a table's rows: [N, F] float64
        "ids": ((-1, -1), np.dtype("int64")),  # any sequence length
        "bert": ((-1, -1), np.dtype("int64")),
        "digits": ((-1, 64), np.dtype("float64")),
    }
    assert specs["categorical"].input_names() == ["age", "colour", "score"]
    assert [c.type.name for c in specs["categorical"].inputs] == ["double", "string", "double"]
    # a table's feature names travel in the metadata (distill predict reads files by them)
    assert infos["resnet_csv"].metadata[FEATURES] == COLUMNS
    assert infos["digits"].metadata[FEATURES][:2] == ["pixel_0_0", "pixel_0_1"]
    assert not (infos["signal"].metadata or {}).get(FEATURES)


def test_the_registered_model_answers_its_users_array_without_distill_torch_transformers(
    registered,
):
    """The student's torch probabilities (to 1e-5) and classes, from the served fp32 ONNX."""
    tmp, models = registered
    jobs = [(name, reg.model_uri, X) for name, (reg, _, _, X) in models.items() if X is not None]
    shorter = models["bert"][3][:, :9]  # token ids of another length than the training rows
    jobs += [("ids_9", models["ids"][0].model_uri, shorter)]
    jobs += [("bert_9", models["bert"][0].model_uri, shorter)]
    digits = models["digits"][2]
    raw = digits.raw_rows("test")
    jobs += [("digits", models["digits"][0].model_uri, raw.to_numpy())]  # [N, 64] float64
    # a DataFrame of the feature columns still works (MLflow reads it by position)
    jobs += [("digits_frame", models["digits"][0].model_uri, raw)]
    resnet = models["resnet_csv"]
    jobs += [("resnet_frame", resnet[0].model_uri, pd.DataFrame(resnet[3], columns=COLUMNS))]
    with use_store(tmp):
        served = _serve(tmp, jobs)
    for name, (_, model, data, X) in models.items():
        if X is not None:
            expected = _expected(model, data, X)
            np.testing.assert_allclose(served[name], expected, atol=1e-5)
            assert (served[name].argmax(1) == expected.argmax(1)).all()
    for name in ("ids", "bert"):
        _, model, data, _ = models[name]
        np.testing.assert_allclose(served[f"{name}_9"], _expected(model, data, shorter), atol=1e-5)
    _, model, data, _ = models["digits"]
    expected = _expected(model, data, raw.to_numpy())
    np.testing.assert_allclose(served["digits"], expected, atol=1e-5)
    np.testing.assert_allclose(served["digits_frame"], expected, atol=1e-5)
    np.testing.assert_allclose(served["resnet_frame"], served["resnet_csv"], atol=1e-12)


def test_a_table_with_text_columns_keeps_its_named_columns(registered):
    """Backward compatible: the raw DataFrame by name (any column order, others ignored)."""
    tmp, models = registered
    reg, model, data, _ = models["categorical"]
    frame = data.raw_rows("test")
    shuffled = frame[["score", "colour", "age"]].assign(unused=1.0)
    with use_store(tmp):
        served = _serve(
            tmp, [("frame", reg.model_uri, frame), ("shuffled", reg.model_uri, shuffled)]
        )
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(data.X_test)), dim=1).numpy()
    np.testing.assert_allclose(served["frame"], expected, atol=1e-5)
    np.testing.assert_allclose(served["shuffled"], expected, atol=1e-5)


def test_mlflow_holds_callers_to_the_signatures_shape_and_dtype(registered):
    tmp, models = registered
    with use_store(tmp):
        model = mlflow.pyfunc.load_model(models["rows"][0].model_uri)
        X = models["rows"][3][:4]
        assert len(model.predict(X)) == 4
        with pytest.raises(mlflow.exceptions.MlflowException, match="dtype of input float64"):
            model.predict(X.astype(np.float64))
        with pytest.raises(mlflow.exceptions.MlflowException, match="Shape of input"):
            model.predict(X[:, :39])
        ids = mlflow.pyfunc.load_model(models["ids"][0].model_uri)
        with pytest.raises(mlflow.exceptions.MlflowException, match="dtype of input float64"):
            ids.predict(models["ids"][3][:4].astype(np.float64))


def test_a_served_array_with_an_empty_cell_is_one_line_naming_it(registered):
    tmp, models = registered
    reg, *_, X = models["resnet_csv"]
    bad = X[:5].copy()
    bad[3, 7] = np.nan
    with use_store(tmp):
        model = mlflow.pyfunc.load_model(reg.model_uri)
        with pytest.raises(ValueError) as err:
            model.predict(bad)
    assert "column 'f7' is empty (NaN) in row 3" in str(err.value)


def test_predict_files_reach_a_tensor_model_as_its_rows(registered, tmp_path):
    """`distill predict`: a model trained on an array gets a CSV's columns (all but the label,
    in order) or an npz's X, any trailing shape of the same size, cast to the model's dtype."""
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
        with pytest.raises(UserError, match=r"the model takes int64 values \(token ids\), and"):
            predict_file(reg.model_uri, tmp_path / "ids.npz", tmp_path / "out.csv")


def test_predict_files_reach_a_table_model_by_column_name(registered, tmp_path):
    """A model trained on a numeric CSV reads a file's columns by name: reordered and extra
    columns are fine, a missing one is one line, an empty cell names the file's row."""
    tmp, models = registered
    reg, model, data, X = models["resnet_csv"]
    expected = _expected(model, data, X).argmax(1)
    frame = pd.DataFrame(X, columns=COLUMNS)
    frame[COLUMNS[::-1]].assign(note="x").to_csv(tmp_path / "rows.csv", index=False)
    with use_store(tmp):
        report = predict_file(reg.model_uri, tmp_path / "rows.csv", tmp_path / "out.csv")
        assert report.rows == len(X)
        assert (pd.read_csv(tmp_path / "out.csv")["prediction"] == expected).all()
        frame.drop(columns=["f3"]).to_csv(tmp_path / "narrow.csv", index=False)
        with pytest.raises(UserError, match=r"missing column\(s\) 'f3'"):
            predict_file(reg.model_uri, tmp_path / "narrow.csv", tmp_path / "out.csv")
        frame.loc[150, "f7"] = np.nan
        frame.to_csv(tmp_path / "gap.csv", index=False)
        with pytest.raises(UserError) as err:
            predict_file(reg.model_uri, tmp_path / "gap.csv", tmp_path / "out.csv", chunk_rows=100)
        assert str(err.value).startswith(
            f"input {tmp_path / 'gap.csv'}: column 'f7' is empty (NaN) in row 150"
        )


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

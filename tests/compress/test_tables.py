"""Tables as users have them: text columns, empty cells, a text label, through the CLI into the
registry, and back out of it from the raw file in a fresh process (`mlflow.pyfunc`, and
`distill predict`), with the one-line refusals of `predict`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from distill.flows.cli import app
from distill.tasks.compress import tabular
from distill.tasks.compress.data import load_dataset
from distill.tasks.platform.config import DataConfig
from distill.tasks.platform.errors import UserError
from distill.tasks.release.predict import _hits
from tests.conftest import ROOT, TINY, fresh_process, use_store

NAME = "tables"


def _table(n: int = 240, seed: int = 0) -> pd.DataFrame:
    """Income from age, a colour (3 values) and a city (30 values); gaps in age and colour."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "age": rng.integers(18, 80, n).astype(float),
            "colour": rng.choice(["red", "green", "blue"], n),
            "city": rng.choice([f"city{i:02d}" for i in range(30)], n),
            "score": rng.normal(size=n),
        }
    )
    frame["label"] = np.where((frame.colour == "red") | (frame.age > 60), "high", "low")
    frame.loc[rng.choice(n, 25, replace=False), "age"] = np.nan
    frame.loc[rng.choice(n, 15, replace=False), "colour"] = np.nan
    return frame


# --- the encoding: scikit-learn's, fitted on the training rows, rebuilt from JSON -----------


def test_spec_rebuilds_what_sklearn_fits_on_the_training_rows():
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder

    frame = _table().drop(columns="label")
    train, test = frame.iloc[:160], frame.iloc[160:].copy()
    test["age"] += 100  # older than anyone in training: their ages must not move the median
    test.loc[test.index[0], "city"] = "atlantis"  # never seen in training: unknown
    spec = json.loads(json.dumps(tabular.fit_spec(train)))  # as the registered model stores it

    def fill():
        return SimpleImputer(strategy="constant", fill_value=tabular.MISSING)

    reference = ColumnTransformer(
        [
            ("age", SimpleImputer(strategy="median", add_indicator=True), ["age"]),
            (
                "colour",
                make_pipeline(fill(), OneHotEncoder(handle_unknown="ignore", sparse_output=False)),
                ["colour"],
            ),
            (
                "city",
                make_pipeline(
                    fill(), OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1)
                ),
                ["city"],
            ),
            ("score", "passthrough", ["score"]),
        ]
    ).fit(train)
    assert np.array_equal(tabular.encode(spec, test), reference.transform(test))
    # fitted on the training rows only: the median of train's ages, not of all rows
    everyone = np.nanmedian(pd.concat([train, test]).age)
    assert spec["columns"][0]["fill"] == float(np.nanmedian(train.age)) != everyone
    assert [c["kind"] for c in spec["columns"]] == ["numeric", "onehot", "ordinal", "numeric"]
    assert tabular.feature_names(spec)[:6] == [
        "age",
        "age=missing",
        "colour=<missing>",
        "colour=blue",
        "colour=green",
        "colour=red",
    ]
    assert tabular.encode(spec, test)[0, 6] == -1  # atlantis


def test_a_table_is_prepared_from_its_raw_columns(tmp_path):
    _table().to_csv(tmp_path / "t.csv", index=False)
    data = load_dataset(DataConfig(source=f"csv:{tmp_path / 't.csv'}", label="label"), 0)
    assert data.feature_names == ["age", "colour", "city", "score"]
    assert data.classes == ["high", "low"]
    # age + its indicator, 4 colours (3 and <missing>), 1 city code, score
    assert data.n_features == 8 and data.input_shape == (8,)
    assert np.isfinite(data.X_train).all() and np.isfinite(data.X_test).all()
    assert np.abs(data.X_train.mean(0)).max() < 1e-5  # standardized on train
    test = data.raw_rows("test")
    assert len(test) == len(data.X_test) and test.colour.isna().any() | test.age.isna().any()


def test_labels_as_classes(tmp_path):
    frame = _table()
    frame.assign(label=np.where(frame.label == "high", 1.0, 0.0)).to_csv(
        tmp_path / "f.csv", index=False
    )
    data = load_dataset(DataConfig(source=f"csv:{tmp_path / 'f.csv'}", label="label"), 0)
    assert data.classes == [0, 1]  # 0.0 / 1.0 in the file: integer classes, not 0.0 and 1.0
    frame.assign(label=np.arange(len(frame)) % 14 + 1).to_csv(tmp_path / "age.csv", index=False)
    cfg = DataConfig(source=f"csv:{tmp_path / 'age.csv'}", label="label")
    with pytest.raises(UserError, match="holds 14 distinct integers"):
        load_dataset(cfg, 0)
    assert load_dataset(cfg.model_copy(update={"task": "classification"}), 0).n_classes == 14


def test_accuracy_counts_labelled_rows_and_numbers_as_numbers():
    pred = pd.Series([0, 1, 2, 1])
    assert _hits(pred, pd.Series([0.0, 1.0, np.nan, 2.0])) == (2, 3)
    assert _hits(pd.Series(["a", "b"]), pd.Series(["a", None])) == (1, 1)


# --- end to end: the CLI registers it, a fresh process predicts from the raw file ----------


@pytest.fixture(scope="module")
def registered(prefect_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tables")
    _table().to_csv(tmp / "table.csv", index=False)
    with use_store(tmp):
        args = [
            a
            for s in [
                *TINY,
                f"data.source=csv:{tmp / 'table.csv'}",
                "data.label=label",
                f"register.model_name={NAME}",
            ]
            for a in ("--set", s)
        ]
        result = CliRunner().invoke(app, ["run", str(ROOT / "configs" / "digits.yaml"), *args])
        assert result.exit_code == 0, result.output
        yield tmp


def test_registered_model_predicts_from_the_raw_csv_in_a_fresh_process(registered):
    code = f"""
import json, mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model("models:/{NAME}@challenger")
schema = {{c.name: c.type.name for c in model.metadata.get_input_schema().inputs}}
rows = pd.read_csv("table.csv", dtype={{"colour": str, "city": str}}).drop(columns="label")
out = model.predict(rows)
print(json.dumps({{"schema": schema, "prediction": out["prediction"].tolist()}}))
"""
    served = fresh_process(registered, code=code)
    assert served.returncode == 0, served.stderr[-3000:]
    answer = json.loads(served.stdout.strip().splitlines()[-1])
    assert answer["schema"] == {
        "age": "double",
        "colour": "string",
        "city": "string",
        "score": "double",
    }
    truth = pd.read_csv(registered / "table.csv")["label"]
    assert (np.array(answer["prediction"]) == truth).mean() > 0.7  # tiny epochs; chance ~0.5

    cli = fresh_process(
        registered,
        "predict",
        "--model",
        f"models:/{NAME}@challenger",
        "--input",
        "table.csv",
        "--output",
        "out.csv",
        "--label",
        "label",
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    out = pd.read_csv(registered / "out.csv")
    assert out["prediction"].tolist() == answer["prediction"]
    accuracy = (out["prediction"] == truth).mean()
    assert cli.stdout.strip() == (
        f"wrote {len(truth)} predictions to out.csv, accuracy {accuracy:.4f}"
    )


def _predict(tmp: Path, frame: pd.DataFrame | str, *extra: str) -> subprocess.CompletedProcess:
    if isinstance(frame, pd.DataFrame):
        frame.to_csv(tmp / "in.csv", index=False)
    else:
        (tmp / "in.csv").write_text(frame)
    return CliRunner().invoke(
        app,
        [
            "predict",
            "--model",
            f"models:/{NAME}@challenger",
            "--input",
            str(tmp / "in.csv"),
            "--output",
            str(tmp / "pred.csv"),
            *extra,
        ],
    )


def _refused(result, message: str, tmp: Path) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == f"error: {message}"
    assert not (tmp / "pred.csv").exists()
    assert not list(tmp.glob(".pred.csv.*"))  # no temporary file left behind


def test_predict_refusals(registered, tmp_path):
    frame = _table(n=60, seed=1)
    inp = tmp_path / "in.csv"
    # the output may not be the input: refused, the input unchanged
    frame.to_csv(inp, index=False)
    before = inp.read_bytes()
    result = CliRunner().invoke(
        app,
        [
            "predict",
            "--model",
            f"models:/{NAME}@challenger",
            "--input",
            str(inp),
            "--output",
            str(inp),
        ],
    )
    assert result.exit_code == 2 and inp.read_bytes() == before
    assert (
        result.stderr.strip() == f"error: output {inp} is the input file; write the "
        "predictions to another file"
    )
    # a repeated column name is refused with the name (pandas would read it as 'score.1')
    text = frame.to_csv(index=False).replace("score,label", "score,score", 1)
    _refused(
        _predict(tmp_path, text),
        f"input {inp}: column name 'score' appears more than "
        "once in the header; give each column its own name",
        tmp_path,
    )
    # an empty cell the model has no imputer for ('score' had none in training), row 41 of the
    # file, in the third chunk: nothing is written
    gap = frame.assign(score=frame.score.where(frame.index != 41))
    gap.to_csv(inp, index=False)
    from distill.tasks.release.predict import predict_file

    with pytest.raises(UserError) as err:
        predict_file(f"models:/{NAME}@challenger", inp, tmp_path / "pred.csv", chunk_rows=20)
    assert str(err.value) == (
        f"input {inp}: column 'score' is empty (NaN) in row 41: the model "
        "has no imputer for it (the column had no empty cells in training)"
    )
    assert not (tmp_path / "pred.csv").exists() and not list(tmp_path.glob(".pred.csv.*"))
    # gaps where it has one are imputed; an empty label is left out of the accuracy
    result = _predict(
        tmp_path, frame.assign(label=frame.label.where(frame.index != 5)), "--label", "label"
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith("on 59 labelled rows (1 without a label)")


def test_predict_streams_in_chunks(registered, tmp_path):
    from distill.tasks.release.predict import predict_file

    frame = _table(n=100, seed=2)
    frame.to_csv(tmp_path / "in.csv", index=False)
    frame.to_parquet(tmp_path / "in.parquet")
    whole = predict_file(
        f"models:/{NAME}@challenger", tmp_path / "in.csv", tmp_path / "a.csv", label="label"
    )
    chunked = predict_file(
        f"models:/{NAME}@challenger",
        tmp_path / "in.parquet",
        tmp_path / "b.parquet",
        label="label",
        chunk_rows=7,
    )
    assert whole.rows == chunked.rows == 100 and whole.accuracy == chunked.accuracy
    a, b = pd.read_csv(tmp_path / "a.csv"), pd.read_parquet(tmp_path / "b.parquet")
    assert a["prediction"].tolist() == b["prediction"].tolist()
    assert np.allclose(a.filter(like="proba_"), b.filter(like="proba_"))


# --- fuzz: whatever a file holds, the readers answer with data or one line -----------------


def _mutations(frame: pd.DataFrame, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(name, CSV text) of damaged tables, seeded."""
    text = frame.to_csv(index=False)
    header, *rows = text.splitlines()
    cases = [
        ("empty file", ""),
        ("header only", header + "\n"),
        ("binary", "\x00\xff\x00,\x01\n"),
        ("no header", "\n".join(rows) + "\n"),
        ("ragged row", text + "1,2\n"),
        ("too many cells", text + ",".join(["1"] * 12) + "\n"),
        ("quote never closed", text + '"open,1,2,3,4\n'),
    ]
    for i in range(12):
        damaged = frame.copy().astype(object)
        for _ in range(int(rng.integers(1, 4))):
            row, col = int(rng.integers(len(frame))), str(rng.choice(frame.columns))
            damaged.loc[row, col] = rng.choice(
                [np.nan, "", "x", "1e400", "-inf", "NaN", "🙂", " ", "1,5", True, 10**30]
            )
        if rng.random() < 0.3:
            damaged = damaged.drop(columns=str(rng.choice(frame.columns)))
        if rng.random() < 0.15:
            damaged = damaged.rename(columns={damaged.columns[0]: damaged.columns[1]})
        cases.append((f"random {i}", damaged.to_csv(index=False)))
    return cases


def test_fuzz_the_data_reader(tmp_path):
    rng = np.random.default_rng(11)
    for name, text in _mutations(_table(n=60, seed=3), rng):
        (tmp_path / "f.csv").write_text(text)
        try:
            data = load_dataset(DataConfig(source=f"csv:{tmp_path / 'f.csv'}", label="label"), 0)
        except UserError as err:
            assert "\n" not in str(err) and str(err), name
            continue
        assert np.isfinite(data.X_train).all() and np.isfinite(data.X_test).all(), name


def test_fuzz_predict(registered, tmp_path):
    from distill.tasks.release.predict import predict_file

    rng = np.random.default_rng(12)
    for name, text in _mutations(_table(n=30, seed=4), rng):
        (tmp_path / "in.csv").write_text(text)
        try:
            report = predict_file(
                f"models:/{NAME}@challenger",
                tmp_path / "in.csv",
                tmp_path / "out.csv",
                label="label",
                chunk_rows=8,
            )
        except UserError as err:
            assert "\n" not in str(err) and str(err), name
            assert not (tmp_path / "out.csv").exists(), name
        else:
            out = pd.read_csv(tmp_path / "out.csv")
            assert len(out) == report.rows and out.filter(like="proba_").notna().all().all(), name
            (tmp_path / "out.csv").unlink()
        assert not list(tmp_path.glob(".out.csv.*")), name

import numpy as np
import pandas as pd
import pytest

from tasks.config import DataConfig
from tasks.data import load_dataset
from tasks.errors import UserError


def test_digits_split_is_stratified_and_standardized_on_train(digits):
    n = len(digits.X_train) + len(digits.X_val) + len(digits.X_test)
    assert n == 1797 and digits.n_classes == 10 and digits.n_features == 64
    assert len(digits.X_test) == pytest.approx(0.2 * n, abs=2)
    # stratified: every split has each class in about the same proportion
    for y in (digits.y_train, digits.y_val, digits.y_test):
        assert np.bincount(y, minlength=10).min() > 0
    # standardization fitted on train only: train columns have mean 0, test's do not exactly
    assert np.abs(digits.X_train.mean(0)).max() < 1e-5
    assert np.abs(digits.X_test.mean(0)).max() > 1e-3
    assert digits.X_train.dtype == np.float32


def test_split_is_seeded():
    a, b = load_dataset(DataConfig(), 0), load_dataset(DataConfig(), 0)
    c = load_dataset(DataConfig(), 1)
    assert np.array_equal(a.X_test, b.X_test) and not np.array_equal(a.X_test, c.X_test)
    assert a.digest == c.digest  # the digest names the table, not the split


def test_csv_source_with_label_column(tmp_path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(60, 3)), columns=["a", "b", "c"])
    frame["kind"] = np.repeat(["x", "y", "z"], 20)
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    data = load_dataset(DataConfig(source=f"csv:{path}", label="kind"), 0)
    assert data.feature_names == ["a", "b", "c"] and data.classes == ["x", "y", "z"]
    raw = data.raw_frame()
    assert set(raw.columns) == {"a", "b", "c", "label"} and len(raw) == 60


def test_parquet_and_npz_sources(tmp_path):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 4)), np.repeat([0, 1], 20)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    frame = pd.DataFrame(X, columns=list("abcd")).assign(target=y)
    frame.to_parquet(tmp_path / "d.parquet")
    a = load_dataset(DataConfig(source=f"npz:{tmp_path / 'd.npz'}"), 0)
    b = load_dataset(DataConfig(source=f"parquet:{tmp_path / 'd.parquet'}"), 0)
    assert a.n_features == b.n_features == 4
    assert np.allclose(np.sort(a.X_test.ravel()), np.sort(b.X_test.ravel()))


def test_shape_for_convolutions():
    data = load_dataset(DataConfig(shape=[1, 8, 8]), 0)
    assert data.input_shape == (1, 8, 8)


@pytest.mark.parametrize("make, message", [
    (lambda p: DataConfig(source="sklearn:mnist"), "unknown sklearn dataset"),
    (lambda p: DataConfig(source="digits"), "expected KIND:REF"),
    (lambda p: DataConfig(source=f"csv:{p}/missing.csv"), "data file not found"),
    (lambda p: DataConfig(shape=[1, 7, 7]), "config key 'data.shape'"),
])
def test_bad_sources(tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        load_dataset(make(tmp_path), 0)


def test_bad_tables(tmp_path):
    frame = pd.DataFrame({"a": [1.0, 2.0, np.nan, 4.0] * 5, "label": [0, 1] * 10})
    frame.to_csv(tmp_path / "nan.csv", index=False)
    with pytest.raises(UserError, match="NaN or inf"):
        load_dataset(DataConfig(source=f"csv:{tmp_path / 'nan.csv'}", label="label"), 0)
    with pytest.raises(UserError, match="label column 'y' not found"):
        load_dataset(DataConfig(source=f"csv:{tmp_path / 'nan.csv'}", label="y"), 0)
    pd.DataFrame({"a": ["u", "v"] * 10, "label": [0, 1] * 10}).to_csv(tmp_path / "s.csv", index=False)
    with pytest.raises(UserError, match="column 'a' is not numeric"):
        load_dataset(DataConfig(source=f"csv:{tmp_path / 's.csv'}", label="label"), 0)
    pd.DataFrame({"a": range(10), "label": [0] * 10}).to_csv(tmp_path / "one.csv", index=False)
    with pytest.raises(UserError, match="single class"):
        load_dataset(DataConfig(source=f"csv:{tmp_path / 'one.csv'}", label="label"), 0)

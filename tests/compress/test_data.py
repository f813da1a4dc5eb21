import numpy as np
import pandas as pd
import pytest

from distill.tasks.compress.data import load_dataset
from distill.tasks.compress.sources import table_digest
from distill.tasks.platform.config import DataConfig
from distill.tasks.platform.errors import UserError


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


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: DataConfig(source="sklearn:mnist"), "unknown sklearn dataset"),
        (lambda p: DataConfig(source="digits"), "expected KIND:REF"),
        (lambda p: DataConfig(source=f"csv:{p}/missing.csv"), "data file not found"),
        (lambda p: DataConfig(shape=[1, 7, 7]), "config key 'data.shape'"),
    ],
)
def test_bad_sources(tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        load_dataset(make(tmp_path), 0)


def test_bad_tables(tmp_path):
    frame = pd.DataFrame({"a": [1.0, 2.0, np.inf, 4.0] * 5, "label": [0, 1] * 10})
    frame.to_csv(tmp_path / "inf.csv", index=False)
    with pytest.raises(UserError, match="column 'a' holds inf in row 2"):
        load_dataset(DataConfig(source=f"csv:{tmp_path / 'inf.csv'}", label="label"), 0)
    with pytest.raises(UserError, match="label column 'y' not found"):
        load_dataset(DataConfig(source=f"csv:{tmp_path / 'inf.csv'}", label="y"), 0)
    pd.DataFrame({"a": range(10), "label": [0] * 10}).to_csv(tmp_path / "one.csv", index=False)
    with pytest.raises(UserError, match="single class"):
        load_dataset(DataConfig(source=f"csv:{tmp_path / 'one.csv'}", label="label"), 0)


# --- the user's own data contract: split kept, standardization optional ---


def _npz_split(path, rng, val=True, row_shape=(4,)):
    """An npz with the user's split: string labels, 'c' only twice in train (no 3-row rule)."""
    arrays = {
        "X_train": rng.normal(size=(30, *row_shape)).astype(np.float32),
        "y_train": np.array(["a", "b"] * 14 + ["c", "c"]),
        "X_test": rng.normal(size=(10, *row_shape)).astype(np.float32),
        "y_test": np.array(["a", "b", "c", "a", "b"] * 2),
    }
    if val:
        arrays |= {
            "X_val": rng.normal(size=(8, *row_shape)).astype(np.float32),
            "y_val": np.array(["a", "b", "c", "a"] * 2),
        }
    np.savez(path, **arrays)
    return arrays


def _rows_in(rows, table):
    """Index of each row of `rows` in `table` (rows are distinct random floats)."""
    return [int(np.flatnonzero((table == r).all(axis=1))[0]) for r in rows]


def test_standardize_false_feeds_the_raw_values(tmp_path):
    f = _npz_split(tmp_path / "s.npz", np.random.default_rng(0))
    data = load_dataset(DataConfig(source=f"npz:{tmp_path / 's.npz'}", standardize=False), 0)
    assert data.X_test.dtype == np.float32 and np.array_equal(data.X_test, f["X_test"])
    assert np.array_equal(data.X_train, f["X_train"]) and np.array_equal(data.X_val, f["X_val"])
    assert np.array_equal(data.mean, np.zeros(4)) and np.array_equal(data.scale, np.ones(4))
    raw = data.raw_frame()
    assert np.array_equal(raw[["x0", "x1", "x2", "x3"]].to_numpy(np.float32)[-10:], f["X_test"])
    on = load_dataset(DataConfig(source=f"npz:{tmp_path / 's.npz'}"), 0)  # default: standardized
    assert np.allclose(on.mean, f["X_train"].mean(0)) and on.digest == data.digest
    digits = load_dataset(DataConfig(standardize=False), 0)
    assert digits.X_train.max() == 16.0 and set(np.unique(digits.X_test)) <= set(range(17))


def test_npz_split_is_kept_exactly(tmp_path):
    f = _npz_split(tmp_path / "s.npz", np.random.default_rng(1))
    cfg = DataConfig(source=f"npz:{tmp_path / 's.npz'}", standardize=False, test_size=0.5)
    data = load_dataset(cfg, 0)
    assert (len(data.X_train), len(data.X_val), len(data.X_test)) == (30, 8, 10)
    for part in ("train", "val", "test"):
        assert np.array_equal(getattr(data, f"X_{part}"), f[f"X_{part}"])
        labels = np.array(data.classes)[getattr(data, f"y_{part}")]
        assert np.array_equal(labels, f[f"y_{part}"])
    assert data.classes == ["a", "b", "c"] and data.input_shape == (4,)
    # the seed moves nothing when the user gave every split
    assert np.array_equal(load_dataset(cfg, 7).X_train, data.X_train)
    assert data.user_split and not load_dataset(DataConfig(), 0).user_split


def test_npz_split_without_val_carves_it_from_train(tmp_path):
    rng = np.random.default_rng(2)
    np.savez(
        tmp_path / "s.npz",
        X_train=rng.normal(size=(40, 3)),
        y_train=np.repeat([0, 1], 20),
        X_test=rng.normal(size=(10, 3)),
        y_test=np.repeat([0, 1], 5),
    )
    f = np.load(tmp_path / "s.npz")
    cfg = DataConfig(source=f"npz:{tmp_path / 's.npz'}", standardize=False)
    a, b = load_dataset(cfg, 0), load_dataset(cfg, 1)
    # val_size is a fraction of all 50 rows: 0.1 * 50 = 5 rows, stratified
    assert (len(a.X_train), len(a.X_val), len(a.X_test)) == (35, 5, 10)
    assert sorted(np.bincount(a.y_val).tolist()) == [2, 3]
    assert np.array_equal(a.X_test, f["X_test"].astype(np.float32))
    train32 = f["X_train"].astype(np.float32)
    train_idx, val_idx = _rows_in(a.X_train, train32), _rows_in(a.X_val, train32)
    assert sorted(train_idx + val_idx) == list(range(40))  # a partition of the user's train
    assert train_idx == sorted(train_idx) and val_idx == sorted(val_idx)  # user's order kept
    assert not np.array_equal(a.X_val, b.X_val)  # carved with the run seed
    assert np.array_equal(a.X_test, b.X_test) and a.digest == b.digest


def test_npz_rows_of_images_give_the_input_shape(tmp_path):
    f = _npz_split(tmp_path / "img.npz", np.random.default_rng(3), row_shape=(1, 8, 8))
    data = load_dataset(DataConfig(source=f"npz:{tmp_path / 'img.npz'}", standardize=False), 0)
    assert data.input_shape == (1, 8, 8) and data.n_features == 64
    assert np.array_equal(data.X_test, f["X_test"].reshape(10, 64))  # C-order rows
    flat = load_dataset(DataConfig(source=f"npz:{tmp_path / 'img.npz'}", shape=[64]), 0)
    assert flat.input_shape == (64,)
    with pytest.raises(UserError, match=r"config key 'data.shape': \[1, 7, 7\] holds 49 values"):
        load_dataset(DataConfig(source=f"npz:{tmp_path / 'img.npz'}", shape=[1, 7, 7]), 0)


def _fold_csv(path, folds):
    rng = np.random.default_rng(4)
    frame = pd.DataFrame(rng.normal(size=(len(folds), 2)), columns=["a", "b"])
    frame["kind"] = np.resize(["x", "y"], len(folds))
    frame["fold"] = folds
    frame.to_csv(path, index=False)
    return frame


def test_split_column_is_kept(tmp_path):
    folds = ["test", "train", "train", "val", "train", "test"] * 5
    frame = _fold_csv(tmp_path / "f.csv", folds)
    cfg = DataConfig(
        source=f"csv:{tmp_path / 'f.csv'}", label="kind", split_column="fold", standardize=False
    )
    data = load_dataset(cfg, 0)
    assert data.feature_names == ["a", "b"]  # the split column is not a feature
    assert data.user_split
    for part in ("train", "val", "test"):
        rows = frame[frame["fold"] == part]
        assert np.array_equal(getattr(data, f"X_{part}"), rows[["a", "b"]].to_numpy(np.float32))
        labels = np.array(data.classes)[getattr(data, f"y_{part}")]
        assert labels.tolist() == rows["kind"].tolist()
    assert set(data.raw_frame().columns) == {"a", "b", "label"}
    # standardized on the user's training rows only
    std = load_dataset(DataConfig(source=cfg.source, label="kind", split_column="fold"), 0)
    train = frame.loc[frame["fold"] == "train", ["a", "b"]].to_numpy()
    assert np.allclose(std.mean, train.mean(0)) and np.allclose(std.scale, train.std(0))
    # without val rows, validation comes out of train (3 of 30 rows)
    _fold_csv(tmp_path / "g.csv", [p.replace("val", "train") for p in folds])
    carved = load_dataset(cfg.model_copy(update={"source": f"csv:{tmp_path / 'g.csv'}"}), 0)
    assert (len(carved.X_train), len(carved.X_val), len(carved.X_test)) == (17, 3, 10)


def test_digest_names_the_data_and_the_users_split(tmp_path):
    assert load_dataset(DataConfig(), 0).digest == "21d8a5f4d4f09baa"  # as before user splits
    rng = np.random.default_rng(5)
    X, y = rng.normal(size=(40, 3)), np.repeat([0, 1], 20)
    np.savez(tmp_path / "xy.npz", X=X, y=y)
    np.savez(tmp_path / "s1.npz", X_train=X[:30], y_train=y[:30], X_test=X[30:], y_test=y[30:])
    np.savez(
        tmp_path / "s2.npz",
        X_train=X[:25],
        y_train=y[:25],
        X_val=X[25:30],
        y_val=y[25:30],
        X_test=X[30:],
        y_test=y[30:],
    )
    xy, s1, s2 = (
        load_dataset(DataConfig(source=f"npz:{tmp_path / n}.npz"), 0).digest
        for n in ("xy", "s1", "s2")
    )
    assert xy == table_digest(X, y) and len({xy, s1, s2}) == 3


@pytest.mark.parametrize(
    "folds, message",
    [
        (
            ["train", "test", "dev"] * 6,
            "column 'fold' holds 'dev'; expected train, val or test (config key 'data.split_column')",
        ),
        (
            ["train", "Test"] * 9,  # case-sensitive
            "column 'fold' holds 'Test'; expected train, val or test (config key 'data.split_column')",
        ),
        (
            ["train", "test", None] * 6,
            (
                "column 'fold' holds an empty cell; expected train, val or test "
                "(config key 'data.split_column')"
            ),
        ),
        (
            ["train", "val"] * 9,
            "no test rows (column 'fold' value 'test'; config key 'data.split_column')",
        ),
        (
            ["train"] * 3 + ["test"] * 15,  # train holds one 'y' row: nothing to stratify val with
            "cannot carve 2 validation rows (0.1 of all rows) from the training split",
        ),
    ],
)
def test_bad_split_column(tmp_path, folds, message):
    _fold_csv(tmp_path / "f.csv", folds)
    cfg = DataConfig(source=f"csv:{tmp_path / 'f.csv'}", label="kind", split_column="fold")
    with pytest.raises(UserError) as err:
        load_dataset(cfg, 0)
    assert str(err.value).startswith(f"data file {tmp_path / 'f.csv'}: {message}")
    assert "\n" not in str(err.value)


def test_forgotten_split_column_is_hinted(tmp_path):
    _fold_csv(tmp_path / "f.csv", ["train", "val", "test"] * 6)
    with pytest.raises(
        UserError,
        match=r"column 'fold' holds only train / val / test: a split\? "
        "set config key 'data.split_column' to 'fold'",
    ):
        load_dataset(DataConfig(source=f"csv:{tmp_path / 'f.csv'}", label="kind"), 0)


def test_test_label_absent_from_train(tmp_path):
    frame = _fold_csv(tmp_path / "f.csv", ["train", "train", "test"] * 6)
    frame.loc[frame.index[-1], "kind"] = "z"  # the last row is a test row
    frame.to_csv(tmp_path / "f.csv", index=False)
    cfg = DataConfig(source=f"csv:{tmp_path / 'f.csv'}", label="kind", split_column="fold")
    with pytest.raises(UserError) as err:
        load_dataset(cfg, 0)
    assert str(err.value) == (
        f"data file {tmp_path / 'f.csv'}: label 'z' is in the test split "
        "(column 'fold' value 'test') but never in the training split "
        "(config key 'data.split_column')"
    )
    rng = np.random.default_rng(6)
    np.savez(
        tmp_path / "s.npz",
        X_train=rng.normal(size=(6, 2)),
        y_train=[0, 1] * 3,
        X_test=rng.normal(size=(2, 2)),
        y_test=[1, 7],
    )
    with pytest.raises(UserError, match=r"label 7 is in the test split \(array 'y_test'\)"):
        load_dataset(DataConfig(source=f"npz:{tmp_path / 's.npz'}"), 0)


@pytest.mark.parametrize(
    "arrays, cfg, message",
    [
        (
            {"X_train": (6, 2), "y_train": (6,), "X_test": (2, 2)},
            {},
            "missing array 'y_test' (expected X and y, or X_train, y_train, X_test, y_test",
        ),
        (
            {"X_train": (6, 2), "y_train": (5,), "X_test": (2, 2), "y_test": (2,)},
            {},
            "array 'X_train' has 6 rows but 'y_train' has 5",
        ),
        (
            {"X_train": (6, 2), "y_train": (6,), "X_test": (2, 3), "y_test": (2,)},
            {},
            "rows of array 'X_test' have shape [3] but those of 'X_train' have [2]",
        ),
        (
            {"X_train": (6, 2), "y_train": (6,), "X_test": (0, 2), "y_test": (0,)},
            {},
            "no test rows (array 'X_test'; config key 'data.source')",
        ),
        (
            {"X": (6, 2), "y": (6,)},
            {"split_column": "fold"},
            "config key 'data.split_column': only csv and parquet sources have columns",
        ),
    ],
)
def test_bad_npz_splits(tmp_path, arrays, cfg, message):
    np.savez(
        tmp_path / "s.npz", **{n: np.arange(np.prod(s)).reshape(s) % 2 for n, s in arrays.items()}
    )
    with pytest.raises(UserError) as err:
        load_dataset(DataConfig(source=f"npz:{tmp_path / 's.npz'}", **cfg), 0)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_nan_is_checked_per_user_split(tmp_path):
    f = _npz_split(tmp_path / "s.npz", np.random.default_rng(7))
    f["X_test"][3, 1] = np.inf
    np.savez(tmp_path / "s.npz", **f)
    with pytest.raises(
        UserError,
        match=r"test split \(array 'X_test'\): column 'x1' holds inf in "
        "row 3",
    ):
        load_dataset(DataConfig(source=f"npz:{tmp_path / 's.npz'}"), 0)


def test_split_column_must_not_be_the_label(tmp_path):
    _fold_csv(tmp_path / "f.csv", ["train", "test"] * 9)
    cfg = DataConfig(source=f"csv:{tmp_path / 'f.csv'}", label="fold", split_column="fold")
    with pytest.raises(UserError, match=r"config key 'data\.split_column': 'fold' is the label"):
        load_dataset(cfg, 0)


def test_held_out_rows_leave_the_fit_rows_with_their_labels_and_raw_rows(digits, tmp_path):
    """target.agreement_rows: the rows held out and the rows kept partition the training split;
    labels and raw rows follow the kept ones; the same seed holds out the same rows; rows on
    disk stay on disk."""
    from dataclasses import replace

    from distill.tasks.compress.dataset import hold_out
    from distill.tasks.compress.rows import Rows

    n_train, n_rest = len(digits.X_train), len(digits.X_val) + len(digits.X_test)
    X = digits.X_train.copy()
    X[:, 0] = np.arange(n_train)  # each row names itself
    raw = pd.DataFrame({"row": np.arange(n_train + n_rest)})
    data = replace(digits, X_train=X, raw=raw)
    fit, agree = hold_out(data, 200, seed=0)
    kept, held = fit.X_train[:, 0].astype(int), agree[:, 0].astype(int)
    assert len(held) == 200 and len(kept) == n_train - 200
    assert sorted([*kept, *held]) == list(range(n_train))
    assert np.array_equal(fit.y_train, digits.y_train[kept])
    assert np.array_equal(fit.raw_rows("train")["row"], kept)
    assert np.array_equal(fit.raw_rows("val")["row"], n_train + np.arange(len(digits.X_val)))
    assert fit.X_val is data.X_val and fit.X_test is data.X_test
    assert np.array_equal(hold_out(data, 200, seed=0)[1], agree)
    assert not np.array_equal(hold_out(data, 200, seed=1)[1], agree)
    with pytest.raises(UserError, match=r"^config key 'target.agreement_rows': 1000 of the"):
        hold_out(data, 1000, seed=0)

    np.save(tmp_path / "x.npy", X)
    on_disk, agree_disk = hold_out(
        replace(data, X_train=Rows(tmp_path / "x.npy", np.arange(n_train), "t")), 200, seed=0
    )
    assert isinstance(on_disk.X_train, Rows) and np.array_equal(agree_disk, agree)
    assert np.array_equal(np.asarray(on_disk.X_train), fit.X_train)


def test_unlabeled_rows_are_read_as_the_model_sees_the_data(digits, tmp_path):
    """target.unlabeled: an npz's X, flattened and standardized as the training rows were; a file
    that does not fit the data is one line naming the key and the file."""
    from distill.tasks.compress.dataset import unlabeled_rows

    raw = digits.X_test * digits.scale + digits.mean  # the test rows as a user has them
    np.savez(tmp_path / "u.npz", X=raw.reshape(-1, 8, 8))
    rows = unlabeled_rows(f"npz:{tmp_path / 'u.npz'}", digits)
    assert rows.dtype == np.float32 and np.allclose(rows, digits.X_test, atol=1e-5)

    def refused(name: str, **arrays) -> str:
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(UserError) as err:
            unlabeled_rows(f"npz:{tmp_path / name}", digits)
        assert str(err.value).startswith(f"config key 'target.unlabeled': {tmp_path / name}")
        return str(err.value)

    assert "its rows have 63 values ([63]), the data's 64" in refused("w.npz", X=raw[:, :63])
    assert "has no array 'X' (it has y)" in refused("y.npz", y=np.zeros(3))
    nan = raw.copy()
    nan[4, 2] = np.nan
    assert "row 4 of X is not finite" in refused("nan.npz", X=nan)
    with pytest.raises(UserError, match="expected npz:PATH"):
        unlabeled_rows("csv:rows.csv", digits)
    with pytest.raises(UserError, match="file not found"):
        unlabeled_rows(f"npz:{tmp_path / 'absent.npz'}", digits)

"""Attention masks from the user's data (issue 27 item 2): an npz's `X_*_mask` arrays (or a
tokenizer's padding) folded into the ids (tasks/compress/masks.py), carried through every split
and stage, and taken by the served model as `input_ids` + `attention_mask`. The check that
matters: a BERT with no `pad_token_id`, fed rows whose masked positions hold garbage, answers
exactly what it answers on the same rows cut to their real length."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from transformers import BertForSequenceClassification

from distill.tasks.compress.data import load_dataset
from distill.tasks.compress.evaluate import OnnxModel
from distill.tasks.compress.hf import HFLogits, load_hf_teacher
from distill.tasks.compress.masks import fold, unfold
from distill.tasks.compress.pipeline import compress
from distill.tasks.compress.quantize import export_onnx
from distill.tasks.platform.config import DataConfig, build_config
from distill.tasks.platform.errors import UserError
from tests.conftest import TINY
from tests.tokens import tiny_bert

VOCAB, T = 50, 10
FAST = [  # test_hf_teacher.py's tiny settings (low-rank, unstructured pruning)
    *TINY,
    "reconstruct.mode=low_rank",
    "compress.prune.method=unstructured",
    "reduce.budget.ratio=1.5",
    "reduce.calibration_samples=64",
    "finetune.epochs=1",
    "finetune.batch_size=32",
]


def _bert(seed: int = 0) -> BertForSequenceClassification:
    """No pad_token_id: without a mask every position, garbage included, is attended to."""
    torch.manual_seed(seed)
    return tiny_bert(
        vocab_size=VOCAB,
        max_position_embeddings=T,
        pad_token_id=None,
        initializer_range=0.3,  # logits of order 1: the garbage moves them visibly
    )


def _rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids with random garbage after each row's real length, the mask, the lengths)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(n, T)).astype(np.int64)
    lengths = rng.integers(3, T + 1, n)
    mask = (np.arange(T) < lengths[:, None]).astype(np.int64)
    return ids, mask, lengths


def _unpadded(model: torch.nn.Module, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Each row's logits on its real tokens alone (no mask needed)."""
    with torch.inference_mode():
        return np.concatenate(
            [
                model(torch.from_numpy(row[None, :n])).numpy()
                for row, n in zip(ids, lengths, strict=True)
            ]
        )


@pytest.fixture(scope="module")
def masked_npz(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny BERT directory and an npz of ids with masks whose labels are the BERT's answers."""
    root = tmp_path_factory.mktemp("masked")
    bert = _bert()
    wrapped = HFLogits(bert, "sequence classification")
    rows = {part: _rows(n, seed) for part, n, seed in (("train", 240, 0), ("test", 90, 1))}
    ids, _, lengths = rows["train"]
    with torch.no_grad():  # every class among the labels: the head's bias centred on train
        bert.classifier.bias -= torch.from_numpy(_unpadded(wrapped, ids, lengths).mean(axis=0))
    bert.save_pretrained(root / "bert")
    arrays = {}
    for part, (ids, mask, lengths) in rows.items():
        arrays |= {f"X_{part}": ids, f"X_{part}_mask": mask.astype(bool)}
        arrays[f"y_{part}"] = _unpadded(wrapped, ids, lengths).argmax(axis=1)
    np.savez(root / "data.npz", **arrays)
    return root / "bert", root / "data.npz"


def test_fold_is_exact_and_the_mask_travels_with_its_rows(masked_npz):
    ids, mask, _ = _rows(50, 3)
    back_ids, back_mask = unfold(fold(ids, mask))
    assert (back_ids == ids).all() and (back_mask == mask).all()

    _, npz = masked_npz
    data = load_dataset(DataConfig(source=f"npz:{npz}", standardize=False), 0)
    assert data.masked and data.X_train.dtype == np.int64
    given = np.load(npz)
    train_ids, train_mask = given["X_train"], given["X_train_mask"]
    # validation rows were carved from train: each row, wherever it went, has its own mask
    by_ids = {tuple(r): m for r, m in zip(train_ids.tolist(), train_mask, strict=True)}
    for X in (data.X_train, data.X_val):
        got_ids, got_mask = unfold(X)
        for r, m in zip(got_ids.tolist(), got_mask, strict=True):
            assert (by_ids[tuple(r)] == m).all()
    test_ids, test_mask = unfold(data.X_test)
    assert (test_ids == given["X_test"]).all() and (test_mask == given["X_test_mask"]).all()


def test_masked_rows_answer_as_the_unpadded_rows_in_torch_and_onnx(masked_npz):
    teacher_dir, npz = masked_npz
    data = load_dataset(DataConfig(source=f"npz:{npz}", standardize=False), 0)
    model = load_hf_teacher(f"hf:{teacher_dir}", data)
    assert model.masked
    ids, mask, lengths = _rows(20, 7)
    want = _unpadded(model, ids, lengths)
    with torch.inference_mode():
        got = model(torch.from_numpy(fold(ids, mask))).numpy()
        unmasked = model(torch.from_numpy(ids)).numpy()  # all ones: the garbage counts
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(unmasked - want).max() > 0.1  # the check above could fail
    onnx = OnnxModel(export_onnx(model, data.X_test), 0, 0)
    sess = onnx.session()
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    served = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    np.testing.assert_allclose(served, want, atol=1e-4)
    np.testing.assert_allclose(onnx.predictor()(fold(ids, mask)), want, atol=1e-4)
    assert (model.padding().lengths(fold(ids, mask)) == lengths).all()


def test_compress_end_to_end_keeps_the_mask_to_the_served_model(masked_npz):
    teacher_dir, npz = masked_npz
    sets = [*FAST, f"teacher.source=hf:{teacher_dir}", f"data.source=npz:{npz}"]
    cfg = build_config({}, [*sets, "data.standardize=false"])
    data = load_dataset(cfg.data, cfg.seed)
    outcome = compress(cfg, data)
    # the teacher labelled its own unpadded rows: with the mask it agrees on every test row
    assert outcome.stages["teacher"]["accuracy"] == 1.0
    assert len(np.unique(data.y_test)) == 3
    ids, mask, lengths = _rows(30, 11)
    for student in (outcome.finetuned, outcome.pruned):
        assert student.masked
        with torch.inference_mode():
            got = student(torch.from_numpy(fold(ids, mask))).numpy()
        np.testing.assert_allclose(got, _unpadded(student, ids, lengths), atol=1e-4)
    sess = outcome.quantized.served.session()
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    served = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    alone = [
        sess.run(None, {"input_ids": r[None, :n], "attention_mask": np.ones((1, n), np.int64)})[0]
        for r, n in zip(ids, lengths, strict=True)
    ]
    tol = 1e-4 if outcome.quantized.method == "fp32" else 0.05  # int8: per-row rounding
    np.testing.assert_allclose(served, np.concatenate(alone), atol=tol)


def _npz(path: Path, **arrays: np.ndarray) -> str:
    ids, mask, _ = _rows(30, 0)
    y = np.resize([0, 1, 2], 30)
    base = {"X_train": ids, "y_train": y, "X_test": ids, "y_test": y}
    base |= {"X_train_mask": mask, "X_test_mask": mask}
    np.savez(path, **{k: v for k, v in (base | arrays).items() if v is not None})
    return f"npz:{path}"


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        (
            {"X_test_mask": np.ones((30, T - 1))},
            r"'X_test_mask' has shape \[30, 9\] but .*\[30, 10\]",
        ),
        ({"X_train": np.ones((30, T)), "X_test": np.ones((30, T))}, "holds float64 values: a mask"),
        ({"X_val_mask": np.ones((30, T))}, "'X_val_mask' is an attention mask with no token ids"),
        ({"X_test_mask": None}, "'X_test' has no attention mask 'X_test_mask'"),
        ({"X_test_mask": np.full((30, T), 2)}, "must hold 0 and 1"),
    ],
)
def test_bad_masks_are_refused_in_one_line(tmp_path, arrays, match):
    source = _npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(UserError, match=match) as err:
        load_dataset(DataConfig(source=source, standardize=False), 0)
    assert "\n" not in str(err.value)


def test_masks_with_standardized_ids_or_a_non_hf_teacher_are_refused(tmp_path):
    source = _npz(tmp_path / "d.npz")
    with pytest.raises(UserError, match=r"'data\.standardize' is true"):
        load_dataset(DataConfig(source=source, standardize=True), 0)
    from distill.tasks.compress.teacher import given_teacher
    from tests.tokens import EmbeddingBag

    data = load_dataset(DataConfig(source=source, standardize=False), 0)
    with pytest.raises(UserError, match="only an hf: teacher takes them"):
        given_teacher(EmbeddingBag(vocab=VOCAB), data)


def test_the_registered_model_takes_ids_and_mask(masked_npz, mlflow_store):
    import mlflow

    from distill.tasks.release.registry import register_model
    from distill.tasks.release.signature import model_input

    teacher_dir, npz = masked_npz
    data = load_dataset(DataConfig(source=f"npz:{npz}", standardize=False), 0)
    model = load_hf_teacher(f"hf:{teacher_dir}", data)
    onnx = OnnxModel(export_onnx(model, data.X_train), 0, 0)
    with mlflow.start_run() as run:
        register_model(onnx, data, "masked", {"mlflow.run_id": run.info.run_id})
    served = mlflow.pyfunc.load_model("models:/masked@challenger")
    inputs = served.metadata.get_input_schema().inputs
    assert [(s.name, s.type, s.shape) for s in inputs] == [
        ("input_ids", np.dtype("int64"), (-1, -1)),
        ("attention_mask", np.dtype("bool"), (-1, -1)),  # the npz's own mask dtype
    ]
    ids, mask, lengths = _rows(12, 5)
    got = served.predict({"input_ids": ids, "attention_mask": mask.astype(bool)})
    alone = [
        served.predict({"input_ids": r[None, :n], "attention_mask": np.ones((1, n), bool)})
        for r, n in zip(ids, lengths, strict=True)
    ]
    want = np.concatenate([a.filter(like="proba_").to_numpy() for a in alone])
    np.testing.assert_allclose(got.filter(like="proba_").to_numpy(), want, atol=1e-5)
    # a file's rows for it (distill predict, the gates): plain ids get all-ones masks
    rows = model_input(served, ids, "input")
    assert (rows["input_ids"] == ids).all() and rows["attention_mask"].all()


def test_evaluation_cuts_the_padding_off_sorted_batches_and_answers_the_same():
    from distill.tasks.compress.evaluate import padding_of, predict_trimmed, torch_predictor
    from distill.tasks.compress.rows import predict_batched

    ids, mask, lengths = _rows(300, 9)
    for model, rows in (
        (HFLogits(_bert(), "sequence classification", masked=True), fold(ids, mask)),
        (HFLogits(_bert_with_pad(), "sequence classification"), np.where(mask == 1, ids, 0)),
    ):
        padding = padding_of(model)
        assert padding is not None and (padding.lengths(rows) == lengths).all()
        predict, seen = torch_predictor(model), []

        def watched(X: np.ndarray, predict=predict, seen=seen) -> np.ndarray:
            seen.append(X.shape)
            return predict(X)

        got = predict_trimmed(watched, rows, padding, tokens=400)
        np.testing.assert_allclose(got, predict_batched(predict, rows), atol=1e-5)
        assert sum(n for n, _ in seen) == len(rows)
        assert all(n * t <= 400 for n, t in seen)  # every batch within its tokens
        # sorted by length: fewer tokens computed than the padded rows hold
        assert sum(n * t for n, t in seen) < 0.8 * rows.size
    assert padding_of(HFLogits(_bert(), "sequence classification")) is None  # no pad id: all count


def _bert_with_pad() -> BertForSequenceClassification:
    bert = _bert(1)
    bert.config.pad_token_id = 0
    return bert

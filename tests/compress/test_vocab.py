"""Vocabulary trimming (`reduce.vocab: data`, tasks/compress/vocab.py): a token model keeps the
embedding rows of the ids its training rows use and one "other" row, the mean of the rows it
dropped. On seen ids the trimmed model answers exactly as the teacher; it still takes the user's
ids (in torch and served from ONNX); `student_hf/` loads with no distill code and, fed the rows
its `vocab.json` names, answers as the student; the plan counts the smaller table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from transformers import (
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    ViTConfig,
    ViTForImageClassification,
)

from distill.tasks.compress.data import load_dataset
from distill.tasks.compress.evaluate import OnnxModel
from distill.tasks.compress.hf import HFLogits, save_student
from distill.tasks.compress.pipeline import compress
from distill.tasks.compress.quantize import export_onnx
from distill.tasks.compress.reduce import reduce_model
from distill.tasks.compress.vocab import TrimmedEmbedding, trim, used_ids
from distill.tasks.platform.config import ReduceConfig, build_config
from distill.tasks.platform.errors import UserError
from tests.conftest import TINY
from tests.tokens import tiny_bert

VOCAB, USED, T = 400, 40, 8  # the data uses ids 1..USED-1 (and pad 0) of VOCAB


def _bert(seed: int = 0) -> HFLogits:
    torch.manual_seed(seed)
    bert = tiny_bert(vocab_size=VOCAB, max_position_embeddings=T, pad_token_id=0)
    return HFLogits(bert, "sequence classification")


def _ids(n: int, seed: int, high: int = USED) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, high, size=(n, T)).astype(np.int64)


def _logits(model: torch.nn.Module, X: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(X)).numpy()


def test_trimmed_model_answers_as_the_teacher_on_seen_ids_and_unseen_ids_get_the_mean_row():
    teacher = _bert()
    X = _ids(64, 0)
    student, done = trim(teacher, X)
    table = student.hf.get_input_embeddings()
    assert isinstance(table, TrimmedEmbedding)
    kept = used_ids(X, teacher.hf.config)
    assert kept.tolist() == list(range(USED))  # 1..39 from the rows, pad 0 from the config
    assert (done.vocab, done.kept) == (VOCAB, USED)
    assert table.weight.shape == (USED + 1, 32) and student.hf.config.vocab_size == USED + 1
    before = sum(p.numel() for p in teacher.parameters())
    after = sum(p.numel() for p in student.parameters())
    assert before - after == done.params_saved == (VOCAB - USED - 1) * 32

    seen = _ids(20, 1)  # other rows, the same ids
    np.testing.assert_allclose(_logits(student, seen), _logits(teacher, seen), atol=1e-6)
    # an unseen id reads the mean of the dropped rows
    full = teacher.hf.get_input_embeddings().weight.detach()
    got = table(torch.tensor([[USED + 5, 7]]))[0]
    torch.testing.assert_close(got[0], full[USED:].mean(0))
    torch.testing.assert_close(got[1], full[7])
    # the teacher is untouched
    assert teacher.hf.get_input_embeddings().weight.shape == (VOCAB, 32)


def test_served_file_takes_the_users_ids_and_is_smaller():
    teacher = _bert()
    X = _ids(64, 0)
    student, _ = trim(teacher, X)
    ids = _ids(16, 2)
    ids[0, 3] = VOCAB - 1  # an id the data never used: the "other" row, in ONNX too
    want = _logits(student, ids)
    onnx = OnnxModel(export_onnx(student, X[:4]), 0, 0)
    sess = onnx.session()
    assert sess.get_inputs()[0].type == "tensor(int64)"
    np.testing.assert_allclose(sess.run(None, {sess.get_inputs()[0].name: ids})[0], want, atol=1e-4)
    full = OnnxModel(export_onnx(teacher, X[:4]), 0, 0)
    # the table of 400 ids (4 bytes each) against 359 rows of 32 floats saved
    assert len(onnx.onnx_bytes) < len(full.onnx_bytes) - 359 * 32 * 4 + VOCAB * 4 + 2048


def test_student_hf_loads_without_distill_and_answers_through_vocab_json(tmp_path):
    teacher = _bert()
    X = _ids(64, 0)
    student, _ = trim(teacher, X)
    assert save_student(student, tmp_path / "hf") == ""
    vocab = json.loads((tmp_path / "hf" / "vocab.json").read_text())
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert loaded.get_input_embeddings().num_embeddings == USED + 1
    assert loaded.config.vocab_size == USED + 1
    ids = _ids(10, 3)
    ids[1, 2] = VOCAB - 7  # unseen
    table = np.full(vocab["vocab_size"], vocab["other_row"])
    table[vocab["kept_ids"]] = np.arange(len(vocab["kept_ids"]))
    rows = torch.from_numpy(table[ids])
    with torch.inference_mode():
        got = loaded(input_ids=rows, attention_mask=(torch.from_numpy(ids) != 0).long()).logits
    np.testing.assert_allclose(got.numpy(), _logits(student, ids), atol=1e-5)
    # saving restored the running model: it still takes the user's ids, its pad id the user's
    assert isinstance(student.hf.get_input_embeddings(), TrimmedEmbedding)
    assert student.hf.config.pad_token_id == 0


def test_models_that_cannot_be_trimmed_are_refused_in_one_line():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(UserError, match=r"answers over its vocabulary.*reduce.vocab=all"):
        trim(HFLogits(gpt2.eval(), "causal LM"), _ids(4, 0))
    vit = ViTForImageClassification(
        ViTConfig(
            image_size=8,
            patch_size=4,
            num_channels=1,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            num_labels=3,
        )
    )
    with pytest.raises(UserError, match="takes pixel_values, not token ids"):
        trim(HFLogits(vit.eval(), "image classification", (1, 8, 8)), np.zeros((2, 64)))
    with pytest.raises(UserError, match="token id 400 is outside the teacher's vocabulary of 400"):
        trim(_bert(), np.array([[1, 400]]))


def test_the_width_plan_spends_what_the_table_saved_on_the_encoder():
    teacher = _bert()
    X = _ids(128, 0)
    student, _ = trim(teacher, X)
    total = sum(p.numel() for p in teacher.parameters())

    def plan(model: torch.nn.Module, budget: int):
        cfg = ReduceConfig.model_validate(
            {"budget": {"params": budget}, "calibration_samples": 128}
        )
        return reduce_model(model, X, cfg, "width")

    # 2 % of the teacher: out of reach while the 400-row table stays (even with the hidden size
    # at 2), reached once it is trimmed
    with pytest.raises(UserError, match="below the smallest reachable student") as err:
        plan(teacher, total // 50)
    assert plan(student, total // 50).student_params <= total // 50
    # the floor the line names is the one with the stream cut too (1,212, not heads/FFN's 16,692)
    floor = int(str(err.value).split("student: ")[1].split(" params")[0])
    assert floor < total // 2 and plan(teacher, floor).student_params <= floor
    # where both reach the budget, the saved rows buy the encoder: the trimmed model keeps all of
    # it, the other cuts its stream and units
    budget = int(total * 0.75)
    plain, cut = plan(teacher, budget), plan(student, budget)
    assert plain.student_params <= budget and cut.student_params <= budget
    assert all(p.rank is None for p in cut.layers)
    assert any(p.rank is not None for p in plain.layers)


@pytest.fixture(scope="module")
def token_npz(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("vocab")
    teacher = _bert()
    arrays = {}
    for part, n, seed in (("train", 240, 0), ("test", 90, 1)):
        X = _ids(n, seed)
        arrays |= {f"X_{part}": X, f"y_{part}": _logits(teacher, X).argmax(axis=1)}
    teacher.hf.save_pretrained(root / "bert")
    np.savez(root / "data.npz", **arrays)
    return root / "bert", root / "data.npz"


def test_compress_with_reduce_vocab_data_records_the_trim_and_serves_the_users_ids(token_npz):
    teacher_dir, npz = token_npz
    sets = [
        *TINY,
        f"teacher.source=hf:{teacher_dir}",
        f"data.source=npz:{npz}",
        "data.standardize=false",
        "reduce.vocab=data",
        "reduce.budget.ratio=2",
        "reduce.calibration_samples=64",
        "compress.prune.amount=0",
        "finetune.epochs=1",
    ]
    cfg = build_config({}, sets)
    data = load_dataset(cfg.data, cfg.seed)
    outcome = compress(cfg, data)
    table = outcome.finetuned.hf.get_input_embeddings()
    assert isinstance(table, TrimmedEmbedding) and table.num_embeddings <= USED + 1
    teacher_params = sum(p.numel() for p in outcome.teacher.parameters())
    assert outcome.reduction.teacher_params == teacher_params  # the ratio is to the teacher
    assert outcome.reduction.student_params <= teacher_params // 2
    sess = outcome.quantized.served.session()
    ids = _ids(5, 9)
    ids[0, 0] = VOCAB - 1
    served = sess.run(None, {sess.get_inputs()[0].name: ids})[0]
    tol = 1e-4 if outcome.quantized.method == "fp32" else 0.05
    np.testing.assert_allclose(served, _logits(outcome.pruned, ids), atol=tol)


def test_a_target_on_a_trimmed_vocabulary_plans_through_the_prefect_plan_task(token_npz):
    """`compress` hands the plan stage the trimmed model (`start=`) and the agreement rows
    (`X_agree=`): the Prefect task's own function takes both (it once took neither, so a
    flow with reduce.vocab=data and a target would have failed at the plan)."""
    from dataclasses import replace

    from distill.flows.stages import plan_task
    from distill.tasks.compress.pipeline import PLAIN_STEPS

    teacher_dir, npz = token_npz
    sets = [
        *TINY,
        f"teacher.source=hf:{teacher_dir}",
        f"data.source=npz:{npz}",
        "data.standardize=false",
        "reduce.vocab=data",
        "reduce.budget.size_kb=120",  # the default: a target sizes the reduction
        "target.ratio=2",
        "target.max_accuracy_drop=0.5",
        "target.agreement_rows=40",
        "reduce.calibration_samples=64",
        "finetune.epochs=1",
    ]
    cfg = build_config({}, sets)
    data = load_dataset(cfg.data, cfg.seed)
    outcome = compress(cfg, data, replace(PLAIN_STEPS, plan=plan_task.fn))
    assert outcome.target is not None and outcome.target.met, outcome.target.line
    table = outcome.finetuned.hf.get_input_embeddings()
    assert isinstance(table, TrimmedEmbedding)
    assert "by agreement on 40 held-out rows" in outcome.target.line


def test_reduce_vocab_data_on_a_non_hf_teacher_is_one_line():
    cfg = build_config({}, [*TINY, "reduce.vocab=data"])
    data = load_dataset(cfg.data, cfg.seed)
    with pytest.raises(UserError, match=r"reduce.vocab.*not a Hugging Face model"):
        compress(cfg, data)


def test_a_budget_only_the_trimmed_table_reaches_names_reduce_vocab(token_npz):
    teacher_dir, npz = token_npz
    sets = [
        *TINY,
        f"teacher.source=hf:{teacher_dir}",
        f"data.source=npz:{npz}",
        "data.standardize=false",
        "reduce.budget.ratio=50",  # below the untrimmed floor, even with the stream at 2
        "reduce.calibration_samples=64",
    ]
    cfg = build_config({}, sets)
    data = load_dataset(cfg.data, cfg.seed)
    with pytest.raises(UserError) as err:
        compress(cfg, data)
    line = str(err.value)
    assert "below the smallest reachable student" in line and "\n" not in line
    assert "token table alone is 12,800 params (400 ids x 32): reduce.vocab=data" in line

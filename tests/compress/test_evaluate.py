import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, log_loss, top_k_accuracy_score

from distill.tasks.compress.architectures import build_cnn, build_mlp
from distill.tasks.compress.evaluate import (
    OnnxModel,
    classification_metrics,
    count_params,
    evaluate_model,
    expected_calibration_error,
    flops_per_row,
    latency_percentiles_ms,
    log_softmax,
    negative_log_likelihood,
    pipeline_summary,
    saved_size,
    top_k_accuracy,
    torch_predictor,
)
from distill.tasks.compress.quantize import export_onnx
from distill.tasks.platform.config import EvaluateConfig


def test_classification_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    logits, y = rng.normal(size=(200, 4)), rng.integers(0, 4, 200)
    teacher_pred = rng.integers(0, 4, 200)
    m = classification_metrics(logits, y, teacher_pred)
    pred = logits.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["agreement"] == pytest.approx((pred == teacher_pred).mean())


def test_top_k_and_nll_match_sklearn():
    rng = np.random.default_rng(1)
    logits, y = rng.normal(scale=2.0, size=(300, 10)), rng.integers(0, 10, 300)
    proba = np.exp(log_softmax(logits))
    assert np.allclose(proba.sum(1), 1.0)
    for k in (1, 3, 5):
        assert top_k_accuracy(logits, y, k) == pytest.approx(
            top_k_accuracy_score(y, logits, k=k, labels=range(10))
        )
    assert negative_log_likelihood(logits, y) == pytest.approx(
        log_loss(y, proba, labels=range(10)), rel=1e-9
    )
    m = classification_metrics(logits, y, None)
    assert m["top3_accuracy"] == pytest.approx(
        top_k_accuracy_score(y, logits, k=3, labels=range(10))
    )
    assert m["nll"] == pytest.approx(log_loss(y, proba, labels=range(10)))
    assert "agreement" not in m
    assert "top3_accuracy" not in classification_metrics(
        logits[:, :5], y % 5, None
    )  # 5 classes: no top-k


def test_ece_on_a_hand_made_case():
    # 4 rows at confidence 0.9 (3 right: accuracy 0.75) and 2 rows at 0.6 (both wrong: accuracy 0)
    proba = np.array([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 2)
    y = np.array([0, 0, 0, 1, 1, 1])
    expected = 4 / 6 * abs(0.75 - 0.9) + 2 / 6 * abs(0.0 - 0.6)
    assert expected_calibration_error(proba, y) == pytest.approx(expected)
    # perfectly calibrated: confidence 1.0 and always right; and one bin's edge is (lo, hi]
    assert expected_calibration_error(np.eye(3), np.arange(3)) == pytest.approx(0.0)
    # 0.6 = 9/15 is the upper edge of bin (8/15, 9/15], shared with 0.55: one bin, |0.5 - 0.575|
    edge = np.array([[0.6, 0.4], [0.55, 0.45]])
    assert expected_calibration_error(edge, np.array([1, 0])) == pytest.approx(0.075)


def test_flops_of_an_mlp_are_two_multiply_adds_per_weight():
    model = build_mlp(64, [32, 16], 10)
    assert flops_per_row(model, 64) == 2 * (64 * 32 + 32 * 16 + 16 * 10)
    cnn = build_cnn((1, 8, 8), [4], 10)  # 3x3 'same' conv on 8x8, then Linear(4*64, 10)
    assert flops_per_row(cnn, 64) == 2 * (1 * 4 * 9 * 64 + 4 * 64 * 10)


def test_latency_percentiles_time_each_call_after_warm_up(monkeypatch):
    """A clock that each call advances by a known amount: 3 slow warm-up calls, then 1..20 ms."""
    import types

    import distill.tasks.compress.evaluate as evaluate

    now, calls = [0.0], []
    timed = (7, 3, 20, 1, 15, 9, 2, 18, 11, 5, 14, 6, 19, 4, 13, 8, 17, 10, 16, 12)  # 1..20 ms
    durations = iter([1.0] * 3 + [k / 1e3 for k in timed])

    def predict(rows):
        calls.append(rows)
        now[0] += next(durations)

    monkeypatch.setattr(evaluate, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    X = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    p50, p95 = latency_percentiles_ms(predict, X, 16, 20)
    assert p50 == pytest.approx(10.5) and p95 == pytest.approx(19.05)  # np.percentile of 1..20 ms
    assert len(calls) == 23 and all(c.shape == (16, 3) for c in calls)
    assert np.array_equal(calls[0], X[np.arange(16) % 10])  # 16 rows cycle through the 10


def test_size_is_the_real_saved_file(tmp_path):
    model = build_mlp(64, [128], 10)
    size, compressed = saved_size(model)
    torch.save(model.state_dict(), tmp_path / "model.bin")  # the archive records its name
    assert size == (tmp_path / "model.bin").stat().st_size
    assert compressed <= size
    assert count_params(model) == (64 * 128 + 128 + 1290, 64 * 128 + 128 + 1290)


def test_evaluate_model_reports_every_metric(digits):
    torch.manual_seed(0)
    model = build_mlp(64, [16], 10)
    cfg = EvaluateConfig(latency_repeats=3, large_batch=64)
    m = evaluate_model(model, digits, None, cfg, validation=True)
    assert {
        "accuracy",
        "f1_macro",
        "top3_accuracy",
        "ece",
        "nll",
        "train_accuracy",
        "train_test_gap",
        "params",
        "nonzeros",
        "flops",
        "size_kb",
        "compressed_kb",
        "latency_ms_b1",
        "latency_p95_ms_b1",
        "latency_ms_b64",
        "latency_p95_ms_b64",
        "throughput_rows_s",
    } <= set(m)
    assert m["size_kb"] > 0
    train_acc = (model(torch.from_numpy(digits.X_train)).argmax(1).numpy() == digits.y_train).mean()
    assert m["train_test_gap"] == pytest.approx(train_acc - m["accuracy"])
    val_pred = model(torch.from_numpy(digits.X_val)).argmax(1).numpy()
    assert m["validation_accuracy"] == pytest.approx(accuracy_score(digits.y_val, val_pred))
    assert m["flops"] == 2 * (64 * 16 + 16 * 10)


def test_latencies_and_throughput_come_from_their_batch(digits, monkeypatch):
    import distill.tasks.compress.evaluate as evaluate

    timed = {1: (0.5, 0.9), 64: (4.0, 6.0)}  # (p50, p95) ms of a batch of 1 and of 64 rows
    seen = []

    def fake_latency(predict, X, batch, repeats):
        seen.append((batch, repeats))
        return timed[batch]

    monkeypatch.setattr(evaluate, "latency_percentiles_ms", fake_latency)
    cfg = EvaluateConfig(latency_repeats=100, large_batch=64)
    m = evaluate_model(build_mlp(64, [16], 10), digits, None, cfg)
    assert seen == [(1, 100), (64, 20)]  # the large batch is timed a fifth as often (10 at least)
    assert (m["latency_ms_b1"], m["latency_p95_ms_b1"]) == (0.5, 0.9)
    assert (m["latency_ms_b64"], m["latency_p95_ms_b64"]) == (4.0, 6.0)
    assert m["throughput_rows_s"] == pytest.approx(16_000)  # 64 rows in 4 ms


def test_onnx_model_carries_the_float_models_counts(digits):
    model = build_mlp(64, [16], 10).eval()
    onnx = OnnxModel(export_onnx(model, 64), *count_params(model), flops_per_row(model, 64))
    cfg = EvaluateConfig(latency_repeats=3, large_batch=32)
    m_torch, m_onnx = (
        evaluate_model(model, digits, None, cfg),
        evaluate_model(onnx, digits, None, cfg),
    )
    for key in ("params", "nonzeros", "flops"):
        assert m_onnx[key] == m_torch[key]
    for key in ("accuracy", "nll", "ece", "train_accuracy"):
        assert m_onnx[key] == pytest.approx(m_torch[key], abs=1e-5)
    assert "flops" not in evaluate_model(OnnxModel(onnx.onnx_bytes, 0, 0), digits, None, cfg)


def test_pipeline_summary():
    teacher = {"accuracy": 0.98, "size_kb": 1000.0, "latency_ms_b1": 0.4, "latency_ms_b256": 8.0}
    final = {"accuracy": 0.97, "size_kb": 50.0, "latency_ms_b1": 0.1, "latency_ms_b256": 1.0}
    s = pipeline_summary({"teacher": teacher, "quantized": final}, "quantized")
    assert s["compression_ratio"] == pytest.approx(20.0)
    assert s["accuracy_drop"] == pytest.approx(0.01)
    assert s["speedup_b1"] == pytest.approx(4.0) and s["speedup_b256"] == pytest.approx(8.0)
    assert s["final/size_kb"] == 50.0


def test_a_model_with_nan_stops_at_its_stage(digits):
    """Issue 18: `finetune.lr=.inf` registered a model answering class 0 and NaN probabilities."""
    from distill.tasks.compress.finite import check_model
    from distill.tasks.platform.errors import UserError

    torch.manual_seed(0)
    model = build_mlp(digits.n_features, [8], digits.n_classes)
    rows = digits.X_test[:32]
    check_model("pruned", model, rows)  # finite: passes
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(
        UserError,
        match=r"^stage pruned: the model's 0\.weight holds NaN or inf "
        r"\(finetune\.lr too high\?\); the run stops before registration$",
    ):
        check_model("pruned", model, rows)
    served = OnnxModel(
        export_onnx(model, digits.n_features), 0, 0
    )  # no weights to read: its outputs tell
    with pytest.raises(UserError, match=r"^stage quantized: the model outputs NaN or inf; "):
        check_model("quantized", served, rows)


def test_the_train_test_gap_is_read_on_a_fixed_sample_of_a_large_training_split(
    digits, monkeypatch
):
    import distill.tasks.compress.evaluate as evaluate
    from distill.tasks.compress.finite import NonFinite

    monkeypatch.setattr(evaluate, "TRAIN_ROWS", 100)
    idx = evaluate.train_sample(len(digits.y_train))
    assert len(idx) == 100 and (np.diff(idx) > 0).all() and idx[-1] < len(digits.y_train)
    assert (evaluate.train_sample(len(digits.y_train)) == idx).all()  # every stage: the same rows
    assert evaluate.train_sample(100) is None  # a split that small is read whole
    torch.manual_seed(0)
    model = build_mlp(64, [16], 10).eval()
    m = evaluate.quality_metrics(torch_predictor(model), digits, None)
    with torch.no_grad():
        pred = model(torch.from_numpy(digits.X_train[idx])).argmax(1).numpy()
    assert m["train_accuracy"] == pytest.approx((pred == digits.y_train[idx]).mean())

    # a NaN on a sampled row (one whose pixels no other row shares) is named by its row in the
    # training split, not in the sample
    same = (digits.X_train[None, idx[7:]] == digits.X_train[:, None]).all(axis=2).sum(axis=0)
    bad = int(idx[7:][np.argmax(same == 1)])

    def nan_on_that_row(X):
        out = torch_predictor(model)(X)
        hit = (digits.X_train[bad] == X).all(axis=1)
        out[hit] = np.nan
        return out

    with pytest.raises(NonFinite, match=f"training row {bad}\\b"):
        evaluate.quality_metrics(nan_on_that_row, digits, None)

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

from tasks.config import EvaluateConfig
from tasks.evaluate import (classification_metrics, count_params, evaluate_model, pipeline_summary, saved_size)
from tasks.teacher import build_mlp


def test_classification_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    logits, y = rng.normal(size=(200, 4)), rng.integers(0, 4, 200)
    teacher_pred = rng.integers(0, 4, 200)
    m = classification_metrics(logits, y, teacher_pred)
    pred = logits.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["agreement"] == pytest.approx((pred == teacher_pred).mean())


def test_size_is_the_real_saved_file(tmp_path):
    model = build_mlp(64, [128], 10)
    size, compressed = saved_size(model)
    torch.save(model.state_dict(), tmp_path / "model.bin")  # the archive records its name
    assert size == (tmp_path / "model.bin").stat().st_size
    assert compressed <= size
    assert count_params(model) == (64 * 128 + 128 + 1290, 64 * 128 + 128 + 1290)


def test_evaluate_model_reports_every_metric(digits):
    m = evaluate_model(build_mlp(64, [16], 10), digits, None, EvaluateConfig(latency_repeats=3, large_batch=64))
    assert {"accuracy", "f1_macro", "params", "nonzeros", "size_kb", "compressed_kb", "latency_ms_b1",
            "latency_ms_b64"} <= set(m)
    assert m["latency_ms_b1"] > 0 and m["size_kb"] > 0


def test_pipeline_summary():
    teacher = {"accuracy": 0.98, "size_kb": 1000.0, "latency_ms_b1": 0.4, "latency_ms_b256": 8.0}
    final = {"accuracy": 0.97, "size_kb": 50.0, "latency_ms_b1": 0.1, "latency_ms_b256": 1.0}
    s = pipeline_summary({"teacher": teacher, "quantized": final}, "quantized")
    assert s["compression_ratio"] == pytest.approx(20.0)
    assert s["accuracy_drop"] == pytest.approx(0.01)
    assert s["speedup_b1"] == pytest.approx(4.0) and s["speedup_b256"] == pytest.approx(8.0)
    assert s["final/size_kb"] == 50.0

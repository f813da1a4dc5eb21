import numpy as np
import pytest
import torch

from tasks.compress.architectures import build_cnn, build_mlp
from tasks.compress.evaluate import OnnxModel, saved_size
from tasks.compress.finetune import FitSettings, fit
from tasks.compress.quantize import export_onnx, quantize_model
from tasks.platform.config import QuantizeConfig


@pytest.fixture(scope="module")
def trained_mlp(digits):
    torch.manual_seed(0)
    model, _ = fit(
        build_mlp(64, [256, 128], 10),
        digits,
        FitSettings(epochs=10, lr=1e-3, batch_size=64, patience=10),
    )
    return model


def test_onnx_export_matches_torch_with_dynamic_batch():
    torch.manual_seed(0)
    model = build_mlp(8, [16], 3).eval()
    onnx = OnnxModel(export_onnx(model, 8), 0, 0)
    predict = onnx.predictor()
    for batch in (1, 7, 300):
        X = np.random.default_rng(batch).normal(size=(batch, 8)).astype(np.float32)
        with torch.no_grad():
            assert np.abs(predict(X) - model(torch.from_numpy(X)).numpy()).max() < 1e-5


def test_int8_is_smaller_and_keeps_accuracy(trained_mlp, digits):
    q = quantize_model(trained_mlp, digits.X_test, digits.X_train, QuantizeConfig(), seed=0)
    assert q.method == "static" and q.export_max_abs_diff < 1e-4
    float_size, _ = saved_size(q.float_model)
    int8_size, _ = saved_size(q.int8_model)
    assert int8_size < float_size / 3  # int8 weights: ~4x
    acc = lambda m: (m.predictor()(digits.X_test).argmax(1) == digits.y_test).mean()  # noqa: E731
    assert acc(q.int8_model) >= acc(q.float_model) - 0.01
    assert q.served is q.int8_model


def test_int8_answers_a_row_the_same_in_any_batch(trained_mlp, digits):
    """Activation scales fixed at calibration: what the evaluation measured on the test batch
    is what each row gets when served alone (dynamic int8 changed 3 of 360 answers)."""
    q = quantize_model(trained_mlp, digits.X_test, digits.X_train, QuantizeConfig(), seed=0)
    predict = q.int8_model.predictor()
    whole = predict(digits.X_test)
    alone = np.concatenate([predict(digits.X_test[i : i + 1]) for i in range(len(digits.X_test))])
    chunks = np.concatenate(
        [predict(digits.X_test[i : i + 7]) for i in range(0, len(digits.X_test), 7)]
    )
    assert np.array_equal(whole.argmax(1), alone.argmax(1)) and np.array_equal(
        whole.argmax(1), chunks.argmax(1)
    )
    assert np.abs(whole - alone).max() < 1e-4


def test_conv_models_take_static_quantization(digits):
    torch.manual_seed(0)
    model = build_cnn((1, 8, 8), [8], 10).eval()
    q = quantize_model(model, digits.X_test[:50], digits.X_train, QuantizeConfig(), seed=0)
    assert q.method == "static" and q.int8_max_abs_diff is not None


def test_quantization_can_be_disabled(trained_mlp, digits):
    q = quantize_model(
        trained_mlp, digits.X_test, digits.X_train, QuantizeConfig(enabled=False), seed=0
    )
    assert q.int8_model is None and q.served is q.float_model and q.method == "none"


def test_torch_runtime_gives_int8_torchscript(trained_mlp, digits):
    q = quantize_model(
        trained_mlp, digits.X_test, digits.X_train, QuantizeConfig(runtime="torch"), seed=0
    )
    assert q.method == "torch-dynamic" and q.served is q.int8_model
    assert saved_size(q.int8_model)[0] < saved_size(q.float_model)[0] / 2
    acc = lambda m: (m.predictor()(digits.X_test).argmax(1) == digits.y_test).mean()  # noqa: E731
    assert acc(q.int8_model) >= acc(q.float_model) - 0.01


def test_the_exporter_op_registry_is_built_once_and_copied():
    """reuse_torchlib_registry: every export gets a copy of one registry built per process,
    equal to the one torch would have built, and the exported bytes do not change."""
    from torch.onnx._internal.exporter._registration import ONNXRegistry

    from tasks.compress.quantize import reuse_torchlib_registry

    model = build_mlp(8, [16], 3).eval()
    exported = export_onnx(model, 8)  # reuses from here on
    reuse_torchlib_registry()  # idempotent
    fresh = ONNXRegistry.from_torchlib.__func__._distill_original(ONNXRegistry)
    first, second = ONNXRegistry.from_torchlib(), ONNXRegistry.from_torchlib()
    assert first is not second and first.functions is not second.functions
    assert first.functions == fresh.functions == second.functions
    assert first.opset_version == fresh.opset_version
    first.functions.clear()  # what one export registers stays in its copy
    assert ONNXRegistry.from_torchlib().functions == fresh.functions
    assert export_onnx(model, 8) == exported

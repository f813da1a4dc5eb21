"""Stage 6 — quantize: export the float student to ONNX, check it, and make it int8.

The float model goes through PyTorch's dynamo ONNX exporter with a dynamic batch axis and
is checked against PyTorch on the test rows (max |Δlogit| must stay under
`compress.quantize.max_abs_diff`). ONNX Runtime then quantizes it to static int8: weights
per channel, activation scales calibrated on training rows and fixed in the file. Not
dynamic int8, though it was as fast on the digits MLP: it computes activation scales from
each batch, so a row's answer depended on the rows served with it (3 of 360 digits test rows
changed between batch 1 and the whole test set), and the accuracy measured on a batch was not
what a row gets. Static int8 answers a row the same in any batch (tested) and took 0.0066
against 0.0062 ms at batch 1; dynamic ConvInteger was slow for convolutions anyway.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tasks.compress.evaluate import (
    OnnxModel,
    TorchScriptModel,
    count_params,
    example_rows,
    flops_per_row,
    torch_predictor,
)
from tasks.compress.reduce import calibration_rows
from tasks.compress.rows import predict_batched
from tasks.platform.config import QuantizeConfig
from tasks.platform.errors import UserError

INPUT_NAME = "x"


@dataclass(frozen=True)
class Quantized:
    float_model: OnnxModel | TorchScriptModel  # in the configured runtime
    int8_model: OnnxModel | TorchScriptModel | None  # None when compress.quantize.enabled is false
    export_max_abs_diff: float  # float ONNX vs PyTorch, test rows (always checked)
    int8_max_abs_diff: float | None  # int8 vs float, test rows
    method: str  # dynamic | static | torch-dynamic | none

    @property
    def served(self) -> OnnxModel | TorchScriptModel:
        """The model the registry gets: int8 when quantization ran, else the float model."""
        return self.int8_model or self.float_model


def torchscript_bytes(model: nn.Module, example: int | np.ndarray) -> bytes:
    """TorchScript traced on the data's rows (`example`: an array, its dtype kept: int64 token
    ids stay int64; or the width of float rows)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model.eval(), example_rows(example, 2)), buffer)
    return buffer.getvalue()


def quantize_torch(model: nn.Module) -> nn.Module:
    """PyTorch's dynamic int8 for Linear layers (convolutions stay fp32 on this path)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
        return torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8
        )


def lean_onnx(onnx_bytes: bytes) -> bytes:
    """The same graph without what only debugging reads: the dynamo exporter writes each node's
    stack trace and source names (`metadata_props`, `doc_string`) and the shape of every
    intermediate (`value_info`, re-inferred by ONNX Runtime). On a small ResNet1d that is 24 of
    31 KB; the served file is what a size target is held to."""
    import onnx

    proto = onnx.load_from_string(onnx_bytes)
    graphs = [proto.graph, *(f for f in proto.functions)]
    for graph in graphs:
        for node in graph.node:
            node.doc_string = ""
            del node.metadata_props[:]
    for item in [*proto.graph.initializer, *proto.graph.input, *proto.graph.output]:
        del item.metadata_props[:]
    del proto.graph.value_info[:]
    proto.graph.doc_string = ""
    return proto.SerializeToString()


_REGISTRIES: dict[int, object] = {}  # opset -> torchlib's op registry, built once per process


def reuse_torchlib_registry() -> None:
    """torch 2.13's dynamo exporter rebuilds its op registry from onnxscript's torchlib on every
    export: it re-reads the source of some 500 functions, about 1 s of every export here (the
    pre-flight's, each target plan's and pruning round's, the quantize stage's). Built once per
    process and opset instead, each export gets its own copy (an op a caller registers stays in
    its copy); the exported bytes are the same (tested). Idempotent; a torch without this
    internal API is left alone."""
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:
        return
    registry = getattr(_registration, "ONNXRegistry", None)
    build = getattr(registry, "from_torchlib", None)
    if registry is None or build is None or getattr(build, "_distill_reused", False):
        return

    def from_torchlib(cls: type, opset_version: int = _registration._constants.TORCHLIB_OPSET):
        built = _REGISTRIES.get(opset_version)
        if built is None:
            built = _REGISTRIES[opset_version] = build.__func__(cls, opset_version)
        copy_ = cls()
        copy_._opset_version = built._opset_version
        copy_.functions = {op: list(metas) for op, metas in built.functions.items()}
        return copy_

    from_torchlib._distill_reused = True  # type: ignore[attr-defined]
    from_torchlib._distill_original = build.__func__  # type: ignore[attr-defined]
    registry.from_torchlib = classmethod(from_torchlib)


def export_onnx(model: nn.Module, example: int | np.ndarray) -> bytes:
    """Float ONNX with a dynamic batch axis (dynamo exporter), as bytes. `example`: the data's
    rows, whose dtype the graph's input takes (int64 token ids: an int64 input), or the width
    of float32 rows."""
    reuse_torchlib_registry()
    model = model.cpu().eval()
    example = (example_rows(example, 2),)
    for name in ("torch.onnx", "onnxscript"):  # onnxscript: constant folding's failed attempts
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            example,
            input_names=[INPUT_NAME],
            output_names=["logits"],
            dynamic_shapes=({0: "batch"},),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    return lean_onnx(program.model_proto.SerializeToString())


class _Rows:
    """onnxruntime CalibrationDataReader over calibration rows, one small batch at a time, in
    their dtype (int64 token ids for a graph whose input is int64)."""

    def __init__(self, X: np.ndarray, batch: int = 64) -> None:
        self._batches = iter([X[i : i + batch] for i in range(0, len(X), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        rows = next(self._batches, None)
        return None if rows is None else {INPUT_NAME: rows}


def quantize_onnx(float_bytes: bytes, X_calib: np.ndarray, static: bool) -> bytes:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        raw, src, dst = Path(tmp) / "raw.onnx", Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        raw.write_bytes(float_bytes)
        quant_pre_process(raw, src)  # shape inference + graph optimizations ORT recommends first
        if static:
            with _root_log_level(logging.ERROR):  # per-channel notes on 1-D weights (norms)
                _quantize_static(src, dst, X_calib)
        else:
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        return lean_onnx(dst.read_bytes())


@contextlib.contextmanager
def _root_log_level(level: int):
    """onnxruntime.quantization logs on the root logger: raised to `level` for a block."""
    root = logging.getLogger()
    before = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(before)


def _quantize_static(src: Path, dst: Path, X_calib: np.ndarray) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(
        src,
        dst,
        _Rows(X_calib),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


@dataclass(frozen=True)
class Exported:
    """The float student exported to ONNX and checked against PyTorch on the test rows."""

    model: nn.Module
    onnx: OnnxModel
    counts: tuple[int, int, int | None]  # params, nonzeros, FLOPs per row (not in ONNX graphs)
    reference: np.ndarray  # PyTorch's outputs on the test rows
    float_outputs: np.ndarray  # the ONNX model's
    diff: float  # max |difference|


def serve_onnxruntime(
    e: Exported, X_test: np.ndarray, X_train: np.ndarray, cfg: QuantizeConfig, seed: int
) -> Quantized:
    """Static int8 in ONNX Runtime (scales calibrated on 512 training rows)."""
    if not cfg.enabled:
        return Quantized(e.onnx, None, e.diff, None, "none")
    calib = calibration_rows(X_train, 512, seed)
    int8 = OnnxModel(quantize_onnx(e.onnx.onnx_bytes, calib, static=True), *e.counts)
    int8_diff = float(np.abs(predict_batched(int8.predictor(), X_test) - e.float_outputs).max())
    return Quantized(e.onnx, int8, e.diff, int8_diff, "static")


def serve_torch(
    e: Exported, X_test: np.ndarray, X_train: np.ndarray, cfg: QuantizeConfig, seed: int
) -> Quantized:
    """TorchScript; PyTorch's dynamic int8 for Linear layers."""
    float_ts = TorchScriptModel(torchscript_bytes(e.model, X_test), *e.counts)
    if not cfg.enabled:
        return Quantized(float_ts, None, e.diff, None, "none")
    int8_ts = TorchScriptModel(torchscript_bytes(quantize_torch(e.model), X_test), *e.counts)
    int8_diff = float(np.abs(predict_batched(int8_ts.predictor(), X_test) - e.reference).max())
    return Quantized(float_ts, int8_ts, e.diff, int8_diff, "torch-dynamic")


# `compress.quantize.runtime` -> what makes the served model (a test keeps the config's choices
# equal to these keys)
RUNTIMES: dict[
    str, Callable[[Exported, np.ndarray, np.ndarray, QuantizeConfig, int], Quantized]
] = {"onnxruntime": serve_onnxruntime, "torch": serve_torch}


def quantize_model(
    model: nn.Module, X_test: np.ndarray, X_train: np.ndarray, cfg: QuantizeConfig, seed: int
) -> Quantized:
    params, nonzeros = count_params(model)
    counts = (params, nonzeros, flops_per_row(model, X_test))
    float_model = OnnxModel(export_onnx(model, X_test), *counts)
    reference = predict_batched(torch_predictor(model), X_test)
    float_outputs = predict_batched(float_model.predictor(), X_test)
    export_diff = float(np.abs(float_outputs - reference).max())
    if export_diff > cfg.max_abs_diff:
        raise UserError(
            f"stage quantize: the ONNX export differs from PyTorch by "
            f"{export_diff:.2e} (> compress.quantize.max_abs_diff="
            f"{cfg.max_abs_diff:g}); nothing registered"
        )
    exported = Exported(model, float_model, counts, reference, float_outputs, export_diff)
    return RUNTIMES[cfg.runtime](exported, X_test, X_train, cfg, seed)

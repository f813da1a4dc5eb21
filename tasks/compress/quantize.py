"""Stage 6 — quantize: export the float student to ONNX, check it, and make it int8.

The float model goes to ONNX with a dynamic batch axis (float rows through PyTorch's
TorchScript exporter where its trace checks out, 40x faster on small models; token ids, masks
and anything it refuses through the dynamo exporter) and is checked against PyTorch on the test
rows (max |Δlogit| must stay under `compress.quantize.max_abs_diff`). ONNX Runtime then
quantizes it to static int8: weights per channel, activation scales calibrated on training rows
and fixed in the file. Not dynamic int8, though it was as fast on the digits MLP: it computes
activation scales from each batch, so a row's answer depended on the rows served with it (3 of
360 digits test rows changed between batch 1 and the whole test set), and the accuracy measured
on a batch was not what a row gets. Static int8 answers a row the same in any batch (tested)
and took 0.0066 against 0.0062 ms at batch 1; dynamic ConvInteger was slow for convolutions
anyway.

Token ids (an int64 `[N, T]` example) keep their dtype in the graph's input, and its sequence
axis is dynamic when the model takes any length (an embedding and a pooling, a transformer's
attention), pinned to the data's length when it does not (a Linear over the flattened sequence).
Rows that carry attention masks (a Hugging Face student of masked data: tasks/compress/masks.py)
export with two inputs, `input_ids` and `attention_mask`, Hugging Face's names, folded together
as the graph's first step.

int8 ships only when it is smaller than the fp32 export and no slower at
`compress.quantize.batch` rows per call, both measured here, side by side (`Choice`; slower: by
over `SLOWER_BY`, 5 %, shown by the paired calls, as a closer call is not repeatable), and where
its classes agree with the fp32 export's on `compress.quantize.min_agreement` of the training
rows; where all-int8 does not, int8 of the weighted ops alone (activations between them float:
a transformer's masked attention does not survive uint8) and then the layers that cost the
agreement most left in fp32 (`mixed_int8`, a per-layer fallback) are tried, `restored_int8`, and
the first that agrees is measured by the same rule. Under a
`target:` it must also keep the accuracy guard (tasks/compress/target.py `guarded_int8`).
Otherwise the fp32 export ships, and `Quantized.why` says which it was. Static int8 is not always
smaller or faster: its quantize/dequantize nodes cost bytes and time, which only large matrices
repay. Measured here: a tiny BERT (2 layers, hidden 32, 100-token vocab) was 97.6 KB fp32 and
68.5 KB int8 but took 25 vs 30 ms at batch 256; a one-conv digits CNN 21.4 vs 8.7 KB, 0.27 vs
1.3 ms; the digits MLP 64-512-512-10 1,177 vs 314 KB, 2.5 vs 1.5 ms (int8 ships).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from torch import nn

from distill.tasks.compress.evaluate import (
    OnnxModel,
    TorchScriptModel,
    count_params,
    example_rows,
    flops_per_row,
    padding_of,
    torch_predictor,
)
from distill.tasks.compress.masks import IDS, MASK, fold_tensor, unfold, unfold_tensor
from distill.tasks.compress.reduce import calibration_rows
from distill.tasks.compress.rows import predict_batched
from distill.tasks.platform.config import QuantizeConfig
from distill.tasks.platform.errors import UserError

INPUT_NAME = "x"


@dataclass(frozen=True)
class Measured:
    """A served file's bytes, and its median latency at the batch the format is chosen for."""

    bytes: int
    ms: float


SLOWER_P = 0.001  # int8 is "slower" only where the paired calls show it at this level
# ... and by more than this fraction of fp32's time: the same two files measured a few per cent
# apart either way from one run to the next on one machine (a 64-85-10 MLP: int8/fp32 0.98-1.06
# over 20 runs, called slower in 10 without a margin), so a smaller gap is not a repeatable call
SLOWER_BY = 0.05


@dataclass(frozen=True)
class Choice:
    """The fp32 export against its int8 model, measured side by side at `batch` rows per call."""

    batch: int
    fp32: Measured
    int8: Measured
    # (pairs of alternating calls in which int8 took over `SLOWER_BY` longer, pairs): what
    # "slower" is decided on
    slower_in: tuple[int, int] | None = None

    @property
    def int8_slower(self) -> bool:
        """Over `SLOWER_BY` slower by its median, and by over `SLOWER_BY` in significantly more
        than half of the paired calls (a one-sided sign test at `SLOWER_P`): two formats as fast
        as each other on a busy machine trade places from one run to the next, a slower one loses
        most pairs."""
        if self.int8.ms <= self.fp32.ms * (1 + SLOWER_BY):
            return False
        if self.slower_in is None:
            return True
        from scipy.stats import binomtest

        slower, pairs = self.slower_in
        return bool(binomtest(slower, pairs, 0.5, alternative="greater").pvalue < SLOWER_P)

    @property
    def int8_ships(self) -> bool:
        """The rule: int8 ships only when it is smaller and not slower (by over `SLOWER_BY`)."""
        return self.int8.bytes < self.fp32.bytes and not self.int8_slower

    def why(self, kind: str) -> str:
        losses = [
            w
            for w, lost in (
                ("bigger", self.int8.bytes >= self.fp32.bytes),
                ("slower", self.int8_slower),
            )
            if lost
        ]
        verdict = "int8 ships" if not losses else f"fp32 ships, int8 is {' and '.join(losses)}"
        return f"{verdict}: {self.measured(kind)}"

    def measured(self, kind: str) -> str:
        return (
            f"{kind} int8 {self.int8.bytes / 1024:.1f} KB, {self.int8.ms:.4f} ms at "
            f"batch {self.batch}; fp32 {self.fp32.bytes / 1024:.1f} KB, {self.fp32.ms:.4f} ms"
        )

    def metrics(self) -> dict[str, float]:
        b = self.batch
        return {
            "fp32_size_kb": self.fp32.bytes / 1024,
            "int8_size_kb": self.int8.bytes / 1024,
            f"fp32_latency_ms_b{b}": self.fp32.ms,
            f"int8_latency_ms_b{b}": self.int8.ms,
        }


@dataclass(frozen=True)
class Quantized:
    float_model: OnnxModel | TorchScriptModel  # in the configured runtime
    int8_model: OnnxModel | TorchScriptModel | None  # the int8 that ships; None: fp32 ships
    export_max_abs_diff: float  # float ONNX vs PyTorch, test rows (always checked)
    int8_max_abs_diff: float | None  # int8 vs float, test rows
    # what ships: static | torch-dynamic (int8), fp32 (int8 made, not shipped: `why`), none (off)
    method: str
    why: str = ""  # why that ships, with the measurements
    int8_candidate: OnnxModel | TorchScriptModel | None = None  # the int8 made, shipped or not
    choice: Choice | None = None  # fp32 vs int8, measured
    # weighted nodes the int8 model leaves in fp32 (a per-layer fallback: `mixed_int8`)
    fp32_layers: tuple[str, ...] = ()
    # the int8 model quantizes the weighted ops alone (`restored_int8`): activations between them
    # stay float
    weights_only: bool = False

    @property
    def served(self) -> OnnxModel | TorchScriptModel:
        """The model the registry gets: int8 when it ships, else the float model."""
        return self.int8_model or self.float_model

    def fp32_instead(self, why: str) -> Quantized:
        """The fp32 export ships in place of the int8 model, for the reason given."""
        return replace(self, int8_model=None, method="fp32", why=why)

    @property
    def params(self) -> dict[str, str]:
        """For the quantize stage's run: what ships and why."""
        return {"method": self.method, "why": self.why[:500]}

    @property
    def metrics(self) -> dict[str, float]:
        """For the quantize stage's run: the export's and int8's error, and the measured choice."""
        out = {"export_max_abs_diff": self.export_max_abs_diff}
        if self.int8_max_abs_diff is not None:
            out["int8_max_abs_diff"] = self.int8_max_abs_diff
        return out | (self.choice.metrics() if self.choice else {})


def measure_choice(
    fp32: OnnxModel | TorchScriptModel,
    int8: OnnxModel | TorchScriptModel,
    X: np.ndarray,
    batch: int,
    calls: int = 30,
    seconds: float = 0.5,
) -> Choice:
    """Bytes of both files, and the median latency of each at `batch` rows per call: at least
    `calls` pairs of calls, more until `seconds` have passed (at most 1,000), in alternating
    order (fp32, int8, int8, fp32, ...), so that both see the same load on a busy machine.
    The measuring stops at a look (`LOOKS` pairs) where the pairs already decide it either way
    (`settled`): a clear choice costs 100 pairs, a close one runs on. Where the int8 file is no
    smaller, its size decides: `calls` pairs measure both latencies for the record, no more."""
    if len(int8.file_bytes) >= len(fp32.file_bytes):
        seconds = 0.0
    rows = np.asarray(X[np.arange(batch) % len(X)])
    predict = {"fp32": fp32.predictor(), "int8": int8.predictor()}
    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    for fmt in predict:  # warm-up
        predict[fmt](rows)
    started, slower = time.perf_counter(), 0
    while len(times["fp32"]) < calls or (
        time.perf_counter() - started < seconds and len(times["fp32"]) < 1000
    ):
        for fmt in ("fp32", "int8") if len(times["fp32"]) % 2 else ("int8", "fp32"):
            start = time.perf_counter()
            predict[fmt](rows)
            times[fmt].append(time.perf_counter() - start)
        pairs = len(times["fp32"])
        slower += times["int8"][-1] > times["fp32"][-1] * (1 + SLOWER_BY)
        if pairs in LOOKS and pairs >= calls and settled(slower, pairs):
            break
    ms = {fmt: float(np.median(t)) * 1e3 for fmt, t in times.items()}
    return Choice(
        batch,
        Measured(len(fp32.file_bytes), ms["fp32"]),
        Measured(len(int8.file_bytes), ms["int8"]),
        (slower, len(times["int8"])),
    )


LOOKS = (100, 200, 400)  # pairs at which the measuring may stop early


def settled(slower: int, pairs: int) -> bool:
    """Whether int8 took longer in so many or so few of the pairs that more pairs would not
    change the call: a sign test either way at a tenth of `SLOWER_P`, so that the three early
    looks add little to how often equally fast formats are called "slower"."""
    from scipy.stats import binomtest

    test = binomtest(slower, pairs, 0.5)  # two-sided: either way
    return bool(test.pvalue < SLOWER_P / 10)


def agreement(
    a: OnnxModel | TorchScriptModel, b: OnnxModel | TorchScriptModel, X: np.ndarray
) -> float | None:
    """The fraction of rows of `X` on which two classifiers answer the same class; None for a
    model of one output (a regression)."""
    out_a = predict_batched(a.predictor(), X)
    if out_a.ndim != 2 or out_a.shape[1] < 2:
        return None
    out_b = predict_batched(b.predictor(), X)
    return float((out_a.argmax(axis=1) == out_b.argmax(axis=1)).mean())


def ship(
    q: Quantized,
    X: np.ndarray,
    batch: int,
    agree_on: np.ndarray | None = None,
    min_agreement: float = 0.0,
    fmt: str = "measured",
    calibration: np.ndarray | None = None,
) -> Quantized:
    """What ships, by the rule of `Choice.int8_ships`, measured on rows of `X` (`fmt` fp32 or
    int8: that format, the measurement logged all the same); with `agree_on`, int8 must also
    answer as the fp32 export on `min_agreement` of those rows. Where it does not and the int8
    is ONNX Runtime's static one, the int8 of its weighted ops alone, then with the layers whose
    int8 costs the agreement most left in fp32 (`restored_int8`, with `calibration` rows for the
    scales), each measured against fp32 by the same rule: the first that ships."""
    int8 = q.int8_model
    if int8 is None:
        return replace(q, why="quantization off (compress.quantize.enabled: false): fp32 ships")
    choice = measure_choice(q.float_model, int8, X, batch)
    if fmt == "measured":
        int8_ships, why = choice.int8_ships, choice.why(q.method)
    else:
        int8_ships = fmt == "int8"
        why = f"{fmt} ships: compress.quantize.format={fmt}; measured: {choice.measured(q.method)}"
    q = replace(q, int8_candidate=int8, choice=choice, why=why)
    if not int8_ships or agree_on is None:
        return q if int8_ships else q.fp32_instead(q.why)
    agreed = agreement(q.float_model, int8, agree_on)
    if agreed is None or agreed >= min_agreement:
        return q
    rows = f"{len(agree_on):,} training rows"
    refused = (
        f"int8 answers as fp32 on only {100 * agreed:.1f} % of {rows} "
        f"(compress.quantize.min_agreement {min_agreement:g})"
    )
    missed = []  # restorations that agree but do not ship
    fp32 = q.float_model
    if calibration is not None and q.method == "static" and isinstance(fp32, OnnxModel):
        judge = _agreement_judge(fp32, agree_on, min_agreement)
        for found in restored_int8(fp32, judge, calibration):
            tried = with_fp32_layers(
                q, found.model, found.fp32_layers, X, batch, fmt, found.weights_only
            )
            if tried.int8_model is not None and tried.choice is not None:
                measured = tried.choice.measured("static") if fmt == "measured" else tried.why
                return replace(
                    tried,
                    why=f"int8 ships {found.how}, where it answers as fp32 on "
                    f"{100 * found.verdict:.1f} % of {rows} (all ops in int8: "
                    f"{100 * agreed:.1f} %, below compress.quantize.min_agreement "
                    f"{min_agreement:g}): {measured}",
                )
            missed.append(
                f"{found.how} it answers so on {100 * found.verdict:.1f} %, but {tried.why}"
            )
    detail = "; ".join(missed) if missed else q.why.removeprefix("int8 ships: ")
    return q.fp32_instead(f"fp32 ships, {refused}; {detail}")


def with_fp32_layers(
    q: Quantized,
    model: OnnxModel,
    kept: Sequence[str],
    X: np.ndarray,
    batch: int,
    fmt: str,
    weights_only: bool = False,
) -> Quantized:
    """`q` with `model` (its int8 with the weighted nodes `kept` left in fp32; `weights_only`:
    of the weighted ops alone) as the int8, measured against fp32 by the rule of `ship` (no
    agreement asked: the caller checked it)."""
    method = "static" + (", weights only" if weights_only else "")
    method += f", {len(kept)} fp32" if kept else ""
    mixed = replace(
        q, int8_model=model, method=method, fp32_layers=tuple(kept), weights_only=weights_only
    )
    return ship(mixed, X, batch, fmt=fmt)


Requantize = Callable[[list[str]], OnnxModel]  # int8 with these weighted nodes left in fp32
Verdict = TypeVar("Verdict")


def requantizer(
    fp32: OnnxModel, calibration: np.ndarray, keep: Sequence[str] = (), weights_only: bool = False
) -> Requantize:
    """Static int8 of `fp32` remade with some weighted nodes in fp32 (`keep`, and those asked);
    `weights_only`: of the weighted ops alone."""

    def requantize(kept_fp32: list[str]) -> OnnxModel:
        exclude = [*keep, *kept_fp32]
        ops = WEIGHTED_OPS if weights_only else None
        int8 = quantize_onnx(fp32.onnx_bytes, calibration, static=True, exclude=exclude, ops=ops)
        return OnnxModel(int8, fp32.params, fp32.nonzeros, fp32.flops, fp32.padding)

    return requantize


def mixed_int8(
    fp32: OnnxModel,
    judge: Callable[[OnnxModel, list[str]], tuple[bool, float, Verdict]],
    requantize: Requantize,
    most: int = 16,
    skip: Sequence[str] = (),
) -> tuple[OnnxModel, Verdict, list[str]] | None:
    """Per-layer fallback, as Intel Neural Compressor's accuracy-aware tuning: each weighted
    node's cost measured by leaving it alone in fp32, then the costliest left in fp32 one more
    at a time until `judge` (model, the nodes in fp32 -> ok, score, its record) passes it: the
    smallest set found this way. The last node (a classifier's head, the usual one: its logits
    are the closest calls) is tried first, and where it passes alone no other is made. None
    when no set short of all of them passes, or the graph has one layer or more than `most`.
    `skip`: nodes already in fp32 in every model `requantize` makes (not tried again)."""
    nodes = [n for n in weighted_nodes(fp32.onnx_bytes) if n not in skip]
    if not 2 <= len(nodes) <= most:
        return None
    models = {nodes[-1]: requantize([nodes[-1]])}
    alone = {nodes[-1]: judge(models[nodes[-1]], [nodes[-1]])}
    if alone[nodes[-1]][0]:
        return models[nodes[-1]], alone[nodes[-1]][2], [nodes[-1]]
    for n in nodes[:-1]:
        models[n] = requantize([n])
        alone[n] = judge(models[n], [n])
    order = sorted(nodes, key=lambda n: alone[n][1], reverse=True)
    for k in range(1, len(nodes)):
        kept_fp32 = order[:k]
        if k == 1:
            model, (ok, _, verdict) = models[order[0]], alone[order[0]]
        else:
            model = requantize(kept_fp32)
            ok, _, verdict = judge(model, kept_fp32)
        if ok:
            return model, verdict, kept_fp32
    return None


@dataclass(frozen=True)
class Restored(Generic[Verdict]):
    """A static int8 of an fp32 graph that `judge` passed where the int8 of every op did not."""

    model: OnnxModel
    verdict: Verdict  # the judge's record
    fp32_layers: list[str]  # weighted nodes left in fp32
    weights_only: bool  # the weighted ops alone quantized

    @property
    def how(self) -> str:
        parts = ["with its weighted ops alone in int8"] if self.weights_only else []
        if self.fp32_layers:
            parts.append(f"with {', '.join(self.fp32_layers)} left in fp32")
        return " and ".join(parts)


def restored_int8(
    fp32: OnnxModel,
    judge: Callable[[OnnxModel, list[str]], tuple[bool, float, Verdict]],
    calibration: np.ndarray,
    keep: Sequence[str] = (),
    weights_only: bool = False,
    most: int = 16,
) -> Iterator[Restored[Verdict]]:
    """Static int8 of `fp32` that `judge` passes, where the int8 of all its ops did not, lazily:
    first the weighted ops alone in int8 (MatMul, Gemm, Conv: the ops that make the file smaller),
    activations between them left float, unless `weights_only` already; then the per-layer
    fallback (`mixed_int8`; `keep`: nodes in fp32 already). A caller takes the first that also
    ships (smaller, no slower), as the per-layer fallback costs a requantization per layer.

    Why the weighted ops alone: a Hugging Face BERT's attention adds its mask (-3.4e38 at padded
    positions) and takes a softmax, and uint8 activations there collapse it (the targets grid's
    BERT, 4 layers, hidden 128: all ops in int8 answered as fp32 on 16.6 % of 1,024 training
    rows, one class for every row; with Add or Softmax quantized too, 16.6 %; the weighted ops
    alone, 99.1 %, 96.30 % test accuracy against fp32's 96.35 %, 938 against 3,245 KB, 199.2
    against 198.5 ms at batch 256). Not the default, as float activations between the weighted
    ops cost time: on the grid's ResNet1d-32 7.15 against 2.12 ms at batch 256, CNN1d 6.1
    against 1.2 ms, the digits MLP 0.30 against 0.19 ms (all ops in int8)."""
    if not weights_only:
        model = requantizer(fp32, calibration, keep, weights_only=True)([])
        ok, _, verdict = judge(model, [])
        if ok:
            yield Restored(model, verdict, [], True)
    found = mixed_int8(fp32, judge, requantizer(fp32, calibration, keep, weights_only), most, keep)
    if found is not None:
        yield Restored(found[0], found[1], found[2], weights_only)


def _agreement_judge(
    fp32: OnnxModel, rows: np.ndarray, min_agreement: float
) -> Callable[[OnnxModel, list[str]], tuple[bool, float, float]]:
    """`restored_int8`'s judge for the quantize stage: answers as `fp32` on `min_agreement`."""

    def judge(model: OnnxModel, kept: list[str]) -> tuple[bool, float, float]:
        agreed = agreement(fp32, model, rows)
        share = 1.0 if agreed is None else agreed
        return share >= min_agreement, share, share

    return judge


def agreeing_int8(
    fp32: OnnxModel, rows: np.ndarray, min_agreement: float, calibration: np.ndarray
) -> Restored[float] | None:
    """The first static int8 of `fp32` that `restored_int8` finds answering as it on
    `min_agreement` of `rows`. The classifier's own layer is the usual one on CNNs: on the
    targets grid's ResNet1d students, int8 agreed on 92.6-93.4 % of the rows, 99.2 % with the
    final Gemm alone in fp32, and that file was no bigger; a BERT's attention is another."""
    judge = _agreement_judge(fp32, rows, min_agreement)
    return next(iter(restored_int8(fp32, judge, calibration)), None)


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


_REGISTRIES: dict[int, Any] = {}  # opset -> torchlib's op registry, built once per process


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

    def from_torchlib(cls: Any, opset_version: int = _registration._constants.TORCHLIB_OPSET):
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
    """Float ONNX with a dynamic batch axis, as bytes: float rows by `_export_traced` where it
    checks out, else (token ids, masks, what the trace refuses) the dynamo exporter. `example`:
    the data's rows, whose dtype the graph's input takes (int64 token ids: an int64 input), or
    the width of float32 rows. Token ids `[N, T]` get a dynamic sequence axis where the model
    allows it (the exporter decides: `Dim.AUTO`), else the data's T. A model of rows with
    attention masks folded in (`masked`: tasks/compress/masks.py) takes `input_ids` and
    `attention_mask`."""
    model = model.cpu().eval()
    rows = example_rows(example, 2)
    if rows.is_floating_point() and not getattr(model, "masked", False):
        traced = _export_traced(model, example)
        if traced is not None:
            return lean_onnx(traced)
    reuse_torchlib_registry()
    axes: dict[int, object] = {0: "batch"}
    if rows.dim() == 2 and not rows.is_floating_point():  # token ids: any length, if it can
        axes[1] = torch.export.Dim.AUTO
    args: tuple[torch.Tensor, ...] = (rows,)
    names, shapes = [INPUT_NAME], [axes]
    if getattr(model, "masked", False):  # ids and their mask, as two inputs
        model, args, names = _IdsAndMask(model), unfold_tensor(rows), [IDS, MASK]
        axes = {0: torch.export.Dim("batch"), 1: torch.export.Dim.AUTO}
        shapes = [axes, axes]
    for name in ("torch.onnx", "onnxscript"):  # onnxscript: constant folding's failed attempts
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            args,
            input_names=names,
            output_names=["logits"],
            dynamic_shapes=tuple(shapes),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    assert program is not None  # dynamo=True returns the ONNXProgram
    proto = program.model_proto
    _pin_fixed_axes(proto, getattr(program.exported_program, "range_constraints", {}))
    return lean_onnx(proto.SerializeToString())


TRACED_OPSET = 20  # what the dynamo exporter writes here (torch 2.13): the same ops either way


def _export_traced(model: nn.Module, example: int | np.ndarray) -> bytes | None:
    """Float rows through PyTorch's TorchScript exporter (`dynamo=False`), checked; None where it
    cannot be trusted, and the dynamo exporter takes over. It traces one forward pass: a small
    ResNet1d exports in 0.03 s against 1.1-2.5 s through `torch.export` (a drop-only target
    exports a dozen students). torch calls it deprecated, so: a tracer warning (a tensor turned
    into a Python value: a branch the trace would freeze) or any error refuses it, and the graph
    must answer 3 rows, a batch size it was not traced at, as the model does."""
    rows = example_rows(example, 2)
    check = example_rows(example, 3)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", torch.jit.TracerWarning)
            torch.onnx.export(
                model,
                (rows,),
                buffer,  # type: ignore[arg-type]  # the TorchScript exporter writes to files too
                input_names=[INPUT_NAME],
                output_names=["logits"],
                dynamic_axes={INPUT_NAME: {0: "batch"}, "logits": {0: "batch"}},
                opset_version=TRACED_OPSET,
                dynamo=False,
            )
        got = OnnxModel(buffer.getvalue(), 0, 0).predictor()(check.numpy())
        with torch.inference_mode():
            want = model(check).numpy()
    except Exception:  # noqa: BLE001 -- any failure: the dynamo exporter decides
        return None
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-4):
        return None
    return buffer.getvalue()


class _IdsAndMask(nn.Module):
    """A model of folded rows (masks.py) as one of `input_ids` and `attention_mask`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(fold_tensor(input_ids, attention_mask))


def _pin_fixed_axes(proto, ranges: dict) -> None:
    """An axis left to the exporter that the model fixed (its range one value: a Linear over the
    flattened sequence) keeps a symbolic name in the ONNX input: give it its length, so the
    graph says what the model takes."""
    fixed = {str(s): int(r.lower) for s, r in ranges.items() if r.lower == r.upper}
    for value in [*proto.graph.input, *proto.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in fixed:
                dim.dim_value = fixed[dim.dim_param]


def input_axes(model: OnnxModel | TorchScriptModel) -> list[int | None]:
    """The served graph's input axes: a length, or None for a dynamic one (batch, sequence).
    A TorchScript model is traced: only its batch is known to vary."""
    if not isinstance(model, OnnxModel):
        return [None]
    shape = model.session().get_inputs()[0].shape
    return [n if isinstance(n, int) else None for n in shape]


class _Rows:
    """onnxruntime CalibrationDataReader over calibration rows, one small batch at a time, in
    their dtype (int64 token ids for a graph whose input is int64)."""

    def __init__(self, X: np.ndarray, names: list[str], batch: int = 64) -> None:
        self._batches = iter([X[i : i + batch] for i in range(0, len(X), batch)])
        self._names = names

    def get_next(self) -> dict[str, np.ndarray] | None:
        rows = next(self._batches, None)
        if rows is None:
            return None
        if self._names == [IDS, MASK]:  # folded rows (masks.py) into both inputs
            return dict(zip(self._names, unfold(rows), strict=True))
        return {self._names[0]: rows}


def quantize_onnx(
    float_bytes: bytes,
    X_calib: np.ndarray,
    static: bool,
    exclude: Sequence[str] = (),
    ops: Sequence[str] | None = None,
) -> bytes:
    """int8 ONNX of `float_bytes`; `exclude`: nodes (of `weighted_nodes`) left in fp32; `ops`:
    the op types static int8 quantizes (None: every one ONNX Runtime can)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        raw, src, dst = Path(tmp) / "raw.onnx", Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        raw.write_bytes(float_bytes)
        _pre_process(raw, src)
        if static:
            with _root_log_level(logging.ERROR):  # per-channel notes on 1-D weights (norms)
                _quantize_static(src, dst, X_calib, list(exclude), ops)
        else:
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude))
        return lean_onnx(dst.read_bytes())


WEIGHTED_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")  # the ops int8 makes smaller


def weighted_nodes(float_bytes: bytes) -> list[str]:
    """The nodes of the graph `quantize_onnx` quantizes (after ORT's pre-processing) that hold a
    weight: what a per-layer fallback can leave in fp32, in graph order."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        raw, src = Path(tmp) / "raw.onnx", Path(tmp) / "float.onnx"
        raw.write_bytes(float_bytes)
        _pre_process(raw, src)
        graph = onnx.load(src).graph
    weights = {init.name for init in graph.initializer}
    return [
        node.name
        for node in graph.node
        if node.op_type in WEIGHTED_OPS and any(name in weights for name in node.input)
    ]


def _pre_process(raw: Path, src: Path) -> None:
    """The shape inference and graph optimizations ORT recommends before quantizing. Its symbolic
    shape inference gives up on some dynamic sequence axes (BERT's position ids: `Min(64, s27)`
    against `s27`), and then writes its work into the current directory: a graph whose input has
    a dynamic axis besides the batch gets ONNX's own shape inference instead. It also asserts on
    a Reshape to a computed shape (a traced `nn.Unflatten` of the batch: `_export_traced`), and
    then gets ONNX's too."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    (first,) = onnx.load(raw, load_external_data=False).graph.input[:1]
    dims = first.type.tensor_type.shape.dim
    if sum(d.HasField("dim_param") for d in dims) <= 1:
        with contextlib.suppress(Exception):  # its own assertions: ONNX's shape inference then
            quant_pre_process(raw, src)
            return
    quant_pre_process(raw, src, skip_symbolic_shape=True)


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


def _quantize_static(
    src: Path, dst: Path, X_calib: np.ndarray, exclude: list[str], ops: Sequence[str] | None
) -> None:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    names = [i.name for i in onnx.load(str(src), load_external_data=False).graph.input]
    quantize_static(
        src,
        dst,
        _Rows(X_calib, names),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        # 7-bit weights: ORT's u8s8 kernels on x86 without VNNI (AVX2, AVX-512) add pairs of
        # products in int16, which saturates with 8-bit weights. Measured here (AVX2): a random
        # 64-512-512-10 MLP's int8 answers agreed with fp32 on 96.9 % of rows, 99.1 % with
        # reduce_range; the served graph's logits were 0.053 off its own QDQ arithmetic, and
        # within float rounding of it with reduce_range
        reduce_range=True,
        nodes_to_exclude=exclude,
        **({"op_types_to_quantize": list(ops)} if ops is not None else {}),
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
    """Static int8 in ONNX Runtime (scales calibrated on 512 training rows); `ship` decides
    whether it ships."""
    if not cfg.enabled:
        return Quantized(e.onnx, None, e.diff, None, "none")
    int8_bytes = quantize_onnx(e.onnx.onnx_bytes, scale_rows(X_train, seed), static=True)
    int8 = OnnxModel(int8_bytes, *e.counts, padding=e.onnx.padding)
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
    """The model exported (checked against PyTorch on `X_test`), its int8 made, and what ships
    chosen (`ship`: measured size and latency, int8's agreement with fp32 on training rows)."""
    agree_on = calibration_rows(X_train, 1024, seed + 1)  # label-free: int8 vs fp32 answers
    return ship(
        exported_and_int8(model, X_test, X_train, cfg, seed),
        X_test,
        cfg.batch,
        agree_on,
        cfg.min_agreement,
        cfg.format,
        scale_rows(X_train, seed),
    )


def scale_rows(X_train: np.ndarray, seed: int) -> np.ndarray:
    """The 512 training rows static int8's activation scales are calibrated on."""
    return calibration_rows(X_train, 512, seed)


def exported_and_int8(
    model: nn.Module, X_test: np.ndarray, X_train: np.ndarray, cfg: QuantizeConfig, seed: int
) -> Quantized:
    """The float export (checked against PyTorch on `X_test`) and the int8 made from it in the
    configured runtime, as `int8_model`: nothing measured, nothing chosen (`ship` does that)."""
    params, nonzeros = count_params(model)
    counts = (params, nonzeros, flops_per_row(model, X_test))
    float_model = OnnxModel(export_onnx(model, X_test), *counts, padding=padding_of(model))
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

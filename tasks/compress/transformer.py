"""Transformer blocks: attention heads, feed-forward width and depth, cut and re-fitted.

Torch-Pruning's tracer is slow on Hugging Face models and wrong about their attention (its
geometry lives in Python attributes and the config, not in the graph), so blocks are found by
their structure instead, through one adapter per attention layout (duck-typed on attributes):

| layout | attention module (q/k/v, output)              | a head's units                   |
|--------|------------------------------------------------|----------------------------------|
| bert   | `self.{query,key,value}`, `output.dense`       | rows of q/k/v, columns of dense  |
| gpt2   | fused `c_attn`, `c_proj` (`Conv1D`, `[in, out]`) | columns of c_attn, rows of c_proj |
| qkvo   | `{q,k,v}_proj`, `o_proj`/`out_proj` (ViT, Llama) | rows of q/k/v, columns of o_proj |
| timm   | fused `qkv`, `proj`, `num_heads`/`head_dim`    | rows of qkv, columns of proj     |

and a feed-forward table relative to the block (`intermediate.dense`/`output.dense`, `mlp.c_fc`/
`mlp.c_proj`, `mlp.fc1`/`mlp.fc2`, gated `mlp.{gate,up}_proj`/`mlp.down_proj`). A block is the
element of a ModuleList / Sequential that holds an attention module; its list is a *stack*.

Before an attention (or feed-forward) module is offered for narrowing, a probe cuts one head
(one unit) on a copy and calls it on the inputs it receives in the model: the result must equal
the uncut module's with that head's output-projection columns zeroed. A module whose forward
hard-codes its width (timm's original `reshape(B, N, C)`) or keeps geometry the adapter does not
update fails it and is refused with the reason; an attention-like module no adapter knows (a
hand-written one that `.view`s into heads) is refused too (`unsupported`, `describe`), never cut.

Groups (`transformer_groups`), each kept units + a ridge least-squares re-fit of its reader from
what the student computes to what the teacher's same layer computes (width.py's normal
equations), in execution order:
- heads: h' whole heads of an attention layer (q/k/v rows and output columns together) by the
  energy of their contribution through the output projection; the output projection re-fitted
  from the kept heads' context vectors to the teacher's attention output (before the residual);
- ffn: k intermediate units (pivoted QR on the PCA of their activations, or activation energy
  times output-weight norm), the down projection re-fitted to the teacher's feed-forward output;
- depth: whole layers, the least contributing first (the change of the model's output when the
  layer alone is skipped, on calibration rows); the feed-forward output projection of the layer
  before a dropped run is re-fitted to also write what the dropped layers added to the residual
  stream (post-LN blocks: to the input of the last dropped layer's norm, whose weights it takes).
Every reader downstream of a cut is re-fitted too, so later layers correct earlier errors.

What transformers 5.25 can express in a config (checked on the installed code, and at run time by
rebuilding the model from its changed config on the meta device and comparing the geometry):
- feed-forward width: one `intermediate_size` (GPT-2: `n_inner`) for all layers of a model;
- heads: `num_attention_heads` for all layers; the head size is `config.head_dim` only where the
  class reads it (ViT, Llama-style); BERT's `attention_head_size` and GPT-2's `head_dim` are
  `hidden_size // num_attention_heads`, and `config.pruned_heads` / `prune_heads` are gone in 5.x:
  a BERT or GPT-2 head cut cannot survive `save_pretrained` -> `from_pretrained`;
- depth: `num_hidden_layers` (GPT-2: `n_layer`), plus `layer_types` when the config has one;
  `layer_idx` of the kept layers is renumbered, and GPT-2's `scale_attn_by_inverse_layer_idx`
  (the scaling depends on it) is folded into the query weights so the logits stay the same.
So in a Hugging Face model every group is *uniform across the layers of a stack*: one width for
all layers' heads, one for all layers' feed-forward units (each layer keeps its own best units,
only the count is shared), and a group that its config cannot express is not reducible, with the
reason. A model without a config (timm-style blocks) gets one heads and one ffn group per layer.
After every cut the module attributes and the config are updated; `config_mismatch` rebuilds the
model from its config and compares every parameter's shape.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.linalg
import torch
from torch import nn

from distill.tasks.compress.graph import Group, no_fastpath, trace
from distill.tasks.compress.memo import remembered
from distill.tasks.compress.pca import Basis, Moments
from distill.tasks.compress.width import _NormalEquations, batches

HEAD_ATTRS = ("num_attention_heads", "num_heads", "n_heads", "n_head", "heads")
# a uniform group's name: `<stack>.each.<path in a layer>` (MLflow keys take no `*`)
EACH = "each"
FFN_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "mlp_dim")  # config width keys

# --- projections: nn.Linear (weight [out, in]) and transformers' Conv1D (weight [in, out]) ------


def _is_conv1d(m: object) -> bool:
    w = getattr(m, "weight", None)
    nf, nx = getattr(m, "nf", None), getattr(m, "nx", None)
    return isinstance(w, torch.Tensor) and isinstance(nf, int) and tuple(w.shape) == (nx, nf)


def is_projection(m: object) -> bool:
    return isinstance(m, nn.Linear) or _is_conv1d(m)


def weight_of(m: nn.Module) -> torch.Tensor:
    """(out, in) of a projection, whichever way it stores it."""
    return m.weight.T if _is_conv1d(m) else m.weight


def _keep_out(m: nn.Module, idx: torch.Tensor) -> None:
    with torch.no_grad():
        if _is_conv1d(m):
            m.weight = nn.Parameter(m.weight[:, idx].clone())
            m.nf = len(idx)
        else:
            m.weight = nn.Parameter(m.weight[idx].clone())
            m.out_features = len(idx)
        if m.bias is not None:
            m.bias = nn.Parameter(m.bias[idx].clone())


def _keep_in(m: nn.Module, idx: torch.Tensor) -> None:
    with torch.no_grad():
        if _is_conv1d(m):
            m.weight = nn.Parameter(m.weight[idx].clone())
            m.nx = len(idx)
        else:
            m.weight = nn.Parameter(m.weight[:, idx].clone())
            m.in_features = len(idx)


def _zero_in(m: nn.Module, idx: torch.Tensor) -> None:
    with torch.no_grad():
        if _is_conv1d(m):
            m.weight[idx] = 0
        else:
            m.weight[:, idx] = 0


def _set_map(m: nn.Module, W: torch.Tensor, b: torch.Tensor | None) -> None:
    """Write a (out, in) weight and bias into a projection."""
    dtype = m.weight.dtype
    m.weight = nn.Parameter((W.T if _is_conv1d(m) else W).contiguous().to(dtype))
    if b is not None:
        m.bias = nn.Parameter(b.to(dtype))


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


# --- layouts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attention:
    """One attention layer: where each head's units are. Paths are relative to `path`."""

    path: str  # the module whose call covers q/k/v and the output projection
    layout: str  # bert | gpt2 | qkvo | timm
    heads: int
    head_dim: int
    writers: tuple[tuple[str, int], ...]  # (projection, blocks of heads·head_dim outputs: 1 or 3)
    reader: str  # the output projection
    attrs: tuple[tuple[str, str, str], ...]  # (module, attribute, "heads" | "width") set on a cut

    def head_units(
        self, heads: list[int], blocks: int = 1, total: int | None = None
    ) -> torch.Tensor:
        """Output indices of these heads in a projection writing `blocks` [total·d] blocks."""
        d, total = self.head_dim, self.heads if total is None else total
        return torch.tensor(
            [s * total * d + h * d + i for s in range(blocks) for h in heads for i in range(d)],
            dtype=torch.long,
        )


@dataclass(frozen=True)
class FFN:
    """The feed-forward units of a block; paths relative to the block."""

    writers: tuple[str, ...]  # projections that write the units (up; gate and up)
    reader: str  # the down projection
    width: int
    norm: str | None  # post-LN blocks: the norm after the residual add (BERT); None: pre-LN


Recognized = Attention | str | None  # a layout, why a recognized module cannot be cut, or no match


def _ints(*xs: object) -> bool:
    return all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in xs)


def _bert(path: str, m: nn.Module) -> Recognized:
    s, out = getattr(m, "self", None), getattr(getattr(m, "output", None), "dense", None)
    if not isinstance(s, nn.Module) or out is None:
        return None
    q, k, v = (getattr(s, n, None) for n in ("query", "key", "value"))
    heads, d = getattr(s, "num_attention_heads", None), getattr(s, "attention_head_size", None)
    if not all(isinstance(p, nn.Linear) for p in (q, k, v, out)) or not _ints(heads, d):
        return None
    if not q.out_features == k.out_features == v.out_features == out.in_features == heads * d:
        return "query/key/value widths differ from num_attention_heads x attention_head_size"
    writers = (("self.query", 1), ("self.key", 1), ("self.value", 1))
    attrs = (("self", "num_attention_heads", "heads"), ("self", "all_head_size", "width"))
    return Attention(path, "bert", heads, d, writers, "output.dense", attrs)


def _gpt2(path: str, m: nn.Module) -> Recognized:
    c_attn, c_proj = getattr(m, "c_attn", None), getattr(m, "c_proj", None)
    heads, d = getattr(m, "num_heads", None), getattr(m, "head_dim", None)
    if not (_is_conv1d(c_attn) and _is_conv1d(c_proj) and _ints(heads, d)):
        return None
    if hasattr(m, "q_attn"):
        return "cross-attention (separate q_attn, fused key/value c_attn)"
    if c_attn.nf != 3 * heads * d or c_proj.nx != heads * d:
        return "c_attn/c_proj widths differ from 3 x num_heads x head_dim"
    attrs = (("", "num_heads", "heads"), ("", "split_size", "width"))
    return Attention(path, "gpt2", heads, d, (("c_attn", 3),), "c_proj", attrs)


def _qkvo(path: str, m: nn.Module) -> Recognized:
    q, k, v = (getattr(m, f"{n}_proj", None) for n in "qkv")
    o = getattr(m, "o_proj", None) or getattr(m, "out_proj", None)
    attr = next((a for a in HEAD_ATTRS if _ints(getattr(m, a, None))), None)
    if not all(isinstance(p, nn.Linear) for p in (q, k, v, o)) or attr is None:
        return None
    heads = getattr(m, attr)
    d = getattr(m, "head_dim", None) or q.out_features // heads
    if k.out_features != q.out_features or v.out_features != q.out_features:
        return "grouped-query attention (fewer key/value heads than query heads)"
    if q.out_features != heads * d or o.in_features != heads * d:
        return f"q_proj/o_proj widths differ from {attr} x head_dim"
    o_name = "o_proj" if getattr(m, "o_proj", None) is o else "out_proj"
    attrs = [("", attr, "heads")]
    if _ints(getattr(m, "num_key_value_heads", None)):
        attrs.append(("", "num_key_value_heads", "heads"))
    writers = (("q_proj", 1), ("k_proj", 1), ("v_proj", 1))
    return Attention(path, "qkvo", heads, d, writers, o_name, tuple(attrs))


def _timm(path: str, m: nn.Module) -> Recognized:
    qkv, proj, heads = (
        getattr(m, "qkv", None),
        getattr(m, "proj", None),
        getattr(m, "num_heads", None),
    )
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and _ints(heads)):
        return None
    d = getattr(m, "head_dim", None) or qkv.out_features // (3 * heads)
    if qkv.out_features != 3 * heads * d or proj.in_features != heads * d:
        return "qkv/proj widths differ from 3 x num_heads x head_dim"
    norm = getattr(m, "norm", None)
    if isinstance(norm, nn.Module) and any(True for _ in norm.parameters()):
        return "a norm over all heads' outputs before proj (scale_norm)"
    attrs = [("", "num_heads", "heads")]
    if _ints(getattr(m, "attn_dim", None)):
        attrs.append(("", "attn_dim", "width"))
    return Attention(path, "timm", heads, d, (("qkv", 3),), "proj", tuple(attrs))


# attention adapters, tried in order on every module
ATTENTIONS: tuple[Callable[[str, nn.Module], Recognized], ...] = (_bert, _gpt2, _qkvo, _timm)

# feed-forward adapters relative to a block: (writers, reader, post-residual norm or None)
FFNS: tuple[tuple[tuple[str, ...], str, str | None], ...] = (
    (("intermediate.dense",), "output.dense", "output.LayerNorm"),  # BERT family (post-LN)
    (("mlp.c_fc",), "mlp.c_proj", None),  # GPT-2 (Conv1D)
    (("mlp.fc1",), "mlp.fc2", None),  # ViT (transformers 5), timm
    (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", None),  # gated (Llama family)
)


def _ffn(block: nn.Module) -> FFN | None:
    for writers, reader, norm in FFNS:
        try:
            ws = [block.get_submodule(w) for w in writers]
            r = block.get_submodule(reader)
        except AttributeError:
            continue
        if not all(is_projection(p) for p in (*ws, r)):
            continue
        width = weight_of(r).shape[1]
        if any(weight_of(w).shape[0] != width for w in ws):
            continue
        try:
            has_norm = norm is not None and isinstance(block.get_submodule(norm), nn.LayerNorm)
        except AttributeError:
            has_norm = False
        return FFN(writers, reader, width, norm if has_norm else None)
    return None


# --- discovery -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    path: str
    stack: str | None  # the ModuleList / Sequential holding it (None: in no list)
    index: int  # its position there
    origin: int  # its position in the teacher (differs after a depth cut)
    attention: tuple[Attention, ...]
    ffn: FFN | None


@dataclass
class Found:
    blocks: list[Block]
    owner: str | None  # the Hugging Face model whose config describes the blocks (its path)
    refused: list[tuple[str, str, str]]  # (module path, class name, why it is not narrowed)

    def stacks(self) -> dict[str | None, list[Block]]:
        out: dict[str | None, list[Block]] = {}
        for b in self.blocks:
            out.setdefault(b.stack, []).append(b)
        return out


def _attention_like(m: nn.Module) -> bool:
    name = type(m).__name__.lower()
    if isinstance(m, nn.MultiheadAttention):
        return False  # the traced graph (tasks/compress/graph.py) handles it
    named = (
        "attention" in name or "attn" in name or any(_ints(getattr(m, a, None)) for a in HEAD_ATTRS)
    )
    return named and any(
        isinstance(c, (nn.Linear, nn.Conv1d)) or _is_conv1d(c) for c in m.modules()
    )


def _inside(path: str, root: str) -> bool:
    return root == "" or path == root or path.startswith(root + ".")


def _block_of(path: str, modules: dict[str, nn.Module]) -> tuple[str, str | None]:
    """The deepest ancestor (or the module itself) that is an element of a list of layers."""
    parts = path.split(".") if path else []
    for i in range(len(parts), 0, -1):
        parent = ".".join(parts[: i - 1])
        if isinstance(modules.get(parent), (nn.ModuleList, nn.Sequential)):
            return ".".join(parts[:i]), parent
    return (".".join(parts[:-1]) if parts else ""), None


def hf_owner(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The outermost Hugging Face model in the tree (has a config and save_pretrained)."""
    for name, m in model.named_modules():
        if hasattr(m, "save_pretrained") and hasattr(getattr(m, "config", None), "to_dict"):
            return name, m
    return None


def find(model: nn.Module) -> Found:
    """Transformer blocks anywhere in `model`, by structure (no tracing, no forward pass)."""
    modules = dict(model.named_modules())
    units: dict[str, Attention] = {}
    refused: list[tuple[str, str, str]] = []
    for name, m in modules.items():
        if any(_inside(name, u) for u in units) or any(_inside(name, r[0]) for r in refused):
            continue
        for recognize in ATTENTIONS:
            got = recognize(name, m)
            if isinstance(got, Attention):
                units[name] = got
                break
            if isinstance(got, str):
                refused.append((name, type(m).__name__, got))
                break
    known = list(units) + [r[0] for r in refused]
    unknown = [
        n
        for n, m in modules.items()
        if _attention_like(m) and not any(_inside(n, k) or _inside(k, n) for k in known)
    ]
    for n in unknown:
        if not any(o != n and _inside(o, n) for o in unknown):  # the innermost only
            why = "attention-like module of no known layout (heads not found): left whole"
            refused.append((n, type(modules[n]).__name__, why))
    by_block: dict[str, list[Attention]] = {}
    stacks: dict[str, str | None] = {}
    for name, att in units.items():
        block, stack = _block_of(name, modules)
        by_block.setdefault(block, []).append(att)
        stacks[block] = stack
    blocks = []
    for path, atts in by_block.items():
        stack = stacks[path]
        index = (
            list(modules[stack]._modules).index(path.rsplit(".", 1)[-1]) if stack is not None else 0
        )
        module = modules[path]
        origin = getattr(module, "_distill_origin", index)
        blocks.append(Block(path, stack, index, origin, tuple(atts), _ffn(module)))
    owner = hf_owner(model)
    return Found(blocks, owner[0] if owner else None, refused)


def holds_blocks(model: nn.Module) -> bool:
    return bool(find(model).blocks)


# --- looking inside a forward pass ---------------------------------------------------------------


class _Done(Exception):
    """Raised once every tapped tensor is in: the rest of the forward pass is skipped."""


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    return next(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))


def _tensor_out(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        if isinstance(getattr(out, key, None), torch.Tensor):
            return getattr(out, key)
    return out[0]


@torch.no_grad()
def taps(
    model: nn.Module, x: torch.Tensor, inputs: tuple[str, ...] = (), outputs: tuple[str, ...] = ()
) -> dict[tuple[str, str], torch.Tensor]:
    """{("in", name): what module `name` receives, ("out", name): what it returns} on `x`, as
    taken (copies: a later in-place op of the forward does not change them)."""
    got: dict[tuple[str, str], torch.Tensor] = {}
    want = len(set(inputs)) + len(set(outputs))
    handles = []

    def pre(name: str):
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            if ("in", name) not in got:
                got["in", name] = _first_tensor(args, kwargs).clone()
            if len(got) == want:
                raise _Done

        return hook

    def post(name: str):
        def hook(_m: nn.Module, _a: tuple, _k: dict, out: Any) -> None:
            if ("out", name) not in got:
                got["out", name] = _tensor_out(out).clone()
            if len(got) == want:
                raise _Done

        return hook

    try:
        for n in set(inputs):
            m = model.get_submodule(n)
            handles.append(m.register_forward_pre_hook(pre(n), with_kwargs=True))
        for n in set(outputs):
            m = model.get_submodule(n)
            handles.append(m.register_forward_hook(post(n), with_kwargs=True))
        with no_fastpath():
            model.eval()(x)
    except _Done:
        pass
    finally:
        for h in handles:
            h.remove()
    return got


# what a `FixedTaps` may hold: on the benchmark's BERT (4 layers, hidden 128, 28 tokens) a
# narrowing's teacher taps on 1,024 calibration rows are 176 MB; a larger model's batches past
# this are run again per request, as without the cache
FIXED_TAPS_BYTES = 512 * 2**20


class FixedTaps:
    """`taps` of a model that does not change (the teacher a student is re-fitted to) on the rows
    `X`, batch by batch as `batches(X, batch_size)` cuts them, every name in one forward pass and
    kept: a re-fit reads one reader at a time, and running the teacher up to each reader for
    every batch was most of the narrowing's time (the BERT's: ~4 teacher passes per batch where
    one does, and again for each of the plan's trial students on the same rows). Requests for
    other rows, batches or names, or past `max_bytes`, are run as `taps` runs them."""

    def __init__(
        self,
        model: nn.Module,
        X: np.ndarray,
        batch_size: int,
        inputs: tuple[str, ...] = (),
        outputs: tuple[str, ...] = (),
        max_bytes: int = FIXED_TAPS_BYTES,
    ) -> None:
        self.model, self.X, self.batch_size = model, X, batch_size
        self.inputs, self.outputs = tuple(dict.fromkeys(inputs)), tuple(dict.fromkeys(outputs))
        self.names = {("in", n) for n in inputs} | {("out", n) for n in outputs}
        self.max_bytes, self.held, self.per_batch = max_bytes, 0, 0
        self.kept: dict[int, dict[tuple[str, str], torch.Tensor]] = {}

    def on(
        self, X: np.ndarray, batch_size: int
    ) -> Callable[[int, torch.Tensor, tuple[str, ...], tuple[str, ...]], dict]:
        """`taps` for batch i of `X`: from the cache where it holds these rows, else run."""
        if X is not self.X or batch_size != self.batch_size:
            return lambda _i, xb, inputs=(), outputs=(): taps(self.model, xb, inputs, outputs)
        return self.get

    def get(
        self, i: int, xb: torch.Tensor, inputs: tuple[str, ...] = (), outputs: tuple[str, ...] = ()
    ) -> dict[tuple[str, str], torch.Tensor]:
        wanted = {("in", n) for n in inputs} | {("out", n) for n in outputs}
        got = self.kept.get(i)
        if got is not None and wanted <= got.keys():
            return got
        if self.held + self.per_batch > self.max_bytes or not wanted <= self.names:
            return taps(self.model, xb, inputs, outputs)
        got = taps(self.model, xb, self.inputs, self.outputs)
        size = sum(t.numel() * t.element_size() for t in got.values())
        self.per_batch = max(self.per_batch, size)
        if self.held + size <= self.max_bytes:
            self.held += size
            self.kept[i] = got
        return got


def teacher_taps(
    teacher: nn.Module, X: np.ndarray, batch_size: int, found: Found | None = None
) -> FixedTaps:
    """What `narrow`'s re-fits read of `teacher` on `X`: every attention's and feed-forward's
    output projection (reader) returns, and each layer's output (pre-LN) or what its
    feed-forward's norm receives (post-LN), where a kept layer absorbs dropped ones. `found`:
    the teacher's blocks, where the caller has them."""
    outputs: list[str] = []
    inputs: list[str] = []
    for b in (found or find(teacher)).blocks:
        outputs += [_join(a.path, a.reader) for a in b.attention]
        if b.ffn is not None:
            outputs.append(_join(b.path, b.ffn.reader))
            if b.ffn.norm is not None:
                inputs.append(_join(b.path, b.ffn.norm))
            else:
                outputs.append(b.path)
    return FixedTaps(teacher, X, batch_size, tuple(inputs), tuple(outputs))


def _calls(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, tuple[tuple, dict]]:
    """The (args, kwargs) each named module is called with (the first call)."""
    calls: dict[str, tuple[tuple, dict]] = {}
    handles = []
    for n in names:

        def hook(_m: nn.Module, args: tuple, kwargs: dict, n: str = n) -> None:
            # a cache object would grow on every call: the probe calls without it
            kw = {k: (None if hasattr(v, "get_seq_length") else v) for k, v in kwargs.items()}
            calls.setdefault(n, (args, kw))

        handles.append(model.get_submodule(n).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad(), no_fastpath():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return calls


def _output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with no_fastpath():
        return _tensor_out(model.eval()(x))


# --- cuts ----------------------------------------------------------------------------------------


def cut_heads(unit: nn.Module, att: Attention, keep: list[int]) -> None:
    """Keep these heads (indices into the current ones) of the attention module `unit`."""
    for rel, blocks in att.writers:
        _keep_out(unit.get_submodule(rel), att.head_units(keep, blocks))
    _keep_in(unit.get_submodule(att.reader), att.head_units(keep))
    for rel, attr, what in att.attrs:
        setattr(unit.get_submodule(rel), attr, len(keep) * (1 if what == "heads" else att.head_dim))


def cut_ffn(block: nn.Module, ffn: FFN, keep: list[int]) -> None:
    idx = torch.as_tensor(keep, dtype=torch.long)
    for rel in ffn.writers:
        _keep_out(block.get_submodule(rel), idx)
    _keep_in(block.get_submodule(ffn.reader), idx)


def _renumber(block: nn.Module, new: int) -> None:
    """Set `layer_idx` (caches, GPT-2's inverse-layer scaling) to the layer's new position.
    GPT-2 with `scale_attn_by_inverse_layer_idx` scales attention by 1/(layer_idx+1): the change
    is folded into the query weights, so the logits stay the same when rebuilt from the config."""
    for m in block.modules():
        old = getattr(m, "layer_idx", None)
        if not isinstance(old, int) or old == new:
            continue
        if getattr(m, "scale_attn_by_inverse_layer_idx", False) and _is_conv1d(
            getattr(m, "c_attn", None)
        ):
            c, q = (new + 1) / (old + 1), slice(0, m.split_size)
            with torch.no_grad():
                m.c_attn.weight[:, q] *= c
                m.c_attn.bias[q] *= c
            m.scaling = m.scaling * (old + 1) / (new + 1)
        m.layer_idx = new


def drop_layers(model: nn.Module, stack: str, keep: list[int]) -> None:
    """Keep only these layers (positions in the stack), in order."""
    lst = model.get_submodule(stack)
    items = list(lst._modules.items())
    kept = []
    for new, i in enumerate(sorted(keep)):
        key, m = items[i]
        if not hasattr(m, "_distill_origin"):
            m._distill_origin = i
        _renumber(m, new)
        kept.append((str(new) if key.isdigit() else key, m))
    rebuilt = (
        nn.ModuleList([m for _, m in kept])
        if isinstance(lst, nn.ModuleList)
        else nn.Sequential(OrderedDict(kept))
    )
    parent, _, attr = stack.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, rebuilt)


# --- the probe: does cutting one head (unit) equal zeroing its output? ---------------------------


@torch.no_grad()
def _probe(module: nn.Module, call: tuple[tuple, dict], zero: Callable, cut: Callable) -> str:
    """'' when `cut` on a copy gives what `zero` on another copy gives, else why not."""
    args, kwargs = call
    zeroed, narrowed = copy.deepcopy(module).eval(), copy.deepcopy(module).eval()
    zero(zeroed)
    try:
        cut(narrowed)
        got = _tensor_out(narrowed(*args, **kwargs))
    except Exception as err:  # noqa: BLE001 -- any failure means the module cannot be cut
        line = str(err).splitlines()[0] if str(err) else ""
        return f"its forward fails after a cut ({type(err).__name__}: {line[:160]})"
    want = _tensor_out(zeroed(*args, **kwargs))
    if got.shape != want.shape:
        return f"after a cut it returns {tuple(got.shape)} instead of {tuple(want.shape)}"
    err = (got - want).abs().max().item()
    if err > 1e-4 * (want.abs().max().item() + 1e-6):
        return f"after a cut it computes something else than with the unit zeroed (diff {err:.2g})"
    return ""


def probe(model: nn.Module, found: Found, example: torch.Tensor) -> dict[str, str]:
    """Why each attention module / block cannot be cut ('' when it can): keys are attention
    paths (heads) and `<block path>#ffn`."""
    names = [a.path for b in found.blocks for a in b.attention] + [
        b.path for b in found.blocks if b.ffn is not None
    ]
    calls = _calls(model, names, example)
    out: dict[str, str] = {}
    for b in found.blocks:
        for a in b.attention:
            if a.heads < 2:
                out[a.path] = "a single head"
            elif a.path not in calls:
                out[a.path] = "never called on the example rows"
            else:
                last = [a.heads - 1]
                out[a.path] = _probe(
                    model.get_submodule(a.path),
                    calls[a.path],
                    lambda m, a=a, last=last: _zero_in(
                        m.get_submodule(a.reader), a.head_units(last)
                    ),
                    lambda m, a=a: cut_heads(m, a, list(range(a.heads - 1))),
                )
        if b.ffn is not None:
            f = b.ffn
            if b.path not in calls:
                out[f"{b.path}#ffn"] = "never called on the example rows"
                continue
            out[f"{b.path}#ffn"] = _probe(
                model.get_submodule(b.path),
                calls[b.path],
                lambda m, f=f: _zero_in(m.get_submodule(f.reader), torch.tensor([f.width - 1])),
                lambda m, f=f: cut_ffn(m, f, list(range(f.width - 1))),
            )
    return out


# --- what a config can express -------------------------------------------------------------------


def _rel(path: str, owner: str) -> str:
    return path[len(owner) + 1 :] if owner and path.startswith(owner + ".") else path


def _rebuilt(owner: nn.Module, changes: dict[str, Any]) -> tuple[nn.Module | None, str]:
    """The owner's class built on the meta device from its config with `changes` (or why not)."""
    cfg = copy.deepcopy(owner.config)
    try:
        for k, v in changes.items():
            setattr(cfg, k, v)
        with torch.device("meta"), contextlib.redirect_stderr(None):
            return type(owner)(cfg), ""
    except Exception as err:  # noqa: BLE001 -- a config that cannot be built cannot express it
        return None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]


def _geometry(found: Found, stack: str | None) -> tuple[list[tuple[int, int]], list[int], int]:
    """(heads, head_dim) per attention, ffn widths, number of blocks of one stack."""
    blocks = found.stacks().get(stack, [])
    return (
        [(a.heads, a.head_dim) for b in blocks for a in b.attention],
        [b.ffn.width for b in blocks if b.ffn is not None],
        len(blocks),
    )


def _recipe(
    owner_path: str, owner: nn.Module, stack: str, kind: str, found: Found
) -> tuple[dict, str]:
    """({config key: what it holds ("heads" | "head_dim" | "width" | "layers")}, why not)."""
    cfg = owner.config
    rel_stack = _rel(stack, owner_path)
    heads, widths, n = _geometry(found, stack)
    if kind == "heads":
        h, d = heads[0]
        recipe = {"num_attention_heads": "heads", "head_dim": "head_dim"}
        if _ints(getattr(cfg, "num_key_value_heads", None)):
            recipe["num_key_value_heads"] = "heads"
        changes = {k: (h - 1 if w == "heads" else d) for k, w in recipe.items()}
        want = ([(h - 1, d)] * len(heads), widths, n)
        candidates = [(recipe, changes)]
    elif kind == "ffn":
        candidates = [({k: "width"}, {k: widths[0] - 1}) for k in FFN_KEYS if hasattr(cfg, k)]
        want = (heads, [widths[0] - 1] * len(widths), n)
    else:
        recipe, changes = {"num_hidden_layers": "layers"}, {"num_hidden_layers": n - 1}
        types = getattr(cfg, "layer_types", None)
        if isinstance(types, (list, tuple)) and len(types) == n:
            recipe["layer_types"], changes["layer_types"] = "layers", list(types[: n - 1])
        candidates = [(recipe, changes)]
        want = (
            heads[: len(heads) - len(heads) // n],
            widths[: len(widths) - len(widths) // n],
            n - 1,
        )
    why = f"{type(cfg).__name__} has no key for it"
    for recipe, changes in candidates:
        meta, err = _rebuilt(owner, changes)
        if meta is None:
            why = f"{type(cfg).__name__} with {changes} does not build: {err}"
            if kind == "heads":
                why = _mismatch(type(cfg).__name__, kind, changes, want, ([], [], 0))
            continue
        got = _geometry(find(meta), rel_stack)
        part = {"heads": 0, "ffn": 1}.get(kind, 2)  # the other cuts need not be expressed too
        if got[part] == want[part]:
            return recipe, ""
        why = _mismatch(type(cfg).__name__, kind, changes, want, got)
    return {}, why


def _mismatch(cfg: str, kind: str, changes: dict, want: tuple, got: tuple) -> str:
    if kind == "heads":
        h, d = want[0][0]
        rebuilt = f"{got[0][0][0]} heads of {got[0][0][1]}" if got[0] else "does not build"
        return (
            f"{cfg} cannot express {h} heads of {d} dims (rebuilt from {changes}: {rebuilt}; "
            "its head size is derived from hidden_size): the cut would not survive "
            "save_pretrained -> from_pretrained"
        )
    return f"{cfg} rebuilt from {changes} does not have the cut's shapes"


def loadable_only(model: nn.Module) -> bool:
    """`teacher.hf_loadable`: the model's cuts must stay what its config describes (a group
    with `unsaved` is then not reducible)."""
    return any(getattr(m, "hf_loadable", False) is True for m in model.modules())


def held_to_config(model: nn.Module, why: str, unsaved: str) -> str:
    """A group's `why_not`: its own reason, else, under `teacher.hf_loadable`, why its config
    cannot describe the cut."""
    if why or not unsaved or not loadable_only(model):
        return why
    return f"teacher.hf_loadable: {unsaved}"


def config_mismatch(model: nn.Module) -> str:
    """'' when the Hugging Face model in `model` rebuilt from its config has every parameter's
    shape (what from_pretrained needs), else the first difference."""
    owner = hf_owner(model)
    if owner is None:
        return ""
    meta, err = _rebuilt(owner[1], {})
    if meta is None:
        return err
    want = {n: tuple(p.shape) for n, p in meta.state_dict().items()}
    for n, p in owner[1].state_dict().items():
        if want.get(n) != tuple(p.shape):
            return f"{n}: {tuple(p.shape)} in the model, {want.get(n)} from its config"
    extra = set(want) - set(owner[1].state_dict())
    return f"{min(extra)}: only in the model rebuilt from its config" if extra else ""


def _configs(model: nn.Module) -> list[Any]:
    seen: dict[int, Any] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if hasattr(cfg, "to_dict"):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


# --- groups --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TGroup:
    """A group of the transformer engine: `width` heads, ffn units or layers, cut together.
    `members`: attention paths (heads), block paths (ffn, depth). `uniform`: one width for every
    layer of a stack (what a Hugging Face config can express)."""

    name: str
    kind: str  # heads | ffn | depth
    width: int
    members: tuple[str, ...]
    stack: str | None
    uniform: bool = False
    step: int = 1
    why_not: str = ""
    order: tuple[int, ...] = ()  # depth: stack positions, most contributing first
    recipe: tuple[tuple[str, str], ...] = ()  # config keys set on a cut, and what they hold
    unsaved: str = ""  # why its config cannot express a cut (cut in memory all the same)

    @property
    def reducible(self) -> bool:
        return not self.why_not


def _origin_path(b: Block, rel: str = "") -> str:
    """A path in the teacher's numbering (stable across depth cuts): group names use it."""
    if b.stack is None:
        return _join(b.path, rel)
    key = b.path.rsplit(".", 1)[-1]
    return _join(b.stack, str(b.origin) if key.isdigit() else key, rel)


def _rel_to(path: str, block: str) -> str:
    return (
        path[len(block) + 1 :]
        if block and path.startswith(block + ".")
        else ("" if path == block else path)
    )


def transformer_groups(
    model: nn.Module, X: np.ndarray | None = None, batch_size: int = 256, found: Found | None = None
) -> list[TGroup]:
    """The model's transformer groups, in execution order, each with why it cannot be reduced
    ('' when it can). With calibration rows `X`: the probe runs on `X[:2]` and the depth groups'
    `order` is measured (else layers go last first... kept first)."""
    found = found or find(model)
    checks = probe(model, found, torch.from_numpy(X[:2])) if X is not None else {}
    owner = hf_owner(model)
    groups: list[TGroup] = []
    for stack, blocks in found.stacks().items():
        uniform = owner is not None and stack is not None and _inside(stack, owner[0])
        groups += _stack_groups(model, stack, blocks, uniform, owner, found, checks)
    if X is not None:
        groups = [_with_order(model, g, X, batch_size) if g.kind == "depth" else g for g in groups]
    return groups


def _stack_groups(model, stack, blocks, uniform, owner, found, checks) -> list[TGroup]:
    out: list[TGroup] = []
    if stack is not None:
        lst = model.get_submodule(stack)
        why = ""
        if len(blocks) < 2:
            why = "a single layer"
        elif len(lst) != len(blocks) or len({type(b) for b in lst}) != 1:
            why = "its list holds other modules than the transformer layers"
        recipe: dict = {}
        unsaved = ""
        if not why and uniform:
            recipe, unsaved = _recipe(owner[0], owner[1], stack, "depth", found)
        members = tuple(b.path for b in blocks)
        out.append(
            TGroup(
                stack,
                "depth",
                len(blocks),
                members,
                stack,
                uniform,
                why_not=held_to_config(model, why, unsaved),
                order=tuple(range(len(blocks))),
                recipe=tuple(recipe.items()),
                unsaved=unsaved,
            )
        )
    if uniform:
        rels = sorted({_rel_to(a.path, b.path) for b in blocks for a in b.attention})
        for rel in rels:
            atts = [a for b in blocks for a in b.attention if _rel_to(a.path, b.path) == rel]
            why = next((checks[a.path] for a in atts if checks.get(a.path)), "")
            if not why and len({(a.heads, a.head_dim) for a in atts}) > 1:
                why = "layers have different head counts or sizes"
            if not why and atts[0].heads < 2:
                why = "a single head"
            recipe, unsaved = {}, ""
            if not why:
                recipe, unsaved = _recipe(owner[0], owner[1], stack, "heads", found)
            out.append(
                TGroup(
                    _join(stack, EACH, rel),
                    "heads",
                    atts[0].heads,
                    tuple(a.path for a in atts),
                    stack,
                    True,
                    why_not=held_to_config(model, why, unsaved),
                    recipe=tuple(recipe.items()),
                    unsaved=unsaved,
                )
            )
        ffns = [b for b in blocks if b.ffn is not None]
        if ffns:
            why = next((checks[f"{b.path}#ffn"] for b in ffns if checks.get(f"{b.path}#ffn")), "")
            if not why and (len(ffns) != len(blocks) or len({b.ffn.width for b in ffns}) > 1):
                why = "layers have different feed-forward widths"
            recipe, unsaved = {}, ""
            if not why:
                recipe, unsaved = _recipe(owner[0], owner[1], stack, "ffn", found)
            name = _join(stack, EACH, ffns[0].ffn.writers[0])
            out.append(
                TGroup(
                    name,
                    "ffn",
                    ffns[0].ffn.width,
                    tuple(b.path for b in ffns),
                    stack,
                    True,
                    why_not=held_to_config(model, why, unsaved),
                    recipe=tuple(recipe.items()),
                    unsaved=unsaved,
                )
            )
        return out
    for b in blocks:
        for a in b.attention:
            why = checks.get(a.path, "") or ("a single head" if a.heads < 2 else "")
            out.append(
                TGroup(
                    _origin_path(b, _rel_to(a.path, b.path)),
                    "heads",
                    a.heads,
                    (a.path,),
                    stack,
                    why_not=why,
                )
            )
        if b.ffn is not None:
            why = checks.get(f"{b.path}#ffn", "")
            out.append(
                TGroup(
                    _origin_path(b, b.ffn.writers[0]),
                    "ffn",
                    b.ffn.width,
                    (b.path,),
                    stack,
                    why_not=why,
                )
            )
    return out


# --- scores --------------------------------------------------------------------------------------


def _skip(block: nn.Module):
    """A forward hook that makes the block return its input (the layer skipped)."""

    def hook(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        x = _first_tensor(args, kwargs)
        if isinstance(out, torch.Tensor):
            return x
        return (x, *out[1:])

    return block.register_forward_hook(hook, with_kwargs=True)


@torch.no_grad()
def outputs(model: nn.Module, X: np.ndarray, batch_size: int = 256) -> list[torch.Tensor]:
    """The model's outputs (logits) on the rows, batch by batch."""
    return [_output(model, xb) for xb in batches(X, batch_size)]


@torch.no_grad()
def output_error(
    model: nn.Module, reference: list[torch.Tensor], X: np.ndarray, batch_size: int = 256
) -> float:
    """Σ‖y − y_ref‖² / Σ‖y_ref − ȳ_ref‖² over the rows (`reference`: `outputs` of another model on
    the same rows and batches): the share of the reference outputs' variance the model misses."""
    ref = torch.cat([y.double() for y in reference])
    var = ((ref - ref.mean(0)) ** 2).sum().item() or 1.0
    got = torch.cat([y.double() for y in outputs(model, X, batch_size)])
    return ((got - ref) ** 2).sum().item() / var


def depth_scores(model: nn.Module, stack: str, X: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Per layer: the change of the model's output when that layer alone is skipped, relative to
    the output's variance, on the calibration rows (`output_error` with the layer skipped). The
    same model and rows again answer from memory (memo.py; read-only): every trial student of
    the reduce stage's depth plan starts as a copy of the teacher and ranks its layers again, as
    does the reconstruct stage (the targets grid's BERT: 14 rankings in a size plan, which took
    55.7 s, 40-46 s with the ranking remembered)."""
    return _depth_scores(model, stack, X, batch_size)


@remembered
@torch.no_grad()
def _depth_scores(model: nn.Module, stack: str, X: np.ndarray, batch_size: int) -> np.ndarray:
    lst = model.get_submodule(stack)
    full = outputs(model, X, batch_size)
    scores = np.zeros(len(lst))
    for i, block in enumerate(lst):
        handle = _skip(block)
        try:
            scores[i] = output_error(model, full, X, batch_size)
        finally:
            handle.remove()
    return scores


def _with_order(model: nn.Module, g: TGroup, X: np.ndarray, batch_size: int) -> TGroup:
    if not g.reducible:
        return g
    s = depth_scores(model, g.stack, X, batch_size)
    order = tuple(int(i) for i in np.argsort(-s, kind="stable"))
    return TGroup(**{**g.__dict__, "order": order})


@torch.no_grad()
def head_energy(
    model: nn.Module, att: Attention, X: np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """Per head: Σ over calibration tokens of ‖W_o[:, head] · context_head‖² (its contribution
    through the output projection)."""
    reader = _join(att.path, att.reader)
    W = weight_of(model.get_submodule(reader)).double()
    energy = np.zeros(att.heads)
    d = att.head_dim
    for xb in batches(X, batch_size):
        a = taps(model, xb, inputs=(reader,))[("in", reader)]
        a = a.reshape(-1, a.shape[-1]).double()
        for h in range(att.heads):
            c = a[:, h * d : (h + 1) * d] @ W[:, h * d : (h + 1) * d].T
            energy[h] += c.pow(2).sum().item()
    return energy


@torch.no_grad()
def ffn_moments(
    model: nn.Module, block: str, ffn: FFN, X: np.ndarray, batch_size: int = 256
) -> Moments:
    """Streamed moments of the feed-forward units (what the down projection reads)."""
    reader = _join(block, ffn.reader)
    moments = Moments(ffn.width)
    for xb in batches(X, batch_size):
        a = taps(model, xb, inputs=(reader,))[("in", reader)]
        moments.add_rows(a.reshape(-1, a.shape[-1]))
    return moments


def ffn_importance(model: nn.Module, block: str, ffn: FFN, moments: Moments) -> np.ndarray:
    """E[a_j²] · ‖W_down[:, j]‖² per unit j."""
    W = weight_of(model.get_submodule(_join(block, ffn.reader))).detach().double()
    energy = (moments.outer.diagonal() / max(moments.n, 1)).numpy()
    return energy * W.pow(2).sum(0).numpy()


def _pqr(basis: Basis, k: int) -> list[int]:
    """The k units whose loadings on the top-k principal components pivoted QR picks first."""
    loadings = basis.components[:, :k]
    _, _, pivots = scipy.linalg.qr(loadings.T, pivoting=True, mode="economic")
    return sorted(int(p) for p in pivots[:k])


def _top(scores: np.ndarray, k: int) -> list[int]:
    return sorted(int(i) for i in np.argsort(-scores, kind="stable")[:k])


def _l_norm(model: nn.Module, paths: list[tuple[str, torch.Tensor]], p: int) -> float:
    total = 0.0
    for path, (rows, cols) in paths:
        W = weight_of(model.get_submodule(path)).detach()
        part = W[rows] if cols is None else W[:, cols]
        total += part.abs().sum().item() if p == 1 else part.pow(2).sum().item()
    return total


def head_scores(
    model: nn.Module, att: Attention, X: np.ndarray | None, criterion: str
) -> np.ndarray:
    """Higher = more important: contribution energy ('activation', or with no rows), or the L2
    / L1 norm of each head's weights in q/k/v and the output projection."""
    if criterion == "activation" or criterion == "energy":
        if X is not None:
            return head_energy(model, att, X)
        criterion = "l2"
    out = np.zeros(att.heads)
    for h in range(att.heads):
        parts = [
            (_join(att.path, rel), (att.head_units([h], blocks), None))
            for rel, blocks in att.writers
        ]
        parts.append((_join(att.path, att.reader), (slice(None), att.head_units([h]))))
        out[h] = _l_norm(model, parts, 1 if criterion == "l1" else 2)
    return out


def ffn_scores(
    model: nn.Module, block: str, ffn: FFN, X: np.ndarray | None, criterion: str
) -> np.ndarray:
    """Higher = more important: activation energy x output-weight norm, or the L2 / L1 norm of
    the weights that write each unit."""
    if criterion in ("activation", "energy", "importance") and X is not None:
        return ffn_importance(model, block, ffn, ffn_moments(model, block, ffn, X))
    out = np.zeros(ffn.width)
    for rel in ffn.writers:
        W = weight_of(model.get_submodule(_join(block, rel))).detach()
        out += (W.abs().sum(1) if criterion == "l1" else W.pow(2).sum(1)).double().numpy()
    return out


def _energy_basis(per_layer: list[np.ndarray]) -> Basis:
    """A Basis whose explained variance at k is the energy the k best units of every layer keep
    (for the planner's `retained`; no components: units are chosen at the cut)."""
    ev = np.sum([np.sort(np.asarray(s, dtype=np.float64))[::-1] for s in per_layer], axis=0)
    return Basis(mean=np.zeros(len(ev)), components=np.zeros((len(ev), 0)), explained_variance=ev)


def group_bases(
    model: nn.Module, groups: list[TGroup], X: np.ndarray, batch_size: int = 256
) -> dict[str, Basis]:
    """What the planner allocates by: per group, the fraction of its contribution energy the
    best k units keep (heads: energy through the output projection; ffn: the PCA variance of
    its units, as width mode's other groups; depth: measured contribution of each layer).
    `model` is left in eval mode; the same model and rows again answer from memory (memo.py)."""
    return _group_bases(model.eval(), groups, X, batch_size)


@remembered
def _group_bases(
    model: nn.Module, groups: list[TGroup], X: np.ndarray, batch_size: int
) -> dict[str, Basis]:
    found = find(model)
    atts = {a.path: a for b in found.blocks for a in b.attention}
    blocks = {b.path: b for b in found.blocks}
    out: dict[str, Basis] = {}
    for g in groups:
        if g.kind == "heads":
            out[g.name] = _energy_basis(
                [head_energy(model, atts[p], X, batch_size) for p in g.members]
            )
        elif g.kind == "ffn":
            evs = [
                ffn_moments(model, p, blocks[p].ffn, X, batch_size).basis().explained_variance
                for p in g.members
            ]
            out[g.name] = _energy_basis(evs)
        else:
            out[g.name] = _energy_basis([depth_scores(model, g.stack, X, batch_size)])
    return out


# --- what a narrower model costs ----------------------------------------------------------------


@dataclass(frozen=True)
class Cost:
    """Parameters as a function of the groups' widths, exact: the parameters outside the
    blocks, and per block a constant plus a count per head and per feed-forward unit (which
    depth keeps which blocks: the depth group's `order`)."""

    other: int
    blocks: dict[
        str, tuple[int, tuple[tuple[str, int], ...]]
    ]  # block -> (constant, ((group, per unit),))
    stacks: dict[
        str, tuple[str, tuple[str, ...], tuple[int, ...]]
    ]  # depth group -> (stack, blocks, order)
    widths: dict[str, int]  # the model's

    def params(self, widths: dict[str, int] | None = None) -> int:
        w = self.widths | (widths or {})
        dropped: set[str] = set()
        for name, (_stack, members, order) in self.stacks.items():
            dropped |= {members[i] for i in order[w[name] :]}
        total = self.other
        for path, (constant, per) in self.blocks.items():
            if path not in dropped:
                total += constant + sum(n * w[g] for g, n in per)
        return total


def _unique_params(module: nn.Module) -> dict[int, int]:
    return {id(p): p.numel() for p in module.parameters()}


def cost_model(model: nn.Module, groups: list[TGroup], found: Found | None = None) -> Cost:
    found = found or find(model)
    total = sum(_unique_params(model).values())
    head_group = {m: g.name for g in groups if g.kind == "heads" for m in g.members}
    ffn_group = {m: g.name for g in groups if g.kind == "ffn" for m in g.members}
    blocks, inside = {}, 0
    for b in found.blocks:
        module = model.get_submodule(b.path)
        size = sum(_unique_params(module).values())
        inside += size
        per: list[tuple[str, int]] = []
        constant = size
        for a in b.attention:
            if a.path in head_group:
                n = _per_head(model, a)
                per.append((head_group[a.path], n))
                constant -= n * a.heads
        if b.ffn is not None and b.path in ffn_group:
            n = _per_unit(model, b.path, b.ffn)
            per.append((ffn_group[b.path], n))
            constant -= n * b.ffn.width
        blocks[b.path] = (constant, tuple(per))
    stacks = {g.name: (g.stack, g.members, g.order) for g in groups if g.kind == "depth"}
    widths = {g.name: g.width for g in groups}
    return Cost(total - inside, blocks, stacks, widths)


def _per_head(model: nn.Module, a: Attention) -> int:
    n = 0
    for rel, blocks in a.writers:
        m = model.get_submodule(_join(a.path, rel))
        n += blocks * a.head_dim * (weight_of(m).shape[1] + (m.bias is not None))
    return n + a.head_dim * weight_of(model.get_submodule(_join(a.path, a.reader))).shape[0]


def _per_unit(model: nn.Module, block: str, f: FFN) -> int:
    n = 0
    for rel in f.writers:
        m = model.get_submodule(_join(block, rel))
        n += weight_of(m).shape[1] + (m.bias is not None)
    return n + weight_of(model.get_submodule(_join(block, f.reader))).shape[0]


# --- narrowing -----------------------------------------------------------------------------------


@dataclass
class NarrowReport:
    """What `narrow` did: kept units per cut module (heads / ffn units, teacher indices) and
    kept layers per stack, the maps re-fitted, what was not re-fitted (and why), the config keys
    set, and seconds per step."""

    kept: dict[str, list[int]] = field(default_factory=dict)
    refitted: list[str] = field(default_factory=list)
    not_refitted: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def _solve(eq: _NormalEquations, m: nn.Module, ridge: float) -> None:
    W, b = eq.solve(ridge)
    _set_map(m, W, b)


def _teacher_block(t_found: Found, stack: str | None, origin: int, path: str) -> Block:
    for b in t_found.blocks:
        if (b.stack, b.index) == (stack, origin) and stack is not None:
            return b
        if stack is None and b.path == path:
            return b
    raise KeyError(f"no teacher layer for {path}")


@torch.no_grad()
def refit_attention(
    student: nn.Module,
    teacher: nn.Module,
    s_att: Attention,
    t_att: Attention,
    X: np.ndarray,
    ridge: float,
    batch_size: int = 256,
    fixed: FixedTaps | None = None,
) -> None:
    """The output projection, from the context vectors the student's kept heads compute to
    the teacher's attention output of the same layer (before the residual). `fixed`: the
    teacher's taps, kept (`teacher_taps`)."""
    s_reader, t_reader = _join(s_att.path, s_att.reader), _join(t_att.path, t_att.reader)
    module = student.get_submodule(s_reader)
    eq = _NormalEquations(module.bias is not None)
    of_teacher = (fixed or FixedTaps(teacher, X, batch_size)).on(X, batch_size)
    for i, xb in enumerate(batches(X, batch_size)):
        a = taps(student, xb, inputs=(s_reader,))[("in", s_reader)]
        z = of_teacher(i, xb, (), (t_reader,))[("out", t_reader)]
        eq.add(a.reshape(-1, a.shape[-1]), z.reshape(-1, z.shape[-1]))
    _solve(eq, module, ridge)


@torch.no_grad()
def refit_ffn(
    student: nn.Module,
    teacher: nn.Module,
    s_block: Block,
    t_block: Block,
    t_last: Block,
    X: np.ndarray,
    ridge: float,
    batch_size: int = 256,
    fixed: FixedTaps | None = None,
) -> None:
    """The down projection, from the student's kept units to the teacher's feed-forward output
    of the same layer plus what the teacher's layers after it up to `t_last` (dropped in the
    student) added to the residual stream. `fixed`: the teacher's taps, kept (`teacher_taps`)."""
    f, tf = s_block.ffn, t_block.ffn
    s_reader, t_reader = _join(s_block.path, f.reader), _join(t_block.path, tf.reader)
    module = student.get_submodule(s_reader)
    eq = _NormalEquations(module.bias is not None)
    absorb = t_last.path != t_block.path
    post = tf.norm is not None
    if absorb and post:  # post-LN: the kept layer's norm becomes the last dropped one's
        s_norm = student.get_submodule(_join(s_block.path, f.norm))
        s_norm.load_state_dict(teacher.get_submodule(_join(t_last.path, tf.norm)).state_dict())
    here = _join(t_block.path, tf.norm) if post else t_block.path
    last = _join(t_last.path, tf.norm) if post else t_last.path
    of_teacher = (fixed or FixedTaps(teacher, X, batch_size)).on(X, batch_size)
    for i, xb in enumerate(batches(X, batch_size)):
        a = taps(student, xb, inputs=(s_reader,))[("in", s_reader)]
        if absorb:
            kind = "in" if post else "out"
            got = of_teacher(
                i,
                xb,
                (here, last) if post else (),
                (t_reader,) + (() if post else (here, last)),
            )
            z = got[("out", t_reader)] + got[(kind, last)] - got[(kind, here)]
        else:
            z = of_teacher(i, xb, (), (t_reader,))[("out", t_reader)]
        eq.add(a.reshape(-1, a.shape[-1]), z.reshape(-1, z.shape[-1]))
    _solve(eq, module, ridge)


def _choose_ffn(model: nn.Module, block: str, f: FFN, k: int, X: np.ndarray, how: str) -> list[int]:
    if how == "pqr":
        return _pqr(ffn_moments(model, block, f, X).basis(), k)
    return _top(ffn_scores(model, block, f, X, how), k)


def narrow(
    student: nn.Module,
    teacher: nn.Module,
    widths: dict[str, int],
    X: np.ndarray,
    how: str = "pqr",
    ridge: float = 1e-4,
    batch_size: int = 256,
    refit: str = "downstream",
    report: NarrowReport | None = None,
    fixed: FixedTaps | None = None,
) -> nn.Module:
    """Cut `student` (the teacher's architecture, e.g. a copy) to `widths` (group name -> heads,
    ffn units or layers; other names are ignored) and re-fit, in place, in execution order:
    depth first (layers ranked on the calibration rows), then layer by layer its heads and its
    feed-forward units. `how`: ffn units by `pqr` or `importance`; heads always by energy.
    `refit`: `cut` re-fits the readers of cut groups (and absorbing layers), `downstream` also
    every reader after the first change, `all` every reader. `fixed`: the teacher's taps on `X`
    (`teacher_taps`), shared by narrowings of the same teacher on the same rows."""
    report = report if report is not None else NarrowReport()
    teacher.eval()
    student.eval()
    start = time.perf_counter()
    found = find(student)
    groups = {g.name: g for g in transformer_groups(student, X, batch_size, found)}
    want = {
        n: int(k)
        for n, k in widths.items()
        if n in groups and groups[n].reducible and 0 < int(k) < groups[n].width
    }
    t_found = find(teacher)
    fixed = fixed if fixed is not None else teacher_taps(teacher, X, batch_size, t_found)
    report.seconds["plan"] = time.perf_counter() - start
    for g in groups.values():
        if g.kind == "depth" and g.name in want:
            tick = time.perf_counter()
            keep = sorted(g.order[: want[g.name]])
            drop_layers(student, g.stack, keep)
            report.kept[g.name] = [found.stacks()[g.stack][i].origin for i in keep]
            report.seconds[g.name] = time.perf_counter() - tick
    found = find(student)
    by_member = {(g.kind, m): g for g in groups.values() for m in g.members}
    changed = refit == "all"
    for stack, blocks in found.stacks().items():
        t_blocks = t_found.stacks()[stack]
        first = blocks[0].origin if stack is not None else 0
        if first > 0:
            report.not_refitted[f"{stack}.0-{first - 1}"] = "dropped before any kept layer"
            changed = changed or refit != "cut"
        for i, b in enumerate(blocks):
            tick = time.perf_counter()
            tb = _teacher_block(t_found, stack, b.origin, b.path)
            nxt = blocks[i + 1].origin if i + 1 < len(blocks) else len(t_blocks)
            t_last = t_blocks[nxt - 1] if stack is not None else tb
            for att, ta in zip(b.attention, tb.attention, strict=True):
                a = att
                g = by_member.get(("heads", _teacher_att_path(a, b, tb)))
                k = want.get(g.name) if g else None
                if k:
                    keep = _top(head_energy(student, a, X, batch_size), k)
                    cut_heads(student.get_submodule(a.path), a, keep)
                    report.kept[a.path] = keep
                    a = replace_heads(a, k)
                if k or changed:
                    refit_attention(student, teacher, a, ta, X, ridge, batch_size, fixed)
                    report.refitted.append(_join(a.path, a.reader))
                changed = changed or bool(k and refit != "cut")
            if b.ffn is not None:
                g = by_member.get(("ffn", tb.path))
                k = want.get(g.name) if g else None
                s_block = b
                if k:
                    keep = _choose_ffn(student, b.path, b.ffn, k, X, how)
                    cut_ffn(student.get_submodule(b.path), b.ffn, keep)
                    report.kept[_join(b.path, b.ffn.writers[0])] = keep
                    s_block = Block(
                        b.path,
                        b.stack,
                        b.index,
                        b.origin,
                        b.attention,
                        FFN(b.ffn.writers, b.ffn.reader, k, b.ffn.norm),
                    )
                absorb = t_last.path != tb.path
                if k or changed or absorb:
                    refit_ffn(student, teacher, s_block, tb, t_last, X, ridge, batch_size, fixed)
                    report.refitted.append(_join(b.path, b.ffn.reader))
                changed = changed or bool((k or absorb) and refit != "cut")
            elif t_last.path != tb.path:
                report.not_refitted[b.path] = "no feed-forward output to absorb the dropped layers"
            report.seconds[b.path] = time.perf_counter() - tick
    report.config = sync_config(student, groups.values())
    return student.eval()


def _teacher_att_path(a: Attention, b: Block, tb: Block) -> str:
    return _join(tb.path, _rel_to(a.path, b.path))


def replace_heads(a: Attention, heads: int) -> Attention:
    return Attention(a.path, a.layout, heads, a.head_dim, a.writers, a.reader, a.attrs)


def sync_config(model: nn.Module, groups: Any) -> dict[str, Any]:
    """Write the model's current widths into its config (the recipes of uniform groups whose
    cuts it can express); returns the keys set. A cut the config cannot express (a BERT or
    GPT-2 head cut) stays in the modules' attributes only: `config_mismatch` then names it."""
    owner = hf_owner(model)
    if owner is None:
        return {}
    found = find(model)
    changes: dict[str, Any] = {}
    for g in groups:
        if not g.uniform or not g.recipe:
            continue
        heads, widths, n = _geometry(found, g.stack)
        for key, what in g.recipe:
            if what == "heads" and heads:
                changes[key] = heads[0][0]
            elif what == "head_dim" and heads:
                changes[key] = heads[0][1]
            elif what == "width" and widths:
                changes[key] = widths[0]
            elif what == "layers" and key == "num_hidden_layers":
                changes[key] = n
            elif what == "layers":
                kept = [b.origin for b in found.stacks()[g.stack]]
                types = list(getattr(owner[1].config, key))
                changes[key] = [types[i] for i in kept] if len(types) > max(kept) else types[:n]
    cfg_before = {k: getattr(owner[1].config, k, None) for k in changes}
    changes = {k: v for k, v in changes.items() if cfg_before[k] != v}
    for cfg in _configs(model):
        for k, v in changes.items():
            setattr(cfg, k, v)
    return changes


# --- structured pruning and shapes-only cuts (no re-fit) ----------------------------------------


def cut(
    model: nn.Module,
    widths: dict[str, int],
    X: np.ndarray | None = None,
    criterion: str = "activation",
    groups: list[TGroup] | None = None,
) -> dict[str, list[int]]:
    """Cut `model` in place to `widths` without re-fitting (pruning, or shapes only when `X` is
    None: the first units and layers are kept). `groups`: the model's, as it is now. Returns the
    kept units per cut module."""
    found = find(model)
    groups = groups if groups is not None else transformer_groups(model, X, found=found)
    # group members are paths before any depth cut: each block is followed by its module
    before = {id(model.get_submodule(b.path)): b.path for b in found.blocks}
    kept: dict[str, list[int]] = {}
    for g in groups:
        k = widths.get(g.name)
        if g.kind != "depth" or not g.reducible or k is None or not 0 < k < g.width:
            continue
        order = g.order if X is not None else tuple(range(g.width))
        keep = sorted(order[:k])
        drop_layers(model, g.stack, keep)
        kept[g.name] = keep
    found = find(model)
    for g in groups:
        k = widths.get(g.name)
        if g.kind == "depth" or not g.reducible or k is None or not 0 < k < g.width:
            continue
        for b in found.blocks:
            old = before.get(id(model.get_submodule(b.path)), b.path)
            for a in b.attention:
                if g.kind == "heads" and _join(old, _rel_to(a.path, b.path)) in g.members:
                    scores = (
                        head_scores(model, a, X, criterion)
                        if X is not None
                        else -np.arange(a.heads)
                    )
                    keep = _top(scores, k)
                    cut_heads(model.get_submodule(a.path), a, keep)
                    kept[a.path] = keep
            if g.kind == "ffn" and b.ffn is not None and old in g.members:
                scores = (
                    ffn_scores(model, b.path, b.ffn, X, criterion)
                    if X is not None
                    else -np.arange(b.ffn.width)
                )
                keep = _top(scores, k)
                cut_ffn(model.get_submodule(b.path), b.ffn, keep)
                kept[_join(b.path, b.ffn.writers[0])] = keep
    sync_config(model, groups)
    return kept


def narrowed(model: nn.Module, fraction: float) -> nn.Module:
    """A copy with every reducible group cut to `fraction` of its width (at least one): only the
    shapes matter (file size, latency), not which units stay."""
    out = copy.deepcopy(model)
    groups = [g for g in transformer_groups(out) if g.reducible]
    cut(out, {g.name: max(1, int(fraction * g.width)) for g in groups}, groups=groups)
    return out.eval()


def prunable_groups(model: nn.Module, X: np.ndarray) -> list[TGroup]:
    """The groups whose common fraction of units states how much structured pruning cuts: the
    reducible heads and feed-forward groups. Layers are cut too where that is cheaper, for the
    same parameters (`prune_to_fraction`): the amount asked is stated in these groups' units.
    Probed on `X[:2]`, no depth ranking."""
    groups = transformer_groups(model, X[:2])
    return [g for g in groups if g.reducible and g.kind != "depth"]


def depth_candidates(
    depth: list[TGroup], within: Callable[[dict[str, int]], bool]
) -> list[dict[str, int]]:
    """Layers kept per depth group to weigh against narrowing: all of them, then one fewer at a
    time (several stacks each lose a common share of theirs), down to one layer, or to the first
    count that is `within` the budget with every other group at full width (a pure depth cut:
    fewer layers would cut more than asked)."""
    if not depth:
        return [{}]
    most = max(g.width for g in depth)
    out: list[dict[str, int]] = []
    for drop in range(most):
        kept = {g.name: max(1, round(g.width * (most - drop) / most)) for g in depth}
        if out and kept == out[-1]:
            continue
        out.append(kept)
        if within(kept):
            break
    return out


def fraction_widths(
    cost: Cost,
    groups: list[TGroup],
    original: dict[str, int],
    layers: dict[str, int],
    params: int,
) -> dict[str, int] | None:
    """The widths of `groups` at the largest common fraction f of their `original` widths
    (ceil(f · original), at most their width now, at least one unit) for which the model with
    `layers` kept has at most `params`, then the parameters that leaves filled a unit at a time,
    the group furthest cut first (where it still fits); None when even one unit each has more.

    The fill matters where a group's units are coarse: a BERT student of 3 layers of 4 heads and
    79 feed-forward units asked for half its 209,843 parameters (104,921) was at f = 1/4 without
    it (one head and 20 units: 70,250; the cut made, 69,146, a third under the ask); with it,
    one head and 79 units (102,995), or, a layer dropped, two heads and 79 units (99,700: the
    cut `prune_to_fraction` makes there, as it changes the output least)."""

    def at(f: float) -> dict[str, int]:
        return {
            g.name: min(g.width, max(1, math.ceil(f * original.get(g.name, g.width))))
            for g in groups
        }

    if cost.params(at(0.0) | layers) > params:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost.params(at(mid) | layers) <= params else (lo, mid)
    widths = at(lo)
    while True:
        fits = [
            g
            for g in groups
            if widths[g.name] < g.width
            and cost.params(widths | {g.name: widths[g.name] + 1} | layers) <= params
        ]
        if not fits:
            return widths
        g = min(fits, key=lambda g: widths[g.name] / original.get(g.name, g.width))
        widths[g.name] += 1


@dataclass(frozen=True)
class PruneCut:
    """One way structured pruning can reach the parameters asked: layers kept per depth group
    (empty: none dropped), every group's width, the parameters left, and the change of the
    model's output it causes on the rows (`output_error`, before any recovery)."""

    layers: dict[str, int]
    widths: dict[str, int]
    params: int
    error: float


def asked_params(model: nn.Module, groups: list[TGroup], keep_fraction: float) -> int:
    """Parameters of `model` with every group in `groups` (heads, ffn) at
    ceil(keep_fraction × its width): the amount structured pruning is asked for."""
    cost = cost_model(model, groups)
    return cost.params({g.name: max(1, math.ceil(keep_fraction * g.width)) for g in groups})


def prune_to_fraction(
    model: nn.Module,
    keep_fraction: float,
    criterion: str,
    X: np.ndarray,
    original: dict[str, int],
    params: int | None = None,
) -> list[PruneCut]:
    """Structured pruning, in place, to the parameters the model has with every prunable group at
    ceil(keep_fraction × its original width) (or to `params`), the cheapest way: that cut, or
    whole layers dropped (least contributing first, `depth_scores`) with the heads and
    feed-forward units narrowed by a common fraction to the same count, whichever changes the
    model's output least on the rows `X` (no re-fit: recovery is KD's). Returns the cuts
    measured, the one made first."""
    every = [g for g in transformer_groups(model, X) if g.reducible]
    width = [g for g in every if g.kind != "depth"]
    depth = [g for g in every if g.kind == "depth"]
    cost = cost_model(model, every)
    if params is None:
        asked = {
            g.name: max(1, math.ceil(keep_fraction * original.get(g.name, g.width))) for g in width
        }
        params = cost.params(asked)
    reference = outputs(model, X)
    tried: list[PruneCut] = []
    for kept in depth_candidates(depth, lambda k: cost.params(k) <= params):
        layers = {n: k for n, k in kept.items() if k < cost.widths[n]}
        widths = fraction_widths(cost, width, original, layers, params)
        if widths is None:
            continue
        candidate = copy.deepcopy(model)
        cut(candidate, widths | layers, X, criterion, every)
        error = output_error(candidate, reference, X)
        tried.append(PruneCut(layers, widths, cost.params(widths | layers), error))
    if not tried:
        return []
    best = min(tried, key=lambda c: c.error)  # the first (fewest layers dropped) on a tie
    cut(model, best.widths | best.layers, X, criterion, every)
    return [best] + [c for c in tried if c is not best]


# --- what cannot be narrowed ---------------------------------------------------------------------


def unsupported(
    model: nn.Module, example: torch.Tensor | None = None
) -> list[tuple[str, str, str]]:
    """(module path, class name, why) of every attention module the engine cannot narrow (an
    unknown layout, a failed probe); with `example` rows, of every group it cannot cut too."""
    found = find(model)
    out = list(found.refused)
    if example is None:
        return out
    X = example.numpy()
    for g in transformer_groups(model, X, found=found):
        if g.why_not and g.why_not not in ("a single head", "a single layer"):
            path = g.members[0] if g.members else g.name
            out.append((path, type(model.get_submodule(path)).__name__, f"{g.kind}: {g.why_not}"))
    return out


def describe(items: list[tuple[str, str, str]]) -> str:
    """One line: each distinct (class, why) once, with its first path and how many more."""
    seen: dict[tuple[str, str], list[str]] = {}
    for path, cls, why in items:
        seen.setdefault((cls, why), []).append(path)
    parts = []
    for (cls, why), paths in seen.items():
        more = f" (and {len(paths) - 1} more)" if len(paths) > 1 else ""
        parts.append(f"{paths[0] or '<model>'} ({cls}){more}: {why}")
    return "; ".join(parts)


# --- any model: the transformer engine's groups, or the traced graph's --------------------------


def reducible_groups(model: nn.Module, X: np.ndarray) -> list[TGroup] | list[Group]:
    """The groups the width path narrows: the transformer engine's when the model holds
    transformer blocks (Torch-Pruning's tracer is never run on them), else the traced graph's."""
    if holds_blocks(model):
        return [g for g in transformer_groups(model, X) if g.reducible]
    return trace(model, torch.from_numpy(X[:2])).reducible()

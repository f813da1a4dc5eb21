"""Hidden size: the residual stream of a pre-LayerNorm transformer narrowed by a PCA rotation.

SliceGPT (Ashkboos et al., 2024), with one rotation for the whole stream so that the model
keeps its own classes. In a pre-LN model every reader of the residual stream `x` reads it through
a LayerNorm with gain g and bias β, `LN(x) = g ⊙ Cx / sqrt(|Cx|²/D + ε) + β` (`C`: subtract the
mean over the features), so:

1. the mean of `x` over its D features is never read: every writer of the stream (embedding
   tables, position / class-token parameters, the patch projection, each block's attention output
   and feed-forward down projection) can write `Cx` instead and nothing changes;
2. `g` and `β` fold into the projections reading the norm (`W diag(g)`, bias `b + Wβ`);
3. then the norm reads `Cx / |Cx|`, which commutes with any rotation of the stream: with `V` the
   principal directions of the centred, normalized stream (what the norms read) on calibration
   rows, the stream becomes `Vᵀx`, and keeping the top directions narrows every writer's output
   rows, every reader's input columns, the embedding tables and the norms together.

To keep `nn.LayerNorm` (and so the model's class and, where its config can say so,
`save_pretrained` -> `from_pretrained`), a stream of width k carries the top k-1 directions in the
k-dim subspace orthogonal to the all-ones vector (`M = V_{k-1} Bᵀ`, `B` an orthonormal basis of
that subspace): the norm's centring is then a no-op, its weight is the constant `sqrt(D/k)` and its
`ε` becomes `ε·D/k` (what turns its `/k` into the teacher's `/D`), and a reader without a bias (GPT-
2's `lm_head`) gets `Wβ` through the spare all-ones direction: the norm's bias is all ones and the
reader's weight gains `Wβ·1ᵀ/k`. At k = D nothing is dropped: the student computes the teacher's
logits to float precision (tested); below, the dropped directions' share of what the norms read is
the sum of the discarded eigenvalues (tested), and the norms divide by the kept part's length.

Post-LN models (BERT: the norm after the residual add, which the next block reads directly) do
not commute with a rotation, so their stream keeps k of its D channels, as structured pruning
does: the embedding tables, every writer's output rows, every norm's gain and bias and every
reader's input columns are sliced to the same channels, and the norms then normalize over those
alone (not exact below D: a norm's mean and variance are taken over the kept channels). The
channels are picked by pivoted QR on what the norms write (`channel_basis`): each next one is the
channel the kept ones predict worst by least squares, which is what the readers' re-fit then
recovers from them (tested: what it cannot recover is the basis's discarded share). At k = D the
student is the teacher. After the blocks, the projections reading the stream are found by their
input (BERT's pooler reads its first token; the classifier behind the pooler's tanh does not).
A tied output embedding (GPT-2's `lm_head` = `wte`) is untied: the head reads `W diag(g) M`, the
table `E M`. What a Hugging Face config can express: `hidden_size` with `head_dim` and the
feed-forward width kept (ViT: yes); GPT-2 derives its attention width from `n_embd`, so its
narrowed student cannot be rebuilt from its config (`config_mismatch` names it: the student is not
saved as `student_hf/`, `student_hf.txt` says why, as for a BERT head cut).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import torch
from torch import nn

from distill.tasks.compress import transformer as tr
from distill.tasks.compress.graph import no_fastpath
from distill.tasks.compress.pca import Basis
from distill.tasks.compress.width import _NormalEquations, batches

HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "embed_dim")  # config keys of the stream width
EPS_KEYS = ("layer_norm_eps", "layer_norm_epsilon", "norm_eps")


@dataclass(frozen=True)
class Norm:
    path: str
    readers: tuple[str, ...]  # the projections reading its output


@dataclass(frozen=True)
class Stream:
    """Everything that writes or reads the residual stream of one stack of pre-LN or post-LN
    blocks."""

    width: int
    embeddings: tuple[str, ...]  # Embedding / Linear / Conv modules writing it before the blocks
    params: tuple[str, ...]  # parameters added to it there (positions, class token): last axis
    writers: tuple[str, ...]  # each block's attention output and feed-forward down projection
    norms: tuple[Norm, ...]  # every LayerNorm reading it, in execution order (the final one last)
    tied: tuple[tuple[str, str], ...]  # (reader, embedding) sharing one weight
    heads: tuple[int, int]  # (heads, head_dim) of the attention layers: kept by a hidden cut
    ffn: int  # the feed-forward width: kept too
    post_ln: bool = False  # BERT's layout: the norms sit after the residual adds (channels kept)


@dataclass(frozen=True)
class HiddenBasis:
    """Principal directions of the stream (D x D-1, all orthogonal to the all-ones vector, by
    decreasing eigenvalue) and their eigenvalues: the second moment of the centred rows that the
    norms read, each scaled to unit length, summed over every norm and calibration token."""

    vectors: np.ndarray
    values: np.ndarray
    rows: int
    selection: bool = False  # post-LN: `vectors` are unit columns (channels) in the order picked

    @property
    def spare(self) -> int:
        """Features of a narrowed stream that carry no direction (pre-LN: the all-ones one)."""
        return 0 if self.selection else 1

    def discarded(self, k: int) -> float:
        """The share of the stream's variance a stream of width k leaves out."""
        return float(self.values[k - self.spare :].sum() / max(self.values.sum(), 1e-300))


def _order_line(path: str, block: nn.Module) -> str:
    name = type(block).__name__
    return f"hidden size: {path} ({name}) runs its norms and projections in an order not followed"


def _out_width(m: nn.Module) -> int | None:
    if isinstance(m, nn.Embedding):
        return m.embedding_dim
    if tr.is_projection(m):
        return tr.weight_of(m).shape[0]
    if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups == 1:
        return m.out_channels
    return None


def _order(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Each module's position in the order of first calls on `x`."""
    order: dict[str, int] = {}
    handles = []
    for name, m in model.named_modules():

        def hook(_m: nn.Module, _a: Any, name: str = name) -> None:
            order.setdefault(name, len(order))

        handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad(), no_fastpath():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return order


def find_stream(model: nn.Module, X: np.ndarray) -> Stream | str:
    """The residual stream of `model` (one stack of pre-LN blocks, every reader behind a
    LayerNorm, or of post-LN blocks), or one line saying why its hidden size cannot be narrowed.
    Calls the model once on `X[:2]` to see what runs before, inside and after the blocks."""
    found = tr.find(model)
    stacks = found.stacks()
    if not found.blocks:
        return "hidden size: no transformer blocks found"
    if len(stacks) != 1 or None in stacks:
        return "hidden size: the transformer blocks are not one list of layers"
    ((stack, blocks),) = stacks.items()
    assert stack is not None  # checked above
    for b in blocks:
        if len(b.attention) != 1 or b.ffn is None:
            return f"hidden size: {b.path} is not one attention and one feed-forward"
    post = [b.ffn is not None and b.ffn.norm is not None for b in blocks]
    if any(post) and not all(post):
        return "hidden size: some blocks put their norms after the residual add, others before"
    order = _order(model, torch.from_numpy(X[:2]))
    modules = dict(model.named_modules())
    att0 = blocks[0].attention[0]
    width = tr.weight_of(model.get_submodule(tr._join(att0.path, att0.writers[0][0]))).shape[1]
    if all(post):
        return _post_ln_stream(model, X, stack, blocks, order, modules, width)
    norms: list[Norm] = []
    writers: list[str] = []
    for b in blocks:
        a, f = b.attention[0], b.ffn
        assert f is not None
        lns = sorted(
            (
                n
                for n, m in modules.items()
                if tr._inside(n, b.path) and isinstance(m, nn.LayerNorm) and n in order
            ),
            key=order.__getitem__,
        )
        a_in = [tr._join(a.path, w) for w, _ in a.writers]
        f_in = [tr._join(b.path, w) for w in f.writers]
        a_out, f_out = tr._join(a.path, a.reader), tr._join(b.path, f.reader)
        if any(n not in order for n in (*a_in, *f_in, a_out, f_out)):
            return f"hidden size: {b.path} is not called on the example rows"
        if len(lns) != 2:
            return f"hidden size: {b.path} runs {len(lns)} LayerNorms (a pre-LN block runs two)"
        if (
            not order[lns[0]] < min(order[n] for n in a_in)
            or not order[a_out] < order[lns[1]] < min(order[n] for n in f_in)
            or any(modules[n].normalized_shape != (width,) for n in lns)
        ):
            return _order_line(b.path, model.get_submodule(b.path))
        norms += [Norm(lns[0], tuple(a_in)), Norm(lns[1], tuple(f_in))]
        writers += [a_out, f_out]
    first = min(order[b.path] for b in blocks)
    last = max(order[n] for b in blocks for n in order if tr._inside(n, b.path))
    embeddings: list[str] = []
    params: list[str] = []
    final: str | None = None
    readers: list[str] = []
    for name, m in sorted(modules.items(), key=lambda nm: order.get(nm[0], -1)):
        if tr._inside(name, stack) or name not in order:
            continue
        own = list(m.named_parameters(recurse=False))
        if order[name] < first:
            if _out_width(m) == width:
                embeddings.append(name)
            elif isinstance(m, nn.LayerNorm):
                return f"hidden size: {name} ({type(m).__name__}) normalizes the embeddings"
            else:  # positions, a class token (on the model or its embeddings module)
                params += [tr._join(name, p) for p, t in own if t.shape[-1] == width]
        elif order[name] > last and own:
            if isinstance(m, nn.LayerNorm) and final is None:
                final = name
            elif final is not None and tr.is_projection(m) and tr.weight_of(m).shape[1] == width:
                readers.append(name)
            else:
                why = "reads the residual stream without a LayerNorm before it"
                return f"hidden size: {name} ({type(m).__name__}) {why}"
    if final is None or not readers:
        return "hidden size: no final LayerNorm and head after the blocks"
    if not embeddings:
        return "hidden size: nothing found writing the residual stream before the blocks"
    norms.append(Norm(final, tuple(readers)))
    tied = tuple(
        (r, e)
        for r in readers
        for e in embeddings
        if model.get_submodule(r).weight is model.get_submodule(e).weight
    )
    return _stream(blocks, width, embeddings, params, writers, norms, tied)


def _stream(
    blocks: list[tr.Block],
    width: int,
    embeddings: list[str],
    params: list[str],
    writers: list[str],
    norms: list[Norm],
    tied: tuple[tuple[str, str], ...] = (),
    post_ln: bool = False,
) -> Stream:
    att0, f0 = blocks[0].attention[0], blocks[0].ffn
    return Stream(
        width,
        tuple(embeddings),
        tuple(params),
        tuple(writers),
        tuple(norms),
        tied,
        (att0.heads, att0.head_dim),
        f0.width if f0 else 0,
        post_ln,
    )


def _post_ln_stream(
    model: nn.Module,
    X: np.ndarray,
    stack: str,
    blocks: list[tr.Block],
    order: dict[str, int],
    modules: dict[str, nn.Module],
    width: int,
) -> Stream | str:
    """The stream of post-LN blocks (BERT): the embeddings' norm, then in each block the
    attention's q/k/v read the stream, its output projection writes it before a norm, the
    feed-forward reads that norm and its down projection writes before the next. After the
    blocks, the projections whose input rows are rows of the last norm's output read it (BERT's
    pooler reads the first token); the classifier behind the pooler does not."""
    norms: list[Norm] = []
    writers: list[str] = []
    first = min(order[b.path] for b in blocks)
    before = sorted((n for n in order if order[n] < first), key=order.__getitem__)
    lns = [n for n in before if isinstance(modules[n], nn.LayerNorm)]
    if len(lns) != 1 or modules[lns[0]].normalized_shape != (width,):
        return "hidden size: no single LayerNorm over the embeddings before the post-LN blocks"
    embeddings = [n for n in before if _out_width(modules[n]) == width]
    params = [
        tr._join(n, p)
        for n in before
        for p, t in modules[n].named_parameters(recurse=False)
        if t.shape[-1] == width and n not in embeddings and n != lns[0]
    ]
    if not embeddings:
        return "hidden size: nothing found writing the residual stream before the blocks"
    previous = lns[0]
    for b in blocks:
        a, f = b.attention[0], b.ffn
        assert f is not None and f.norm is not None
        a_in = [tr._join(a.path, w) for w, _ in a.writers]
        f_in = [tr._join(b.path, w) for w in f.writers]
        a_out, f_out = tr._join(a.path, a.reader), tr._join(b.path, f.reader)
        inside = sorted(
            (
                n
                for n, m in modules.items()
                if tr._inside(n, b.path) and isinstance(m, nn.LayerNorm)
            ),
            key=lambda n: order.get(n, -1),
        )
        if any(n not in order for n in (*a_in, *f_in, a_out, f_out, *inside)) or len(inside) != 2:
            return _order_line(b.path, modules[b.path])
        if not (
            max(order[n] for n in a_in)
            < order[a_out]
            < order[inside[0]]
            < min(order[n] for n in f_in)
            and max(order[n] for n in f_in) < order[f_out] < order[inside[1]]
            and all(modules[n].normalized_shape == (width,) for n in inside)
        ):
            return _order_line(b.path, modules[b.path])
        norms += [Norm(previous, tuple(a_in)), Norm(inside[0], tuple(f_in))]
        writers += [a_out, f_out]
        previous = inside[1]
    last = max(order[n] for b in blocks for n in order if tr._inside(n, b.path))
    after = [
        n
        for n in sorted(order, key=order.__getitem__)
        if order[n] > last
        and not tr._inside(n, stack)
        and tr.is_projection(modules[n])
        and tr.weight_of(modules[n]).shape[1] == width
    ]
    readers = _reading(model, X, previous, after)
    if not readers:
        return "hidden size: nothing found reading the residual stream after the blocks"
    norms.append(Norm(previous, tuple(readers)))
    shared = {id(p) for n in embeddings for p in modules[n].parameters(recurse=False)}
    for n, m in modules.items():
        if n not in embeddings and any(id(p) in shared for p in m.parameters(recurse=False)):
            return f"hidden size: {n} ({type(m).__name__}) shares its weight with the embeddings"
    return _stream(blocks, width, embeddings, params, writers, norms, post_ln=True)


def _reading(model: nn.Module, X: np.ndarray, norm: str, candidates: list[str]) -> list[str]:
    """The `candidates` whose input rows on `X[:2]` are rows of `norm`'s output."""
    got = tr.taps(model, torch.from_numpy(X[:2]), inputs=tuple(candidates), outputs=(norm,))
    out = got[("out", norm)]
    rows = out.reshape(-1, out.shape[-1]).double()
    scale = rows.abs().max().item() + 1e-12
    found = []
    for n in candidates:
        if ("in", n) not in got:
            continue
        a = got[("in", n)].reshape(-1, rows.shape[1]).double()
        if bool((torch.cdist(a, rows, p=float("inf")).min(1).values <= 1e-6 * scale).all()):
            found.append(n)
    return found


# --- the basis -----------------------------------------------------------------------------------


def _ones_complement(n: int) -> np.ndarray:
    """An orthonormal basis (n x n-1) of the vectors whose entries sum to zero."""
    q, _ = np.linalg.qr(np.concatenate([np.ones((n, 1)), np.eye(n)[:, : n - 1]], axis=1))
    return q[:, 1:]


def stream_rows(model: nn.Module, stream: Stream, x: torch.Tensor) -> torch.Tensor:
    """What the norms read on `x`: every norm's input rows, centred over the features and scaled
    to unit length (float64, [rows, D])."""
    got = tr.taps(model, x, inputs=tuple(n.path for n in stream.norms))
    rows = []
    for n in stream.norms:
        a = got[("in", n.path)].reshape(-1, stream.width).double()
        a = a - a.mean(1, keepdim=True)
        rows.append(a / a.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return torch.cat(rows)


@torch.no_grad()
def stream_basis(
    model: nn.Module, stream: Stream, X: np.ndarray, batch_size: int = 256
) -> HiddenBasis:
    """The stream's principal directions on the calibration rows `X` (post-LN: its channels,
    `channel_basis`)."""
    if stream.post_ln:
        return channel_basis(model, stream, X, batch_size)
    D = stream.width
    S = np.zeros((D, D))
    count = 0
    for xb in batches(X, batch_size):
        r = stream_rows(model, stream, xb)
        S += (r.T @ r).numpy()
        count += len(r)
    U = _ones_complement(D)
    values, vectors = np.linalg.eigh(U.T @ S @ U)
    top = np.argsort(-values, kind="stable")
    return HiddenBasis(U @ vectors[:, top], np.clip(values[top], 0.0, None), count)


@torch.no_grad()
def channel_basis(
    model: nn.Module, stream: Stream, X: np.ndarray, batch_size: int = 256
) -> HiddenBasis:
    """A post-LN stream's channels in the order pivoted QR picks them on what the norms write
    (every norm's output rows, centred per channel over the calibration tokens: the readers have
    biases): each next channel is the one the kept ones predict worst by least squares, and its
    value is the variance it adds (the squared row of R), so the values sum to the total and
    `discarded(k)` is the share no least-squares map from the k kept channels recovers."""
    D = stream.width
    S, total, count = np.zeros((D, D)), np.zeros(D), 0
    norms = tuple(dict.fromkeys(n.path for n in stream.norms))
    for xb in batches(X, batch_size):
        got = tr.taps(model, xb, outputs=norms)
        for n in norms:
            a = got[("out", n)].reshape(-1, D).double().numpy()
            S += a.T @ a
            total += a.sum(0)
            count += len(a)
    mean = total / max(count, 1)
    C = S / max(count, 1) - np.outer(mean, mean)
    values, vectors = np.linalg.eigh((C + C.T) / 2)
    root = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T  # C = root.T @ root
    _, R, pivots = scipy.linalg.qr(root, pivoting=True)
    gained = (R**2).sum(1)  # R is upper triangular: row i is R[i, i:]
    return HiddenBasis(np.eye(D)[:, pivots], gained, count, selection=True)


def rotation(basis: HiddenBasis, k: int) -> np.ndarray:
    """M (D x k): the stream of width k is `Mᵀx`, the top k-1 directions in the k-dim subspace
    orthogonal to the all-ones vector; `M Mᵀ` projects on those directions."""
    D = basis.vectors.shape[0]
    if not 2 <= k <= D:
        raise ValueError(f"hidden size {k}: it must be between 2 and {D}")
    if basis.selection:  # the first k channels picked, in the stream's own order
        kept = sorted(int(np.argmax(v)) for v in basis.vectors[:, :k].T)
        return np.eye(D)[:, kept]
    return basis.vectors[:, : k - 1] @ _ones_complement(k).T


# --- the cut -------------------------------------------------------------------------------------


def _param(t: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.to(like.dtype).contiguous())


def _write_rows(m: Any, M: torch.Tensor) -> None:
    """A module writing the stream (its output axis) now writes `Mᵀ(output)`."""
    k = M.shape[1]
    if isinstance(m, nn.Embedding):
        m.weight = _param(m.weight.double() @ M, m.weight)
        m.embedding_dim = k
        return
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        w = m.weight.double()
        m.weight = _param(torch.tensordot(M.T, w, dims=([1], [0])), m.weight)
        m.out_channels = k
    else:
        W, conv1d = tr.weight_of(m).double(), tr._is_conv1d(m)
        tr._set_map(m, M.T @ W, None)
        if conv1d:
            m.nf = k
        else:
            m.out_features = k
    if m.bias is not None:
        m.bias = _param(M.T @ m.bias.double(), m.bias)


def _read_norm(model: nn.Module, norm: Norm, M: torch.Tensor, width: int) -> None:
    """Fold the norm's g, β into its readers, rotate their inputs, make it a width-k norm."""
    ln = model.get_submodule(norm.path)
    assert isinstance(ln, nn.LayerNorm)
    D, k = width, M.shape[1]
    g = ln.weight.double() if ln.weight is not None else torch.ones(D, dtype=torch.float64)
    beta = ln.bias.double() if ln.bias is not None else torch.zeros(D, dtype=torch.float64)
    spare = False  # a reader without a bias takes Wβ through the all-ones direction
    for r in norm.readers:
        m: Any = model.get_submodule(r)
        W, conv1d = tr.weight_of(m).double(), tr._is_conv1d(m)
        Wb = W @ beta
        Wn = (W * g) @ M
        if m.bias is not None:
            tr._set_map(m, Wn, m.bias.double() + Wb)
        else:
            tr._set_map(m, Wn + torch.outer(Wb, torch.ones(k, dtype=torch.float64)) / k, None)
            spare = True
        if conv1d:
            m.nx = k
        else:
            m.in_features = k
    dtype = ln.weight.dtype if ln.weight is not None else torch.float32
    ln.normalized_shape = (k,)
    ln.weight = nn.Parameter(torch.full((k,), math.sqrt(D / k), dtype=dtype))
    ln.bias = nn.Parameter(torch.full((k,), 1.0 if spare else 0.0, dtype=dtype))
    ln.eps = ln.eps * D / k


def _select_norm(model: nn.Module, norm: Norm, M: torch.Tensor) -> None:
    """A post-LN norm keeps its gain and bias on the kept channels (`M`: unit columns) and now
    normalizes over those alone; its readers keep the same input columns."""
    ln = model.get_submodule(norm.path)
    assert isinstance(ln, nn.LayerNorm)
    for r in norm.readers:
        m: Any = model.get_submodule(r)
        W, conv1d = tr.weight_of(m).double(), tr._is_conv1d(m)
        tr._set_map(m, W @ M, m.bias.double() if m.bias is not None else None)
        if conv1d:
            m.nx = M.shape[1]
        else:
            m.in_features = M.shape[1]
    ln.normalized_shape = (M.shape[1],)
    for attr in ("weight", "bias"):
        p = getattr(ln, attr)
        if p is not None:
            setattr(ln, attr, _param(M.T @ p.double(), p))


@torch.no_grad()
def slice_hidden(model: nn.Module, stream: Stream, basis: HiddenBasis, k: int) -> dict[str, Any]:
    """Rotate the residual stream of `model` (in place) to the basis and keep `k` features;
    returns the config keys set (Hugging Face models)."""
    M64 = torch.from_numpy(rotation(basis, k))
    for r, _e in stream.tied:  # the head will read W diag(g) M, the table E M
        head: Any = model.get_submodule(r)
        head.weight = nn.Parameter(head.weight.detach().clone())
    for n in stream.norms:
        if stream.post_ln:
            _select_norm(model, n, M64)
        else:
            _read_norm(model, n, M64, stream.width)
    for name in (*stream.embeddings, *stream.writers):
        _write_rows(model.get_submodule(name), M64)
    for name in stream.params:
        owner, _, attr = name.rpartition(".")
        m = model.get_submodule(owner)
        p = getattr(m, attr)
        setattr(m, attr, _param(p.double() @ M64, p))
    return _sync_config(model, stream, k)


def _sync_config(model: nn.Module, stream: Stream, k: int) -> dict[str, Any]:
    owner = tr.hf_owner(model)
    if owner is None:
        return {}
    cfg = owner[1].config
    changes: dict[str, Any] = {}
    key = next((h for h in HIDDEN_KEYS if isinstance(getattr(cfg, h, None), int)), None)
    if key is not None:
        changes[key] = k
    ffn = next((f for f in tr.FFN_KEYS if hasattr(cfg, f)), None)
    if ffn is not None and stream.ffn:
        changes[ffn] = stream.ffn  # GPT-2's n_inner=None would mean 4 x n_embd
    changes["head_dim"] = stream.heads[1]  # read by ViT / Llama-style classes, else ignored
    eps = next((e for e in EPS_KEYS if isinstance(getattr(cfg, e, None), float)), None)
    if eps is not None and not stream.post_ln:  # post-LN norms keep their eps
        changes[eps] = getattr(cfg, eps) * stream.width / k
    if stream.tied and getattr(cfg, "tie_word_embeddings", False):
        changes["tie_word_embeddings"] = False
        tied = getattr(owner[1], "all_tied_weights_keys", None)
        if isinstance(tied, dict):  # transformers 5: what save/load would tie again
            for r, _e in stream.tied:
                tied.pop(tr._rel(r, owner[0]) + ".weight", None)
    for c in tr._configs(model):
        for name, v in changes.items():
            setattr(c, name, v)
    return changes


def params_after(model: nn.Module, stream: Stream, k: int) -> int:
    """The parameter count of `model` after `slice_hidden` to `k` (without cutting it)."""
    D = stream.width
    total = sum(p.numel() for p in model.parameters())

    def rows(name: str) -> int:  # a writer's parameters change by k/D
        m = model.get_submodule(name)
        return sum(p.numel() for p in m.parameters(recurse=False))

    delta = 0
    for name in (*stream.embeddings, *stream.writers):
        delta += rows(name) // D * (k - D)
    for name in stream.params:
        delta += model.get_parameter(name).numel() // D * (k - D)
    untied = {r for r, _e in stream.tied}
    for n in stream.norms:
        ln = model.get_submodule(n.path)
        delta += sum(k - (D if p is not None else 0) for p in (ln.weight, ln.bias))
        for r in n.readers:
            out = tr.weight_of(model.get_submodule(r)).shape[0]
            delta += out * k if r in untied else out * (k - D)  # untied: a weight of its own
    return total + delta


def refusal(model: nn.Module, X: np.ndarray) -> str:
    """'' when the hidden size of `model` can be narrowed, else one line why: the stream is
    found and, on a copy, the rotation at full width must give the same outputs on `X[:2]`."""
    stream = find_stream(model, X)
    return stream if isinstance(stream, str) else _inexact(model, stream, X)


def cuttable(model: nn.Module, X: np.ndarray) -> Stream | None:
    """The stream of `model` where a plan can narrow it (found, exact at full width, at least 4
    wide: a cut to 2 features saves something), else None."""
    stream = find_stream(model, X)
    if isinstance(stream, str) or stream.width < 4 or _inexact(model, stream, X):
        return None
    return stream


def _inexact(model: nn.Module, stream: Stream, X: np.ndarray) -> str:
    """'' when the cut at full width gives `model`'s outputs on `X[:2]`, else one line."""
    x = torch.from_numpy(X[:2])
    copied = copy.deepcopy(model).eval()
    slice_hidden(copied, stream, stream_basis(copied, stream, X[:2]), stream.width)
    with torch.no_grad():
        want, got = tr._output(model, x), tr._output(copied, x)
    err = (got - want).abs().max().item()
    if err > 1e-4 * (want.abs().max().item() + 1e-6):
        return f"hidden size: the rotation at full width changes the outputs (diff {err:.2g})"
    return ""


# --- re-fit --------------------------------------------------------------------------------------


@torch.no_grad()
def refit_hidden(
    student: nn.Module,
    teacher: nn.Module,
    stream: Stream,
    M: np.ndarray,
    X: np.ndarray,
    ridge: float = 1e-4,
    batch_size: int = 256,
) -> list[str]:
    """Re-fit, in execution order, every projection touching the narrowed stream by ridge least
    squares on the calibration rows, from what it reads in the student: a norm's readers to the
    teacher's same outputs, a writer (attention output, down projection) to the teacher's same
    output rotated into the stream (`Mᵀz`). `student` is `teacher` sliced by `slice_hidden` (the
    same module paths); returns the projections re-fitted."""
    Mt = torch.from_numpy(M)
    done: list[str] = []
    steps: list[tuple[tuple[str, ...], bool]] = []
    for i, n in enumerate(stream.norms):
        steps.append((n.readers, False))
        if i < len(stream.writers):
            steps.append(((stream.writers[i],), True))
    every = tuple(p for names, _ in steps for p in names)
    of_teacher = tr.FixedTaps(teacher, X, batch_size, outputs=every).get  # its rows, batches
    for names, rotate in steps:
        eqs = {p: _NormalEquations(student.get_submodule(p).bias is not None) for p in names}
        for i, xb in enumerate(batches(X, batch_size)):
            a = tr.taps(student, xb, inputs=names)
            z = of_teacher(i, xb, (), names)
            for p, eq in eqs.items():
                A, Z = a[("in", p)], z[("out", p)]
                A, Z = A.reshape(-1, A.shape[-1]), Z.reshape(-1, Z.shape[-1])
                eq.add(A, Z.double() @ Mt if rotate else Z)
        for p, eq in eqs.items():
            W, b = eq.solve(ridge)
            tr._set_map(student.get_submodule(p), W, b)
            done.append(p)
    return done


@dataclass
class HiddenReport:
    width: int = 0  # the teacher's
    kept: int = 0
    discarded: float = 0.0  # share of what the norms read, lost on the calibration rows
    config: dict[str, Any] | None = None
    refitted: list[str] | None = None


def narrow_hidden(
    student: nn.Module,
    teacher: nn.Module,
    k: int,
    X: np.ndarray,
    refit: bool = True,
    ridge: float = 1e-4,
    batch_size: int = 256,
) -> HiddenReport:
    """Narrow the residual stream of `student` (a copy of `teacher`) to `k` features, in place:
    the basis on the calibration rows `X`, the rotation and slice, then (`refit`) the least-squares
    re-fit of every projection touching the stream. Raises ValueError with one line when the model
    cannot be narrowed this way."""
    stream = find_stream(student, X)
    if isinstance(stream, str):
        raise ValueError(stream)
    basis = stream_basis(student, stream, X, batch_size)
    config = slice_hidden(student, stream, basis, k)
    report = HiddenReport(stream.width, k, basis.discarded(k), config)
    if refit:
        M = rotation(basis, k)
        report.refitted = refit_hidden(student, teacher, stream, M, X, ridge, batch_size)
    student.eval()
    return report


def hidden_group(model: nn.Module, X: np.ndarray) -> tr.TGroup:
    """The residual stream as a transformer group (`kind="hidden"`, width D, cut in steps of one
    feature): `why_not` is `refusal`'s line; `unsaved` says why the model's config cannot express
    a narrower stream (a cut on a copy, rebuilt from its config: GPT-2's attention width is
    n_embd), '' where `save_pretrained` -> `from_pretrained` gives the student back. Not in
    `transformer_groups` (transformer.py cannot import this module): the width plan adds it
    (reduce.plan_hidden, with `HiddenCost`: a hidden cut multiplies with the heads and
    feed-forward widths) and reconstruct runs `narrow_hidden` after `transformer.narrow`."""
    stream = find_stream(model, X)
    if isinstance(stream, str):
        return tr.TGroup("hidden", "hidden", 0, (), None, why_not=stream)
    why = refusal(model, X)
    unsaved = ""
    if not why and tr.hf_owner(model) is not None:
        copied = copy.deepcopy(model)
        basis = any_basis(stream)
        # a width the heads divide, so that a config deriving head sizes from it can still build
        k = max(stream.width - stream.heads[0], 2)
        slice_hidden(copied, stream, basis, k)
        mismatch = tr.config_mismatch(copied)
        if mismatch:
            unsaved = (
                f"its config cannot express a hidden size below {stream.width} with the "
                f"attention and feed-forward widths kept ({mismatch})"
            )
    stack = tr.find(model).blocks[0].stack
    members = (*stream.embeddings, *stream.writers, *(n.path for n in stream.norms))
    why = tr.held_to_config(model, why, unsaved)
    return tr.TGroup(
        "hidden", "hidden", stream.width, members, stack, True, why_not=why, unsaved=unsaved
    )


# --- the width plan ------------------------------------------------------------------------------

NAME = "hidden"  # the group's name in a width plan (`hidden_group`)


def plan_step(width: int, most: int = 64) -> int:
    """The plan's step in features: the smallest divisor of `width`, at least 2 (the narrowest
    stream), that leaves at most `most` steps."""
    return next(s for s in range(2, width + 1) if width % s == 0 and width // s <= most)


def plan_basis(basis: HiddenBasis) -> Basis:
    """What the planner allocates by: a pre-LN stream of width k keeps the top k-1 directions,
    so the explained variance has a leading 0 for the all-ones slot (`retained(k)` = their
    share); a post-LN one keeps k channels, each with the variance it adds."""
    ev = np.concatenate([[0.0] * basis.spare, basis.values])
    return Basis(mean=np.zeros(len(ev)), components=np.zeros((len(ev), 0)), explained_variance=ev)


@dataclass(frozen=True)
class HiddenCost:
    """Parameters as a function of the groups' widths and the hidden size k, exact. At the
    teacher's width, `full` (a tied head stays tied); below it every parameter's size is affine
    in k for given heads, units and layers (the q/k/v, output, up and down projections are k x
    heads or k x units, tables and norms k wide, an untied head vocab x k), so the count is
    the line through `low` and `high`, the cost models of two sliced copies (k = 2 and 3)."""

    full: tr.Cost
    low: tr.Cost
    high: tr.Cost
    width: int
    name: str = NAME

    def params(self, widths: dict[str, int] | None = None) -> int:
        w = dict(widths or {})
        k = w.pop(self.name, self.width)
        if k >= self.width:
            return self.full.params(w)
        a, b = self.low.params(w), self.high.params(w)
        return a + (b - a) * (k - 2)


def any_basis(stream: Stream) -> HiddenBasis:
    """A basis of the stream's kind, its directions (channels) in no particular order: for a
    cut whose shapes matter, not its values, and for the exactness check at full width."""
    D = stream.width
    if stream.post_ln:
        return HiddenBasis(np.eye(D), np.ones(D), 0, selection=True)
    return HiddenBasis(_ones_complement(D), np.ones(D - 1), 0)


def _sliced(model: nn.Module, stream: Stream, k: int) -> nn.Module:
    """A copy with the stream cut to `k` along any basis (only the shapes matter)."""
    copied = copy.deepcopy(model)
    slice_hidden(copied, stream, any_basis(stream), k)
    return copied


def cost_model(model: nn.Module, groups: list[tr.TGroup], stream: Stream) -> HiddenCost:
    """`tr.cost_model` of the heads / FFN / depth `groups`, with the hidden size (width >= 4)."""
    low, high = (_sliced(model, stream, k) for k in (2, 3))
    return HiddenCost(
        tr.cost_model(model, groups),
        tr.cost_model(low, groups),
        tr.cost_model(high, groups),
        stream.width,
    )


def narrowed_hidden(model: nn.Module, X: np.ndarray, fraction: float) -> nn.Module:
    """`model` (in place) with its stream cut to `fraction` of its width along any basis, when
    it can be (the shapes of a planned student: file size, latency); else left as it is."""
    stream = cuttable(model, X)
    if stream is None:
        return model
    k = max(2, int(fraction * stream.width))
    if k < stream.width:
        slice_hidden(model, stream, any_basis(stream), k)
    return model

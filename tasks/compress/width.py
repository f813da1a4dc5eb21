"""Width-mode reconstruction on any model: keep k units of each coupled group, re-fit its readers.

Group by group, in execution order (ThiNet / He et al. 2017 style, on calibration rows):
1. choose k units of the group from the *student's* activations so far (so the errors of
   earlier groups are seen and corrected), pooled over every layer that reads the group:
   by pivoted QR on the top-k PCA loadings (`pqr`, the units that best span the principal
   subspace), or by `importance` (mean squared activation × squared norm of the readers'
   weights on that unit); attention heads each keep the same number of dimensions;
2. remove the other units physically, with every coupled layer (tasks/compress/graph.py);
3. re-fit each reader by ridge least squares so that, from what it now reads, it
   reproduces the *teacher's* outputs of that layer: min ‖[A 1] W̃ − Z‖² + λ‖W‖². A
   MultiheadAttention is re-fitted twice: its q/k/v projection from its narrower input,
   then its output projection from the attention values it now computes.
   The normal equations are accumulated over calibration batches (memory-bounded).
4. once every group is cut, re-fit every reader once more, in execution order: each then
   fits what it finally reads (a residual stream's readers were fitted before the groups
   downstream of them changed).

The result is the user's own module tree with narrower layers: smaller and faster, not masked.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from distill.tasks.compress.graph import (
    Graph,
    Group,
    Reader,
    keep_units,
    no_fastpath,
    out_units,
    trace,
)
from distill.tasks.compress.memo import Digested, remembered
from distill.tasks.compress.pca import Basis, Moments, feature_rows
from distill.tasks.compress.rows import batches as row_blocks


def batches(X: np.ndarray, size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(X), size):
        yield torch.from_numpy(X[start : start + size])


# --- looking inside a forward pass -------------------------------------------------------


class _Captured(Exception):
    """Raised by a hook once it has what it came for: the rest of the forward pass is skipped."""


@dataclass
class Call:
    """The inputs (or output) a module saw in one forward pass."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    output: Any = None


@torch.no_grad()
def capture(model: nn.Module, name: str, x: torch.Tensor, output: bool = False) -> Call:
    """What module `name` receives (or returns, `output=True`) when `model` runs on `x`."""
    module = model.get_submodule(name)
    call = Call()

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        call.args, call.kwargs = args, kwargs
        if not output:
            raise _Captured

    def post(_m: nn.Module, _args: tuple, _kwargs: dict, out: Any) -> None:
        call.output = out
        raise _Captured

    handles = [module.register_forward_pre_hook(pre, with_kwargs=True)]
    if output:
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        with no_fastpath():
            model.eval()(x)
    except _Captured:
        pass
    finally:
        for h in handles:
            h.remove()
    return call


def unit_view(reader: Reader, a: torch.Tensor) -> torch.Tensor:
    """A reader's input as rows of the group's units: (samples, units). Conv channels are on
    axis 1 (every position is a sample), Linear and attention features on the last axis; a
    unit spread over S flattened features gives S samples."""
    rows = feature_rows(a, channels_first=reader.kind == "conv")
    per = len(reader.positions[0])
    cols = torch.tensor([p for unit in reader.positions for p in unit])
    picked = rows[:, cols].reshape(rows.shape[0], len(reader.positions), per)
    return picked.movedim(2, 1).reshape(-1, len(reader.positions))


def group_bases(
    model: nn.Module, groups: list[Group], X: np.ndarray, batch_size: int = 256
) -> dict[str, Basis]:
    """One streamed pass: PCA of the units of each group, pooled over all its readers' inputs
    (`model` left in eval mode). The same model and rows measured again (a search's builds from
    one teacher) answer from memory (tasks/compress/memo.py)."""
    return _group_bases(model.eval(), groups, X, batch_size)


@remembered
@torch.no_grad()
def _group_bases(
    model: nn.Module, groups: list[Group], X: np.ndarray, batch_size: int
) -> dict[str, Basis]:
    moments = {g.name: Moments(g.width) for g in groups}
    hooks = []
    for g in groups:
        for reader in g.readers:

            def hook(_m: nn.Module, args: tuple, kwargs: dict, g=g, reader=reader) -> None:
                a = args[0] if args else kwargs["query"]
                moments[g.name].add_rows(unit_view(reader, a))

            hooks.append(
                model.get_submodule(reader.name).register_forward_pre_hook(hook, with_kwargs=True)
            )
    try:
        with no_fastpath():
            for xb in batches(X, batch_size):
                model(xb)
    finally:
        for h in hooks:
            h.remove()
    return {name: m.basis() for name, m in moments.items()}


# --- which units to keep -----------------------------------------------------------------


def _reader_weight(module: nn.Module) -> torch.Tensor:
    """(outputs, input features) of a reader's linear map."""
    w: torch.Tensor
    if isinstance(module, nn.MultiheadAttention):
        w = module.in_proj_weight
    else:
        w = cast(torch.Tensor, module.weight)  # a Linear or Conv reader
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return w.detach().movedim(1, 0).reshape(w.shape[1], -1).T  # (out·kernel, in channels)
    return w.detach()


def activation_importance(model: nn.Module, group: Group, basis: Basis) -> np.ndarray:
    """E[a_j²] · Σ_readers ‖W_reader[:, j]‖² per unit j: how much each unit feeds forward."""
    energy = basis.explained_variance @ (basis.components**2).T + basis.mean**2  # diag of E[a aᵀ]
    feed = np.zeros(group.width)
    for reader in group.readers:
        W = _reader_weight(model.get_submodule(reader.name)).pow(2).sum(0).double().numpy()
        feed += np.array([W[list(unit)].sum() for unit in reader.positions])
    return energy * feed


def _blocks(group: Group) -> list[np.ndarray]:
    size = group.width // group.step
    return [np.arange(b * size, (b + 1) * size) for b in range(group.step)]


def choose_units(
    group: Group, k: int, scores: np.ndarray | None = None, basis: Basis | None = None
) -> np.ndarray:
    """Sorted indices of the k units to keep: the highest `scores`, or the units whose PCA
    loadings pivoted QR picks first (`basis`). With attention heads, each head keeps k/heads."""
    per = k // group.step
    keep = []
    for block in _blocks(group):
        if scores is not None:
            order = block[np.argsort(-scores[block], kind="stable")]
        else:
            assert basis is not None, "choose_units: give scores or a basis"
            loadings = basis.components[np.ix_(block, np.arange(min(per, len(block))))]
            _, _, pivots = scipy.linalg.qr(loadings.T, pivoting=True, mode="economic")
            order = block[pivots]
        keep.extend(order[:per].tolist())
    return np.sort(np.asarray(keep, dtype=np.int64))


def select_units(
    model: nn.Module, group: Group, k: int, X: np.ndarray, how: str, batch_size: int = 256
) -> np.ndarray:
    basis = group_bases(model, [group], X, batch_size)[group.name]
    return SELECTIONS[how](model, group, k, basis)


# `reconstruct.selection` -> which k units of a group are kept (a test keeps the config's
# choices equal to these keys)
SELECTIONS: dict[str, Callable[[nn.Module, Group, int, Basis], np.ndarray]] = {
    "pqr": lambda model, group, k, basis: choose_units(group, k, basis=basis),
    "importance": lambda model, group, k, basis: choose_units(
        group, k, scores=activation_importance(model, group, basis)
    ),
}


# --- re-fitting a reader -----------------------------------------------------------------


def _conv_rows(conv: nn.Conv1d | nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """Rows of a conv's linear map: unfolded patches (its own padding applied first)."""
    if any(conv._reversed_padding_repeated_twice):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        a = F.pad(a, conv._reversed_padding_repeated_twice, mode=mode)
    if isinstance(conv, nn.Conv1d):
        a = a.unsqueeze(2)
        kernel, stride, dil = (1, *conv.kernel_size), (1, *conv.stride), (1, *conv.dilation)
    else:
        kernel, stride, dil = conv.kernel_size, conv.stride, conv.dilation
    cols = F.unfold(a, kernel, dilation=dil, stride=stride)  # (N, C·k, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def attention_values(mha: nn.MultiheadAttention, call: Call) -> torch.Tensor:
    """What the attention layer hands its output projection: its forward with the projection
    replaced by the identity."""
    names = ("query", "key", "value")
    q, k, v = (call.args[i] if i < len(call.args) else call.kwargs[n] for i, n in enumerate(names))
    if mha.batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    E = mha.embed_dim
    out, _ = F.multi_head_attention_forward(
        q,
        k,
        v,
        E,
        mha.num_heads,
        mha.in_proj_weight,
        mha.in_proj_bias,
        mha.bias_k,
        mha.bias_v,
        mha.add_zero_attn,
        0.0,
        torch.eye(E, dtype=q.dtype),
        torch.zeros(E, dtype=q.dtype),
        training=False,
        key_padding_mask=call.kwargs.get("key_padding_mask"),
        need_weights=False,
        attn_mask=call.kwargs.get("attn_mask"),
        is_causal=call.kwargs.get("is_causal", False),
    )
    return out.transpose(0, 1) if mha.batch_first else out


def _query(call: Call) -> torch.Tensor:
    return call.args[0] if call.args else call.kwargs["query"]


class _NormalEquations:
    """Σ [A 1]ᵀ[A 1] and Σ [A 1]ᵀ Z over batches, then the ridge solution."""

    def __init__(self, intercept: bool) -> None:
        self.intercept = intercept
        self.G: torch.Tensor | None = None
        self.R: torch.Tensor | None = None

    def add(self, A: torch.Tensor, Z: torch.Tensor) -> None:
        A, Z = A.double(), Z.double()
        if self.intercept:
            A = torch.cat([A, torch.ones(A.shape[0], 1, dtype=A.dtype)], dim=1)
        G, R = A.T @ A, A.T @ Z
        if self.G is None or self.R is None:  # the first batch (both are set together)
            self.G, self.R = G, R
        else:
            self.G, self.R = self.G + G, self.R + R

    def solve(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight (out, d), bias or None)."""
        assert self.G is not None and self.R is not None, "no batches were added"
        d = self.G.shape[0] - int(self.intercept)
        lam = ridge * torch.trace(self.G[:d, :d]) / max(d, 1)
        reg = torch.zeros_like(self.G)
        reg[range(d), range(d)] = lam
        M = self.G + reg
        solution = None
        if lam > 0:  # a ridge makes the weights' block positive definite: Cholesky solves it,
            # 10-20x faster than the SVD (d = 1,024: 0.04 s vs 0.43 s, one thread; equal to 1e-14)
            factor, info = torch.linalg.cholesky_ex(M)
            if int(info) == 0:
                solution = torch.cholesky_solve(self.R, factor)
        if solution is None:  # no ridge, or not positive definite in floating point (dead
            # units make G exactly singular, where the default QR driver goes wrong): SVD-based
            solution = torch.linalg.lstsq(M, self.R, driver="gelsd").solution
        return solution[:d].T.float().contiguous(), (
            solution[d].float() if self.intercept else None
        )


@remembered(keep=256)
@torch.no_grad()
def teacher_outputs(
    teacher: Digested, name: str, xb: np.ndarray, channels_first: bool
) -> np.ndarray:
    """The teacher's outputs of layer `name` on one batch of rows, as (samples, units) rows
    (`feature_rows`). Remembered (memo.py) batch by batch, within its bound of bytes (a batch
    larger than that is computed each time, as before): every reconstruction of a search re-fits
    its readers to the same teacher on the same rows, each twice (`refit_again`), and the teacher
    ran to each reader every time. `teacher`: its digest taken once per reconstruction, not per
    batch or layer."""
    model = teacher.model.eval()
    out = feature_rows(
        model.get_submodule(name)(_query(capture(model, name, torch.from_numpy(xb)))),
        channels_first,
    )
    # numpy has no bfloat16; float32 holds a half-precision value exactly (the normal equations
    # read the targets as float64)
    return (out if out.dtype in (torch.float32, torch.float64) else out.float()).numpy()


@torch.no_grad()
def refit_reader(
    student: nn.Module,
    teacher: nn.Module,
    reader: Reader,
    X: np.ndarray,
    kept_out: dict[str, torch.Tensor],
    ridge: float,
    batch_size: int = 256,
    digested: Digested | None = None,
) -> list[str]:
    """Re-fit one reader of the student, in place, to the teacher's outputs of that layer on its
    kept output units. Returns the names of the maps re-fitted. `digested`: the teacher with its
    digest already taken (a reconstruction takes it once for all its readers)."""
    module, t_module = student.get_submodule(reader.name), teacher.get_submodule(reader.name)
    kept = kept_out.get(reader.name, torch.arange(out_units(t_module)))
    if reader.kind == "attention":
        return _refit_attention(student, teacher, reader.name, X, kept, ridge, batch_size)
    eq = _NormalEquations(module.bias is not None)
    picked, known = kept.numpy(), digested or Digested.of(teacher.eval())
    for rows in row_blocks(X, batch_size):
        a = _query(capture(student, reader.name, torch.from_numpy(rows)))
        if reader.kind == "conv":
            A = _conv_rows(cast(nn.Conv1d | nn.Conv2d, module), a)
        else:
            A = a.reshape(-1, a.shape[-1])
        targets = teacher_outputs(known, reader.name, rows, reader.kind == "conv")
        eq.add(A, torch.from_numpy(targets[:, picked]))
    weight, bias = eq.solve(ridge)
    shape = cast(torch.Tensor, module.weight).shape  # a Linear or Conv reader
    module.weight = nn.Parameter(weight.reshape(len(kept), *shape[1:]))
    if bias is not None:
        module.bias = nn.Parameter(bias)
    return [reader.name]


def _refit_attention(
    student: nn.Module,
    teacher: nn.Module,
    name: str,
    X: np.ndarray,
    kept: torch.Tensor,
    ridge: float,
    batch_size: int,
) -> list[str]:
    mha = cast(nn.MultiheadAttention, student.get_submodule(name))  # an "attention" reader
    t_mha = cast(nn.MultiheadAttention, teacher.get_submodule(name))
    E_t = t_mha.embed_dim
    rows = torch.cat([kept, kept + E_t, kept + 2 * E_t])  # q, k, v of the kept dimensions
    eq = _NormalEquations(mha.in_proj_bias is not None)
    for xb in batches(X, batch_size):
        call, t_call = capture(student, name, xb), capture(teacher, name, xb)
        q, t_q = _query(call), _query(t_call)
        if len(call.args) < 3 or not (call.args[0] is call.args[1] is call.args[2]):
            return []  # cross-attention: the q/k/v inputs differ; left as it is
        t_b = t_mha.in_proj_bias[rows] if t_mha.in_proj_bias is not None else None
        eq.add(
            q.reshape(-1, q.shape[-1]),
            F.linear(t_q, t_mha.in_proj_weight[rows], t_b).reshape(-1, len(rows)),
        )
    weight, bias = eq.solve(ridge)
    mha.in_proj_weight = nn.Parameter(weight)
    if bias is not None:
        mha.in_proj_bias = nn.Parameter(bias)
    # then the output projection, from the attention values the re-fitted q/k/v give
    out = mha.out_proj
    eq = _NormalEquations(out.bias is not None)
    for xb in batches(X, batch_size):
        values = attention_values(mha, capture(student, name, xb))
        target = capture(teacher, name, xb, output=True).output[0]
        eq.add(values.reshape(-1, values.shape[-1]), target[..., kept].reshape(-1, len(kept)))
    weight, bias = eq.solve(ridge)
    out.weight = nn.Parameter(weight)
    if bias is not None:
        out.bias = nn.Parameter(bias)
    return [f"{name}.in_proj", f"{name}.out_proj"]


# --- the whole reconstruction ------------------------------------------------------------


@dataclass
class WidthReport:
    """What reconstruction did: units kept per group, the maps re-fitted, what was left alone."""

    kept: dict[str, list[int]] = field(default_factory=dict)  # group -> teacher unit indices kept
    # layer -> the teacher's output units its outputs are (layers whose outputs were cut)
    kept_out: dict[str, list[int]] = field(default_factory=dict)
    refitted: list[str] = field(default_factory=list)
    not_refitted: dict[str, str] = field(default_factory=dict)  # layer -> why


def _update_kept(
    kept_out: dict[str, torch.Tensor], removed: dict[str, list[int]], graph: Graph
) -> None:
    for name, idxs in removed.items():
        current = kept_out.get(name)
        if current is None:
            current = torch.arange(len(idxs) + out_units(graph.model.get_submodule(name)))
        mask = torch.ones(len(current), dtype=torch.bool)
        mask[idxs] = False
        kept_out[name] = current[mask]


def reconstruct_width(
    teacher: nn.Module,
    widths: dict[str, int],
    X: np.ndarray,
    how: str = "pqr",
    ridge: float = 1e-4,
    batch_size: int = 256,
    report: WidthReport | None = None,
    refit_again: bool = True,
) -> nn.Module:
    """A narrower copy of the teacher: group `name` keeps `widths[name]` units, readers re-fit."""
    teacher = teacher.eval()
    known = Digested.of(teacher)  # the teacher is not changed here: one digest for every reader
    student = copy.deepcopy(teacher)
    example = torch.from_numpy(X[:2])
    graph = trace(student, example)
    kept_out: dict[str, torch.Tensor] = {}
    report = report if report is not None else WidthReport()
    reduced: list[Group] = []
    for name in [g.name for g in graph.groups]:
        k = widths.get(name)
        if (
            reduced
        ):  # a cut moves the inputs of readers it shares with other groups (concatenations)
            graph = trace(student, example)
        group = graph.group(name)
        if k is None or k >= group.width or not group.reducible:
            continue
        keep = select_units(student, group, k, X, how, batch_size)
        report.kept[group.name] = keep.tolist()
        _update_kept(kept_out, keep_units(graph, group, keep), graph)
        reduced.append(group)
        for reader in group.readers:
            refit_reader(student, teacher, reader, X, kept_out, ridge, batch_size, known)
    report.kept_out = {name: idxs.tolist() for name, idxs in kept_out.items()}
    if reduced and refit_again:
        # a reader re-fitted early (a residual stream's, read again far downstream) saw inputs
        # that later groups changed: one more pass over every reader, in execution order, fits
        # each to what it finally reads
        graph = trace(student, example)
        readers = {r.name: r for g in graph.groups if g.reducible for r in g.readers}
        for reader in sorted(readers.values(), key=lambda r: graph.order.get(r.name, 1 << 30)):
            done = refit_reader(student, teacher, reader, X, kept_out, ridge, batch_size, known)
            report.refitted += done
            if not done:
                report.not_refitted[reader.name] = "cross-attention (query, key and value differ)"
    return student.eval()

"""The model's graph: which units are coupled, who reads them, and what a narrower model costs.

A *group* is a set of units (neurons, channels, embedding dimensions) that must be kept or
removed together: a layer's output channels with the BatchNorm after it; a residual stream
with every layer that writes it, every norm on it and every layer that reads it; the
hidden units of a transformer's feed-forward block; the channels through a depthwise conv.
Torch-Pruning's `DependencyGraph` finds them by tracing autograd on one example batch, so
it follows skip connections, concatenations, flattens and `nn.MultiheadAttention` in any
`nn.Module`, whatever its `forward` does; it also performs the physical removal.

On top of its groups this module says, for each group:
- its *readers*: the Linear / Conv (groups=1) / MultiheadAttention layers whose inputs are
  the group's units; width-mode reconstruction re-fits them by least squares;
- its *step*: units go in multiples of the attention heads that read them, so every head
  keeps the same number of dimensions;
- whether it can be reduced at all, and if not, why (stated in the reduce stage's record).

Layers are named by their dotted module path (`layer2.0.conv1`); a group is named after
its first producer in execution order.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import SupportsInt

import torch
import torch_pruning as tp
from torch import nn

from distill.tasks.platform.errors import UserError

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
REFIT = (nn.Linear, *CONVS)  # readers re-fitted by least squares (when groups == 1)
PER_UNIT = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.PReLU, nn.Embedding)
ROOTS = (nn.Linear, *CONVS, nn.Embedding, nn.MultiheadAttention)


@dataclass(frozen=True)
class Reader:
    """A layer that reads a group's units: `positions[j]` are the input features of unit j
    (one for a channel, `S` for a channel flattened over S positions)."""

    name: str
    kind: str  # linear | conv | attention
    positions: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Group:
    name: str  # the first producer's dotted path
    root: str  # the module Torch-Pruning prunes the group from
    width: int
    step: int  # units are kept in multiples of this (the heads of attention layers reading it)
    producers: tuple[str, ...]  # layers whose output units these are
    readers: tuple[Reader, ...]
    members: tuple[str, ...]  # every module with parameters the group touches
    why_not: str = ""  # empty: reducible

    @property
    def reducible(self) -> bool:
        return not self.why_not


@dataclass
class Graph:
    """A traced model: its groups in execution order, and Torch-Pruning's graph to cut it."""

    model: nn.Module
    dg: tp.DependencyGraph
    groups: list[Group]
    order: dict[str, int] = field(default_factory=dict)  # module name -> execution position

    def group(self, name: str) -> Group:
        return next(g for g in self.groups if g.name == name)

    def reducible(self) -> list[Group]:
        return [g for g in self.groups if g.reducible]


@contextlib.contextmanager
def no_fastpath() -> Iterator[None]:
    """Transformer layers in eval mode skip their submodules' forwards (a fused kernel): hooks
    on `linear1` or `self_attn` would never fire. Off while distill looks inside."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def execution_order(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Position of each module's first call in one forward pass."""
    order: dict[str, int] = {}

    def seen(name: str):
        def hook(_module: nn.Module, _args: object) -> None:
            order.setdefault(name, len(order))

        return hook

    hooks = [m.register_forward_pre_hook(seen(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad(), no_fastpath():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    return order


def out_units(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, CONVS):
        return module.out_channels
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    raise TypeError(type(module).__name__)


def _kind(module: nn.Module) -> str:
    return (
        "attention"
        if isinstance(module, nn.MultiheadAttention)
        else "linear"
        if isinstance(module, nn.Linear)
        else "conv"
    )


def _attention_blocker(mha: nn.MultiheadAttention) -> str:
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        return "attention with separate key/value sizes, bias_k or add_zero_attn"
    return ""


def _blocker(module: nn.Module) -> str:
    """Why a module in a group stops it from being reduced ('' when it does not)."""
    if isinstance(module, CONVS):
        if module.groups > 1 and not (module.groups == module.in_channels == module.out_channels):
            return f"grouped convolution (groups={module.groups})"
        return ""
    if isinstance(module, nn.MultiheadAttention):
        return _attention_blocker(module)
    if isinstance(module, (nn.Linear, *PER_UNIT)):
        return ""
    if isinstance(module, nn.Parameter):
        return ""
    return f"{type(module).__name__} has no re-fit rule"


def _positions(idxs: list, roots: list, width: int) -> tuple[tuple[int, ...], ...]:
    """Group unit j -> the reader's input features. Torch-Pruning maps unit indices through
    flattens (unit j -> S features) and concatenations (offsets) and keeps, for each mapped
    index, the root unit it came from."""
    units: list[list[int]] = [[] for _ in range(width)]
    for i, root in zip(idxs, roots, strict=True):
        units[int(root)].append(int(i))
    return tuple(tuple(sorted(u)) for u in units)


def trace(model: nn.Module, example: torch.Tensor) -> Graph:
    """The coupled groups of `model` (in eval mode) on one example batch of its inputs."""
    model.eval()
    order = execution_order(model, example)
    dg = tp.DependencyGraph()
    with warnings.catch_warnings(), torch.enable_grad():
        warnings.simplefilter("ignore")  # unwrapped parameters (positional embeddings) are expected
        try:
            dg.build_dependency(model, example_inputs=example, verbose=False)
        except Exception as err:  # noqa: BLE001 -- Torch-Pruning fails in many ways
            raise UserError(
                f"cannot trace the model's graph: {type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}"
            ) from None
    names = {m: n for n, m in model.named_modules()}
    groups = []
    for tp_group in dg.get_all_groups(root_module_types=ROOTS):
        group = _describe(tp_group, dg, names, order)
        if group is not None:
            groups.append(group)
    groups.sort(key=lambda g: order.get(g.name, 1 << 30))
    return Graph(model=model, dg=dg, groups=groups, order=order)


def _describe(tp_group, dg: tp.DependencyGraph, names: dict, order: dict[str, int]) -> Group | None:
    root_module = tp_group[0].dep.target.module
    if root_module not in names:
        return None
    width = out_units(root_module)
    producers, readers, members, blockers, heads = [], [], [], [], []
    for item in tp_group.items:
        dep, idxs, module = item.dep, item.idxs, item.dep.target.module
        if isinstance(module, nn.Parameter):
            members.append(dg._param_to_name.get(module, "parameter"))
            continue
        if module not in names or next(module.parameters(recurse=False), None) is None:
            continue  # traced operations (add, reshape, ...) and parameter-free modules
        name, is_out = names[module], dg.is_out_channel_pruning_fn(dep.handler)
        members.append(name)
        if reason := _blocker(module):
            blockers.append(f"{name}: {reason}")
        if isinstance(module, nn.MultiheadAttention):
            producers.append(name)
            heads.append(module.num_heads)
            readers.append(Reader(name, "attention", _positions(idxs, item.root_idxs, width)))
        elif isinstance(module, REFIT) and not _depthwise(module):
            if is_out:
                producers.append(name)
            else:
                readers.append(Reader(name, _kind(module), _positions(idxs, item.root_idxs, width)))
        elif isinstance(module, nn.Embedding) and is_out:
            producers.append(name)
    producers = sorted(set(producers), key=lambda n: order.get(n, 1 << 30))
    readers = sorted(
        {r.name: r for r in readers}.values(), key=lambda r: order.get(r.name, 1 << 30)
    )
    step = math.lcm(*heads) if heads else 1
    why_not = "; ".join(dict.fromkeys(blockers))
    if not why_not and not readers:
        why_not = "no layer reads these units (a model output)"
    if not why_not and width % step:
        why_not = f"{width} units do not split into {step} heads"
    if not why_not and width <= step:
        why_not = "a single unit per head"
    name = producers[0] if producers else names[root_module]
    return Group(
        name=name,
        root=names[root_module],
        width=width,
        step=step,
        producers=tuple(producers),
        readers=tuple(readers),
        members=tuple(dict.fromkeys(members)),
        why_not=why_not,
    )


def _depthwise(module: nn.Module) -> bool:
    return isinstance(module, CONVS) and module.groups > 1 and module.groups == module.out_channels


def pruning_group(graph: Graph, group: Group, units: list[int] | None = None):
    """Torch-Pruning's group object for these units (default: all), e.g. for its importance
    criteria (`tp.importance.GroupMagnitudeImportance()(pruning_group(graph, group))`)."""
    if units is None:
        units = list(range(out_units(graph.model.get_submodule(group.root))))
    return _pruning_group(graph, group, units)


def _pruning_group(graph: Graph, group: Group, remove: list[int]):
    root = graph.model.get_submodule(group.root)
    fn = graph.dg.get_pruner_of_module(root).prune_out_channels
    return graph.dg.get_pruning_group(root, fn, remove)


def keep_units(graph: Graph, group: Group, keep: Iterable[SupportsInt]) -> dict[str, list[int]]:
    """Physically remove every unit of `group` not in `keep` (indices into its current units:
    a list, a tensor or an array of them).

    Kept units compute exactly what they computed before, given the same inputs. Returns,
    per layer whose outputs shrank, the output indices removed (to map a student's outputs
    back to the teacher's)."""
    kept = {int(k) for k in keep}
    current = out_units(graph.model.get_submodule(group.root))
    remove = [j for j in range(current) if j not in kept]
    if not remove:
        return {}
    pruning = _pruning_group(graph, group, remove)
    names = {m: n for n, m in graph.model.named_modules()}
    removed: dict[str, list[int]] = {}
    for dep, idxs in pruning:
        module = dep.target.module
        if (
            module in names
            and graph.dg.is_out_channel_pruning_fn(dep.handler)
            and isinstance(module, (*REFIT, nn.MultiheadAttention, nn.Embedding))
        ):
            removed[names[module]] = sorted(int(i) for i in idxs)
    pruning.prune()
    return removed


# --- what a narrower model costs -------------------------------------------------------

Dim = tuple[int, dict[str, int]]  # size = constant + Σ multiplier · width of the named group


@dataclass(frozen=True)
class ParamModel:
    """Parameters of the model as a function of its groups' widths, measured on the model:
    each group is cut by one step on a copy and every parameter's shape change is read off.
    Exact for the cuts Torch-Pruning makes (products of dims, sums over concatenations)."""

    tensors: dict[str, tuple[Dim, ...]]
    widths: dict[str, int]  # the teacher's

    def params(self, widths: dict[str, int] | None = None) -> int:
        w = self.widths | (widths or {})
        total = 0
        for dims in self.tensors.values():
            size = 1
            for constant, per_group in dims:
                size *= constant + sum(m * w[g] for g, m in per_group.items())
            total += size
        return total


def param_model(
    model: nn.Module, example: torch.Tensor, groups: list[Group] | None = None
) -> ParamModel:
    probe = copy.deepcopy(model)
    graph = trace(probe, example)
    groups = groups if groups is not None else graph.reducible()
    before = {n: tuple(p.shape) for n, p in probe.named_parameters()}
    per: dict[str, list[dict[str, int]]] = {n: [{} for _ in s] for n, s in before.items()}
    for group in groups:
        g = graph.group(group.name)
        block = g.width // g.step
        # one unit off each block (attention heads stay equal)
        keep = [j for j in range(g.width) if j % block != block - 1]
        shapes_then = {n: tuple(p.shape) for n, p in probe.named_parameters()}
        keep_units(graph, g, keep)
        for n, p in probe.named_parameters():
            for d, (was, now) in enumerate(zip(shapes_then[n], p.shape, strict=True)):
                if was != now:
                    per[n][d][g.name] = (was - now) // g.step
    widths = {g.name: g.width for g in groups}
    tensors = {}
    for n, shape in before.items():
        dims = []
        for d, size in enumerate(shape):
            mult = per[n][d]
            dims.append((size - sum(m * widths[g] for g, m in mult.items()), mult))
        tensors[n] = tuple(dims)
    return ParamModel(tensors=tensors, widths=widths)

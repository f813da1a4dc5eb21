"""Stage 5 — prune, then recover by distillation. Two methods (`compress.prune.method`):

- structured: remove whole units of every coupled group of the model's graph (neurons,
  channels, a residual stream's channels, attention dimensions head by head; lowest L2 or
  L1 norm of the weights that write them, or lowest activation × outgoing-weight energy)
  with every coupled layer: the model really gets smaller and faster. In a model of
  transformer blocks, whole layers (least contributing first) go instead of part of the heads and
  feed-forward units where that changes the model's output less for the same parameters
  (tasks/compress/transformer.py `prune_to_fraction`). Gradual: `rounds`
  prune → KD-recover steps on a cubic schedule (Zhu & Gupta 2017), the teacher as the KD
  target.
- unstructured: global magnitude pruning of Linear/Conv weights (one threshold across all
  layers), KD recovery with the masks held, masks folded in (`prune.remove`). Zeros do not
  shrink a dense file: the evaluate stage reports nonzeros and the compressed size for that.
"""

from __future__ import annotations

import copy
import math
from typing import Protocol, cast

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

from distill.tasks.compress import transformer
from distill.tasks.compress.data import Dataset
from distill.tasks.compress.finetune import FitSettings, History, fit
from distill.tasks.compress.graph import REFIT, Group, keep_units, trace
from distill.tasks.compress.recipe import recipe_for, resolved, resolved_prune
from distill.tasks.compress.width import activation_importance, choose_units, group_bases
from distill.tasks.platform.config import FinetuneConfig, PruneConfig
from distill.tasks.platform.errors import UserError


def prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, REFIT)]


def magnitude_prune(model: nn.Module, amount: float) -> nn.Module:
    """Zero `amount` of all Linear/Conv weights by global magnitude; masks stay attached."""
    prune.global_unstructured(
        prunable_weights(model), pruning_method=prune.L1Unstructured, amount=amount
    )
    return model


def fold_masks(model: nn.Module) -> nn.Module:
    for module, name in prunable_weights(model):
        if prune.is_pruned(module):
            prune.remove(module, name)
    return model


def cubic_schedule(amount: float, rounds: int) -> list[float]:
    """Sparsity after each round: s_t = s·(1 − (1 − t/n)³) — prune fast early, gently late."""
    return [amount * (1 - (1 - t / rounds) ** 3) for t in range(1, rounds + 1)]


def unit_scores(model: nn.Module, group: Group, criterion: str, X: np.ndarray) -> np.ndarray:
    """Higher = more important. Norms of each unit's weights in the layers that write it
    (summed over a residual stream's writers), or its activation energy times the energy of
    the readers' weights on it."""
    if criterion == "activation":
        return activation_importance(model, group, group_bases(model, [group], X)[group.name])
    total = np.zeros(group.width)
    for name in group.producers:
        rows = _writer_rows(model.get_submodule(name))
        total += (rows.pow(2).sum(1) if criterion == "l2" else rows.abs().sum(1)).double().numpy()
    return np.sqrt(total) if criterion == "l2" else total


def _writer_rows(module: nn.Module) -> torch.Tensor:
    """(units, weights) of a layer that writes a group's units."""
    if isinstance(module, nn.MultiheadAttention):
        return module.out_proj.weight.detach()
    if isinstance(module, nn.Embedding):
        return module.weight.detach().T
    weight = cast(torch.Tensor, module.weight)  # a Linear or Conv: REFIT
    return weight.detach().reshape(weight.shape[0], -1)


def remove_lowest_units(
    model: nn.Module,
    keep_fraction: float,
    criterion: str,
    X: np.ndarray,
    original: dict[str, int],
    params: int | None = None,
) -> list[transformer.PruneCut]:
    """Shrink every reducible group to ceil(keep_fraction × its original width) units (whole
    heads' worth at a time for attention), in place. A model of transformer blocks: to the
    parameters that cut leaves (or `params`), by whole heads and feed-forward units of every
    layer or by whole layers and narrower ones, whichever changes its output least on `X`
    (transformer.prune_to_fraction: the cuts it measured are returned, the one made first)."""
    if transformer.holds_blocks(model):
        return transformer.prune_to_fraction(model, keep_fraction, criterion, X, original, params)
    example = torch.from_numpy(X[:2])
    graph, cut = trace(model, example), False
    for name in [g.name for g in graph.reducible()]:
        if cut:  # a cut moves the inputs of readers shared with other groups (concatenations)
            graph, cut = trace(model, example), False
        group = graph.group(name)
        full = original.get(group.name, group.width)
        keep_n = max(1, math.ceil(keep_fraction * full / group.step)) * group.step
        if keep_n < group.width:
            keep = choose_units(group, keep_n, scores=unit_scores(model, group, criterion, X))
            keep_units(graph, group, keep)
            cut = True
    return []


def prunable_groups(model: nn.Module, X: np.ndarray) -> list[Group] | list[transformer.TGroup]:
    """The groups structured pruning narrows: heads and feed-forward units of transformer blocks
    (transformer.py), else the traced graph's reducible groups."""
    if transformer.holds_blocks(model):
        return transformer.prunable_groups(model, X)
    return trace(model, torch.from_numpy(X[:2])).reducible()


def recover(
    model: nn.Module,
    teacher: nn.Module,
    data: Dataset,
    cfg: PruneConfig,
    finetune: FinetuneConfig,
    seed: int,
    device: str,
) -> tuple[nn.Module, History]:
    """KD recovery after a pruning step: the `finetune` recipe for `recovery_epochs`, at half its
    learning rate (left-out keys: the teacher's family's, tasks/compress/recipe.py)."""
    recipe = recipe_for(teacher)
    finetune, epochs = resolved(finetune, recipe), resolved_prune(cfg, recipe).recovery_epochs
    assert finetune.lr is not None and epochs is not None  # resolved
    settings = FitSettings.of(finetune, seed, device, epochs=epochs, lr=finetune.lr / 2)
    return fit(model, data, settings, teacher=teacher, description="recovering from pruning")


def structured_prune(
    teacher: nn.Module,
    student: nn.Module,
    data: Dataset,
    cfg: PruneConfig,
    finetune: FinetuneConfig,
    seed: int,
    device: str = "cpu",
) -> tuple[nn.Module, History]:
    model = copy.deepcopy(student)
    X = data.X_train[:1024]
    groups = prunable_groups(model, X)
    if not groups:
        raise UserError(
            "config key 'compress.prune.method': structured pruning found no group of units to "
            "narrow in this student; use compress.prune.method=unstructured"
        )
    original = {g.name: g.width for g in groups}
    blocks = transformer.holds_blocks(model)
    history = History()
    for sparsity in cubic_schedule(cfg.amount, cfg.rounds):
        # transformers: the parameters asked are the unpruned student's at this fraction, so a
        # round that dropped a layer does not make the next one cut its share again
        params = (
            transformer.asked_params(
                student, cast("list[transformer.TGroup]", groups), 1 - sparsity
            )
            if blocks
            else None
        )
        remove_lowest_units(model, 1 - sparsity, cfg.criterion, X, original, params)
        model, round_history = recover(model, teacher, data, cfg, finetune, seed, device)
        for name, values in round_history.curves().items():
            getattr(history, name).extend(values)
    return model, history


class Pruner(Protocol):
    def __call__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        data: Dataset,
        cfg: PruneConfig,
        finetune: FinetuneConfig,
        seed: int,
        device: str = "cpu",
    ) -> tuple[nn.Module, History]: ...


def unstructured_prune(
    teacher: nn.Module,
    student: nn.Module,
    data: Dataset,
    cfg: PruneConfig,
    finetune: FinetuneConfig,
    seed: int,
    device: str = "cpu",
) -> tuple[nn.Module, History]:
    model = copy.deepcopy(student)
    magnitude_prune(model, cfg.amount)
    model, history = recover(model, teacher, data, cfg, finetune, seed, device)
    return fold_masks(model), history


# `compress.prune.method` -> its implementation (the config's choices; a test keeps them equal)
PRUNERS: dict[str, Pruner] = {"structured": structured_prune, "unstructured": unstructured_prune}


def prune_and_recover(
    teacher: nn.Module,
    student: nn.Module,
    data: Dataset,
    cfg: PruneConfig,
    finetune: FinetuneConfig,
    seed: int,
    device: str = "cpu",
) -> tuple[nn.Module, History]:
    if cfg.amount == 0:
        return copy.deepcopy(student), History()
    return PRUNERS[cfg.method](teacher, student, data, cfg, finetune, seed, device)

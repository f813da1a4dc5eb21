"""Stage 5 — prune: global magnitude pruning of Linear/Conv weights, then KD recovery.

The smallest-magnitude weights across all layers are zeroed together (one global
threshold), the student recovers for a few epochs of distillation with the masks held,
and the masks are then folded into the weights (`prune.remove`). Zeros do not shrink a
dense file: the evaluate stage reports nonzeros and the compressed size for that reason.
"""

from __future__ import annotations

import copy

from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn
from torch.nn.utils import prune

from tasks.config import FinetuneConfig, PruneConfig
from tasks.data import Dataset
from tasks.finetune import FitSettings, History, fit
from tasks.topology import REDUCIBLE


def prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, REDUCIBLE)]


def magnitude_prune(model: nn.Module, amount: float) -> nn.Module:
    """Zero `amount` of all Linear/Conv weights by global magnitude; masks stay attached."""
    prune.global_unstructured(prunable_weights(model), pruning_method=prune.L1Unstructured, amount=amount)
    return model


def fold_masks(model: nn.Module) -> nn.Module:
    for module, name in prunable_weights(model):
        if prune.is_pruned(module):
            prune.remove(module, name)
    return model


def prune_and_recover(teacher: nn.Module, student: nn.Module, data: Dataset, cfg: PruneConfig,
                      finetune: FinetuneConfig, seed: int, device: str = "cpu") -> tuple[nn.Module, History]:
    model = copy.deepcopy(student)
    if cfg.amount == 0:
        return model, History()
    magnitude_prune(model, cfg.amount)
    settings = FitSettings(epochs=cfg.recovery_epochs, lr=finetune.lr / 2, batch_size=finetune.batch_size,
                           patience=finetune.patience, weight_decay=finetune.weight_decay,
                           temperature=finetune.temperature, alpha=finetune.alpha, seed=seed, device=device)
    model, history = fit(model, data, settings, teacher=teacher, description="recovering from pruning")
    return fold_masks(model), history


@task(name="prune", cache_policy=NO_CACHE)
def prune_task(teacher: nn.Module, student: nn.Module, data: Dataset, cfg: PruneConfig,
               finetune: FinetuneConfig, seed: int, device: str) -> tuple[nn.Module, History]:
    return prune_and_recover(teacher, student, data, cfg, finetune, seed, device)

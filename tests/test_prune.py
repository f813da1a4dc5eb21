import numpy as np
import torch

from tasks.config import FinetuneConfig, PruneConfig
from tasks.evaluate import count_params
from tasks.prune import fold_masks, magnitude_prune, prune_and_recover, prunable_weights
from tasks.teacher import build_mlp


def _weights(model):
    return torch.cat([m.weight.detach().flatten() for m, _ in prunable_weights(model)])


def test_global_magnitude_pruning_is_exact_and_global():
    torch.manual_seed(0)
    model = build_mlp(10, [20, 30], 4)
    before = _weights(model).abs()
    fold_masks(magnitude_prune(model, 0.4))
    after = _weights(model)
    n = before.numel()
    assert int((after == 0).sum()) == round(0.4 * n)
    # global: the zeroed weights are exactly the smallest-magnitude ones across all layers
    threshold = before.sort().values[round(0.4 * n) - 1]
    assert torch.all(before[after == 0] <= threshold) and torch.all(before[after != 0] >= threshold)
    assert not any(hasattr(m, "weight_mask") for m, _ in prunable_weights(model))


def test_recovery_keeps_the_sparsity(digits):
    torch.manual_seed(0)
    teacher = build_mlp(64, [32], 10).eval()
    student = build_mlp(64, [32], 10)
    pruned, history = prune_and_recover(teacher, student, digits, PruneConfig(amount=0.5, recovery_epochs=2),
                                        FinetuneConfig(), seed=0)
    weights = _weights(pruned)
    assert int((weights == 0).sum()) == round(0.5 * weights.numel())
    params, nonzeros = count_params(pruned)
    assert params - nonzeros == int((weights == 0).sum())  # biases are not pruned
    assert len(history.val_accuracy) == 2
    assert np.count_nonzero(_weights(student).numpy()) == _weights(student).numel()  # input untouched

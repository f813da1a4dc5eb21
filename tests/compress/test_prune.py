import copy
import itertools
import math

import numpy as np
import pytest
import torch

from distill.tasks.compress.architectures import build_cnn, build_mlp
from distill.tasks.compress.evaluate import count_params, saved_size
from distill.tasks.compress.graph import keep_units, trace
from distill.tasks.compress.prune import (
    cubic_schedule,
    fold_masks,
    magnitude_prune,
    prunable_weights,
    prune_and_recover,
    structured_prune,
    unit_scores,
)
from distill.tasks.platform.config import FinetuneConfig, PruneConfig


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
    pruned, history = prune_and_recover(
        teacher,
        student,
        digits,
        PruneConfig(method="unstructured", amount=0.5, recovery_epochs=2),
        FinetuneConfig(),
        seed=0,
    )
    weights = _weights(pruned)
    assert int((weights == 0).sum()) == round(0.5 * weights.numel())
    params, nonzeros = count_params(pruned)
    assert params - nonzeros == int((weights == 0).sum())  # biases are not pruned
    assert len(history.val_accuracy) == 2
    assert (
        np.count_nonzero(_weights(student).numpy()) == _weights(student).numel()
    )  # input untouched


# --- structured pruning ---------------------------------------------------------------


@pytest.mark.parametrize(
    "model, n_features",
    [
        (build_mlp(6, [12, 9], 3), 6),
        (build_cnn((2, 5, 5), [4, 3], 3), 50),  # the last conv's reader sits after a Flatten
        (build_cnn((2, 12), [4, 3], 3), 24),
    ],
)
def test_removal_keeps_kept_units_exact(model, n_features):
    torch.manual_seed(0)
    model.eval()
    X = torch.randn(20, n_features)
    for group in trace(model, X[:2]).reducible():  # each group on its own fresh copy
        pruned = copy.deepcopy(model)
        keep = np.arange(0, group.width, 2)
        keep_units(trace(pruned, X[:2]), group, keep)
        index = int(group.name)
        reader = int(group.readers[0].name)
        with torch.no_grad():
            # the kept units of the pruned layer compute exactly what they did
            assert torch.allclose(
                pruned[: index + 1](X), model[: index + 1](X)[:, keep], atol=1e-6, rtol=0
            )
            # the reader sees exactly the kept units' activations and drops the others' terms
            a = model[: index + 1](X)
            mask = torch.zeros(group.width)
            mask[keep] = 1.0
            expected = model[index + 1 : reader + 1](
                a * mask.reshape((1, -1) + (1,) * (a.dim() - 2))
            )
            assert torch.allclose(pruned[: reader + 1](X), expected, atol=1e-5)


def test_cubic_schedule():
    s = cubic_schedule(0.5, 3)
    assert s == pytest.approx([0.5 * (1 - (2 / 3) ** 3), 0.5 * (1 - (1 / 3) ** 3), 0.5])
    assert all(a < b for a, b in itertools.pairwise(s))


def test_scores_rank_units_by_norm():
    model = build_mlp(4, [3], 2)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [3, 0, 0, 0], [0, 2, 2, 0]]))
    h = trace(model, torch.zeros(2, 4)).group("0")
    assert np.argsort(unit_scores(model, h, "l2", np.zeros((2, 4), np.float32))).tolist() == [
        0,
        2,
        1,
    ]
    assert np.argsort(unit_scores(model, h, "l1", np.zeros((2, 4), np.float32))).tolist() == [
        0,
        1,
        2,
    ]


def test_structured_pruning_really_shrinks(digits):
    torch.manual_seed(0)
    teacher = build_mlp(64, [64], 10).eval()
    student = build_mlp(64, [40, 30], 10)
    cfg = PruneConfig(
        method="structured", amount=0.5, rounds=2, recovery_epochs=1, criterion="activation"
    )
    pruned, history = structured_prune(teacher, student, digits, cfg, FinetuneConfig(), seed=0)
    assert pruned[0].out_features == math.ceil(0.5 * 40) and pruned[2].out_features == math.ceil(
        0.5 * 30
    )
    assert pruned[2].in_features == 20 and pruned[4].in_features == 15
    assert count_params(pruned)[0] < count_params(student)[0] / 2
    assert saved_size(pruned)[0] < saved_size(student)[0] * 0.6
    assert len(history.val_accuracy) == 2  # one recovery epoch per round


def test_structured_pruning_narrows_a_low_rank_students_ranks(digits):
    """A low-rank student's inner dimension is a group of units like any other."""
    from distill.tasks.compress.reconstruct import reconstruct_low_rank
    from distill.tasks.compress.reduce import reduce_model
    from distill.tasks.platform.config import BudgetConfig, ReduceConfig

    teacher = build_mlp(64, [32, 32], 10).eval()
    low_rank = reconstruct_low_rank(
        teacher,
        reduce_model(teacher, digits.X_train[:200], ReduceConfig(budget=BudgetConfig(ratio=3))),
    )
    cfg = PruneConfig(method="structured", amount=0.5, rounds=1, recovery_epochs=0)
    pruned, _ = structured_prune(teacher, low_rank, digits, cfg, FinetuneConfig(), seed=0)
    assert count_params(pruned)[0] < count_params(low_rank)[0]


@pytest.mark.parametrize("arch", ["resnet2d", "transformer"])
def test_structured_pruning_of_any_architecture(arch, digits):
    from tests.archs import wrapped

    model, X = wrapped(arch)
    data = _data_like(digits, X)
    cfg = PruneConfig(method="structured", amount=0.5, rounds=1, recovery_epochs=0)
    pruned, _ = structured_prune(model, model, data, cfg, FinetuneConfig(), seed=0)
    before = {g.name: g for g in trace(model, torch.from_numpy(X[:2])).reducible()}
    for group in trace(pruned, torch.from_numpy(X[:2])).reducible():
        full = before[group.name]
        assert group.width == math.ceil(0.5 * full.width / full.step) * full.step
    assert pruned(torch.from_numpy(X[:3])).shape == (3, 5)


def _data_like(digits, X):
    import dataclasses

    y = np.arange(len(X)) % 5
    return dataclasses.replace(
        digits,
        X_train=X,
        y_train=y,
        X_val=X[:32],
        y_val=y[:32],
        X_test=X[:32],
        y_test=y[:32],
        classes=list(range(5)),
    )

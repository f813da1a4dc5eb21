import copy

import numpy as np
import pytest
import torch

from distill.tasks.compress.architectures import build_cnn, build_mlp
from distill.tasks.compress.graph import param_model, trace
from distill.tasks.compress.reconstruct import factor_layer, reconstruct_low_rank
from distill.tasks.compress.reduce import (
    LayerPlan,
    Reduction,
    allocate_widths,
    collect_bases,
    reduce_model,
)
from distill.tasks.compress.width import reconstruct_width, refit_reader, select_units
from distill.tasks.platform.config import BudgetConfig, ReduceConfig


def _full_rank(model, X):
    red = reduce_model(model, X, ReduceConfig(budget=BudgetConfig(variance=1.0)))
    plans = [LayerPlan(p.name, p.fan_in, p.out, rank=p.out, variance=1.0) for p in red.layers]
    return Reduction(red.bases, plans, red.teacher_params, red.teacher_params, "variance", 1.0)


@pytest.mark.parametrize(
    "model, n_features",
    [
        (build_mlp(16, [32, 24], 5), 16),
        (build_cnn((1, 8, 8), [4, 6], 3), 64),
        (build_cnn((2, 20), [5, 7], 4), 40),
    ],
)
def test_full_rank_student_equals_teacher(model, n_features):
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    X = np.random.default_rng(0).normal(size=(128, n_features)).astype(np.float32)
    student = reconstruct_low_rank(model.eval(), _full_rank(model, X))
    Xt = torch.from_numpy(X)
    with torch.no_grad():
        assert torch.allclose(student(Xt), model(Xt), atol=1e-5)
    # every reducible layer was really replaced by two
    assert sum(isinstance(m, torch.nn.Sequential) for m in student.modules()) > 1


def test_rank_k_error_equals_discarded_variance():
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 10)
    X = torch.randn(400, 12) @ torch.randn(12, 12)
    model = torch.nn.Sequential(layer).eval()
    basis = collect_bases(model, X.numpy())["0"]
    with torch.no_grad():
        z = layer(X).double()
        for k in (1, 3, 6, 10):
            approx = factor_layer(layer, basis, k)(X).double()
            mse = ((z - approx) ** 2).sum(1).mean().item()
            assert mse == pytest.approx(basis.explained_variance[k:].sum(), rel=1e-4, abs=1e-6)


def test_conv_factorization_shapes():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    X = np.random.default_rng(0).normal(size=(20, 3 * 6 * 6)).astype(np.float32)
    model = torch.nn.Sequential(torch.nn.Unflatten(1, (3, 6, 6)), conv).eval()
    basis = collect_bases(model, X)["1"]
    pair = factor_layer(conv, basis, 2)
    assert pair[0].weight.shape == (2, 3, 3, 3) and pair[1].weight.shape == (8, 2, 1, 1)


@pytest.mark.parametrize("layer", [torch.nn.Linear(6, 5), torch.nn.Conv2d(3, 5, 3, padding=1)])
def test_a_factored_layer_shows_the_weight_and_bias_it_computes(layer):
    """Code that reads the replaced layer's `.weight` (Hugging Face's ViT reads its patch
    projection's dtype) gets the product, which is the layer itself at full rank."""
    rng = np.random.default_rng(0)
    if isinstance(layer, torch.nn.Linear):
        model, X = torch.nn.Sequential(layer), rng.normal(size=(40, 6))
        name = "0"
    else:
        model = torch.nn.Sequential(torch.nn.Unflatten(1, (3, 4, 4)), layer)
        X, name = rng.normal(size=(40, 48)), "1"
    X = X.astype(np.float32)
    pair = factor_layer(layer, collect_bases(model.eval(), X)[name], 5)
    torch.testing.assert_close(pair.weight, layer.weight, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pair.bias, layer.bias, atol=1e-5, rtol=1e-4)
    assert pair.weight.dtype == torch.float32


# --- width mode -------------------------------------------------------------------------


def _random(model, std=0.5):
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=std)
    return model.eval()


def _widths(reduction):
    return {p.name: p.rank for p in reduction.layers if p.rank is not None}


@pytest.mark.parametrize(
    "model, n_features",
    [
        (build_mlp(6, [12, 9], 3), 6),  # Linear reader
        (build_cnn((2, 5, 5), [4, 3], 3), 50),  # Conv2d reader, then Linear after Flatten
        (build_cnn((2, 12), [4, 3], 3), 24),  # Conv1d reader
    ],
)
def test_refit_recovers_the_reader_exactly_when_it_is_identifiable(model, n_features):
    """With every unit kept and no ridge, the least-squares re-fit must return the teacher's
    own reader weights: the targets are an exact linear function of the activations."""
    model = _random(model)
    X = np.random.default_rng(0).normal(size=(400, n_features)).astype(np.float32)
    student = copy.deepcopy(model)
    for group in trace(student, torch.from_numpy(X[:2])).reducible():
        for reader in group.readers:
            refit_reader(student, model, reader, X, {}, ridge=0.0)
            refit, original = student.get_submodule(reader.name), model.get_submodule(reader.name)
            assert torch.allclose(refit.weight, original.weight, atol=1e-4)
            assert torch.allclose(refit.bias, original.bias, atol=1e-4)


def test_width_student_is_a_plain_narrower_network(digits):
    teacher = _random(build_mlp(64, [48, 32], 10), std=0.2)
    red = reduce_model(
        teacher, digits.X_train[:500], ReduceConfig(budget=BudgetConfig(ratio=4)), mode="width"
    )
    student = reconstruct_width(teacher, _widths(red), digits.X_train[:500])
    widths = {p.name: p.rank for p in red.layers}
    assert student[0].out_features == widths["0"] and student[2].in_features == widths["0"]
    assert (
        sum(p.numel() for p in student.parameters()) == red.student_params <= red.teacher_params / 4
    )
    assert not any(hasattr(m, "weight_mask") for m in student.modules())
    assert student(torch.from_numpy(digits.X_test[:3])).shape == (3, 10)


def test_width_allocation_meets_the_budget_and_one_more_unit_breaks_it():
    teacher = build_mlp(20, [40, 30], 5)
    example = torch.zeros(2, 20)
    groups = trace(teacher, example).reducible()
    cost = param_model(teacher, example, groups)
    bases = {g.name: _basis_flat(g.width) for g in groups}
    for target in (400, 900, 1600):  # the teacher has 2,225
        plans = allocate_widths(groups, bases, cost, BudgetConfig(params=target))
        widths = {p.name: p.rank or p.out for p in plans}
        assert cost.params(widths) <= target
        # one more unit in any layer that can still grow would break the budget
        growable = [q for q in plans if q.rank is not None]
        assert growable and all(
            cost.params(widths | {q.name: q.rank + 1}) > target for q in growable
        )


def _basis_flat(m):
    from distill.tasks.compress.reduce import Basis

    return Basis(mean=np.zeros(m), components=np.eye(m), explained_variance=np.linspace(2, 1, m))


def test_pqr_and_importance_pick_k_distinct_units(digits):
    teacher = _random(build_mlp(64, [24], 10), std=0.2)
    group = trace(teacher, torch.zeros(2, 64)).group("0")
    for how in ("pqr", "importance"):
        keep = select_units(teacher, group, 7, digits.X_train[:300], how)
        assert len(set(keep.tolist())) == 7 and keep.max() < 24


def test_width_mode_beats_low_rank_before_finetuning_at_high_compression(digits):
    """The reason width mode exists: at 30x, the rank-k map of a 512-wide layer starves."""
    from distill.tasks.compress.finetune import FitSettings, fit, predict_logits

    torch.manual_seed(0)
    teacher, _ = fit(
        build_mlp(64, [256, 256], 10),
        digits,
        FitSettings(epochs=10, lr=1e-3, batch_size=64, patience=10),
    )
    X = digits.X_train
    acc = lambda m: (predict_logits(m, digits.X_test).argmax(1) == digits.y_test).mean()  # noqa: E731
    budget = ReduceConfig(budget=BudgetConfig(ratio=30))
    low = reconstruct_low_rank(teacher, reduce_model(teacher, X, budget))
    wide = reconstruct_width(teacher, _widths(reduce_model(teacher, X, budget, mode="width")), X)
    assert acc(wide) > acc(low) and acc(wide) > acc(teacher) - 0.05


# --- low rank on any architecture ---------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet2d", "resnet1d", "mobilenet", "transformer"])
def test_low_rank_at_full_rank_reproduces_any_architecture(arch):
    from tests.archs import wrapped

    teacher, X = wrapped(arch)
    student = reconstruct_low_rank(teacher, _full_rank(teacher, X))
    with torch.no_grad():
        assert torch.allclose(student(torch.from_numpy(X)), teacher(torch.from_numpy(X)), atol=1e-5)


def test_low_rank_leaves_fused_transformer_layers_dense_and_says_why():
    from tests.archs import wrapped

    teacher, X = wrapped("transformer")
    red = reduce_model(teacher, X, ReduceConfig(budget=BudgetConfig(variance=0.9)))
    assert "TransformerEncoderLayer" in red.fixed["model.encoder.layers.0.linear1"]
    assert {p.name for p in red.layers} == {"model.embed", "model.head"}


@pytest.mark.parametrize("arch", ["resnet2d", "resnet1d"])
def test_low_rank_budget_counts_the_real_student(arch):
    from tests.archs import wrapped

    teacher, X = wrapped(arch)
    red = reduce_model(teacher, X, ReduceConfig(budget=BudgetConfig(ratio=2)))
    student = reconstruct_low_rank(teacher, red)
    assert (
        sum(p.numel() for p in student.parameters()) == red.student_params <= red.teacher_params / 2
    )

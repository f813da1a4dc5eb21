import numpy as np
import pytest
import torch

from tasks.config import BudgetConfig, ReduceConfig
from tasks.reconstruct import factor_layer, reconstruct_low_rank
from tasks.reduce import LayerPlan, Reduction, collect_bases, reduce_model
from tasks.teacher import build_cnn, build_mlp


def _full_rank(model, X):
    red = reduce_model(model, X, ReduceConfig(budget=BudgetConfig(variance=1.0)))
    plans = [LayerPlan(p.name, p.fan_in, p.out, rank=p.out, variance=1.0) for p in red.layers]
    return Reduction(red.bases, plans, red.teacher_params, red.other_params, "variance", 1.0)


@pytest.mark.parametrize("model, n_features", [
    (build_mlp(16, [32, 24], 5), 16),
    (build_cnn((1, 8, 8), [4, 6], 3), 64),
    (build_cnn((2, 20), [5, 7], 4), 40),
])
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

import numpy as np
import pytest
import torch

from distill.tasks.compress.architectures import build_cnn, build_mlp
from distill.tasks.compress.reduce import (
    BYTES_PER_PARAM,
    Basis,
    allocate,
    calibration_rows,
    collect_bases,
    low_rank_params,
    reduce_model,
)
from distill.tasks.platform.config import BudgetConfig, ReduceConfig
from distill.tasks.platform.errors import UserError


def _mlp():
    torch.manual_seed(0)
    return build_mlp(16, [32, 24], 5).eval()


def test_streamed_pca_equals_numpy_on_all_samples():
    model = _mlp()
    X = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
    bases = collect_bases(model, X, batch_size=7)  # odd batch: the sums must not care
    with torch.no_grad():
        z = model[0](torch.from_numpy(X)).double().numpy()
    cov = np.cov(z, rowvar=False, bias=True)
    eig = np.sort(np.linalg.eigvalsh(cov))[::-1]
    assert np.allclose(bases["0"].mean, z.mean(0), atol=1e-10)
    assert np.allclose(bases["0"].explained_variance, np.clip(eig, 0, None), atol=1e-8)
    U = bases["0"].components
    assert np.allclose(U.T @ U, np.eye(32), atol=1e-10)


def test_conv_pca_uses_pixels_as_samples():
    torch.manual_seed(0)
    model = build_cnn((1, 8, 8), [4], 3).eval()
    X = np.random.default_rng(0).normal(size=(50, 64)).astype(np.float32)
    bases = collect_bases(model, X)
    with torch.no_grad():
        out = model[1](torch.from_numpy(X).reshape(-1, 1, 8, 8))
    z = out.permute(0, 2, 3, 1).reshape(-1, 4).double().numpy()
    assert np.allclose(bases["1"].mean, z.mean(0), atol=1e-10)


def _basis(variances):
    m = len(variances)
    return Basis(
        mean=np.zeros(m), components=np.eye(m), explained_variance=np.asarray(variances, float)
    )


def test_allocation_meets_params_budget_and_prefers_variance_per_param():
    shapes = {"a": (100, 100), "b": (100, 100)}
    # layer a's variance is concentrated in few components, b's is flat
    bases = {"a": _basis([50, 30, 10, 5] + [0.05] * 96), "b": _basis([1.0] * 100)}
    for target in (2_000, 5_000, 9_000):
        plans = allocate(shapes, bases, BudgetConfig(params=target))
        used = sum(p.params for p in plans)
        assert used <= target
        # no single further rank would still fit: the budget is used up to one step
        assert used + 201 > target
    # 3,000 params buy 13 ranks: a's 4 heavy components first (95% of a's variance), then
    # b's flat 1% components, which beat a's 0.05% tail
    plans = {p.name: p for p in allocate(shapes, bases, BudgetConfig(params=3_000))}
    assert plans["a"].rank == 4 and plans["a"].variance > 0.95
    assert plans["b"].rank == 9


def test_allocation_size_and_ratio_budgets():
    shapes = {"a": (64, 128), "b": (128, 10)}
    bases = {"a": _basis(np.linspace(2, 0.1, 64).tolist() + [0.0] * 64), "b": _basis([1.0] * 10)}
    dense = 64 * 128 + 128 + 128 * 10 + 10
    plans = allocate(shapes, bases, BudgetConfig(size_kb=10))
    assert sum(p.params for p in plans) * BYTES_PER_PARAM <= 10 * 1024
    plans = allocate(shapes, bases, BudgetConfig(ratio=4))
    assert sum(p.params for p in plans) <= dense / 4


def test_generous_budget_keeps_every_layer_dense():
    shapes = {"a": (20, 30), "b": (30, 4)}
    bases = {"a": _basis([1.0] * 30), "b": _basis([1.0] * 4)}
    plans = allocate(shapes, bases, BudgetConfig(params=10**6))
    assert all(p.rank is None for p in plans)


def test_layer_that_cannot_save_stays_dense():
    # 4x4: any rank k costs 9k+4 >= 20 once k >= 2, and k=1 costs 13 < 20
    assert low_rank_params(4, 4, 1) < 4 * 4 + 4 <= low_rank_params(4, 4, 2)
    plans = allocate({"a": (2, 2)}, {"a": _basis([1.0, 1.0])}, BudgetConfig(params=100))
    assert plans[0].rank is None


def test_variance_budget_picks_smallest_rank_per_layer():
    shapes = {"a": (100, 100)}
    plans = allocate(shapes, {"a": _basis([6, 3, 1] + [0] * 97)}, BudgetConfig(variance=0.9))
    assert plans[0].rank == 2 and plans[0].variance == pytest.approx(0.9)


def test_impossible_budget_says_the_smallest_reachable_size():
    shapes = {"a": (100, 100)}
    with pytest.raises(UserError, match=r"below the smallest reachable student: 301 params"):
        allocate(shapes, {"a": _basis([1.0] * 100)}, BudgetConfig(params=100))


def test_reduce_model_end_to_end_counts_params():
    model = _mlp()
    X = np.random.default_rng(0).normal(size=(200, 16)).astype(np.float32)
    red = reduce_model(model, X, ReduceConfig(budget=BudgetConfig(ratio=2)))
    assert red.teacher_params == sum(p.numel() for p in model.parameters())
    assert red.student_params <= red.teacher_params / 2


def test_calibration_rows_is_a_seeded_subset():
    X = np.arange(100, dtype=np.float32).reshape(50, 2)
    a, b = calibration_rows(X, 10, 0), calibration_rows(X, 10, 0)
    assert a.shape == (10, 2) and np.array_equal(a, b)
    assert calibration_rows(X, 500, 0) is X


def test_empty_calibration_is_a_user_error():
    with pytest.raises(UserError, match="calibration"):
        collect_bases(_mlp(), np.zeros((1, 16), np.float32))


def test_svd_bases_give_the_truncated_svd():
    from distill.tasks.compress.reconstruct import factor_layer
    from distill.tasks.compress.reduce import svd_bases

    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 9)
    basis = svd_bases(torch.nn.Sequential(layer))["0"]
    U, S, Vh = torch.linalg.svd(layer.weight.detach().double(), full_matrices=False)
    x = torch.randn(5, 12)
    with torch.no_grad():
        for k in (2, 5):
            truncated = (U[:, :k] * S[:k]) @ Vh[:k]
            expected = x.double() @ truncated.T + layer.bias.double()
            assert torch.allclose(factor_layer(layer, basis, k)(x).double(), expected, atol=1e-5)
    assert np.allclose(basis.explained_variance[:9], (S**2).numpy())


def test_svd_needs_low_rank_mode():
    from distill.tasks.platform.config import build_config

    with pytest.raises(UserError, match=r"reduce\.method=svd needs reconstruct\.mode=low_rank"):
        build_config({}, ["reduce.method=svd", "reconstruct.mode=width"])

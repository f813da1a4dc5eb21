import copy

import numpy as np
import pytest
import torch

from distill.tasks.compress.evaluate import OnnxModel
from distill.tasks.compress.graph import keep_units, trace
from distill.tasks.compress.quantize import export_onnx
from distill.tasks.compress.reduce import reduce_model
from distill.tasks.compress.width import WidthReport, capture, reconstruct_width, refit_reader
from distill.tasks.platform.config import BudgetConfig, ReduceConfig
from tests.archs import ARCHS, wrapped


def _out(model, X):
    with torch.no_grad():
        return model(torch.from_numpy(X))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_keeping_every_unit_reproduces_the_teacher(arch):
    teacher, X = wrapped(arch)
    graph = trace(teacher, torch.from_numpy(X[:2]))
    student = reconstruct_width(teacher, {g.name: g.width for g in graph.groups}, X)
    assert torch.allclose(_out(student, X), _out(teacher, X), atol=1e-5)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_refit_of_every_reader_is_exact_when_nothing_was_removed(arch):
    """With every unit kept and no ridge, the least-squares targets are an exact linear
    function of what each reader reads (convs with stride and padding, a Linear on tokens,
    attention's q/k/v and output projections): every re-fit must reproduce the teacher."""
    teacher, X = wrapped(arch)
    student = copy.deepcopy(teacher)
    graph = trace(student, torch.from_numpy(X[:2]))
    refitted = []
    for group in graph.groups:
        for reader in group.readers:
            refitted += refit_reader(student, teacher, reader, X, {}, ridge=0.0)
    assert refitted and all(name for name in refitted)
    scale = _out(teacher, X).abs().max()
    assert (_out(student, X) - _out(teacher, X)).abs().max() < 1e-4 * scale


def test_refit_is_the_ridge_least_squares_optimum():
    teacher, X = wrapped("resnet1d")
    student = copy.deepcopy(teacher)
    graph = trace(student, torch.from_numpy(X[:2]))
    group = graph.group("model.layer1.conv1")
    keep = np.array([0, 2, 3, 5, 7])
    keep_units(graph, group, keep)
    reader = group.readers[0]  # layer1.conv2: 3-wide kernel, padding 1, no bias
    ridge = 1e-2
    refit_reader(student, teacher, reader, X, {}, ridge=ridge)
    x = torch.from_numpy(X)
    a = capture(student, reader.name, x).args[0].double()  # (N, 5, L)
    with torch.no_grad():
        z = teacher.get_submodule(reader.name)(capture(teacher, reader.name, x).args[0]).double()
    A = torch.nn.functional.unfold(torch.nn.functional.pad(a, (1, 1)).unsqueeze(2), (1, 3))
    A = A.transpose(1, 2).reshape(-1, A.shape[1]).numpy()
    Z = z.movedim(1, -1).reshape(-1, z.shape[1]).numpy()
    lam = ridge * np.trace(A.T @ A) / A.shape[1]
    W = np.linalg.solve(A.T @ A + lam * np.eye(A.shape[1]), A.T @ Z)
    got = (
        student.get_submodule(reader.name).weight.detach().double().reshape(W.shape[1], -1).numpy()
    )
    assert np.allclose(got, W.T, atol=1e-5)


def test_refit_does_better_than_surgery_alone():
    teacher, X = wrapped("transformer")
    widths = {
        "model.embed": 16,
        "model.encoder.layers.0.linear1": 24,
        "model.encoder.layers.1.linear1": 24,
    }
    report = WidthReport()
    refitted = reconstruct_width(teacher, widths, X, report=report)
    assert "model.encoder.layers.0.self_attn.out_proj" in report.refitted
    # the same units, removed without any re-fit
    cut = copy.deepcopy(teacher)
    graph = trace(cut, torch.from_numpy(X[:2]))
    for name, keep in report.kept.items():
        keep_units(graph, graph.group(name), keep)
    t = _out(teacher, X)
    assert ((_out(refitted, X) - t) ** 2).mean() < 0.5 * ((_out(cut, X) - t) ** 2).mean()
    for layer in (refitted.model.encoder.layers[0], refitted.model.encoder.layers[1]):
        attn = layer.self_attn
        assert attn.embed_dim == 16 and attn.head_dim == 4 and attn.num_heads == 4


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("ratio", [2, 4])
def test_a_budgeted_student_is_within_budget_and_exports_to_onnx(arch, ratio):
    teacher, X = wrapped(arch)
    reduction = reduce_model(
        teacher, X, ReduceConfig(budget=BudgetConfig(ratio=ratio)), mode="width"
    )
    widths = {p.name: p.rank for p in reduction.layers if p.rank is not None}
    student = reconstruct_width(teacher, widths, X)
    n = sum(p.numel() for p in student.parameters())
    assert n == reduction.student_params <= reduction.teacher_params / ratio
    onnx = OnnxModel(export_onnx(student, X.shape[1]), n, n)
    assert np.allclose(onnx.predictor()(X[:64]), _out(student, X[:64]).numpy(), atol=1e-4)

import copy

import numpy as np
import pytest
import torch
from torch import nn

from distill.tasks.compress import memo
from distill.tasks.compress.architectures import build_mlp
from distill.tasks.compress.graph import trace
from distill.tasks.compress.width import group_bases


@pytest.fixture
def counted():
    calls = []

    @memo.remembered
    def measure(model: nn.Module, X: np.ndarray, batch: int = 4) -> dict[str, np.ndarray]:
        calls.append(1)
        with torch.no_grad():
            return {"out": model(torch.from_numpy(X)).numpy() * batch}

    return measure, calls


def rows(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(8, 6)).astype(np.float32)


def test_the_same_model_and_rows_are_measured_once(counted):
    measure, calls = counted
    model = build_mlp(6, [5], 3).eval()
    first = measure(model, rows())
    assert measure(model, rows()) is first and len(calls) == 1
    assert measure(copy.deepcopy(model), rows()) is first  # another object, the same content
    assert len(calls) == 1


@pytest.mark.parametrize(
    "change",
    [
        lambda m, X: (m[0].weight.data.__setitem__((0, 0), 9.0), X),  # one weight
        lambda m, X: (setattr(m[1], "inplace", True), X),  # a plain attribute
        lambda m, X: (m.train(), X),  # the mode
        lambda m, X: (None, rows(1)),  # the rows
    ],
    ids=["weight", "attribute", "mode", "rows"],
)
def test_any_change_is_measured_afresh(counted, change):
    measure, calls = counted
    model, X = build_mlp(6, [5], 3).eval(), rows()
    measure(model, X)
    _, X = change(model, X)
    measure(model, X)
    assert len(calls) == 2


def test_keyword_and_plain_arguments_are_part_of_the_key(counted):
    measure, calls = counted
    model = build_mlp(6, [5], 3).eval()
    a = measure(model, rows(), batch=4)
    b = measure(model, rows(), batch=8)
    assert len(calls) == 2 and np.allclose(b["out"], 2 * a["out"])


def test_answers_are_read_only_and_the_oldest_is_forgotten(counted):
    measure, calls = counted
    model = build_mlp(6, [5], 3).eval()
    first = measure(model, rows(0))
    with pytest.raises(ValueError, match="read-only"):
        first["out"][0, 0] = 1.0
    for seed in range(1, memo.KEEP + 1):
        measure(model, rows(seed))
    assert len(calls) == memo.KEEP + 1
    assert measure(model, rows(0)) is not first and len(calls) == memo.KEEP + 2


def test_answers_past_the_byte_bound_are_not_kept(monkeypatch, counted):
    measure, calls = counted
    model = build_mlp(6, [5], 3).eval()
    monkeypatch.setattr(memo, "MAX_BYTES", 8 * 3 * 4 + 1)  # one answer of 8 x 3 float32 rows
    first = measure(model, rows(0))
    assert measure(model, rows(0)) is first and len(calls) == 1
    measure(model, rows(1))  # the second pushes the first out
    assert measure(model, rows(0)) is not first and len(calls) == 3
    monkeypatch.setattr(memo, "MAX_BYTES", 8)  # no answer fits
    measure(model, rows(2))
    measure(model, rows(2))
    assert len(calls) == 5


def test_group_bases_from_memory_equal_a_fresh_measurement_and_leave_eval_mode():
    torch.manual_seed(0)
    model = build_mlp(6, [16, 12], 3)
    X = rows()
    groups = trace(model, torch.from_numpy(X[:2])).reducible()
    first = group_bases(model, groups, X, 4)
    model.train()
    again = group_bases(model, groups, X, 4)  # from memory: the mode is part of the contract
    assert again is first and not model.training
    model[0].weight.data.mul_(1.0)  # unchanged content: still remembered
    assert group_bases(model, groups, X, 4) is first
    with torch.no_grad():
        model[0].weight[0, 0] += 1.0
    fresh = group_bases(model, groups, X, 4)
    assert fresh is not first
    name = groups[0].name
    assert not np.allclose(fresh[name].explained_variance, first[name].explained_variance)


def test_reconstruction_reads_the_teacher_from_memory_and_builds_the_same_student(monkeypatch):
    """Every reader is re-fitted to the teacher's outputs on the calibration rows
    (`width.teacher_outputs`): a second reconstruction from the same teacher and rows runs the
    teacher no more, and its student is the one a fresh measurement of them gives, to the bit."""
    from distill.tasks.compress import width
    from tests.zoo import make_resnet1d

    torch.manual_seed(0)
    teacher = make_resnet1d(channels=8, n_classes=4).eval()
    X = np.random.default_rng(0).normal(size=(40, 1, 16)).astype(np.float32)
    graph = trace(teacher, torch.from_numpy(X[:2]))
    widths = {g.name: max(1, g.width // 2) for g in graph.reducible()}
    ran = []  # the teacher run to a reader (a hook would be copied into the student)
    capture = width.capture
    monkeypatch.setattr(
        width,
        "capture",
        lambda model, *a, **k: ran.append(model is teacher) or capture(model, *a, **k),
    )

    first = width.reconstruct_width(teacher, widths, X, batch_size=16)
    assert any(ran)  # the teacher ran to each reader
    ran.clear()
    again = width.reconstruct_width(teacher, widths, X, batch_size=16)
    assert ran and not any(ran)  # the student's readers only: the teacher's from memory
    monkeypatch.setattr(width, "teacher_outputs", width.teacher_outputs.__wrapped__)
    fresh = width.reconstruct_width(teacher, widths, X, batch_size=16)
    assert any(ran)  # measured again
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name
        assert torch.equal(value, first.state_dict()[name]), name


def test_the_reduce_stage_plans_the_same_teacher_rows_and_config_once():
    """A size target's plan measures the reconstruction at the budget the reduce stage then
    builds (plan.shaped): the second plan is the first, and any other budget, mode or weight is
    planned afresh."""
    from distill.tasks.compress.reduce import reduce_model
    from distill.tasks.platform.config import BudgetConfig, ReduceConfig

    model = build_mlp(6, [16, 16], 3).eval()
    X = np.random.default_rng(0).normal(size=(64, 6)).astype(np.float32)
    cfg = ReduceConfig(budget=BudgetConfig(params=200))
    first = reduce_model(model, X, cfg, "width")
    assert reduce_model(copy.deepcopy(model), X.copy(), cfg.model_copy(), "width") is first
    other = reduce_model(model, X, ReduceConfig(budget=BudgetConfig(params=120)), "width")
    assert other is not first and other.student_params < first.student_params
    assert reduce_model(model, X, cfg, "low_rank") is not first
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed[0].weight[0, 0] += 1.0
    assert reduce_model(changed, X, cfg, "width") is not first


def test_a_copy_of_the_teacher_ranks_its_layers_from_memory(monkeypatch):
    """Every trial student of a transformer's depth plan starts as a copy of the teacher: its
    layers' ranking is the teacher's, measured once; a changed weight is ranked afresh."""
    from distill.tasks.compress import transformer as tr
    from tests.compress.test_transformer import TimmNet, _tokens

    teacher, X = TimmNet(depth=3).eval(), _tokens()
    with torch.no_grad():  # weights no other test ranked (the memo is the process's)
        next(teacher.parameters()).add_(0.123)
    calls = []
    monkeypatch.setattr(tr, "output_error", lambda *a, **k: calls.append(1) or 0.5)
    stack = next(g.stack for g in tr.transformer_groups(teacher) if g.kind == "depth")
    first = tr.depth_scores(teacher, stack, X)
    assert len(calls) == 3  # one skipped layer at a time
    assert tr.depth_scores(copy.deepcopy(teacher).eval(), stack, X.copy()) is first
    assert len(calls) == 3 and not first.flags.writeable
    changed = copy.deepcopy(teacher)
    with torch.no_grad():
        next(changed.parameters()).add_(0.1)
    tr.depth_scores(changed, stack, X)
    assert len(calls) == 6

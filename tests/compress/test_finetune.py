import math

import numpy as np
import pytest
import torch

from tasks.compress.finetune import FitSettings, distill, fit, kd_loss, predict_logits
from tasks.compress.teacher import build_mlp
from tasks.platform.config import FinetuneConfig


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5]])
    t = torch.tensor([[2.0, 0.0, 1.0]])
    y = torch.tensor([1])
    T, alpha = 2.0, 0.7

    def softmax(v):
        e = [math.exp(x / T) for x in v]
        return [x / sum(e) for x in e]

    p_t, p_s = softmax([2.0, 0.0, 1.0]), softmax([1.0, 2.0, 0.5])
    kl = sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s, strict=False))
    ce = -math.log(math.exp(2.0) / sum(math.exp(x) for x in [1.0, 2.0, 0.5]))
    expected = alpha * T * T * kl + (1 - alpha) * ce
    assert kd_loss(s, t, y, T, alpha).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_without_teacher_or_alpha_is_cross_entropy():
    s, t, y = torch.randn(8, 4), torch.randn(8, 4), torch.randint(0, 4, (8,))
    ce = torch.nn.functional.cross_entropy(s, y)
    assert torch.allclose(kd_loss(s, None, y, 3.0, 0.9), ce)
    assert torch.allclose(kd_loss(s, t, y, 3.0, 0.0), ce)
    # identical logits: the KL term vanishes
    assert torch.allclose(kd_loss(s, s, y, 3.0, 1.0), torch.tensor(0.0), atol=1e-6)


def test_fit_learns_and_is_seeded(digits):
    settings = FitSettings(epochs=4, lr=1e-2, batch_size=64, patience=10, seed=3)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model, history = fit(build_mlp(64, [32], 10), digits, settings)
        runs.append(predict_logits(model, digits.X_test))
    assert np.array_equal(runs[0], runs[1])
    acc = (runs[0].argmax(1) == digits.y_test).mean()
    assert acc > 0.85
    assert len(history.val_accuracy) == 4 and history.best_epoch >= 0
    assert history.lr[0] == pytest.approx(1e-2) and history.lr[-1] < history.lr[0]  # cosine


def test_early_stopping_restores_the_best_epoch(digits):
    torch.manual_seed(0)
    settings = FitSettings(
        epochs=30, lr=0.5, batch_size=64, patience=2, seed=0
    )  # lr far too high: diverges
    model, history = fit(build_mlp(64, [32], 10), digits, settings)
    assert len(history.val_accuracy) < 30
    final = (predict_logits(model, digits.X_val).argmax(1) == digits.y_val).mean()
    assert final == pytest.approx(max(history.val_accuracy), abs=1e-6)


def test_distillation_moves_the_student_toward_the_teacher(digits):
    torch.manual_seed(0)
    teacher, _ = fit(
        build_mlp(64, [128], 10),
        digits,
        FitSettings(epochs=10, lr=1e-3, batch_size=64, patience=10),
    )
    torch.manual_seed(1)
    student = build_mlp(64, [16], 10)
    before = (
        predict_logits(student, digits.X_test).argmax(1)
        == predict_logits(teacher, digits.X_test).argmax(1)
    ).mean()
    student2, _history = distill(
        teacher, student, digits, FinetuneConfig(epochs=8, lr=5e-3), seed=0
    )
    after = (
        predict_logits(student2, digits.X_test).argmax(1)
        == predict_logits(teacher, digits.X_test).argmax(1)
    ).mean()
    assert after > before + 0.5 and after > 0.9
    assert student2 is not student  # the input student is left as it was

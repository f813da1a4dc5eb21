import copy
import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from distill.tasks.compress.architectures import build_cnn, build_mlp
from distill.tasks.compress.data import load_dataset
from distill.tasks.compress.export_lock import onnx_export_lock, seed_torch
from distill.tasks.compress.finetune import (
    HELD_OUT,
    MIN_HELD_OUT,
    FeatureMatch,
    FitSettings,
    History,
    _teacher_features,
    distill,
    feature_loss,
    feature_pairs,
    fit,
    held_out_rows,
    kd_loss,
    predict_logits,
    r2,
    selection_of,
)
from distill.tasks.compress.graph import keep_units, trace
from distill.tasks.compress.rows import Rows
from distill.tasks.compress.teacher import train_teacher
from distill.tasks.compress.width import WidthReport, reconstruct_width
from distill.tasks.platform.config import DataConfig, FinetuneConfig, TeacherConfig


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


def test_a_time_box_stops_training_after_the_epoch_it_ran_out_in(digits):
    """`finetune.max_minutes`: no epoch starts once the box is spent (the first always runs); the
    run says why it stopped and how long each epoch took. A box of a microsecond: one epoch."""
    recipe = {"epochs": 80, "lr": 3e-3}
    assert FitSettings.of(FinetuneConfig(max_minutes=0.5, **recipe), 0, "cpu").max_seconds == 30.0
    assert FitSettings.of(FinetuneConfig(**recipe), 0, "cpu").max_seconds is None
    settings = FitSettings(epochs=5, lr=1e-2, batch_size=64, patience=10, max_seconds=1e-6)
    torch.manual_seed(0)
    _, history = fit(build_mlp(64, [32], 10), digits, settings)
    assert len(history.val_accuracy) == len(history.epoch_seconds) == 1
    assert history.epoch_seconds[0] > 0 and history.best_epoch == 0
    assert history.params() == {
        "epochs_run": 1,
        "stopped": "time box: 1.66667e-08 min (finetune.max_minutes)",
    }
    unboxed = fit(build_mlp(64, [32], 10), digits, dataclasses.replace(settings, max_seconds=None))
    assert unboxed[1].params() == {"epochs_run": 5}  # ran its epochs: nothing to say


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
        teacher, student, digits, FinetuneConfig(epochs=10, lr=5e-3), seed=0
    )
    after = (
        predict_logits(student2, digits.X_test).argmax(1)
        == predict_logits(teacher, digits.X_test).argmax(1)
    ).mean()
    assert after > before + 0.5 and after > 0.9
    assert student2 is not student  # the input student is left as it was


def test_feature_loss_matches_hand_computation():
    # layer 1: ((1 - 0) / 1)² and ((2 - 4) / 2)², mean 1; layer 2: ((3 - 1) / 1)² = 4
    student = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0]])]
    teacher = [torch.tensor([[0.0, 4.0]]), torch.tensor([[1.0]])]
    scale = [torch.tensor([1.0, 2.0]), torch.tensor([1.0])]
    assert feature_loss(student, teacher, scale).item() == pytest.approx((1 + 4) / 2)


def test_teacher_features_pick_the_kept_units_and_their_std():
    torch.manual_seed(0)
    teacher = build_cnn((2, 5), [4], 3)
    X = torch.randn(16, 10).numpy()
    (feats,), (scale,) = _teacher_features(
        teacher, [FeatureMatch("1", "1", (3, 0))], X, torch.device("cpu")
    )
    with torch.no_grad():
        full = teacher[1](teacher[0](torch.from_numpy(X)))  # (16, 4 channels, 5)
    assert torch.allclose(feats, full[:, [3, 0]])
    assert scale.shape == (2, 1)  # per channel, broadcast over positions
    assert torch.allclose(scale[:, 0], full[:, [3, 0]].transpose(0, 1).reshape(2, -1).std(1))


def test_feature_loss_is_zero_for_a_student_made_of_the_teachers_kept_units():
    torch.manual_seed(0)
    teacher = build_mlp(8, [6, 5], 3)
    X = torch.randn(32, 8).numpy()
    student = copy.deepcopy(teacher)
    graph = trace(student, torch.from_numpy(X[:2]))
    keep_units(graph, graph.group("0"), [1, 4, 5])  # first layer: 3 of 6 units, unchanged
    match = FeatureMatch("0", "0", (1, 4, 5))
    t_feats, scales = _teacher_features(teacher, [match], X, torch.device("cpu"))
    with torch.no_grad():
        s_feat = student[0](torch.from_numpy(X))
    assert feature_loss([s_feat], t_feats, scales).item() == pytest.approx(0.0, abs=1e-12)


def test_feature_matching_pulls_the_students_layers_to_the_teachers(digits):
    torch.manual_seed(0)
    teacher, _ = fit(
        build_mlp(64, [64], 10), digits, FitSettings(epochs=5, lr=1e-3, batch_size=64, patience=5)
    )
    report = WidthReport()
    student = reconstruct_width(teacher, {"0": 16}, digits.X_train[:512], report=report)
    matches = feature_pairs(report.kept_out)
    assert matches == [FeatureMatch("0", "0", tuple(report.kept["0"]))]
    student[0].reset_parameters()  # a start that no longer matches the teacher's units

    def mismatch(model):
        t_feats, scales = _teacher_features(teacher, matches, digits.X_val, torch.device("cpu"))
        with torch.no_grad():
            return feature_loss([model[0](torch.from_numpy(digits.X_val))], t_feats, scales)

    runs = {}
    for beta in (0.0, 10.0):
        settings = FitSettings(
            epochs=5,
            lr=1e-2,
            batch_size=64,
            patience=5,
            temperature=4.0,
            alpha=0.9,
            feature_weight=beta,
        )
        model, _ = fit(copy.deepcopy(student), digits, settings, teacher, features=matches)
        runs[beta] = mismatch(model).item()
        assert not model[0]._forward_hooks  # the hooks are gone
    assert runs[10.0] < 0.5 * runs[0.0]


def test_no_optimizer_step_runs_while_another_thread_exports(digits, monkeypatch):
    """torch's export flag is process-wide: an optimizer call in one thread while another
    exports raised KeyError('custom') (export_lock.py). Here this thread plays the exporter: it
    takes the lock while the other trains, and no step may run until it lets go (should the
    trainer finish first on a loaded machine, the test passes without teeth)."""
    import threading
    import time

    exporting = threading.Event()
    trained_once = threading.Event()
    steps_while_exporting = []
    step = torch.optim.Adam.step

    def watched_step(self, *args, **kwargs):
        steps_while_exporting.append(exporting.is_set())
        trained_once.set()
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", watched_step)
    model = build_mlp(64, [16], 10)
    long = FitSettings(epochs=40, lr=1e-3, batch_size=32, patience=40)
    trainer = threading.Thread(target=fit, args=(model, digits, long), daemon=True)
    trainer.start()
    trained_once.wait()
    with onnx_export_lock():
        exporting.set()
        time.sleep(0.3)  # an export's time, for steps the lock does not hold back
        exporting.clear()
    trainer.join()
    assert len(steps_while_exporting) > 1 and not any(steps_while_exporting)


# --- the rows that choose the epoch -----------------------------------------------------------


def test_seeding_waits_while_another_thread_exports():
    """`torch.manual_seed` is wrapped by torch._dynamo like the optimizer calls: a sweep variant
    seeding its teacher while the other variant's pre-flight exported raised KeyError('custom')
    (CI, stop 38). `seed_torch` takes the export lock: it cannot run while an export holds it."""
    import threading

    done = threading.Event()
    seeder = threading.Thread(target=lambda: (seed_torch(7), done.set()), daemon=True)
    with onnx_export_lock():
        seeder.start()
        assert not done.wait(0.3)  # blocked for as long as the export holds the lock
    assert done.wait(60)
    seeder.join()
    assert torch.initial_seed() == 7


def test_held_out_rows_are_stratified_seeded_and_leave_every_class_a_training_row():
    sizes = {0: 50, 1: 30, 2: 7, 3: 1}  # class 3: one row, which must stay in training
    y = np.repeat(list(sizes), list(sizes.values()))
    np.random.default_rng(0).shuffle(y)
    share = 0.1
    held = held_out_rows(y, share, seed=4)
    assert np.array_equal(held, np.unique(held))  # sorted, no row twice
    for c, n in sizes.items():  # the share of each class, rounded; never a class's last row
        assert (y[held] == c).sum() == min(round(share * n + 1e-9), n - 1)
    assert np.array_equal(held, held_out_rows(y, share, seed=4))  # deterministic
    assert not np.array_equal(held, held_out_rows(y, share, seed=5))  # and seeded
    assert len(held_out_rows(y, 0.0, seed=4)) == 0
    plain = held_out_rows(np.linspace(0, 1, 200), share, seed=4, stratify=False)  # regression
    assert len(plain) == round(share * 200)


def test_the_rows_that_choose_are_training_rows_no_fit_trains_on(digits):
    chosen = selection_of(digits, HELD_OUT, seed=0)
    n = len(digits.y_train)
    assert len(chosen.held) >= MIN_HELD_OUT and not chosen.on_validation
    assert len(chosen.y_train) + len(chosen.y_select) == n
    assert np.array_equal(chosen.X_select, digits.X_train[chosen.held])
    kept = np.setdiff1d(np.arange(n), chosen.held)
    assert np.array_equal(chosen.X_train, digits.X_train[kept])
    # and none of them is a validation row (the guard's): no row of X_select is in X_val
    val = {row.tobytes() for row in digits.X_val}
    assert not any(row.tobytes() in val for row in chosen.X_select)
    # with no share held out, or too few rows to hold out, the validation rows choose
    assert selection_of(digits, 0.0, seed=0).on_validation
    small = dataclasses.replace(digits, X_train=digits.X_train[:50], y_train=digits.y_train[:50])
    assert selection_of(small, HELD_OUT, seed=0).on_validation


def test_rows_on_disk_are_held_out_as_rows_on_disk(digits, tmp_path):
    np.save(tmp_path / "x.npy", digits.X_train.astype(np.float32))
    on_disk = Rows(tmp_path / "x.npy", np.arange(len(digits.X_train)), "digits-train")
    chosen = selection_of(dataclasses.replace(digits, X_train=on_disk), HELD_OUT, seed=0)
    assert isinstance(chosen.X_select, Rows) and isinstance(chosen.X_train, Rows)
    assert np.array_equal(np.asarray(chosen.X_select), digits.X_train[chosen.held])


def _fit_with_val_labels(digits, y_val: np.ndarray, held_out: float):
    torch.manual_seed(0)
    noisy = dataclasses.replace(digits, y_val=y_val)
    settings = FitSettings(epochs=6, lr=3e-2, batch_size=64, patience=6, held_out=held_out)
    return fit(build_mlp(64, [16], 10), noisy, settings)


def test_the_guards_rows_have_no_say_in_the_epoch_restored(digits):
    """Validation labels replaced by noise: the model restored is the same, weight for weight, and
    its epoch the best on the held-out training rows; the validation rows' scores (the curves)
    do follow the noise. The teacher's rule (nothing held out) restores the best on them."""
    noise = np.random.default_rng(1).integers(0, 10, len(digits.y_val))
    (a, ha), (b, hb) = (_fit_with_val_labels(digits, y, HELD_OUT) for y in (digits.y_val, noise))
    assert ha.select_rows == hb.select_rows > 0 and ha.select_score == hb.select_score
    assert ha.best_epoch == hb.best_epoch and ha.select_score[ha.best_epoch] == max(ha.select_score)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])
    assert ha.val_accuracy != hb.val_accuracy  # the validation rows were scored, not consulted
    _, old = _fit_with_val_labels(digits, noise, 0.0)
    assert not old.select_score and old.val_accuracy[old.best_epoch] == max(old.val_accuracy)


def test_a_teacher_distill_trains_chooses_its_epoch_on_held_out_training_rows(digits):
    """The guard's reference is the teacher's validation score: a teacher whose epoch the
    validation rows chose would score above itself there. Its validation labels replaced by
    noise, the same teacher comes back, weight for weight."""
    cfg = TeacherConfig(arch="mlp", hidden=[16], epochs=4, lr=3e-2, batch_size=64)
    noise = np.random.default_rng(1).integers(0, 10, len(digits.y_val))
    history = History()
    a = train_teacher(cfg, digits, seed=0, history=history)
    b = train_teacher(cfg, dataclasses.replace(digits, y_val=noise), seed=0)
    assert history.select_rows == len(held_out_rows(digits.y_train, HELD_OUT, 0))
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])


def test_distillation_chooses_its_epoch_on_held_out_training_rows(digits):
    torch.manual_seed(0)
    teacher = build_mlp(64, [32], 10)
    _, history = distill(teacher, build_mlp(64, [16], 10), digits, FinetuneConfig(epochs=2), 0)
    assert history.select_rows == len(held_out_rows(digits.y_train, HELD_OUT, 0))
    assert history.select_score[history.best_epoch] == max(history.select_score)
    merged = History()  # how the pruning rounds' curves are merged: by attribute name
    for name, values in history.curves().items():
        getattr(merged, name).extend(values)
    assert merged.select_accuracy == history.select_accuracy


def test_a_regression_fit_chooses_by_r2_on_held_out_rows(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 4))
    table = pd.DataFrame(X, columns=[f"x{i}" for i in range(4)])
    table["y"] = X @ np.array([1.5, -2.0, 0.5, 1.0]) + rng.normal(0, 0.3, 400)
    table.to_csv(tmp_path / "t.csv", index=False)
    data = load_dataset(DataConfig(source=f"csv:{tmp_path / 't.csv'}", label="y"), 0)
    torch.manual_seed(0)
    settings = FitSettings(epochs=6, lr=1e-2, batch_size=32, patience=6, held_out=HELD_OUT)
    model, history = fit(build_mlp(4, [16], 1), data, settings)
    held = held_out_rows(data.y_train, HELD_OUT, 0, stratify=False)
    assert data.is_regression and history.select_rows == len(held)
    assert history.select_score[history.best_epoch] == max(history.select_score)
    assert len(history.val_r2) == 6 and "select_r2" in history.curves()
    pred = predict_logits(model, data.X_test)
    assert r2(torch.from_numpy(pred), torch.from_numpy(data.y_test)) > 0.8

"""The accuracy guard's paired decision (tasks/compress/guard.py), against hand counts, scipy's
bootstrap and scikit-learn's R²."""

import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import r2_score

from distill.tasks.compress.guard import Agreement, Guard, decide, disagreement_bound, resolution


def _answers(n, teacher_only_right, student_only_right, classes=10, seed=0):
    """y, teacher and student classes on `n` rows: both right except on the given counts of
    rows where only one of them is."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    teacher, student = y.copy(), y.copy()
    rows = rng.permutation(n)
    a, b = (
        rows[:teacher_only_right],
        rows[teacher_only_right : teacher_only_right + student_only_right],
    )
    student[a] = (y[a] + 1) % classes
    teacher[b] = (y[b] + 1) % classes
    return y, teacher, student


def test_the_same_answers_drop_nothing_with_no_doubt():
    y, teacher, _ = _answers(100, 0, 0)
    d = decide("accuracy", teacher, teacher, y, max_drop=0.0)
    assert (d.drop, d.low, d.high, d.disagreement, d.verdict) == (0.0, 0.0, 0.0, 0.0, "within")


def test_two_rows_of_180_do_not_decide_a_one_point_allowance():
    """The issue's case: 2 of 180 validation rows changed (1.1 points > 1): a resample has no
    discordant row with probability (1 - 2/180)^180 = 13 % > 10 %, so the 90 % lower end is 0:
    not shown to exceed, kept (the point estimate alone rolled the round back)."""
    y, teacher, student = _answers(180, 2, 0)
    d = decide("accuracy", teacher, student, y, max_drop=0.01)
    assert d.drop == pytest.approx(2 / 180) and d.disagreement == pytest.approx(2 / 180)
    assert d.low == 0.0 and d.high > 0.01
    assert d.verdict == "unresolved" and d.ok
    assert "not shown to exceed 0.0100" in d.reason(0.01)


def test_twenty_rows_of_180_are_over_a_one_point_allowance():
    y, teacher, student = _answers(180, 20, 0)
    d = decide("accuracy", teacher, student, y, max_drop=0.01)
    assert d.drop == pytest.approx(20 / 180) and d.low > 0.05
    assert d.verdict == "over" and not d.ok
    assert "above 0.0100 with 90% confidence" in d.reason(0.01)


def test_a_student_better_than_its_teacher_is_within_whatever_the_allowance():
    y, teacher, student = _answers(200, 3, 9)
    d = decide("accuracy", teacher, student, y, max_drop=0.0)
    assert d.drop == pytest.approx(-6 / 200) and d.verdict == "within"
    assert d.disagreement == pytest.approx(12 / 200)


def test_only_discordant_rows_move_the_drop():
    """Rows both get wrong (in different ways) change neither the drop nor its interval."""
    y, teacher, student = _answers(300, 12, 4)
    d = decide("accuracy", teacher, student, y, max_drop=0.01)
    both_wrong_teacher, both_wrong_student = teacher.copy(), student.copy()
    rows = np.flatnonzero((teacher == y) & (student == y))[:30]
    both_wrong_teacher[rows] = (y[rows] + 1) % 10
    both_wrong_student[rows] = (y[rows] + 2) % 10
    e = decide("accuracy", both_wrong_teacher, both_wrong_student, y, max_drop=0.01)
    assert (e.drop, e.low, e.high) == pytest.approx((d.drop, d.low, d.high))


def test_the_interval_is_scipys_paired_percentile_bootstrap():
    y, teacher, student = _answers(400, 25, 10)
    d = decide("accuracy", teacher, student, y, max_drop=0.05, confidence=0.9, resamples=4000)
    diff = (teacher == y).astype(float) - (student == y).astype(float)
    ci = scipy.stats.bootstrap(
        (diff,),
        np.mean,
        confidence_level=0.8,  # two-sided 80 % = one-sided 90 % at each end
        n_resamples=4000,
        method="percentile",
        random_state=1,
    ).confidence_interval
    assert d.low == pytest.approx(ci.low, abs=0.006) and d.high == pytest.approx(ci.high, abs=0.006)


def test_the_r2_drop_is_scikit_learns():
    rng = np.random.default_rng(0)
    y = rng.normal(size=150)
    teacher = y + rng.normal(scale=0.3, size=150)
    student = y + rng.normal(scale=0.5, size=150)
    d = decide("r2", teacher, student, y, max_drop=0.5)
    assert d.drop == pytest.approx(r2_score(y, teacher) - r2_score(y, student))
    assert d.low < d.drop < d.high and d.verdict == "within"


def test_coarse_validation_rows_are_named_before_any_stage():
    line = resolution("accuracy", 180, 0.01)
    assert line is not None and "one row = 0.0056" in line and ">= 200 validation rows" in line
    assert "data.val_size" in line and "target.agreement_rows" in line
    assert resolution("accuracy", 200, 0.01) is None
    assert resolution("r2", 5, 0.01) is None
    # or as many held-out rows for the agreement guard
    assert resolution("accuracy", 180, 0.01, agreement_rows=200) is None
    assert resolution("accuracy", 180, 0.01, agreement_rows=199) is not None


# --- agreement on held-out rows --------------------------------------------------------------


def test_the_disagreement_bound_is_clopper_pearsons():
    # none of n differ: the bound solves (1 - p)^n = 1 - confidence
    assert disagreement_bound(0, 400, 0.9) == pytest.approx(1 - 0.1 ** (1 / 400), rel=1e-9)
    # k of n: the binomial tail at the bound is 1 - confidence
    high = disagreement_bound(3, 400, 0.9)
    assert scipy.stats.binom.cdf(3, 400, high) == pytest.approx(0.1, rel=1e-6)
    assert disagreement_bound(5, 5, 0.9) == 1.0


def test_agreement_shows_within_what_coarse_validation_rows_cannot():
    """100 validation rows (one row = a point), the student loses one the teacher gets right:
    the interval reaches 2 points, not shown within a point. It answers as the teacher on all
    of 400 held-out rows: the drop is at most 1 - 0.1^(1/400) = 0.0057 at 90 %."""
    y, teacher, student = _answers(100, 1, 0)
    alone = decide("accuracy", teacher, student, y, max_drop=0.01)
    assert alone.verdict == "within" and not alone.shown_within(0.01)
    agree = Agreement.of(np.zeros(400), np.zeros(400), 0.9)
    assert (agree.differ, agree.rows) == (0, 400)
    both = decide("accuracy", teacher, student, y, max_drop=0.01, agreement=agree)
    assert both.shown_within(0.01) and both.bound == agree.high < 0.01
    assert (both.low, both.high) == (alone.low, alone.high)  # the labeled interval unchanged
    assert "0 of 400 held-out rows" in both.reason(0.01)
    # 2 rows lost: the estimate is over, the interval is not: agreement makes it within
    y, teacher, student = _answers(100, 2, 0)
    assert decide("accuracy", teacher, student, y, max_drop=0.01).verdict == "unresolved"
    assert decide("accuracy", teacher, student, y, 0.01, agreement=agree).verdict == "within"
    # a student disagreeing on 8 of 400: the bound is above a point, nothing shown
    loose = Agreement.of(np.zeros(400), np.r_[np.ones(8), np.zeros(392)], 0.9)
    assert loose.high > 0.01
    assert not decide("accuracy", teacher, student, y, 0.01, agreement=loose).shown_within(0.01)


def test_agreement_never_overrules_rows_that_show_a_drop_over():
    y, teacher, student = _answers(180, 20, 0)
    agree = Agreement.of(np.zeros(4000), np.zeros(4000), 0.9)
    d = decide("accuracy", teacher, student, y, max_drop=0.01, agreement=agree)
    assert d.verdict == "over" and not d.ok and not d.shown_within(0.01)


def test_the_guard_asks_teacher_and_student_about_the_held_out_rows():
    y, teacher, _ = _answers(60, 0, 0, classes=3)
    X_agree = np.arange(50, dtype=np.float32)[:, None]
    teacher_agree = np.zeros(50, dtype=np.int64)
    guard = Guard(
        1.0,
        0.02,
        np.zeros((60, 1), np.float32),
        y,
        teacher_answers=teacher,
        X_agree=X_agree,
        teacher_agree=teacher_agree,
    )

    def student(X):  # the validation rows as the teacher; class 1 on held-out rows 0..4
        if len(X) == 60:
            return np.eye(3)[teacher]
        return np.eye(3)[(X[:, 0] < 5).astype(int)]

    decision = guard.check("step", student, 10).decision
    assert decision is not None and decision.agreement is not None
    assert (decision.agreement.differ, decision.agreement.rows) == (5, 50)
    assert decision.agreement.high == disagreement_bound(5, 50, guard.confidence)

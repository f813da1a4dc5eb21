"""The accuracy guard's statistics: is a student within `max_drop` of its teacher, on rows that
both were asked about, and how sure can those rows make us?

Teacher and student answer the same validation rows, so their difference is *paired*: only the
rows where exactly one of them is right move it (a row both get right, or both wrong, says
nothing about the drop). The guard resamples the rows (a paired bootstrap: each resample keeps
a row's teacher and student answers together) and reads the drop's interval at
`confidence` from it:

- `over`: the interval's lower end is above `max_drop`: the rows show the step loses too much.
- `within`: the point estimate is at most `max_drop` (its interval may reach above it: the rows
  cannot exclude that; the interval is logged beside the decision).
- `unresolved`: the point estimate is above `max_drop` but the interval reaches below it: with
  these rows the step is not shown to lose more than allowed, and is kept as within, saying so.

A step is rolled back only when `over`. The alternative, the point estimate alone, decides on
single rows: with 180 validation rows one row is 0.56 points, and a 1-point allowance is two
rows (README, targets). `resolution` says before any stage runs when one row weighs more than
half the allowance, with the ways out (more validation rows, a wider allowance).

For a regression guard the statistic is teacher R² - student R² on the resampled rows.

**Agreement** (`target.agreement_rows`, classification): rows with no labels still bound the
drop. On any rows, teacher accuracy - student accuracy <= the share of rows where the two answer
differently (a row can only cost the student a point where it leaves the teacher's answer). So
the student's disagreement with the teacher on rows held out from everything the student was fit
on (KD, calibration, recovery: tasks/compress/pipeline.py `hold_out`) has an upper bound at
`confidence` (Clopper-Pearson: exact for a binomial share) that is an upper bound of the drop
too, from as many rows as the training split can spare. It can only *show* a drop within the
allowance (`Decision.bound`): disagreeing on rows the teacher gets wrong costs nothing, so it
never shows a drop above it, and a step the validation rows show to lose too much is rolled
back whatever the agreement.

`Guard` applies it: the teacher's answers on the validation rows (never the test split) held
once, each step's model asked the same rows (`Guard.check`), the decision kept as a `Check`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import nn

from distill.tasks.compress.data import Dataset
from distill.tasks.compress.evaluate import torch_predictor
from distill.tasks.compress.rows import predict_batched
from distill.tasks.platform.config import TargetConfig
from distill.tasks.platform.errors import UserError

Predict = Callable[[np.ndarray], np.ndarray]
RESAMPLES = 2000
CONFIDENCE = 0.9  # one-sided: the drop is shown to exceed max_drop with this confidence


@dataclass(frozen=True)
class Decision:
    drop: float  # point estimate: teacher's score - student's score on the rows
    low: float  # the interval's lower end at `confidence` (one-sided)
    high: float  # its upper end at `confidence` (one-sided)
    rows: int
    disagreement: float  # fraction of rows where the two predict differently (classification)
    verdict: str  # within | unresolved | over
    agreement: Agreement | None = None  # on unlabeled rows held out (target.agreement_rows)

    @property
    def ok(self) -> bool:
        return self.verdict != "over"

    @property
    def bound(self) -> float:
        """The drop's upper bound at the decision's confidence: the interval's upper end, or
        the disagreement's on held-out rows where that is lower."""
        return min(self.high, self.agreement.high) if self.agreement else self.high

    def shown_within(self, max_drop: float) -> bool:
        """The drop's upper bound is at most `max_drop`: the rows show the drop within it at
        the decision's confidence (not merely fail to show it above)."""
        return self.verdict == "within" and self.bound <= max_drop + 1e-9

    def reason(self, max_drop: float, confidence: float = CONFIDENCE) -> str:
        span = f"{self.drop:.4f} ({confidence:.0%} interval {self.low:.4f}..{self.high:.4f}, "
        span += f"{self.rows} rows)"
        if self.agreement is not None:
            span += f", {self.agreement.line(confidence)}"
        if self.verdict == "over":
            return f"drop {span} is above {max_drop:.4f} with {confidence:.0%} confidence"
        if self.verdict == "unresolved":
            return f"drop {span} is not shown to exceed {max_drop:.4f}: kept"
        return f"drop {span} is within {max_drop:.4f}"


@dataclass(frozen=True)
class Agreement:
    """Teacher and student on `rows` unlabeled rows: `differ` of them answered differently;
    `high`: that share's upper bound at the guard's confidence (Clopper-Pearson), which bounds
    the accuracy drop as well."""

    differ: int
    rows: int
    high: float

    @classmethod
    def of(cls, teacher: np.ndarray, student: np.ndarray, confidence: float) -> Agreement:
        differ, rows = int((np.asarray(teacher) != np.asarray(student)).sum()), len(teacher)
        return cls(differ, rows, disagreement_bound(differ, rows, confidence))

    def line(self, confidence: float) -> str:
        return (
            f"disagrees with the teacher on {self.differ} of {self.rows} held-out rows "
            f"(drop <= {self.high:.4f} at {confidence:.0%})"
        )


def disagreement_bound(differ: int, rows: int, confidence: float) -> float:
    """One-sided Clopper-Pearson upper bound of a share seen as `differ` of `rows`."""
    from scipy.stats import beta

    if differ >= rows:
        return 1.0
    return float(beta.ppf(confidence, differ + 1, rows - differ))


def _r2(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """R² of each resample: `y` and `pred` are [resamples, rows]."""
    residual = ((y - pred) ** 2).sum(axis=1)
    total = ((y - y.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
    return 1.0 - residual / np.maximum(total, 1e-12)


def _drops(
    metric: str, teacher: np.ndarray, student: np.ndarray, y: np.ndarray, index: np.ndarray
) -> np.ndarray:
    """The drop on each resample; `index` is [resamples, rows] of row numbers."""
    if metric == "r2":
        ys = y[index]
        return _r2(ys, teacher[index]) - _r2(ys, student[index])
    right = (teacher == y).astype(np.float64) - (student == y).astype(np.float64)
    return right[index].mean(axis=1)


def decide(
    metric: str,
    teacher: np.ndarray,
    student: np.ndarray,
    y: np.ndarray,
    max_drop: float,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
    agreement: Agreement | None = None,
) -> Decision:
    """The guard's decision on paired answers: `teacher` and `student` are predicted classes
    (accuracy) or predicted values (r2) for the same rows whose truth is `y`; `agreement`: the
    two on held-out unlabeled rows, whose bound can show a drop within `max_drop` (never over)."""
    teacher, student, y = np.asarray(teacher), np.asarray(student), np.asarray(y)
    n = len(y)
    whole = np.arange(n)[None, :]
    drop = float(_drops(metric, teacher, student, y, whole)[0])
    index = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    drops = _drops(metric, teacher, student, y, index)
    low, high = (float(q) for q in np.quantile(drops, [1.0 - confidence, confidence]))
    disagreement = float("nan") if metric == "r2" else float((teacher != student).mean())
    tolerance = 1e-9
    shown = agreement is not None and agreement.high <= max_drop + tolerance
    if low > max_drop + tolerance:
        verdict = "over"
    elif drop <= max_drop + tolerance or shown:
        verdict = "within"
    else:
        verdict = "unresolved"
    return Decision(drop, low, high, n, disagreement, verdict, agreement)


def resolution(metric: str, rows: int, max_drop: float, agreement_rows: int = 0) -> str | None:
    """A line when `rows` validation rows cannot resolve `max_drop` (one row weighs more than
    half of it) and `agreement_rows` held-out rows cannot either, with the ways out; None when
    they can. (An R² drop has no per-row weight.)"""
    if metric != "accuracy" or rows <= 0:
        return None
    per_row = 1.0 / rows
    needed = int(np.ceil(2.0 / max_drop)) if max_drop > 0 else 0
    if per_row <= max_drop / 2 or (needed and agreement_rows >= needed):
        return None
    return (
        f"{rows} validation rows are coarse for target.max_accuracy_drop={max_drop:g} (one row "
        f"= {per_row:.4f}): a step is kept unless shown to lose more; give >= {needed} "
        "validation rows (data.val_size), or hold out >= "
        f"{needed} training rows for the agreement guard (target.agreement_rows), or allow a "
        "wider drop"
    )


# --- the guard on a model's answers ---------------------------------------------------------


@dataclass(frozen=True)
class Check:
    step: str  # reduction | prune round N | int8
    params: int
    accuracy: float  # on the validation rows
    drop: float  # the teacher's validation accuracy - this
    ok: bool  # not shown to lose more than allowed (guard.decide)
    decision: Decision | None = None  # the interval and verdict behind `ok`

    @property
    def estimated_within(self) -> bool:
        """The drop's point estimate is within the allowance (not merely not shown over it)."""
        return self.ok and (self.decision is None or self.decision.verdict == "within")


def max_drop_of(target: TargetConfig, data: Dataset) -> float:
    """The guard's allowance for this data's task: target.max_r2_drop or max_accuracy_drop."""
    return target.max_r2_drop if data.is_regression else target.max_accuracy_drop


def _answers(metric: str, outputs: np.ndarray) -> np.ndarray:
    """What is scored: the class (accuracy) or the value (r2, standardized units)."""
    return outputs[:, 0] if metric == "r2" else outputs.argmax(1)


def _score(metric: str, answers: np.ndarray, y: np.ndarray) -> float:
    if metric == "r2":  # standardized units: the same R² as in the label's
        from sklearn.metrics import r2_score

        return float(r2_score(y, answers))
    return float((answers == y).mean())


@dataclass(frozen=True)
class Guard:
    """Teacher accuracy minus model accuracy (R² for a regression target, `metric`) on the
    validation rows within `max_drop`: decided on the paired answers by guard.decide (a step
    fails only when its drop is above `max_drop` with `confidence`)."""

    reference: float  # the teacher's validation accuracy (or R²)
    max_drop: float
    X_val: np.ndarray
    y_val: np.ndarray
    metric: str = "accuracy"  # accuracy | r2
    teacher_answers: np.ndarray | None = None  # on X_val, for the paired decision
    confidence: float = CONFIDENCE
    X_agree: np.ndarray | None = None  # unlabeled rows held out (target.agreement_rows)
    teacher_agree: np.ndarray | None = None  # the teacher's classes on them

    @classmethod
    def of(
        cls,
        teacher: nn.Module,
        data: Dataset,
        max_drop: float,
        confidence: float = CONFIDENCE,
        X_agree: np.ndarray | None = None,
    ) -> Guard:
        """`X_agree`: rows held out from everything a student is fit on, for the agreement
        bound (classification)."""
        metric = "r2" if data.is_regression else "accuracy"
        if len(data.y_val) < (2 if data.is_regression else 1):
            raise UserError(
                f"config key 'target': the {metric} guard needs validation rows "
                "(data.val_size, or val rows in your split)"
            )
        predict = torch_predictor(teacher)
        answers = _answers(metric, predict_batched(predict, data.X_val))
        reference = _score(metric, answers, data.y_val)
        agree = None
        if X_agree is not None and len(X_agree) and metric == "accuracy":
            agree = _answers(metric, predict_batched(predict, X_agree))
        return cls(
            reference,
            max_drop,
            data.X_val,
            data.y_val,
            metric,
            answers,
            confidence,
            X_agree if agree is not None else None,
            agree,
        )

    def check(self, step: str, predict: Predict, params: int) -> Check:
        answers = _answers(self.metric, predict_batched(predict, self.X_val))
        accuracy = _score(self.metric, answers, self.y_val)
        drop = self.reference - accuracy
        if self.teacher_answers is None:
            return Check(step, params, accuracy, drop, drop <= self.max_drop + 1e-9)
        agreement = None
        if self.X_agree is not None and self.teacher_agree is not None:
            student = _answers(self.metric, predict_batched(predict, self.X_agree))
            agreement = Agreement.of(self.teacher_agree, student, self.confidence)
        decision = decide(
            self.metric,
            self.teacher_answers,
            answers,
            self.y_val,
            self.max_drop,
            self.confidence,
            agreement=agreement,
        )
        return Check(step, params, accuracy, drop, decision.ok, decision)

    def why(self, check: Check) -> str:
        """The decision in words: the drop, its interval, the rows."""
        if check.decision is None:
            return f"lost {check.drop:.4f} (max {self.max_drop:.4f})"
        return check.decision.reason(self.max_drop, self.confidence)

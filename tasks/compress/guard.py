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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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

    @property
    def ok(self) -> bool:
        return self.verdict != "over"

    def reason(self, max_drop: float, confidence: float = CONFIDENCE) -> str:
        span = f"{self.drop:.4f} ({confidence:.0%} interval {self.low:.4f}..{self.high:.4f}, "
        span += f"{self.rows} rows)"
        if self.verdict == "over":
            return f"drop {span} is above {max_drop:.4f} with {confidence:.0%} confidence"
        if self.verdict == "unresolved":
            return f"drop {span} is not shown to exceed {max_drop:.4f}: kept"
        return f"drop {span} is within {max_drop:.4f}"


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
) -> Decision:
    """The guard's decision on paired answers: `teacher` and `student` are predicted classes
    (accuracy) or predicted values (r2) for the same rows whose truth is `y`."""
    teacher, student, y = np.asarray(teacher), np.asarray(student), np.asarray(y)
    n = len(y)
    whole = np.arange(n)[None, :]
    drop = float(_drops(metric, teacher, student, y, whole)[0])
    index = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    drops = _drops(metric, teacher, student, y, index)
    low, high = (float(q) for q in np.quantile(drops, [1.0 - confidence, confidence]))
    disagreement = float("nan") if metric == "r2" else float((teacher != student).mean())
    tolerance = 1e-9
    if low > max_drop + tolerance:
        verdict = "over"
    elif drop <= max_drop + tolerance:
        verdict = "within"
    else:
        verdict = "unresolved"
    return Decision(drop, low, high, n, disagreement, verdict)


def resolution(metric: str, rows: int, max_drop: float) -> str | None:
    """A line when `rows` validation rows cannot resolve `max_drop` (one row weighs more than
    half of it), with the ways out; None when they can. (An R² drop has no per-row weight.)"""
    if metric != "accuracy" or rows <= 0:
        return None
    per_row = 1.0 / rows
    if per_row <= max_drop / 2:
        return None
    needed = int(np.ceil(2.0 / max_drop))
    return (
        f"{rows} validation rows are coarse for target.max_accuracy_drop={max_drop:g} (one row "
        f"= {per_row:.4f}): a step is kept unless shown to lose more; give >= {needed} "
        "validation rows (data.val_size) or allow a wider drop"
    )

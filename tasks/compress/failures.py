"""One error path for every stage: whatever a stage raises becomes one line a user can act on.

`StageGuard` runs each stage of `pipeline.compress` (and the flow's registration). An exception
inside becomes one line naming the stage, what failed in the user's terms (the module path and
class where the traceback passes through a model's forward, and which model: the teacher or the
student), the config key behind the stage, and a setting that would work where one exists (the
pre-flight's check of the other `reconstruct.mode`, tasks/compress/preflight.py). The recorder is
told first (`Recorder.failed`: the line and the full trace, which the flow's writes as the stage
run's `error.txt`), then:

- bad input (`UserError`: a config key, NaN from a learning rate) goes on as it is, its line
  prefixed with the stage where it does not say (`NonFinite`: "stage finetune, epoch 3, ...");
- a fault of the environment (disk full, tracking server gone) goes on unchanged: the CLI names it;
- anything else becomes `StageFailed(stage, line)`, the original as its `__cause__`.
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from torch import nn

from distill.tasks.compress.finite import NonFinite, module_label
from distill.tasks.platform.errors import StageFailed, UserError, fault_message, first_line

# the config key a stage's failure points to
STAGE_KEYS = {
    "teacher": "teacher.arch",
    "plan-target": "target",
    "reduce": "reconstruct.mode",
    "reconstruct": "reconstruct.mode",
    "finetune": "finetune",
    "prune": "compress.prune.method",
    "fit-target": "target",
    "quantize": "compress.quantize",
    "plots": "evaluate.plots",
    "register": "register",
}
# stages whose failure the other reconstruction mode may avoid (a pre-flight checks it)
MODE_STAGES = ("plan-target", "reduce", "reconstruct", "prune", "fit-target")


@dataclass(frozen=True)
class Culprit:
    """The module whose forward an exception came out of."""

    path: str  # dotted path in the model called (empty: the model itself)
    module: nn.Module
    root: nn.Module  # the model called

    @property
    def label(self) -> str:
        return module_label(self.path, self.module)


def _frames(tb: TracebackType | None) -> Iterator[Any]:
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


def culprit(err: BaseException) -> Culprit | None:
    """The module an exception was raised in: of the modules whose `forward` (or call) the
    traceback passes through, the innermost one of the user's own (any class not from torch:
    theirs, Hugging Face's), else the innermost one; named by its path in the outermost."""
    calls: list[nn.Module] = []
    for frame in _frames(err.__traceback__):
        module = frame.f_locals.get("self")
        if (
            isinstance(module, nn.Module)
            and frame.f_code.co_name in ("forward", "_call_impl")
            and (not calls or calls[-1] is not module)
        ):
            calls.append(module)
    if not calls:
        return None
    own = [m for m in calls if not type(m).__module__.startswith("torch.")]
    target = (own or calls)[-1]
    root = calls[0]
    inner = getattr(root, "_export_root", None)  # torch.export's wrapper around the model
    root = inner if isinstance(inner, nn.Module) else root
    names = {id(m): n for n, m in root.named_modules()}
    return Culprit(names.get(id(target), ""), target, root)


def trace_text(err: BaseException) -> str:
    return "".join(traceback.format_exception(err))


class Recording(Protocol):
    def failed(self, stage: str, line: str, trace: str, started: float | None) -> None: ...


@dataclass
class StageGuard:
    """`with guard("reduce"):` around a stage's work. `teacher`: set once loaded, to tell the
    teacher's forward from the student's; `alternative(stage)`: a setting that would work, or
    None (the pre-flight's check of the other reconstruction mode)."""

    recorder: Recording | None = None
    teacher: nn.Module | None = None
    alternative: Callable[[str], str | None] | None = None
    failed: list[str] = field(default_factory=list)  # the stages that failed, in order

    @contextlib.contextmanager
    def __call__(self, stage: str, started: float | None = None) -> Iterator[None]:
        started = time.time() if started is None else started
        try:
            yield
        except Exception as err:
            raised = self._handled(stage, err, started)
            if raised is err:
                raise
            raise raised from err

    def _handled(self, stage: str, err: Exception, started: float) -> Exception:
        """What to raise for `err`: recorded first (best effort: a recorder that cannot write,
        the tracking server gone, must not hide the stage's own error)."""
        if fault_message(err) is not None:
            line, raised = fault_message(err) or "", err
        elif isinstance(err, NonFinite):
            who = "the teacher" if stage == "teacher" else "the student"
            line = err.line(stage, who)
            raised = UserError(line)
        elif isinstance(err, UserError):
            line, raised = str(err), err
        else:
            line = self.line(stage, err)
            raised = StageFailed(stage, line)
        self.failed.append(stage)
        if self.recorder is not None:
            with contextlib.suppress(Exception):
                self.recorder.failed(stage, line, trace_text(err), started)
        return raised

    def line(self, stage: str, err: BaseException) -> str:
        """One line: the stage, the error, where (module and model) and what to change."""
        found = culprit(err)
        where = ""
        if found is not None:
            whose = (
                "the teacher" if found.root is self.teacher or stage == "teacher" else "the student"
            )
            where = f" in {found.label} of {whose}"
        key = STAGE_KEYS.get(stage)
        hint = f" (config key '{key}')" if key else ""
        instead = None
        if self.alternative is not None and stage in MODE_STAGES:
            with contextlib.suppress(Exception):
                instead = self.alternative(stage)
        tail = f"; {instead} handles this model (pre-flight on 2 rows)" if instead else ""
        return f"stage {stage}: {type(err).__name__}: {first_line(err)}{where}{hint}{tail}"

"""The exception type for mistakes the user can fix (config, files, columns, URIs), and the
recognizer of faults of the environment around a run (a full disk, a path that may not be
written, a tracking server that stopped answering), which are not bugs either.

The CLI prints both as a single line and exits non-zero (2: bad input, 3: a fault); a stage that
fails for another reason is one line too (`StageFailed`, 4), its trace in the stage run's
`error.txt`.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
from collections.abc import Iterator


def first_line(err: BaseException) -> str:
    """An exception's first line, for a one-line message (its type where it has no text)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# a full disk or quota, a path the process may not write, a read-only filesystem
WRITE_FAULTS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS})
LOST_SERVER = (
    "API request to "  # how MLflow's HTTP client starts its message once its retries are spent
)
WRITE_FAULT_TEXTS = tuple(
    os.strerror(code) for code in sorted(WRITE_FAULTS)
)  # "No space left on device", ...
# what SQLite says (through SQLAlchemy and MLflow) when the tracking store's file is full, may not
# be written (read-only filesystem, `chattr +i`), or is not a database at all
STORE_FAULTS = {
    "database or disk is full": "cannot write",
    "attempt to write a readonly database": "cannot write",
    "unable to open database file": "cannot open",
    "file is not a database": "cannot read",
    "database disk image is malformed": "cannot read",
}
FAULT_MARKERS = (*WRITE_FAULT_TEXTS, LOST_SERVER, *STORE_FAULTS)


class UserError(Exception):
    """Bad input: the message names what is wrong and where."""


class StageFailed(Exception):
    """A pipeline stage failed for a reason that is not bad input: an error in the model's own
    code, or in distill. `line` says, in the user's terms, which stage, what failed (module path
    and class where known) and what setting would work where one exists; the exception that
    caused it is `__cause__` (its full trace went to the stage run's `error.txt`)."""

    def __init__(self, stage: str, line: str) -> None:
        super().__init__(line)
        self.stage = stage
        self.line = line


def _causes(exc: BaseException | None) -> Iterator[BaseException]:
    """The exception, then what caused it (explicitly, or while it was being handled)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _store() -> str:
    """The SQLite file (else the URI) MLflow is pointed at, for a store fault's message."""
    mlflow = sys.modules.get("mlflow")
    uri = (
        mlflow.get_tracking_uri()
        if mlflow is not None
        else os.environ.get("MLFLOW_TRACKING_URI", "")
    )
    return str(uri).removeprefix("sqlite:///") or "(unknown)"


def mentions_fault(text: str) -> bool:
    """A log line that reports one of these faults (Prefect's "Finished in state Failed(...)")."""
    return any(marker in text for marker in FAULT_MARKERS)


def fault_message(exc: BaseException) -> str | None:
    """One line naming the fault of the environment behind `exc`, None when it is not one."""
    for err in _causes(exc):
        if isinstance(err, OSError) and err.errno in WRITE_FAULTS:
            path = (
                err.filename2 or err.filename
            )  # a copy's failure names its source, then its target
            return f"cannot write{f' {path}' if path else ''}: {err.strerror}"
        if isinstance(err, shutil.Error) and err.args and isinstance(err.args[0], list):
            # copytree gathers its failures as (source, target, reason) and raises them together
            for _source, target, reason in err.args[0]:
                fault = next((t for t in WRITE_FAULT_TEXTS if t in str(reason)), None)
                if fault:
                    return f"cannot write {target}: {fault}"
        text = str(err)
        store_fault = next((f for f in STORE_FAULTS if f in text), None)
        if store_fault is not None:
            return f"{STORE_FAULTS[store_fault]} the tracking store {_store()}: {store_fault}"
        # "API request to URL failed with exception ..."
        if (
            type(err).__name__ == "MlflowException"
            and text.startswith(LOST_SERVER)
            and " failed with " in text
        ):
            endpoint = text.removeprefix(LOST_SERVER).split(" failed with ")[0]
            endpoint = re.sub(r"//([^/@:]*):[^/@]*@", r"//\1:***@", endpoint)  # no password
            return (
                f"the MLflow tracking server stopped answering ({endpoint}); the run is marked "
                "FAILED by the next `distill run` once the server is back"
            )
    return None

"""What the fault tests share: `distill run` as a user starts it, its environment, and small
filesystems (tmpfs) to fill or make read-only."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY

RUN = [
    sys.executable,
    "-m",
    "distill.flows.cli",
    "run",
    str(ROOT / "configs" / "digits.yaml"),
    *[a for s in TINY for a in ("--set", s)],
]


def fault_env(tmp_path: Path, temporary_server: bool = False, **extra: str) -> dict[str, str]:
    """This process's environment without its MLflow store, with this test's own result storage
    (no stage comes from another test's cache) and mlflow.yaml path. The run talks to the test
    session's Prefect server; `temporary_server`: to a temporary one of its own, as a user's
    `distill run` without PREFECT_API_URL does."""
    dropped = ("MLFLOW_", "PREFECT_API") if temporary_server else ("MLFLOW_",)
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    return (
        env
        | {
            "PYTHONPATH": str(ROOT),
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "prefect-results"),
            "DISTILL_MLFLOW_CONFIG": str(tmp_path / "mlflow.yaml"),
        }
        | extra
    )


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def mount(disk: Path, options: str) -> None:
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("needs permission to mount a small tmpfs (root)")


def fill(disk: Path) -> None:
    with contextlib.suppress(OSError), open(disk / "filler", "wb", buffering=0) as handle:
        while True:
            handle.write(b"\0" * 4096)

"""The MLflow store: processes that start together create one store and one experiment."""

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

FIRST_TOUCH = """
import sys, time
from distill.tasks.platform import store
import mlflow  # imported before the start line, so the processes reach the store together
time.sleep(max(0.0, float(sys.argv[1]) - time.time()))
print(store.configure(store.load_settings()))
"""


@pytest.mark.slow
def test_processes_starting_together_share_a_fresh_store(tmp_path):
    env = os.environ | {
        "PYTHONPATH": str(ROOT),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "DISTILL_MLFLOW_CONFIG": str(tmp_path / "absent.yaml"),
    }
    start = str(time.time() + 8)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FIRST_TOUCH, start],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-500:] for _, err in outputs]
    assert len({out.strip() for out, _ in outputs}) == 1  # one experiment, created once

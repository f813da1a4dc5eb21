"""`distill` as a user runs it: a separate process, its stdout and exit code."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY

DISTILL = [sys.executable, "-m", "distill.flows.cli"]


def _run(args, tmp_path: Path, timeout=600):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # mlflow.set_*_uri in earlier in-process tests also set these variables: pin both
    env = os.environ | {
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_REGISTRY_URI": uri,
        "PYTHONPATH": str(ROOT),
        # this test's own stage results: the session's PREFECT_HOME holds other tests' cached stages
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "prefect-results"),
    }
    return subprocess.run(
        DISTILL + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_run_json(tmp_path):
    sets = [a for s in TINY for a in ("--set", s)]
    proc = _run(["run", str(ROOT / "configs" / "digits.yaml"), *sets, "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # stdout holds the JSON object and nothing else
    assert {"run_id", "model_name", "model_version", "metrics"} <= set(out)
    assert out["model_name"] == "distill-digits" and out["model_version"] == "1"
    assert 0 < out["metrics"]["final/accuracy"] <= 1
    assert out["metrics"]["accuracy_drop"] == pytest.approx(
        out["metrics"]["teacher/accuracy"] - out["metrics"]["final/accuracy"]
    )
    assert (tmp_path / "mlflow.db").is_file()
    # stderr is not a terminal here: one line per finished stage, with its time, in order
    stages = re.findall(
        r"^distill: ([\w-]+) done in \d+\.\d s \(\d+\.\d s in all\)$", proc.stderr, re.MULTILINE
    )
    assert stages == [
        "data",
        "teacher",
        "evaluate-teacher",
        "reduce",
        "reconstruct",
        "evaluate-reconstructed",
        "finetune",
        "evaluate-finetuned",
        "prune",
        "evaluate-pruned",  # the pruned stage run spans pruning only, before the int8 export
        "quantize",
        "evaluate-quantized",
        "register",  # (no `plots`: TINY draws none)
    ], proc.stderr[-3000:]
    # a first registration, then a promotion: distill says what it did, MLflow's own registry
    # lines ("Registered model 'distill-digits' already exists. Creating a new version...",
    # "Created version '1' of model ...") reach neither stream
    promoted = _run(
        ["promote", "--model", "distill-digits", "--max-accuracy-drop", "1", "--json"], tmp_path
    )
    assert promoted.returncode == 0, promoted.stderr[-3000:]
    assert json.loads(promoted.stdout)["status"] == "promoted"
    for out in (proc.stdout, proc.stderr, promoted.stdout, promoted.stderr):
        assert not re.search(r"Registered model|already exists|Created version", out), out


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "missing.yaml"], "error: config file not found: missing.yaml"),
        (
            ["run", "--set", "reduce.budget.size_kb=-1"],
            "error: config key 'reduce.budget.size_kb': Input should be greater than 0",
        ),
        (["run", "--set", "teacher.epoch=3"], "error: config key 'teacher.epoch': unknown key"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    if "--set" in args:
        args = ["run", str(ROOT / "configs" / "digits.yaml"), *args[1:]]
    proc = _run(args, tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == message
    assert not (tmp_path / "mlflow.db").exists()  # nothing written


def test_user_error_inside_the_flow_is_one_line(tmp_path):
    proc = _run(
        ["run", str(ROOT / "configs" / "digits.yaml"), "--set", "data.source=csv:nope.csv"],
        tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: data file not found: nope.csv"
    assert "Traceback" not in proc.stderr


def test_help_lists_run():
    proc = subprocess.run(
        [*DISTILL, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert proc.returncode == 0 and "run" in proc.stdout


INTERRUPTED_IN_EXEC = """
import os, signal, sys
# as in a terminal, even where this test runs in the background (SIGINT ignored)
signal.signal(signal.SIGINT, signal.default_int_handler)
{install}
try:  # the interrupt lands inside code run by exec() of a string, as in sympy's or mpmath's imports
    exec("os.kill(os.getpid(), signal.SIGINT)\\nimport time\\nwhile True: time.sleep(0.01)")
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_ctrl_c_inside_exec_code_still_exits_130(tmp_path):
    def run(install: str) -> int:
        (tmp_path / "interrupted.py").write_text(INTERRUPTED_IN_EXEC.format(install=install))
        env = os.environ | {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
        return subprocess.run([sys.executable, "-m", "interrupted"], env=env, timeout=60).returncode

    # CPython kills itself at exit after a handled plain KeyboardInterrupt that left exec'd code
    if run("") != -signal.SIGINT:
        pytest.skip("this Python exits 130 after such an interrupt anyway")
    assert run("from distill.flows.process import exit_on_signals; exit_on_signals()") == 130


SWALLOWED_CTRL_C = """
import os, signal, time, weakref
from distill.flows import process

process.exit_on_signals()


class A:
    pass


def callback(_ref):  # garbage collection runs code like this at any moment
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)  # the handler runs here: its exception would be printed and dropped


a = A()
r = weakref.ref(a, callback)
try:
    del a
    time.sleep(5)
    print("not interrupted")
except KeyboardInterrupt as e:
    print("interrupted")
"""


def test_ctrl_c_landing_in_a_weakref_callback_still_interrupts():
    proc = subprocess.run(
        [sys.executable, "-c", SWALLOWED_CTRL_C],
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        # SIGINT as a terminal delivers it: a suite run in the background (`make test &`, nohup)
        # starts with SIGINT ignored, the child inherits that, and exit_on_signals rightly keeps
        # it ignored: the Ctrl-C would never arrive
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout.strip() == "interrupted", proc.stdout + proc.stderr
    assert "Exception ignored" not in proc.stderr


SWALLOWED_SIGTERM = """
import os, signal, time, weakref
from distill.flows import process

process.exit_on_signals()


class TerminationSignal(Exception):  # as Prefect's handler raises it while a flow runs
    pass


def prefect_like_handler(signum, frame):
    signal.signal(signal.SIGTERM, process_handler)  # Prefect restores the previous one
    raise TerminationSignal


process_handler = signal.getsignal(signal.SIGTERM)
signal.signal(signal.SIGTERM, prefect_like_handler)


class A:
    pass


def callback(_ref):  # garbage collection runs code like this at any moment
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)  # the handler runs here: its exception would be printed and dropped


a = A()
r = weakref.ref(a, callback)
try:
    del a
    time.sleep(5)
    print("not terminated")
except SystemExit as e:
    print("terminated", e.code)
"""


def test_sigterm_landing_in_a_weakref_callback_still_stops_the_run():
    """Seen in the suite: Prefect's SIGTERM handler raised inside SQLAlchemy's weakref callback,
    Python printed "Exception ignored" and the run went on to register its model."""
    proc = subprocess.run(
        [sys.executable, "-c", SWALLOWED_SIGTERM],
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.strip() == "terminated 143", proc.stdout + proc.stderr
    assert "Exception ignored" not in proc.stderr


SECOND_CTRL_C = """
from distill.flows import process

try:
    process.interrupt(2, None)  # the first Ctrl-C unwinds
except KeyboardInterrupt:
    print("unwinding")
process.interrupt(2, None)  # a second one while that is under way
print("not exited")
"""


def test_a_second_ctrl_c_exits_at_once():
    proc = subprocess.run(
        [sys.executable, "-c", SECOND_CTRL_C],
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (proc.returncode, proc.stdout.strip()) == (130, "unwinding")
    assert proc.stderr.strip() == "distill: interrupted again: exiting now"

"""Four `distill run` processes at once against one SQLite store: four intact parent runs,
four model versions, no corrupted records (issue 9: concurrency); each with Prefect's temporary
server of its own on one fresh PREFECT_HOME, as users start them, printing only its own lines
(their servers raced to migrate the new database and printed SQLAlchemy tracebacks)."""

import os
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.slow


def test_four_processes_share_one_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")} | {
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_REGISTRY_URI": uri,
        "PYTHONPATH": str(ROOT),
        "DISTILL_MLFLOW_CONFIG": str(tmp_path / "absent.yaml"),
    }
    sets = [a for s in [*TINY, "register.model_name=shared"] for a in ("--set", s)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distill.flows.cli",
                "run",
                str(ROOT / "configs" / "digits.yaml"),
                *sets,
                "--set",
                f"seed={i}",
                "--fresh",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    results = [p.communicate(timeout=600) for p in procs]
    for proc, (_, err) in zip(procs, results, strict=False):
        assert proc.returncode == 0, err[-3000:]
        assert all(line.startswith("distill: ") for line in err.splitlines()), err[-3000:]

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("distill")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 4 and all(r.info.status == "FINISHED" for r in parents)
    assert sorted(r.data.params["seed"] for r in parents) == ["0", "1", "2", "3"]
    for parent in parents:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(children) == 6 and all(c.info.status == "FINISHED" for c in children)
        assert "final/accuracy" in parent.data.metrics
    versions = client.search_model_versions("name='shared'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3, 4]
    assert {v.tags["mlflow.run_id"] for v in versions} == {p.info.run_id for p in parents}
    assert client.get_model_version_by_alias("shared", "challenger").version in {
        v.version for v in versions
    }

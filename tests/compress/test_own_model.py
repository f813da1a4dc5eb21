"""A user's own architecture through the whole pipeline, as a user runs it: `distill run` in
its own process with `teacher.arch: module:Name`, and the registered model served by
`mlflow.pyfunc` in a fresh process where that module cannot be imported."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.tasks.compress.data import load_dataset
from distill.tasks.platform.config import DataConfig
from distill.tasks.release.registry import raw_features
from tests.conftest import ROOT, fresh_process

FAST = [
    "teacher.epochs=10",
    "teacher.lr=0.01",
    "reduce.budget.ratio=2",
    "reduce.calibration_samples=256",
    "finetune.epochs=2",
    "compress.prune.recovery_epochs=1",
    "compress.prune.rounds=1",
    "evaluate.latency_repeats=3",
    "evaluate.large_batch=32",
    "evaluate.plots=false",
    "target=null",
]
ARCHS = {
    "resnet": ("tests.zoo:ResNet2d", {"channels": 4}, [1, 8, 8]),
    "transformer": (
        "tests.zoo:TransformerClassifier",
        {"d_model": 16, "n_heads": 2, "dim_feedforward": 32, "n_layers": 1},
        [8, 8],
    ),
}


def _distill(args: list[str], cwd: Path, uri: str) -> subprocess.CompletedProcess:
    return fresh_process(cwd, *args, store=uri, timeout=600)


def _sets(pairs: list[str]) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


SERVE = """
import sys
import mlflow, pandas as pd
try:
    import tests.zoo
    sys.exit("tests.zoo is importable here")
except ImportError:
    pass
model = mlflow.pyfunc.load_model(sys.argv[1])
print(model.predict(pd.read_csv(sys.argv[2]))["prediction"].astype(int).tolist())
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ARCHS))
def test_own_architecture_runs_and_is_served_without_its_module(name, tmp_path):
    arch, init_args, shape = ARCHS[name]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sets = [
        f"teacher.arch={arch}",
        f"teacher.init_args={json.dumps(init_args)}",
        f"data.shape={shape}",
        f"register.model_name=own-{name}",
        *FAST,
    ]
    proc = _distill(
        ["run", str(ROOT / "configs" / "digits.yaml"), *_sets(sets), "--json"], ROOT, uri
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    metrics = out["metrics"]
    # the budget is the real student's: half the teacher's parameters at most
    assert metrics["reconstructed/params"] <= metrics["teacher/params"] / 2
    assert metrics["teacher/accuracy"] > 0.5  # it trained: the model saw images / token sequences

    data = load_dataset(DataConfig(shape=shape), seed=0)
    csv = tmp_path / "rows.csv"
    raw_features(data, data.X_test).to_csv(csv, index=False)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_REGISTRY_URI": uri,
    }
    served = subprocess.run(
        [sys.executable, "-c", SERVE, f"models:/own-{name}@challenger", str(csv)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert served.returncode == 0, served.stderr[-3000:]
    predictions = np.array(json.loads(served.stdout.strip().splitlines()[-1]))
    accuracy = float((np.asarray(data.classes)[data.y_test] == predictions).mean())
    assert accuracy == pytest.approx(metrics["final/accuracy"], abs=1e-9)


def _module_file(tmp_path: Path) -> Path:
    """A user's model file beside their config (imported from the config's folder)."""
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "my_models.py").write_text(
        "from torch import nn\n\n\nclass Net(nn.Module):\n"
        "    def __init__(self, width=16):\n        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Flatten(),\n"
        "                                  nn.Linear(width * 64, 10))\n\n"
        "    def forward(self, x):\n        return self.body(x)\n"
    )
    config = tmp_path / "cfg" / "run.yaml"
    config.write_text((ROOT / "configs" / "digits.yaml").read_text())
    return config


def test_a_module_that_does_not_import_is_one_line_and_leaves_no_run(tmp_path):
    config = _module_file(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = _distill(["run", str(config), *_sets(["teacher.arch=nowhere:Net"])], tmp_path, uri)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: config key 'teacher.arch': cannot import module 'nowhere' (looked in ")
    )
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    "sets, message",
    [
        (["teacher.arch=my_models:Nope"], "has no 'Nope'"),
        (
            ['teacher.init_args={"depth": 3}'],
            (
                "config key 'teacher.init_args': my_models:Net(...) rejected them: "
                "got an unexpected keyword argument 'depth'"
            ),
        ),
        (["data.shape=[64]"], "teacher my_models:Net does not accept inputs of shape [2, 64]"),
        (
            ["teacher.source=file:WEIGHTS"],
            (
                "body.0.weight has shape [8, 1, 3, 3], teacher.arch=my_models:Net "
                "expects [16, 1, 3, 3]"
            ),
        ),
    ],
)
def test_bad_own_model_stops_before_any_run(sets, message, tmp_path, prefect_server, mlflow_store):
    """Checked before the parent run opens: the store holds no run afterwards."""
    import mlflow

    from distill.flows.distill import distill_flow
    from distill.tasks.platform.errors import UserError

    config = _module_file(tmp_path)
    weights = tmp_path / "wrong.pt"
    torch.save(
        {
            "body.0.weight": torch.zeros(8, 1, 3, 3),
            "body.0.bias": torch.zeros(8),
            "body.3.weight": torch.zeros(10, 512),
            "body.3.bias": torch.zeros(10),
        },
        weights,
    )
    sets = [
        "teacher.arch=my_models:Net",
        "data.shape=[1, 8, 8]",
        *[s.replace("WEIGHTS", str(weights)) for s in sets],
    ]
    with pytest.raises(UserError) as err:
        distill_flow(str(config), sets)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert mlflow.search_runs(search_all_experiments=True).empty

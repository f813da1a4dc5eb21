"""Scheduled deployments, from one file: `deployments/prefect.yaml`.

- `distill deploy` applies it to the Prefect server in PREFECT_API_URL: it creates the
  file's process work pools if missing, then runs `prefect --no-prompt deploy --all` from
  the project root (entrypoints and config paths in the file are relative to it; the
  file's pull step sends workers there through DISTILL_PROJECT_DIR). A worker runs them:
  `prefect worker start --pool distill`.
- `distill serve` serves the same deployments, schedules and parameters from one process
  (`prefect.serve`): no work pool, no worker.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from distill.tasks.platform.config import read_yaml
from distill.tasks.platform.errors import UserError

PREFECT_FILE = Path("deployments/prefect.yaml")
PROJECT_DIR_ENV = "DISTILL_PROJECT_DIR"


def project_root(prefect_file: Path) -> Path:
    """deployments/prefect.yaml lives one level below the project root."""
    return prefect_file.resolve().parent.parent


def read_spec(prefect_file: Path) -> dict[str, Any]:
    spec = read_yaml(prefect_file, kind="deployment file")
    deployments = spec.get("deployments")
    if not isinstance(deployments, list) or not deployments:
        raise UserError(f"{prefect_file}: no 'deployments' list")
    for i, d in enumerate(deployments):
        missing = [k for k in ("name", "entrypoint") if not isinstance(d, dict) or not d.get(k)]
        if missing:
            raise UserError(f"{prefect_file}: deployments[{i}] has no '{missing[0]}'")
    return spec


def work_pools(spec: dict[str, Any]) -> list[str]:
    return sorted(
        {d["work_pool"]["name"] for d in spec["deployments"] if d.get("work_pool", {}).get("name")}
    )


def require_server() -> str:
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise UserError(
            "no Prefect server: set PREFECT_API_URL (e.g. `prefect server start`, then "
            "PREFECT_API_URL=http://127.0.0.1:4200/api), or use `distill serve`"
        )
    return url


def ensure_work_pools(names: list[str]) -> list[str]:
    """Create the process work pools that do not exist yet; return the ones created."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    created = []
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=name, type="process"))
                created.append(name)
    return created


def deploy(prefect_file: Path = PREFECT_FILE) -> list[str]:
    """Apply the file to the server; return the deployments' names (`FLOW/NAME`)."""
    spec = read_spec(prefect_file)
    require_server()
    ensure_work_pools(work_pools(spec))
    root = project_root(prefect_file)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefect",
            "--no-prompt",
            "deploy",
            "--all",
            "--prefect-file",
            str(prefect_file.resolve()),
        ],
        cwd=root,
        env=os.environ | {PROJECT_DIR_ENV: str(root)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"prefect deploy failed (exit {proc.returncode}):\n{tail}")
    return deployed_names([d["name"] for d in spec["deployments"]])


def deployed_names(names: list[str]) -> list[str]:
    """`FLOW/NAME` of the server's deployments with these names (read back, not assumed)."""
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as client:
        found = client.read_deployments(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=names))
        )
        return sorted(f"{client.read_flow(d.flow_id).name}/{d.name}" for d in found)


def _flow(entrypoint: str) -> Any:
    """`flows/distill.py:distill_flow` -> the flow object, imported as a module of the installed
    package (`distill.flows.distill`)."""
    path, _, attr = entrypoint.partition(":")
    module = importlib.import_module("distill." + path.removesuffix(".py").replace("/", "."))
    return getattr(module, attr)


def runner_deployments(prefect_file: Path = PREFECT_FILE) -> list[Any]:
    """The file's deployments as `RunnerDeployment`s for `prefect.serve` (cron schedules, event
    triggers)."""
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron

    deployments = []
    for d in read_spec(prefect_file)["deployments"]:
        schedules = []
        for s in d.get("schedules") or []:
            if "cron" not in s:
                raise UserError(
                    f"{prefect_file}: deployment {d['name']!r}: `distill serve` takes "
                    "cron schedules only"
                )
            schedules.append(
                Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True))
            )
        triggers = [
            DeploymentEventTrigger(**{k: v for k, v in t.items() if k != "type"})
            for t in d.get("triggers") or []
        ]
        deployments.append(
            _flow(d["entrypoint"]).to_deployment(
                name=d["name"],
                schedules=schedules,
                triggers=triggers or None,
                parameters=d.get("parameters") or {},
                description=d.get("description"),
                tags=d.get("tags"),
            )
        )
    return deployments


def check_not_deployed(deployments: list[Any]) -> None:
    """Serving a deployment of the same name as one applied to a work pool would turn it into a
    broken hybrid (the server keeps the pool, the runner has no storage): refuse, naming it."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for d in deployments:
            try:
                existing = client.read_deployment_by_name(f"{d.flow_name}/{d.name}")
            except ObjectNotFound:
                continue
            if existing.work_pool_name:
                raise UserError(
                    f"deployment {d.flow_name}/{d.name} is deployed to work pool "
                    f"{existing.work_pool_name!r} on this server: serve and deploy are "
                    "alternatives (remove it with `prefect deployment delete "
                    f"{d.flow_name}/{d.name}`)"
                )


def serve(prefect_file: Path = PREFECT_FILE) -> None:
    """Serve the deployments from this process until interrupted (runs start in the project
    root)."""
    from prefect import serve as prefect_serve

    deployments = runner_deployments(prefect_file)
    check_not_deployed(deployments)
    os.chdir(project_root(prefect_file))
    prefect_serve(*deployments)

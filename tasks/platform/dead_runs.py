"""Runs whose process died: closed FAILED by the next run in the experiment.

A parent run is closed by `tracking.parent_run` on success, error or Ctrl-C; a process killed by
SIGKILL (or the OOM killer, or a lost machine) closes nothing. Each parent carries the host and
process that ran it (`tracking.process_tags`); the next run in the experiment closes the dead ones
(`close_dead_runs`). A process is named by its pid and start time (`reaper.started`), so a
recycled pid is not taken for the run's process.
"""

from __future__ import annotations

import socket

from distill.tasks.platform import reaper


def _process_gone(tags: dict[str, str]) -> bool | None:
    """True when the run's process is gone, False when alive, None when it ran elsewhere."""
    if (
        tags.get("distill.host") != socket.gethostname()
        or not tags.get("distill.pid", "").isdigit()
    ):
        return None
    started = reaper.started(int(tags["distill.pid"]))
    return started is None or (
        bool(started) and started != tags.get("distill.process_start", started)
    )


def _flow_run_finished(flow_run_id: str | None) -> bool:
    """The Prefect flow run is in a final state or unknown to this server."""
    if not flow_run_id:
        return False
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
    except ObjectNotFound:
        return True
    except Exception:  # noqa: BLE001 -- no reachable server: cannot tell
        return False
    return state is not None and state.is_final()


def _crash_flow_run(flow_run_id: str | None, message: str) -> None:
    if not flow_run_id:
        return
    from prefect import get_client
    from prefect.states import Crashed

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
            if state is not None and not state.is_final():
                client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)
    except Exception:  # noqa: BLE001, S110 -- Prefect client errors are many
        pass  # best effort: the MLflow record is what this function owns


def close_dead_runs(experiment_id: str) -> list[str]:
    """Mark FAILED the experiment's RUNNING distill parent runs (and their RUNNING stage runs)
    whose process is gone (same host) or whose Prefect flow run has finished (another host).
    A run on another host whose flow run Prefect still believes RUNNING is left alone: nothing
    tells a slow run from a dead one there. Returns the ids of the runs closed."""
    from mlflow import MlflowClient

    client = MlflowClient()
    running = client.search_runs(
        [experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000
    )
    parents = [
        r for r in running if "distill.pid" in r.data.tags and "distill.stage" not in r.data.tags
    ]
    closed = []
    for run in parents:
        tags = run.data.tags
        gone = _process_gone(tags)
        if gone is False or (
            gone is None and not _flow_run_finished(tags.get("prefect.flow_run_id"))
        ):
            continue
        reason = (
            f"process {tags.get('distill.pid')} on {tags.get('distill.host')} ended without "
            "closing the run (killed)"
        )
        for child in running:
            if child.data.tags.get("mlflow.parentRunId") == run.info.run_id:
                client.set_terminated(child.info.run_id, "FAILED")
        client.set_tag(run.info.run_id, "distill.end_reason", reason)
        client.set_terminated(run.info.run_id, "FAILED")
        if gone:
            _crash_flow_run(tags.get("prefect.flow_run_id"), reason)
        closed.append(run.info.run_id)
    return closed

"""Browser check of what a user sees: `distill ui` (MLflow) and a real `prefect server`, opened
in headless Chromium after two pipeline runs and two promotions.

    .venv/bin/python benchmarks/ui_check.py [--targets 250 100] [--quick] [--out DIR] [--store DIR]
    make ui-check   # installs Debian's chromium first where it is missing

1. starts `prefect server start` on a free port (its own PREFECT_HOME) and runs
   `distill run configs/digits.yaml --set target.size_kb=T` once per target against it
   and a throw-away MLflow store (`--quick`: a small teacher, few epochs), a sweep of two
   targets (nested under its run, one challenger), then `distill promote` twice: the newest
   version granted (alias champion), the first one refused (its flow run ends Failed);
   `--store DIR` reuses an MLflow store that holds runs already (no runs, no Prefect pages);
2. starts `distill ui` on a free port and checks over its REST API what the pages should
   show: run names, descriptions, stage runs with their `seconds`, system metrics, plots at
   the run's root served as PNGs;
3. renders pages in headless Chromium (`chromium`, Debian's package) and checks the DOM for
   what should be on them, writing a screenshot per page to --out (look at them): the runs
   table, a parent run's page, its nested stage runs, the compare view of two runs with
   their plots, the registered model with its aliases, the Prefect flow run with its named
   task runs and logs, and the refused promotion's Failed flow run with its reason;
4. stops the UI (SIGINT, as Ctrl-C) and the Prefect server and checks they have gone.

Not part of `make test`: CI has no Chromium. Exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from distill.tasks.platform.servers import ServerNotReady, free_port, prefect_server  # noqa: E402

QUICK = [
    "teacher.hidden=[64, 64]",
    "teacher.epochs=8",
    "finetune.epochs=3",
    "compress.prune.recovery_epochs=1",
    "evaluate.latency_repeats=10",
    "evaluate.large_batch=64",
]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=15000",
]  # the UI is a JS app: let it fetch and render
PLOTS = ("pareto.png", "confusion.png", "tsne.png", "curves.png")  # at the run's root
MODEL = "ui-check-digits"
SWEEP_MODEL = "ui-check-sweep"
STAGE_NAMES = ["teacher", "reduce", "reconstructed", "finetuned", "pruned", "quantized"]


def get(url: str, payload: dict | None = None) -> tuple[int, str, bytes]:
    """GET, or POST of a JSON payload."""
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode() if payload is not None else None,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, response.headers.get("Content-Type", ""), response.read()


def chromium(binary: str, url: str, *, screenshot: Path | None = None, height: int = 1000) -> str:
    """The page's DOM after its scripts ran; with `screenshot`, a PNG of the window too."""
    with tempfile.TemporaryDirectory() as profile:
        base = [
            binary,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size=1600,{height}",
        ]
        if screenshot is not None:
            subprocess.run(
                [*base, f"--screenshot={screenshot}", url],
                capture_output=True,
                timeout=180,
                check=True,
            )
        dom = subprocess.run(
            [*base, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=True
        )
    return dom.stdout


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--targets",
        type=float,
        nargs="+",
        help="target.size_kb per run (default: 250 100; --quick: 20 12, its teacher is ~36 KB)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small teacher, few epochs (seconds per run)"
    )
    parser.add_argument(
        "--store", type=Path, help="a directory holding mlflow.db with runs already (skip the runs)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path(tempfile.gettempdir()) / "distill-ui-check"
    )
    args = parser.parse_args()
    args.targets = args.targets or ([20.0, 12.0] if args.quick else [250.0, 100.0])

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        print("error: chromium not found (Debian: apt-get install -y chromium)", file=sys.stderr)
        return 2
    store = args.store or Path(tempfile.mkdtemp(prefix="distill-ui-check-"))
    args.out.mkdir(parents=True, exist_ok=True)
    env = os.environ | {
        "MLFLOW_TRACKING_URI": f"sqlite:///{store.resolve()}/mlflow.db",
        "DISTILL_MLFLOW_CONFIG": str(store / "absent-mlflow.yaml"),
        "PYTHONPATH": str(ROOT),
        "PREFECT_HOME": str(store / "prefect"),
        "DO_NOT_TRACK": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    distill = [sys.executable, "-m", "distill.flows.cli"]
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(f"  [{'ok' if ok else 'FAIL'}] {what}")
        if not ok:
            failures.append(what)

    prefect_base, flow_runs = "", {}
    servers = contextlib.ExitStack()  # the Prefect server: stopped at the end, its whole group
    if args.store is None:
        try:
            api = servers.enter_context(
                prefect_server(
                    store / "prefect-server", ui=True, log=args.out / "prefect-server.log"
                )
            )
        except ServerNotReady as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        env["PREFECT_API_URL"] = api
        prefect_base = api.removesuffix("/api")
        print(f"prefect server: {prefect_base}")
    try:
        if args.store is None:
            for budget in args.targets:
                sets = [
                    f"target.size_kb={budget:g}",
                    f"register.model_name={MODEL}",
                    *(QUICK if args.quick else []),
                ]
                print(f"distill run --set {' --set '.join(sets)}", flush=True)
                start = time.monotonic()
                proc = subprocess.run(
                    [
                        *distill,
                        "run",
                        str(ROOT / "configs" / "digits.yaml"),
                        *[a for s in sets for a in ("--set", s)],
                        "--json",
                    ],
                    cwd=store,
                    env=env,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                (args.out / f"run-{budget:g}.stderr.txt").write_text(proc.stderr)
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    return 1
                out = json.loads(proc.stdout)
                flow_runs[out["run_name"]] = out["flow_run_id"]
                lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("distill: ")]
                check(
                    any("evaluate-finetuned done in" in ln for ln in lines),
                    f"run {out['run_name']!r}: {len(lines)} `distill:` lines on stderr "
                    f"(not a terminal), final/accuracy {out['metrics']['final/accuracy']:.4f} "
                    f"({time.monotonic() - start:.0f} s)",
                )
            # a sweep of two variants: nested under the sweep's run, one challenger
            grid = "target.size_kb=16,24"
            print(f"distill sweep --grid {grid}", flush=True)
            proc = subprocess.run(
                [
                    *distill,
                    "sweep",
                    str(ROOT / "configs" / "digits.yaml"),
                    "--grid",
                    grid,
                    "--set",
                    f"register.model_name={SWEEP_MODEL}",
                    *[a for s in (QUICK if args.quick else []) for a in ("--set", s)],
                    "--json",
                ],
                cwd=store,
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            (args.out / "sweep.stderr.txt").write_text(proc.stderr)
            sweep = json.loads(proc.stdout) if proc.returncode == 0 else {}
            check(
                proc.returncode == 0 and (sweep.get("challenger") or "").startswith("challenger:"),
                f"distill sweep: exit {proc.returncode}, {sweep.get('challenger')}",
            )
            for name, flags, code in (
                ("granted", ["--max-accuracy-drop", "0.5"], 0),
                ("refused", ["--version", "1", "--min-accuracy", "0.9999"], 1),
            ):
                proc = subprocess.run(
                    [*distill, "promote", "--model", MODEL, *flags, "--json"],
                    cwd=store,
                    env=env,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                decision = json.loads(proc.stdout) if proc.stdout.strip() else {}
                check(
                    proc.returncode == code,
                    f"distill promote ({name}): exit {proc.returncode}, {decision.get('status')}",
                )

        port = free_port()
        ui_log = (args.out / "ui.log").open("w")
        ui = subprocess.Popen(
            [*distill, "ui", "--port", str(port)],
            cwd=store,
            env=env,
            stdout=subprocess.PIPE,
            stderr=ui_log,
            text=True,
        )
        try:
            failed_pages = pages_check(ui, binary, args, check, prefect_base, flow_runs)
            if failed_pages:
                return 1
        finally:
            if ui.poll() is None:
                ui.send_signal(signal.SIGINT)  # as Ctrl-C
                try:
                    ui.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    ui.kill()
            ui_log.close()
        stopped = ui.returncode is not None
        try:
            get(f"http://127.0.0.1:{port}/health")
            answering = True
        except OSError:
            answering = False
        check(
            stopped and not answering,
            f"distill ui stopped on SIGINT (exit {ui.returncode}), port {port} closed",
        )
    finally:
        servers.close()
    print(f"\nscreenshots and the servers' logs in {args.out}; store {store}")
    print("all checks passed" if not failures else f"{len(failures)} check(s) failed")
    return 0 if not failures else 1


def pages_check(ui, binary, args, check, prefect_base: str, flow_runs: dict[str, str]) -> int:
    """REST checks, then every page in Chromium; returns 1 when `distill ui` did not start."""
    start = time.monotonic()
    line = ui.stdout.readline()  # "MLflow UI: URL  (Ctrl-C to stop)" once it answers
    if not line.startswith("MLflow UI: "):
        print(f"error: distill ui printed {line!r}", file=sys.stderr)
        return 1
    base = line.split()[2]
    print(f"distill ui: {base} answered after {time.monotonic() - start:.1f} s")

    _, _, body = get(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=distill")
    experiment_id = json.loads(body)["experiment"]["experiment_id"]
    _, _, body = get(
        f"{base}/api/2.0/mlflow/runs/search",
        {"experiment_ids": [experiment_id], "max_results": 1000},
    )
    every = json.loads(body)["runs"]

    def tags_of(run: dict) -> dict[str, str]:
        return {t["key"]: t["value"] for t in run["data"].get("tags", [])}

    sweeps = [r for r in every if tags_of(r).get("distill.sweep_summary") == "true"]
    for sweep in sweeps:
        variants = [
            r for r in every if tags_of(r).get("mlflow.parentRunId") == sweep["info"]["run_id"]
        ]
        check(
            len(variants) == 2,
            f"sweep run {sweep['info']['run_name']!r}: variants nested under it: "
            + str(sorted(r["info"]["run_name"] for r in variants)),
        )
    _, _, body = get(
        f"{base}/api/2.0/mlflow/model-versions/search?"
        + urllib.parse.urlencode({"filter": f"name = '{SWEEP_MODEL}'"})
    )
    versions = json.loads(body).get("model_versions", [])
    if sweeps:
        _, _, body = get(
            f"{base}/api/2.0/mlflow/registered-models/alias?"
            + urllib.parse.urlencode({"name": SWEEP_MODEL, "alias": "challenger"})
        )
        challenger = json.loads(body)["model_version"]
        best = {t["key"]: t["value"] for t in challenger.get("tags", [])}.get("distill.sweep_best")
        check(
            len(versions) == 2 and best == "true",
            f"sweep: {len(versions)} versions registered, challenger version "
            f"{challenger['version']} (distill.sweep_best={best})",
        )
    runs = [
        r
        for r in every
        if "distill.stage" not in tags_of(r) and "distill.sweep_id" not in tags_of(r)
    ]
    runs.sort(key=lambda r: r["info"]["start_time"], reverse=True)
    run_ids = [r["info"]["run_id"] for r in runs]
    names = [r["info"]["run_name"] for r in runs]
    check(len(runs) >= 2, f"{len(runs)} parent runs in experiment {experiment_id}: {names}")
    for run in runs:
        metrics = {m["key"]: m["value"] for m in run["data"].get("metrics", [])}
        rid, tags = run["info"]["run_id"], tags_of(run)
        check(
            {"final/accuracy", "final/size_kb", "compression_ratio"} <= set(metrics)
            and "·" in run["info"]["run_name"],
            f"run {run['info']['run_name']!r}: final/accuracy "
            f"{metrics.get('final/accuracy', float('nan')):.4f}, "
            f"{sum(k.startswith('system/') for k in metrics)} system metrics",
        )
        check(
            tags.get("mlflow.note.content", "").startswith("# distill run")
            and "mlflow.source.git.commit" in tags,
            f"run {rid[:8]}: description of {len(tags.get('mlflow.note.content', ''))} "
            "characters, mlflow.source.git.commit set",
        )
        stages = [r for r in every if tags_of(r).get("mlflow.parentRunId") == rid]
        timed = {
            r["info"]["run_name"]: next(
                (m["value"] for m in r["data"].get("metrics", []) if m["key"] == "seconds"), None
            )
            for r in stages
        }
        check(
            len(stages) >= 6 and all(v is not None for v in timed.values()),
            f"run {rid[:8]}: stage runs "
            + ", ".join(f"{k} {v:.1f} s" for k, v in timed.items() if v is not None),
        )
        for plot in PLOTS:
            status, ctype, png = get(
                f"{base}/get-artifact?" + urllib.parse.urlencode({"path": plot, "run_uuid": rid})
            )
            check(
                status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n",
                f"run {rid[:8]}: {plot} served ({ctype}, {len(png):,} bytes)",
            )

    newest = run_ids[0]
    pages = {
        "runs": (f"{base}/#/experiments/{experiment_id}/runs", 1000, names[:2]),
        "parent": (  # its description, and its nested stage runs as "Child runs"
            f"{base}/#/experiments/{experiment_id}/runs/{newest}",
            1400,
            ["distill run: " + names[0], "points", "Child runs", *STAGE_NAMES],
        ),
        "compare": (
            f"{base}/#/compare-runs?"
            + urllib.parse.urlencode(
                {"runs": json.dumps(run_ids[:2]), "experiments": json.dumps([experiment_id])}
            ),
            3000,
            # its tables are virtualized: only the first rows (alphabetical) are in the DOM
            [*names[:2], "final/accuracy", "compression_ratio", "accuracy_drop", "pareto.png"],
        ),
        "model": (f"{base}/#/models/{MODEL}", 1000, ["champion", "challenger", "Students"]),
        **{
            f"plot-{plot.removesuffix('.png')}": (
                f"{base}/#/experiments/{experiment_id}/runs/{newest}/artifacts/{plot}",
                1000,
                [plot],
            )
            for plot in PLOTS
        },
    }
    if sweeps:
        sweep_id = sweeps[0]["info"]["run_id"]
        pages["sweep"] = (
            f"{base}/#/experiments/{experiment_id}/runs/{sweep_id}",
            1400,
            ["sweep · target.size_kb=16,24", "Child runs", "challenger: ui-check-sweep"],
        )
        pages["sweep-pareto"] = (
            f"{base}/#/experiments/{experiment_id}/runs/{sweep_id}/artifacts/sweep/pareto.png",
            1000,
            ["pareto.png"],
        )
    if prefect_base and flow_runs:
        name, flow_run_id = next(iter(flow_runs.items()))
        pages["prefect-flow-run"] = (
            f"{prefect_base}/runs/flow-run/{flow_run_id}",
            1400,
            [name, "MLflow parent run", "evaluate-finetuned", "register"],
        )
        _, _, body = get(
            f"{prefect_base}/api/task_runs/filter",
            {
                "flow_runs": {"id": {"any_": [flow_run_id]}},
                "task_runs": {"name": {"any_": ["evaluate-finetuned"]}},
            },
        )
        task_runs = json.loads(body)
        # the flow run carries the tags (`config:NAME`), its task runs none: Prefect asks its
        # server for a concurrency slot per tag of every task run (flows/distill.py)
        _, _, body = get(f"{prefect_base}/api/flow_runs/{flow_run_id}")
        flow_tags = json.loads(body).get("tags", [])
        check(
            len(task_runs) == 1 and "config:digits" in flow_tags and not task_runs[0]["tags"],
            f"Prefect: flow run tags {flow_tags}, task run evaluate-finetuned tags "
            + str(task_runs[0]["tags"] if task_runs else []),
        )
        if task_runs:
            pages["prefect-task-run"] = (
                f"{prefect_base}/runs/task-run/{task_runs[0]['id']}",
                1000,
                ["evaluate-finetuned"],
            )
        pages["prefect-runs"] = (f"{prefect_base}/runs", 1200, [f"{MODEL} v1", "Failed"])
        _, _, body = get(
            f"{prefect_base}/api/flow_runs/filter",
            {"flow_runs": {"state": {"type": {"any_": ["FAILED"]}}}},
        )
        failed = json.loads(body)
        check(
            len(failed) == 1 and failed[0]["state"]["message"].startswith("refused"),
            "Prefect: the refused promotion's flow run is Failed: "
            + (repr(failed[0]["state"]["message"][:90]) if failed else "none"),
        )
        if failed:
            pages["prefect-refused"] = (
                f"{prefect_base}/runs/flow-run/{failed[0]['id']}",
                1000,
                ["Failed", "refused", "min_accuracy"],
            )
    for page, (url, height, expected) in pages.items():
        shot = args.out / f"{page}.png"
        dom = chromium(binary, url, screenshot=shot, height=height)
        (args.out / f"{page}.html").write_text(dom)
        missing = [text for text in expected if text not in dom]
        check(
            not missing and shot.stat().st_size > 20_000,
            f"page {page}: {shot} ({shot.stat().st_size:,} bytes)"
            + (f", DOM lacks {missing}" if missing else f", shows {expected}"),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

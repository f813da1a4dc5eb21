"""Browser check of `distill ui`: two pipeline runs with different budgets, then the MLflow UI
served by `distill ui` opened in headless Chromium.

    .venv/bin/python benchmarks/ui_check.py [--budgets 250 100] [--quick] [--out DIR] [--store DIR]

1. runs `distill run configs/digits.yaml --set reduce.budget.size_kb=B` once per budget
   against a throw-away MLflow store (`--store DIR` reuses one that already holds runs;
   `--quick` trains a small teacher for a few epochs instead of the default config);
2. starts `distill ui` on a free port and checks over its REST API that both parent runs
   carry `final/*` metrics and that every `plots/*.png` artifact is served as a PNG;
3. renders pages in headless Chromium (`chromium`, Debian's package): the experiment's runs,
   the compare view of the runs (params, metrics side by side), and each plot of the
   newest run; it checks the rendered DOM shows the runs' ids, `final/*` metric names and
   the plots' names, and writes a screenshot per page to --out (look at them);
4. stops the UI (SIGINT, as Ctrl-C) and checks it has gone.

Not part of `make test`: CI has no Chromium. Exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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
PLOTS = ("pareto.png", "confusion.png", "tsne.png", "curves.png")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        "--budgets",
        type=float,
        nargs="+",
        default=[250.0, 100.0],
        help="reduce.budget.size_kb per run",
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
    }
    distill = [sys.executable, "-m", "flows.cli"]
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(f"  [{'ok' if ok else 'FAIL'}] {what}")
        if not ok:
            failures.append(what)

    if args.store is None:
        for budget in args.budgets:
            sets = [f"reduce.budget.size_kb={budget:g}", *(QUICK if args.quick else [])]
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
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            out = json.loads(proc.stdout)
            print(
                f"  run {out['run_id']}: final/accuracy {out['metrics']['final/accuracy']:.4f}, "
                f"final/size_kb {out['metrics']['final/size_kb']:.1f} "
                f"({time.monotonic() - start:.0f} s)"
            )

    port, base = free_port(), ""
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
        runs = [
            r
            for r in json.loads(body)["runs"]
            if not any(t["key"] == "mlflow.parentRunId" for t in r["data"].get("tags", []))
        ]
        runs.sort(key=lambda r: r["info"]["start_time"], reverse=True)
        run_ids = [r["info"]["run_id"] for r in runs]
        check(len(runs) >= 2, f"{len(runs)} parent runs in experiment {experiment_id}")
        for run in runs:
            metrics = {m["key"]: m["value"] for m in run["data"].get("metrics", [])}
            rid = run["info"]["run_id"]
            check(
                {"final/accuracy", "final/size_kb", "compression_ratio"} <= set(metrics),
                f"run {rid[:8]}: final/accuracy {metrics.get('final/accuracy', float('nan')):.4f}, "
                f"final/size_kb {metrics.get('final/size_kb', float('nan')):.1f}, "
                f"{sum(k.startswith('final/') for k in metrics)} final/* metrics",
            )
            for plot in PLOTS:
                status, ctype, png = get(
                    f"{base}/get-artifact?"
                    + urllib.parse.urlencode({"path": f"plots/{plot}", "run_uuid": rid})
                )
                check(
                    status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n",
                    f"run {rid[:8]}: plots/{plot} served ({ctype}, {len(png):,} bytes)",
                )

        newest = run_ids[0]
        pages = {
            "runs": (f"{base}/#/experiments/{experiment_id}/runs", 1000, ["digits-size_kb"]),
            "compare": (
                f"{base}/#/compare-runs?"
                + urllib.parse.urlencode(
                    {"runs": json.dumps(run_ids[:2]), "experiments": json.dumps([experiment_id])}
                ),
                5000,
                # its tables are virtualized: only the first rows (alphabetical) are in the DOM
                [
                    *run_ids[:2],
                    "final/accuracy",
                    "final/ece",
                    "compression_ratio",
                    "accuracy_drop",
                    "reduce.budget.size_kb",
                ],
            ),
            **{
                f"plot-{plot.removesuffix('.png')}": (
                    f"{base}/#/experiments/{experiment_id}/runs/{newest}/artifacts/plots/{plot}",
                    1000,
                    [f"plots/{plot}"],
                )
                for plot in PLOTS
            },
        }
        for name, (url, height, expected) in pages.items():
            shot = args.out / f"{name}.png"
            dom = chromium(binary, url, screenshot=shot, height=height)
            missing = [text for text in expected if text not in dom]
            check(
                not missing and shot.stat().st_size > 20_000,
                f"page {name}: {shot} ({shot.stat().st_size:,} bytes)"
                + (
                    f", DOM lacks {missing}"
                    if missing
                    else f", shows {len(expected)} expected texts"
                ),
            )
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
        get(f"{base}/health")
        answering = True
    except OSError:
        answering = False
    check(
        stopped and not answering,
        f"distill ui stopped on SIGINT (exit {ui.returncode}), port {port} closed",
    )
    print(f"\nscreenshots and the server's log (ui.log) in {args.out}; store {store}")
    print("all checks passed" if not failures else f"{len(failures)} check(s) failed")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())

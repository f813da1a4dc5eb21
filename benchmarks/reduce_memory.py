"""Peak memory of the reduce stage as calibration grows 10x: streamed moments vs keeping
activations.

    .venv/bin/python benchmarks/reduce_memory.py [--rows 4096] [--factor 10]

Each measurement runs in a fresh process: build the digits teacher (64-512-512-10, random
weights: memory does not depend on training), make the calibration rows, note the peak
RSS, run the PCA, and report how much the peak grew. `streamed` is
`distill.tasks.compress.reduce.collect_bases` (running Σz, Σzzᵀ per layer); `naive` keeps every
layer's outputs and runs one PCA on them (what a straightforward implementation does) — the
reference the streamed one must beat.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(method: str, rows: int) -> tuple[float, float]:
    """(peak RSS in MB, growth of the peak while computing the bases), in a child process."""
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch

    from distill.tasks.compress.architectures import build_mlp
    from distill.tasks.compress.pca import collect_bases, linear_layers

    torch.manual_seed(0)
    model = build_mlp(64, [512, 512], 10).eval()
    X = np.random.default_rng(0).normal(size=(rows, 64)).astype(np.float32)
    collect_bases(model, X[:512])  # warm up allocators and kernels outside the measurement
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if method == "streamed":
        collect_bases(model, X, batch_size=256)
    else:
        outs: dict[str, list[torch.Tensor]] = {}
        hooks = [
            m.register_forward_hook(
                lambda _m, _i, o, n=n: outs.setdefault(n, []).append(o.detach().double())
            )
            for n, m in linear_layers(model).items()
        ]
        with torch.no_grad():
            for i in range(0, rows, 256):
                model(torch.from_numpy(X[i : i + 256]))
        for h in hooks:
            h.remove()
        for z in outs.values():
            Z = torch.cat(z)
            Z = Z - Z.mean(0)
            torch.linalg.eigh(Z.T @ Z / len(Z))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return after / 1024, (after - before) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]))))
        return

    def child(method: str, rows: int) -> tuple[float, float]:
        out = subprocess.run(
            [sys.executable, __file__, "--child", method, str(rows)],
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    f = args.factor
    print(
        f"| PCA of layer outputs | rows 1x -> {f}x | peak RSS 1x (MB) | peak RSS {f}x (MB) | ratio "
        f"{f}x/1x | growth during PCA 1x / {f}x (MB) |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for method in ("streamed", "naive"):
        (peak1, grow1), (peak10, grow10) = child(method, args.rows), child(method, args.rows * f)
        print(
            f"| {method} | {args.rows:,} -> {args.rows * f:,} | {peak1:.0f} | {peak10:.0f} | "
            f"{peak10 / peak1:.2f} | {grow1:.1f} / {grow10:.1f} |"
        )


if __name__ == "__main__":
    main()

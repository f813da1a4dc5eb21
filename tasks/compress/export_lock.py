"""One lock for what torch keeps process-wide while it exports a graph.

`torch.onnx.export(dynamo=True)` traces with `torch.export`, which sets a flag for the whole
process (`torch.compiler.is_exporting()`), not for its thread; the tracer itself is not
thread-safe either. While the flag is set, every function torch wraps in `_disable_dynamo`
(the optimizers' `__init__`, `zero_grad`, `step`) writes to the tracer's global node metadata,
in any thread: a pipeline training in one thread of a sweep while another exports raised
`KeyError: 'custom'` from `opt.zero_grad()` (torch 2.13), and from `torch.manual_seed` (which
`torch._dynamo` wraps the same way once imported: a sweep variant seeding its teacher while the
other variant's pre-flight exported). So exports run one at a time, and optimizer calls and
seeding (`seed_torch`) never run during one. Reentrant: the target stage holds it across its search,
whose pruning rounds train.

Reached through a function: a flow shipped to a Dask worker is pickled by value, and a lock
cannot be; a module-level function is pickled by reference.
"""

from __future__ import annotations

import threading

import torch

_LOCK = threading.RLock()


def onnx_export_lock() -> threading.RLock:
    """Held by an ONNX export (and the planning that exports), and by each optimizer call."""
    return _LOCK


def seed_torch(seed: int) -> None:
    """`torch.manual_seed`, never while another thread exports."""
    with _LOCK:
        torch.manual_seed(seed)

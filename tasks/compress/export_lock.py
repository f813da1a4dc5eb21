"""One lock for what torch keeps process-wide while it exports a graph.

`torch.onnx.export(dynamo=True)` traces with `torch.export`, which sets a flag for the whole
process (`torch.compiler.is_exporting()`), not for its thread; the tracer itself is not
thread-safe either. While the flag is set, every function torch wraps in `_disable_dynamo`
(the optimizers' `__init__`, `zero_grad`, `step`) writes to the tracer's global node metadata,
in any thread: a pipeline training in one thread of a sweep while another exports raised
`KeyError: 'custom'` from `opt.zero_grad()` (torch 2.13). So exports run one at a time, and
optimizer calls never run during one. Reentrant: the target stage holds it across its search,
whose pruning rounds train.

Reached through a function: a flow shipped to a Dask worker is pickled by value, and a lock
cannot be; a module-level function is pickled by reference.
"""

from __future__ import annotations

import threading

_LOCK = threading.RLock()


def onnx_export_lock() -> threading.RLock:
    """Held by an ONNX export (and the planning that exports), and by each optimizer call."""
    return _LOCK

"""distill: compress a trained PyTorch model into a small student that keeps its accuracy.

    import distill
    result = distill.compress(model, train=(X, y), test=(X_test, y_test), target={"ratio": 10})

`compress` runs in this process with no server (tracked in MLflow only when asked); `run` is
the CLI's `distill run`: a config through the Prefect flow, recorded and registered.

One installed package: the project's folders `tasks/` (the stages, the release, the platform)
and `flows/` (Prefect flows, the CLI) are its subpackages `distill.tasks` and `distill.flows`.
The public API is loaded on first use, so `import distill.flows.cli` (the command line) does
not import torch.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distill.api import Result, Served, compress, run
    from distill.tasks.platform.errors import UserError

try:
    __version__ = version("distill")
except PackageNotFoundError:  # a source tree not installed
    __version__ = "0+unknown"

__all__ = ["Result", "Served", "UserError", "__version__", "compress", "run"]


def __getattr__(name: str) -> Any:
    if name == "UserError":
        from distill.tasks.platform.errors import UserError

        return UserError
    if name in __all__:
        from distill import api

        return getattr(api, name)
    raise AttributeError(f"module 'distill' has no attribute {name!r}")

"""distill: compress a trained PyTorch model into a small student that keeps its accuracy.

    import distill
    result = distill.compress(model, train=(X, y), test=(X_test, y_test), target={"ratio": 10})

`compress` runs in this process with no server (tracked in MLflow only when asked); `run` is
the CLI's `distill run`: a config through the Prefect flow, recorded and registered.
"""

from importlib.metadata import PackageNotFoundError, version

from distill.api import Result, Served, compress, run
from tasks.platform.errors import UserError

try:
    __version__ = version("distill")
except PackageNotFoundError:  # a source tree not installed
    __version__ = "0+unknown"

__all__ = ["Result", "Served", "UserError", "__version__", "compress", "run"]

"""What one run prepares once and its parts share: the config, the dataset and the pre-flight.

`distill run` checks its inputs in the CLI's process before Prefect starts (the config parsed,
the data read and prepared, the pre-flight flown: flows/cli.py), then the flow run's name and
the flow ask for the same config, dataset and pre-flight, and `compress` asks for the pre-flight
again; `distill sweep` checks every variant first, then runs each in a thread of its flow. One
`RunContext`, created by the command (or the flow, when a deployment starts it), is handed down
to each of them, and each asks it: the first asks prepare, the others get what was prepared.
Nothing outlives the context: a second run, or a second `distill.compress(...)` in the same
process, prepares its own.
"""

from __future__ import annotations

import threading
from pathlib import Path

from distill.tasks.compress.data import Dataset, load_dataset
from distill.tasks.compress.preflight import Preflight, preflight_config
from distill.tasks.platform.config import (
    DEFAULT_CONFIG,
    DataConfig,
    PipelineConfig,
    load_config,
    resolve_config,
)


class RunContext:
    """The datasets prepared and the pre-flights flown in one run, by what they were made from
    (a data config, its seed and the file's size and modification time; a config, the data's
    digest and the config's folder). A sweep's variants ask from their threads: a lock guards the
    records (not the work: two threads asking at once for one dataset may both prepare it).

    Slots, not a dataclass: a Prefect flow parameter is encoded for the API and a dataclass's
    fields would be walked (a dataset's arrays copied) on the way; a class without `__dict__`
    is stored as a placeholder. Pickled (to a Dask worker) it arrives empty."""

    __slots__ = ("_configs", "_datasets", "_lock", "_preflights")

    def __init__(self) -> None:
        self._configs: dict[tuple[object, ...], PipelineConfig] = {}
        self._datasets: dict[tuple[object, ...], Dataset] = {}
        self._preflights: dict[str, Preflight | None] = {}
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[type[RunContext], tuple[()]]:
        return RunContext, ()

    def config(self, path: str | Path | None, overrides: list[str] | None = None) -> PipelineConfig:
        """`load_config(path, overrides)`, parsed once in this run while the file is unchanged
        (the CLI's input check, the flow run's name and the flow read the same object)."""
        file = resolve_config(Path(path or DEFAULT_CONFIG)).resolve()
        key = (str(file), tuple(overrides or ()), _file_stamp(f"file:{file}"))
        with self._lock:
            if key in self._configs:
                return self._configs[key]
        cfg = load_config(path, overrides)
        with self._lock:
            return self._configs.setdefault(key, cfg)

    def dataset(self, cfg: DataConfig, seed: int) -> Dataset:
        """`load_dataset(cfg, seed)`, prepared once in this run while the file is unchanged."""
        key = (cfg.model_dump_json(), seed, _file_stamp(cfg.source))
        with self._lock:
            if key in self._datasets:
                return self._datasets[key]
        data = load_dataset(cfg, seed)
        with self._lock:
            return self._datasets.setdefault(key, data)

    def preflight(
        self, cfg: PipelineConfig, data: Dataset, config_dir: str | Path | None = None
    ) -> Preflight | None:
        """`preflight_config(cfg, data, config_dir)`, flown once in this run (a failure raises
        and is not kept: a second ask fails again)."""
        key = f"{cfg.digest()}:{data.digest}:{config_dir}"
        with self._lock:
            if key in self._preflights:
                return self._preflights[key]
        result = preflight_config(cfg, data, config_dir)
        with self._lock:
            return self._preflights.setdefault(key, result)


def _file_stamp(source: str) -> tuple[str, int, int] | None:
    kind, _, ref = source.partition(":")
    path = Path(ref)
    if kind == "sklearn" or not path.is_file():
        return None
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns

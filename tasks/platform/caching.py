"""Resume: the expensive stages are cached on the *content* of their inputs and code.

Prefect's `INPUTS` policy hashes arguments as JSON or cloudpickle bytes; a module or a
tensor pickles differently on every call, so a run killed in fine-tuning would never find
its teacher again (shared/FACTS.md). The stages' cache policy (flows/caching.py) keys a task
run on what its inputs hold instead, hashed here: tensor and array bytes, a module's
architecture and `state_dict`, a config's JSON, a dataclass field by field except those marked
`metadata={"content": False}` (a `Dataset` by its split arrays, which already encode the raw
table, the split seed and the data config, not by the path they were read from; a large table's
splits on disk by the digest its conversion computed once, streamed: tasks/compress/stream.py;
a function among the inputs, such as a search's export stand-in, has no key: not cached),
plus the source of the task's module and of every `tasks` module it
uses (a change in `fit` invalidates the teacher), Prefect's `TASK_SOURCE`, and the torch/numpy
versions its pickled result depends on.

With `persist_result=True` the results are pickled under `PREFECT_HOME/storage`
(`PREFECT_LOCAL_STORAGE_PATH`), so a re-run with the same config reads the finished
stages back: their task runs end in state `Cached`. `distill run --fresh` recomputes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import sys
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel
from torch import nn

from distill.tasks.platform.config import TeacherConfig

CODE_PACKAGE = "distill.tasks"


class Uncacheable(Exception):
    """An input whose content a key cannot pin down (a registry alias that may move)."""


def content_hash(*values: Any) -> str:
    """sha256 of what the values hold (not of how they pickle)."""
    h = hashlib.sha256()
    for value in values:
        _feed(h, value)
    return h.hexdigest()


def _tag(h: Any, kind: str, *parts: object) -> None:
    h.update(f"<{kind}:{':'.join(str(p) for p in parts)}>".encode())


def _feed(h: Any, obj: Any) -> None:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        _tag(h, type(obj).__name__, repr(obj))
    elif isinstance(obj, (bytes, bytearray)):
        _tag(h, "bytes", len(obj))
        h.update(obj)
    elif isinstance(obj, np.ndarray):
        _array(h, obj)
    elif isinstance(obj, torch.Tensor):
        _tag(h, "tensor", obj.dtype, tuple(obj.shape))
        # a fresh dense copy: a size-1 slice counts as contiguous with any stride, and viewing
        # it as bytes needs stride 1 (a regression head's bias is one)
        flat = obj.detach().cpu().reshape(-1).clone(memory_format=torch.contiguous_format)
        h.update(flat.view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, nn.Module):
        # the printed architecture names every layer and its shape; the state_dict holds the numbers
        _tag(h, "module", type(obj).__module__, type(obj).__qualname__, obj.training)
        _feed(h, str(obj))
        _feed(h, dict(obj.state_dict()))
    elif hasattr(obj, "content_key"):  # rows on disk (tasks/compress/rows.py): named, not read
        _tag(h, "keyed", type(obj).__qualname__, obj.content_key())
    elif isinstance(obj, BaseModel):
        _tag(h, "config", type(obj).__qualname__)
        _feed(h, obj.model_dump_json())
        if isinstance(obj, TeacherConfig):
            _feed(h, teacher_source_fingerprint(obj.source))
            _feed(h, arch_fingerprint(obj.arch))
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        _tag(h, "dataclass", type(obj).__module__, type(obj).__qualname__)
        for f in dataclasses.fields(obj):
            if not f.metadata.get("content", True):  # e.g. where the rows were read from
                continue
            _feed(h, f.name)
            _feed(h, getattr(obj, f.name))
    elif isinstance(obj, Mapping):
        _tag(h, "mapping", len(obj))
        for key in sorted(obj, key=repr):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        _tag(h, type(obj).__name__, len(obj))
        for item in obj:
            _feed(h, item)
    elif isinstance(obj, np.generic):
        _feed(h, obj.item())
    elif isinstance(obj, pd.DataFrame):  # a Dataset's raw columns: names, types, cell hashes
        _tag(h, "frame", obj.shape, list(obj.columns), [str(t) for t in obj.dtypes])
        h.update(pd.util.hash_pandas_object(obj, index=False).to_numpy().tobytes())
    elif callable(obj):  # a function's content is its code and what it closes over: not pinned
        raise Uncacheable(f"a function: {getattr(obj, '__qualname__', type(obj).__qualname__)}")
    else:
        raise TypeError(f"no content hash for {type(obj).__module__}.{type(obj).__qualname__}")


def _array(h: Any, a: np.ndarray) -> None:
    if a.dtype == object:
        _tag(h, "object-array", a.shape)
        _feed(h, a.tolist())
        return
    _tag(h, "array", a.dtype.str, a.shape)
    h.update(np.ascontiguousarray(a).tobytes())


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read once per (path, size, mtime): the teacher file is both
    a lineage tag and part of the teacher stage's cache key."""
    st = path.stat()
    return _file_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


@cache
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def directory_sha256(path: Path) -> str:
    """sha256 of a `save_pretrained` directory: the names and bytes of its config and weights
    (`*.json`, `*.safetensors`), each file hashed once per (path, size, mtime)."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file() and f.suffix in (".json", ".safetensors"):
            h.update(f"{f.name}\0{file_sha256(f)}\0".encode())
    return h.hexdigest()


def teacher_source_fingerprint(source: str) -> str:
    """What a teacher source currently points at: a file's bytes, an `hf:` directory's config and
    weights; an immutable URI as is.

    `models:/NAME@ALIAS` can move to another version at any time, so a teacher loaded by
    alias is never cached (the key function returns None for it)."""
    if source.startswith("file:"):
        path = Path(source.removeprefix("file:"))
        return file_sha256(path) if path.is_file() else "missing"
    if source.startswith("hf:"):
        path = Path(source.removeprefix("hf:"))
        return directory_sha256(path) if path.is_dir() else "missing"
    if source.startswith("models:/") and "@" in source:
        raise Uncacheable(source)
    return source


def arch_fingerprint(arch: str) -> str:
    """A `module:Name` teacher's source file (editing the class invalidates a cached teacher);
    the flow imports it before any task's key is computed."""
    module = sys.modules.get(arch.partition(":")[0]) if ":" in arch else None
    source = getattr(module, "__file__", None)
    return file_sha256(Path(source)) if source and Path(source).is_file() else arch


def _code_module(value: Any) -> str | None:
    """The `tasks` module a global names: the module itself, or where a function or class lives."""
    dep = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
    return (
        dep
        if isinstance(dep, str) and (dep == CODE_PACKAGE or dep.startswith(CODE_PACKAGE + "."))
        else None
    )


def code_modules(fn: Callable[..., Any]) -> list[str]:
    """The `tasks` modules a stage function calls into, transitively (sorted names): the ones
    its own code names, then every `tasks` module those import. A thin Prefect wrapper in
    flows/stages.py keys on the stage it wraps, not on every stage its module imports."""
    names = fn.__code__.co_names
    todo = [m for m in (_code_module(fn.__globals__[n]) for n in names if n in fn.__globals__) if m]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += [m for m in map(_code_module, vars(importlib.import_module(name)).values()) if m]
    return sorted(seen)


@cache
def code_digest(fn: Callable[..., Any]) -> str:
    """sha256 of the source of `code_modules(fn)`."""
    h = hashlib.sha256()
    for name in code_modules(fn):
        _tag(h, "source", name)
        h.update(inspect.getsource(importlib.import_module(name)).encode())
    return h.hexdigest()

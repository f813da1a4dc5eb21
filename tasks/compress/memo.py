"""Measurements of a model on rows, remembered by content: the same weights, structure and rows
give the same answer, so the second call returns the first's.

A search builds many students from one teacher on one set of calibration rows (a drop-only
target's start: a reconstruction per doubling budget; each rebuild: the reduce stage's plan
again), and each build measures the same PCA of the teacher's groups again: on the digits MLP,
24 of the 45 measurements of one drop-only search were repeats; and every reconstruction re-fits
its layers to the same teacher outputs on the same rows (`width.teacher_outputs`, a batch at a
time, the teacher's digest taken once per reconstruction: `Digested`). `remembered` keys a
measurement by a digest of the model (every module's class and plain attributes, every tensor of
its state) and of the rows, so a model changed in any weight, width or attribute (a head count)
is measured afresh. What it returns is shared between callers, so its arrays are made
read-only; at most `KEEP` answers and `MAX_BYTES` of their arrays are kept per function (a
2,048-channel group's PCA alone is 32 MB).
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, TypeVar, overload

import numpy as np
import torch
from torch import nn

KEEP = 8  # measurements remembered per function, the least recently used forgotten first
MAX_BYTES = 256 * 2**20  # and at most this many bytes of arrays: a wide CNN's bases are large
PLAIN = (bool, int, float, str, type(None))

F = TypeVar("F", bound=Callable[..., Any])


def model_digest(model: nn.Module) -> bytes:
    """What the model computes: its modules' classes and plain attributes (widths, head counts,
    eps, training mode) and its state's names, shapes, dtypes and values."""
    h = hashlib.blake2b(digest_size=20)
    for name, module in model.named_modules():
        plain = sorted((k, v) for k, v in vars(module).items() if _plain(v))
        h.update(f"{name}|{type(module).__qualname__}|{plain}".encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(_bytes(t))
    return h.digest()


def _plain(v: object) -> bool:
    return isinstance(v, PLAIN) or (isinstance(v, tuple) and all(isinstance(x, PLAIN) for x in v))


def _bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: the same bits, read as int16
        t = t.view(torch.int16)
    return t.numpy().tobytes()


@dataclass(frozen=True)
class Digested:
    """A model with its digest taken once, for a function called with it many times (a batch at
    a time): `remembered` keys on `digest` and hands the function `model`."""

    model: nn.Module
    digest: bytes

    @classmethod
    def of(cls, model: nn.Module) -> Digested:
        return cls(model, model_digest(model))


def _digest(arg: object) -> bytes:
    if isinstance(arg, Digested):
        return arg.digest
    if isinstance(arg, nn.Module):
        return model_digest(arg)
    if isinstance(arg, np.ndarray):
        a = np.ascontiguousarray(arg)
        return hashlib.blake2b(
            f"{a.shape}|{a.dtype}".encode() + a.tobytes(), digest_size=20
        ).digest()
    return repr(arg).encode()


@overload
def remembered(fn: F) -> F: ...


@overload
def remembered(*, keep: int = KEEP) -> Callable[[F], F]: ...


def remembered(fn: F | None = None, *, keep: int = KEEP) -> Any:
    """`fn` with its last `keep` answers remembered by the content of its arguments (models,
    arrays, and the `repr` of the rest: groups, batch sizes); `@remembered(keep=N)` for another
    count (one answer per layer of a model read in turn: at least its layers, or the least
    recently used is always the next asked for)."""
    if fn is None:
        return functools.partial(remembered, keep=keep)
    answers: OrderedDict[bytes, tuple[Any, int]] = OrderedDict()
    lock = threading.Lock()  # a sweep's runs share it from their threads

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        h = hashlib.blake2b(digest_size=20)
        for arg in args:
            h.update(_digest(arg))
        for name, arg in sorted(kwargs.items()):
            h.update(name.encode() + _digest(arg))
        key = h.digest()
        with lock:
            if key in answers:
                answers.move_to_end(key)
                return answers[key][0]
        answer = _frozen(fn(*args, **kwargs))  # measured outside the lock
        size = _nbytes(answer)
        if size <= MAX_BYTES:
            with lock:
                answers[key] = (answer, size)
                while len(answers) > keep or sum(n for _, n in answers.values()) > MAX_BYTES:
                    answers.popitem(last=False)
        return answer

    return call


def _arrays(answer: Any) -> Iterator[np.ndarray]:
    """Every array inside `answer` (dicts, lists, tuples, dataclasses)."""
    if isinstance(answer, np.ndarray):
        yield answer
    elif isinstance(answer, dict):
        for v in answer.values():
            yield from _arrays(v)
    elif isinstance(answer, (list, tuple)):
        for v in answer:
            yield from _arrays(v)
    elif is_dataclass(answer) and not isinstance(answer, type):
        for f in fields(answer):
            yield from _arrays(getattr(answer, f.name))


def _frozen(answer: Any) -> Any:
    """`answer` with every array inside it made read-only, in place."""
    for a in _arrays(answer):
        a.flags.writeable = False
    return answer


def _nbytes(answer: Any) -> int:
    return sum(a.nbytes for a in _arrays(answer))

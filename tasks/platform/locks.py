"""File locks beside a SQLite store: processes (and threads) that write one store at once.

SQLite serializes single writes, not sequences of them: creating a fresh store's tables and
its experiment, or reading the champion and moving the alias, must happen one at a time.
`filelock` (flock on POSIX) takes a lock file next to the database. Other stores (a tracking
server, a remote registry) have no file here and get no lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI; None for any other store."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


@contextmanager
def beside_store(uri: str, purpose: str) -> Iterator[None]:
    """Hold `.DB.PURPOSE.lock` next to the SQLite file of `uri` (no lock for other stores)."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    with FileLock(db.parent / f".{db.name}.{purpose}.lock"):
        yield

"""No password leaves a `distill` process in clear: `http://user:password@host` is written
`http://user:***@host` wherever it appears in what the process prints.

distill's own messages redact the URIs they name (`store.redact`). MLflow and Prefect print URIs
of their own ("View run ... at: http://user:password@host/#/...", connection errors, logs): the
process's stdout and stderr are wrapped once, at start-up, in a stream that masks every
`scheme://user:password@` it is given, so what they print through it is masked too, and logging
handlers made afterwards write through it.
"""

from __future__ import annotations

import re
import sys
from typing import Any, TextIO

# scheme://user:password@ -- the password is anything up to the '@' that ends the authority
PASSWORD_IN_URI = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://[^/@:\s]*):[^/@\s]+@")


def redact_text(text: str) -> str:
    """`text` with the password of every `scheme://user:password@` replaced by `***`."""
    return PASSWORD_IN_URI.sub(r"\1:***@", text)


class RedactingStream:
    """A text stream that writes through to `stream` with passwords in URIs masked."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact_text(text) if "@" in text else text)
        return len(text)  # what the caller gave: some callers check it

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:  # flush, isatty, fileno, encoding, ...
        return getattr(self._stream, name)


def mask_passwords_in_output() -> None:
    """Wrap sys.stdout and sys.stderr (once)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))

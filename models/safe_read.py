"""Read a whole file into memory only when it is a regular file no larger than a stated limit.

Why: a path bastion reads whole (a model, a payload file, an image) can be anything by the time it is opened —
a 10 GB file, a FIFO that blocks ``open`` forever, a device that never ends. The size is checked on the open
descriptor (``fstat``), before anything is buffered, and at most ``limit + 1`` bytes are read, so a file that
grows after the check is caught too. The caller says what the file is for the message.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path


class TooLarge(OSError):
    """The file is larger than the limit (``size`` bytes, or more than ``limit`` when it grew while read)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"{size} bytes, more than the limit of {limit}")
        self.size, self.limit = size, limit


class NotRegular(OSError):
    """The path is a FIFO, a device, a socket or a directory."""


def open_regular(path: str | Path, limit: int) -> int:
    """A descriptor on ``path`` once it is known to be a regular file of at most ``limit`` bytes."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegular(f"{path} is not a regular file")
        if info.st_size > limit:
            raise TooLarge(info.st_size, limit)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bounded(path: str | Path, limit: int) -> bytes:
    """The bytes of ``path``; ``TooLarge``/``NotRegular``/``OSError`` otherwise (``FileNotFoundError`` included)."""
    with os.fdopen(open_regular(path, limit), "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(len(data), limit)
    return data


def hash_bounded(path: str | Path, limit: int, chunk: int = 1 << 20) -> tuple[str, int]:
    """(sha256 hex, size) of ``path``, streamed from one descriptor; the same refusals as ``read_bounded``."""
    digest, size = hashlib.sha256(), 0
    with os.fdopen(open_regular(path, limit), "rb") as fh:
        while block := fh.read(min(chunk, limit + 1 - size)):
            digest.update(block)
            size += len(block)
            if size > limit:
                raise TooLarge(size, limit)
    return digest.hexdigest(), size

"""Crash-safe writes: a file is either the old version or the complete new one."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
import tempfile
from pathlib import Path
from typing import Iterator


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write to a temp file in the same directory, fsync it, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode if mode is not None else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class LockTimeout(OSError):
    """``file_lock`` waited ``timeout_s`` and the lock was still held by another process."""


@contextlib.contextmanager
def file_lock(path: Path, shared: bool = False, timeout_s: float | None = None) -> Iterator[None]:
    """An advisory lock (flock) held for the ``with`` block: exclusive, it serialises writers across processes;
    ``shared``, it lets a reader wait out a writer's change of two files (a journal line and the file it names)
    and needs only read access to an existing lock file (a node whose trust/ is read-only to it). A shared lock
    on a lock file that does not exist yet raises FileNotFoundError: no writer has ever run."""
    path = Path(path)
    if not shared:
        path.parent.mkdir(parents=True, exist_ok=True)
    flags = (os.O_RDONLY if shared else os.O_RDWR | os.O_CREAT) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags, 0o644)  # non-blocking: a FIFO put there never hangs the open
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "the lock is not a regular file", str(path))
    with os.fdopen(fd, "rb" if shared else "r+b") as fh:
        _flock(fh.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX, timeout_s, path)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _flock(fd: int, mode: int, timeout_s: float | None, path: Path) -> None:
    """flock, waiting at most ``timeout_s`` (None: for ever) — a reader must not hang behind a stalled writer."""
    if timeout_s is None:
        fcntl.flock(fd, mode)
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise LockTimeout(errno.EWOULDBLOCK, f"still locked after {timeout_s:.0f} s", str(path)) from None
            time.sleep(0.05)


def append_record(path: Path, record: dict, limit: int | None = None) -> None:
    """Append one JSON line and fsync it: the small, local record of who changed a store and how.

    One ``write`` of the whole line to an ``O_APPEND`` file, so concurrent writers never interleave
    within a line; a short write (full disk) is cut back off so the file never ends in half a record. A file
    that already ends in half a record (power lost mid-write, by another writer) gets a newline first, so the
    new record is a line of its own and not glued onto the torn one. ``limit``: the size the file may not
    grow past (a reader refuses a larger one) — refused before anything is written."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_NONBLOCK", 0), 0o644)
    try:
        start = os.fstat(fd).st_size
        if start and os.pread(fd, 1, start - 1) != b"\n":
            line = b"\n" + line
        if limit is not None and start + len(line) > limit:
            raise OSError(errno.EFBIG, f"{path} would grow past its {limit}-byte limit", str(path))
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(28, "No space left on device (short write)")
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


FREE_RESERVE = 64 << 20  # never fill the last 64 MiB of a disk: the node's audit log and store may live there


def short_of_space(directory: Path, needed: int) -> int | None:
    """The free bytes in ``directory``'s filesystem when ``needed`` would not fit with a reserve left over
    (64 MiB, or 5 % of a small disk), else None. Checked before a large write, so a full disk is a refusal
    up front rather than a half-written copy to clean up (and a node that could not write its audit log)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    free = st.f_bavail * st.f_frsize
    reserve = min(FREE_RESERVE, st.f_blocks * st.f_frsize // 20)
    return free if needed + reserve > free else None

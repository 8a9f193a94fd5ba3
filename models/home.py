"""Where bastion keeps its state: ``BASTION_HOME`` (default ``~/.local/share/bastion``), and how the private
staging directories it makes there are held and swept.

A staging directory (an archive being unpacked, a bundle being added to the registry) is flocked exclusively by
the process that made it, for as long as it uses it. A process killed mid-unpack (kill -9, a power cut) cannot
clean up, but the kernel drops its lock with it: so a sweep removes exactly the staging directories nobody holds,
and never one a living process is still writing. Each directory is made under the same lock file the sweep holds
(``lock_path``), so a sweep never sees one between its creation and its flock.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from bastion.models.atomic import file_lock

log = logging.getLogger(__name__)


def bastion_home() -> Path:
    """The state directory: trust store, registry, caches. Read from the environment on every call."""
    configured = os.environ.get("BASTION_HOME")
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "bastion"


class Staging:
    """A staging directory and the exclusive flock that says a living process owns it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        """Give up the lock (idempotent): after a rename into place, the directory is no longer staging."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def held_staging(parent: Path, prefix: str, lock_path: Path | None = None) -> Iterator[Staging]:
    """A new private directory ``parent/prefix…``, exclusively flocked while the ``with`` block runs, removed at
    its end unless it was renamed away (published). Made under ``lock_path`` (the sweep's lock) when given; None
    where the caller already holds that lock, or where nothing sweeps ``parent`` (a destination the user chose)."""
    lock = file_lock(lock_path) if lock_path is not None else contextlib.nullcontext()
    with lock:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)  # just made, so nobody else holds it: this never waits
    staging = Staging(path, fd)
    try:
        yield staging
    finally:
        try:
            shutil.rmtree(path, ignore_errors=True)  # before the lock goes: a sweep never races our own removal
        finally:
            staging.release()


def remove_unless_held(path: Path) -> bool:
    """Remove the directory ``path`` when no process holds a flock on it (True when it is gone). A link, a file or
    a directory that vanished is left alone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a living process holds it (staging it, or reading it)
        shutil.rmtree(path, ignore_errors=True)
        return not os.path.lexists(path)
    finally:
        os.close(fd)


def sweep_staging(parent: Path, is_staging: Callable[[str], bool], lock_path: Path | None = None) -> list[Path]:
    """Remove the staging directories in ``parent`` (names ``is_staging`` accepts) that no living process holds:
    what a crash mid-unpack left. Under ``lock_path`` when given; None where the caller already holds it."""
    lock = file_lock(lock_path) if lock_path is not None else contextlib.nullcontext()
    with lock:
        try:
            names = sorted(os.listdir(parent))
        except FileNotFoundError:
            return []
        removed = [parent / name for name in names if is_staging(name) and remove_unless_held(parent / name)]
    if removed:
        log.info("removed stale staging directories", extra={"directory": str(parent), "count": len(removed)})
    return removed

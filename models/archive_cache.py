"""The archive cache ``BASTION_HOME/cache/archives/<sha256>/``, bounded: a `.bastion` file is unpacked there once
(``archive.unpack_cached``), and the cache is kept under a byte budget by evicting the least recently used entries.

What keeps eviction safe: a process that uses an entry holds a shared flock on its directory until it exits, so
an entry some living process loaded a bundle from (a node serving it, another process reading it) is never
evicted — the budget is exceeded rather than a file pulled from under a reader. Eviction runs under the cache's
own lock (``.lock``), the same lock new entries are published under, so a fresh entry is always held before a
prune can see it. A crash mid-unpack leaves a staging directory (``.…``) that nobody holds; it is swept on the next
use of the cache (``bastion.models.home``). "Recently used" is the entry directory's mtime, touched on every use.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import threading
from pathlib import Path

from bastion.models.archive_stream import bytes_from_env
from bastion.models.atomic import file_lock
from bastion.models.home import Staging, remove_unless_held, sweep_staging
from bastion.models.manifest import MANIFEST_NAME

log = logging.getLogger(__name__)

CACHE_BYTES_ENV = "BASTION_ARCHIVE_CACHE_BYTES"
DEFAULT_CACHE_BYTES = 4 << 30  # a few bundles; the newest entry is kept whatever its size
LOCK_NAME = ".lock"
_ENTRY = re.compile(r"[0-9a-f]{64}")

_held: dict[str, int] = {}  # entry path -> the fd of our shared flock, kept until the process exits
_held_lock = threading.Lock()


def cache_budget() -> int:
    """The cache's byte budget: ``BASTION_ARCHIVE_CACHE_BYTES`` (bytes; 0 keeps only what is in use) or 4 GiB."""
    return bytes_from_env(CACHE_BYTES_ENV, DEFAULT_CACHE_BYTES, minimum=0)


def lock_path(cache_dir: Path) -> Path:
    return Path(cache_dir) / LOCK_NAME


def is_staging(name: str) -> bool:
    """Staging directories are hidden (``.<sha256>.…``); the lock file is not a directory and is never touched."""
    return name.startswith(".") and name != LOCK_NAME


def hold(entry: Path) -> bool:
    """Take (once per process) a shared flock on a complete cache entry and mark it used now; False when there is
    no such entry (never made, or evicted just before the lock was granted: the caller unpacks it again)."""
    key = str(entry)
    with _held_lock:
        if key not in _held:
            try:
                fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            except OSError:
                return False
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while a prune that locked it first removes it
            try:
                same = os.stat(entry, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except OSError:
                same = False
            if not (same and (entry / MANIFEST_NAME).is_file()):
                os.close(fd)
                return False
            _held[key] = fd
    _touch(entry)
    return True


def publish_held(staging: Staging, target: Path, cache_dir: Path) -> None:
    """Rename a finished staging directory to ``target`` and hold it, under the cache lock: no prune runs between
    the rename and our shared flock. A twin that got there first (the same archive unpacked at once by another
    process) is as good as ours: ours is dropped and theirs is held."""
    with file_lock(lock_path(cache_dir)):
        try:
            os.replace(staging.path, target)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not (target / MANIFEST_NAME).is_file():
                raise
        staging.release()  # the exclusive staging lock, before the shared one on the same directory
        if not hold(target):
            raise FileNotFoundError(errno.ENOENT, "cache entry vanished while it was published", str(target))


def _touch(entry: Path) -> None:
    try:
        os.utime(entry)
    except OSError:  # a read-only cache still serves; it just cannot record use
        pass


def _size(entry: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(entry):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name), follow_symlinks=False).st_size
            except OSError:
                pass
    return total


def prune(cache_dir: Path, budget: int | None = None) -> list[Path]:
    """Evict least-recently-used entries until the cache fits ``budget`` bytes (default ``cache_budget()``),
    skipping every entry a living process holds. Returns the evicted paths."""
    budget = cache_budget() if budget is None else budget
    cache_dir = Path(cache_dir)
    evicted: list[Path] = []
    with file_lock(lock_path(cache_dir)):
        entries = []
        for name in os.listdir(cache_dir):
            path = cache_dir / name
            if _ENTRY.fullmatch(name) and path.is_dir() and not path.is_symlink():
                entries.append((path.stat().st_mtime_ns, _size(path), path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):  # oldest use first
            if total <= budget:
                break
            if remove_unless_held(path):
                total -= size
                evicted.append(path)
    if evicted:
        log.info("archive cache pruned", extra={"evicted": len(evicted), "bytes": total, "budget": budget})
    elif total > budget:
        log.warning("archive cache over its budget: every entry left is in use", extra={"bytes": total})
    return evicted


def sweep(cache_dir: Path) -> None:
    """Remove the staging directories a killed unpack left (best effort, like ``housekeep``)."""
    try:
        sweep_staging(Path(cache_dir), is_staging, lock_path(cache_dir))
    except OSError as exc:
        log.warning("archive cache sweep skipped", extra={"directory": str(cache_dir), "error": str(exc)})


def housekeep(cache_dir: Path) -> None:
    """Sweep stale staging directories and prune to the budget; best effort (a read-only or missing cache is
    left as it is, a bad budget is the one line it always is)."""
    sweep(cache_dir)
    try:
        prune(cache_dir)
    except OSError as exc:
        log.warning("archive cache prune skipped", extra={"directory": str(cache_dir), "error": str(exc)})

"""Fold an append-only journal (``trust/audit.jsonl``) once per change to it, not at every check.

Why: a running node re-checks its bundles against the trust in force every few seconds
(``bastion.edge.trust_recheck``), and each check folds the whole trust journal twice (revocations, policy
applies) — up to 64 MiB, about a second of CPU each time at that size.  The journal only ever grows by appends,
and any change to it changes its size, inode or ctime (restoring an mtime by hand changes the ctime), so a fold
is remembered against those, taken from the descriptor that is read.  An append that lands between that
``fstat`` and the read only makes the remembered fold newer than its key, and the next check folds again.
Errors (missing, not a regular file, too large) are never remembered: each check raises them afresh.
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from bastion.models.safe_read import TooLarge, open_regular

T = TypeVar("T")
_folds: dict[tuple[str, str], tuple[tuple[int, ...], object]] = {}
_lock = threading.Lock()


def fold_journal(path: Path, limit: int, fold: Callable[[list[str]], T]) -> T:
    """``fold(lines of path)``, recomputed only when the file changed since the same fold last read it.

    Raises what :func:`bastion.models.safe_read.read_bounded` raises (``FileNotFoundError``, ``NotRegular``,
    ``TooLarge``, ``OSError``).  The caller gets its own copy of the result."""
    ident = (str(path), f"{fold.__module__}.{fold.__qualname__}")
    with os.fdopen(open_regular(path, limit), "rb") as handle:
        info = os.fstat(handle.fileno())
        stamp = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        with _lock:
            hit = _folds.get(ident)
        if hit is not None and hit[0] == stamp:
            return copy.deepcopy(hit[1])  # type: ignore[return-value]
        data = handle.read(limit + 1)
    if len(data) > limit:  # grew past the limit while read, as read_bounded refuses it
        raise TooLarge(len(data), limit)
    result = fold(data.decode(errors="replace").splitlines())
    with _lock:
        _folds[ident] = (stamp, result)
    return copy.deepcopy(result)

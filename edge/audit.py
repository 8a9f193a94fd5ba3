"""The audit log: append-only JSON lines, each carrying the hash of the one before it.

Record ``i`` holds ``prev`` (the ``hash`` of record ``i-1``; 64 zeros for the
first) and its own ``hash`` = sha256 of its canonical JSON without ``hash``.
Editing, deleting, reordering or inserting any record breaks the chain at that
point, and ``verify`` names the first broken record.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENESIS = "0" * 64


def _digest(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._prev, self._next = self._tail()

    def _tail(self) -> tuple[str, int]:
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return GENESIS, 0
        last = None
        with open(self.path, "rb") as fh:
            for line in fh:
                if line.strip():
                    last = line
        try:
            record = json.loads(last)
            return record["hash"], int(record["i"]) + 1
        except (ValueError, KeyError, TypeError):
            # A torn last line (crash mid-write): chain on from it anyway; verify will name it.
            return hashlib.sha256(last or b"").hexdigest(), sum(1 for _ in open(self.path, "rb"))

    def append(self, kind: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            record = {"i": self._next, "ts": round(time.time(), 3), "kind": kind, "fields": fields, "prev": self._prev}
            record["hash"] = _digest(record)
            line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._prev, self._next = record["hash"], self._next + 1
            return record


@dataclass
class AuditVerification:
    ok: bool
    records: int
    first_bad: int | None = None
    reason: str = ""


def verify_audit_log(path: Path) -> AuditVerification:
    path = Path(path)
    if not path.is_file():
        return AuditVerification(False, 0, 0, f"audit log not found: {path}")
    prev, count = GENESIS, 0
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                claimed = record["hash"]
                index = record["i"]
            except (ValueError, KeyError, TypeError):
                return AuditVerification(False, count, lineno, f"line {lineno + 1} is not an audit record")
            if index != count:
                return AuditVerification(False, count, lineno, f"record {lineno + 1} has index {index}, expected {count}"
                                         " (records removed or reordered)")
            if record.get("prev") != prev:
                return AuditVerification(False, count, index, f"record {index} does not chain to record {index - 1}"
                                         " (a record before it was changed or removed)")
            if _digest(record) != claimed:
                return AuditVerification(False, count, index, f"record {index} was modified (hash mismatch)")
            prev, count = claimed, count + 1
    return AuditVerification(True, count)

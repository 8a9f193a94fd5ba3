"""The audit log: append-only JSON lines, each carrying the hash of the one before it, anchored by signed checkpoints.

Record ``i`` holds ``prev`` (the ``hash`` of record ``i-1``; 64 zeros for the
first) and its own ``hash`` = sha256 of its canonical JSON without ``hash``.
Editing, deleting, reordering or inserting any record breaks the chain at that
point, and ``verify`` names the first broken record.

A chain alone cannot tell a cut-off tail, a well-chained forged append or a
full rewrite from the real thing, so the node also writes ``checkpoint``
records signed with its Ed25519 node key (over the record's index and the hash
before it): ``verify --key node.pub`` refuses records no checkpoint vouches for,
and a head published elsewhere (heartbeats, ``status``) catches a truncation.

Writes are all-or-nothing: one ``write`` at the end of the file, fsync, length
checked, and on any failure (a full disk) the file is cut back to where it was.
A record that cannot be written waits in memory, in order, and is written as
soon as the disk has room — the log never stops the node.  A torn last line left
by an older writer or a crash mid-write is cut off at the next start, and a
record says so.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bastion.errors import BastionError

log = logging.getLogger(__name__)

GENESIS = "0" * 64
CHECKPOINT = "checkpoint"
MAX_PENDING = 10_000  # records kept in memory while the disk is full; beyond that they are counted as lost
# The longest line read as a record (a real one is well under 4 KiB). Anyone who can write the file could append
# a 2 GB line without a newline; every reader takes at most this much of a line into memory, and a longer line is
# a damaged record (verify names it, the node chains on past it, the seq-mark reader skips it).
MAX_RECORD_BYTES = 1 << 20
CHUNK = 65536


class AuditWriteError(BastionError):
    """The audit log cannot be written (disk full, read-only): the record waits in memory."""


def _digest(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def checkpoint_message(index: int, prev: str) -> bytes:
    """What a checkpoint signs: its own position and the head of the chain before it."""
    return f"bastion-audit-checkpoint/1\n{index}\n{prev}\n".encode()


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _line_start(fh, end: int) -> int:
    """Offset where the line holding byte ``end - 1`` starts (the file is read backwards, in chunks)."""
    pos = end - 1
    while pos > 0:
        lo = max(0, pos - 65536)
        fh.seek(lo)
        i = fh.read(pos - lo).rfind(b"\n")
        if i >= 0:
            return lo + i + 1
        pos = lo
    return 0


def read_record_line(fh, limit: int | None = None) -> tuple[bytes, bool]:
    """The next line of ``fh``, at most ``limit`` bytes of it; ``(line, True)`` when it was longer.

    The rest of an overlong line is skipped in bounded chunks, so the next call starts at the next line.
    """
    limit = MAX_RECORD_BYTES if limit is None else limit
    line = fh.readline(limit + 1)
    if len(line) <= limit or line.endswith(b"\n"):
        return line, False
    while True:  # skip the rest without holding it
        rest = fh.readline(CHUNK)
        if not rest or rest.endswith(b"\n"):
            return line[:limit], True


def _hash_range(fh, start: int, end: int) -> str:
    """SHA-256 of bytes ``start..end`` of ``fh``, read in bounded chunks."""
    digest = hashlib.sha256()
    fh.seek(start)
    while start < end:
        chunk = fh.read(min(CHUNK, end - start))
        if not chunk:
            break
        digest.update(chunk)
        start += len(chunk)
    return digest.hexdigest()


def _count_lines(fh) -> int:
    """Lines in ``fh`` (a last line without a newline counts), read in bounded chunks."""
    fh.seek(0)
    count, last = 0, b"\n"
    while chunk := fh.read(CHUNK):
        count += chunk.count(b"\n")
        last = chunk[-1:]
    return count + (last != b"\n")


class AuditLog:
    def __init__(self, path: Path, signer: Ed25519PrivateKey | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.signer = signer
        self._lock = threading.Lock()
        self._pending: deque[tuple[float, str, dict[str, Any]]] = deque()
        self._lost = 0
        self.error: str | None = None
        self.checkpointed = -1  # count at the last checkpoint this process wrote
        repaired = self._open_tail()
        if repaired is not None:
            log.warning("audit log %s ended in a torn record (%d bytes): cut off", self.path, repaired["bytes_removed"])
            self.append("audit_tail_repaired", **repaired)

    # -- opening ---------------------------------------------------------------------------------------------------
    def _open_tail(self) -> dict[str, Any] | None:
        """Find the chain head; cut off a torn last line (a write that never finished). Returns what was cut."""
        self._prev, self._next = GENESIS, 0
        if not self.path.is_file():
            return None
        repaired = None
        with open(self.path, "r+b") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size and not self._ends_with_newline(fh, size):
                start = _line_start(fh, size)
                removed = _hash_range(fh, start, size)  # a torn tail may be huge: hashed in chunks, never held
                fh.truncate(start)
                fh.flush()
                os.fsync(fh.fileno())
                repaired = {"bytes_removed": size - start, "sha256_removed": removed, "at_offset": start}
                size = start
            if size == 0:
                return repaired
            start = _line_start(fh, size)
            try:
                if size - start > MAX_RECORD_BYTES + 1:  # + 1: its newline
                    raise ValueError("longer than any record")
                fh.seek(start)
                record = json.loads(fh.read(size - start))
                self._prev, self._next = record["hash"], int(record["i"]) + 1
            except (ValueError, KeyError, TypeError, RecursionError):
                # A complete but damaged (or overlong) last line: chain on from it anyway; verify names it.
                self._prev, self._next = _hash_range(fh, start, size), _count_lines(fh)
        return repaired

    @staticmethod
    def _ends_with_newline(fh, size: int) -> bool:
        fh.seek(size - 1)
        return fh.read(1) == b"\n"

    # -- writing ----------------------------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return len(self._pending)

    def head(self) -> tuple[int, str]:
        """(records on disk, hash of the last one): what heartbeats and ``status`` publish."""
        with self._lock:
            return self._next, self._prev

    @property
    def key_id(self) -> str | None:
        return hashlib.sha256(_raw_public(self.signer)).hexdigest()[:16] if self.signer else None

    def append(self, kind: str, *, strict: bool = False, **fields: Any) -> dict[str, Any] | None:
        """Write one record (after any that wait). On a write failure the record waits in memory and None is
        returned — or, with ``strict``, it is dropped and ``AuditWriteError`` raised (for actions that must not
        happen unaudited)."""
        with self._lock:
            if len(self._pending) >= MAX_PENDING:
                self._lost += 1
                return None
            self._pending.append((round(time.time(), 3), kind, fields))
            written = self._flush_locked()
            if written is None and strict:
                self._pending.pop()
                raise AuditWriteError(
                    f"the audit log {self.path} cannot be written: {self.error}",
                    "free disk space; the action was refused because it could not be audited",
                )
            return written

    def checkpoint(self) -> dict[str, Any] | None:
        """Sign the current head (no-op without a node key)."""
        if self.signer is None:
            return None
        return self.append(CHECKPOINT)

    def flush(self) -> bool:
        """Write whatever waits; True when nothing is left waiting."""
        with self._lock:
            if self._pending:
                self._flush_locked()
            return not self._pending

    def _flush_locked(self) -> dict[str, Any] | None:
        last = None
        while self._pending or self._lost:
            if not self._pending:  # after what waited: how many records did not fit in memory
                self._pending.append((round(time.time(), 3), "audit_records_lost", {"count": self._lost}))
                self._lost = 0
            ts, kind, fields = self._pending[0]
            record = self._record(ts, kind, fields)
            line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
            try:
                self._write(line)
            except OSError as exc:
                if self.error is None:
                    log.error(
                        "audit log %s cannot be written (%s); %d record(s) wait in memory",
                        self.path,
                        exc.strerror or exc,
                        len(self._pending),
                    )
                self.error = f"{exc.strerror or exc}"
                return None
            self._pending.popleft()
            if kind == CHECKPOINT:
                self.checkpointed = record["i"]
            self._prev, self._next = record["hash"], self._next + 1
            last = record
        if self.error is not None:
            log.warning("audit log %s writable again", self.path)
            self.error = None
        return last

    def _record(self, ts: float, kind: str, fields: dict[str, Any]) -> dict[str, Any]:
        if kind == CHECKPOINT and self.signer is not None:
            fields = {
                "count": self._next,
                "head": self._prev,
                "key_id": self.key_id,
                "pub": _raw_public(self.signer).hex(),
                "sig": self.signer.sign(checkpoint_message(self._next, self._prev)).hex(),
            }
        record = {"i": self._next, "ts": ts, "kind": kind, "fields": fields, "prev": self._prev}
        record["hash"] = _digest(record)
        return record

    def _write(self, line: bytes) -> None:
        """Append ``line`` whole or not at all: one write at the end, fsync, length checked, else cut back."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            start = os.fstat(fd).st_size
            try:
                view, done = memoryview(line), 0
                while done < len(line):
                    n = os.write(fd, view[done:])
                    if n <= 0:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    done += n
                os.fsync(fd)
                if os.fstat(fd).st_size != start + len(line):
                    raise OSError(errno.EIO, "audit log length is wrong after the write")
            except OSError:
                try:  # leave no torn record behind; if even this fails, the next start cuts it off
                    os.ftruncate(fd, start)
                    os.fsync(fd)
                except OSError:
                    pass
                raise
        finally:
            os.close(fd)


def verify_audit_log(
    path: Path, key: Any = None, expect_count: int | None = None, expect_head: str | None = None
) -> Any:
    """See ``bastion.edge.audit_verify.verify_audit_log`` (kept here for callers of the first version)."""
    from bastion.edge.audit_verify import verify_audit_log as verify

    return verify(path, key, expect_count, expect_head)


def open_node_key(path: Path) -> tuple[Ed25519PrivateKey, Path | None]:
    """The node's checkpoint key at ``path`` (PKCS#8 PEM, mode 0600), made on first start with its ``.pub`` beside
    it. Returns (key, path when it was just created). A key readable by others is refused, like every key."""
    from bastion.models.keys import PRIVATE_SUFFIX, generate_keypair, load_private_key, passphrase_from_env, public_pem
    from bastion.models.atomic import atomic_write_bytes

    path = Path(path)
    stem = path.with_name(path.name[: -len(PRIVATE_SUFFIX)] if path.name.endswith(PRIVATE_SUFFIX) else path.name)
    path, created = stem.with_name(stem.name + PRIVATE_SUFFIX), None
    if not path.exists():
        created = generate_keypair(stem).private_path
    key = load_private_key(path, passphrase_from_env())
    pub = stem.with_name(stem.name + ".pub")
    if not pub.exists():
        atomic_write_bytes(pub, public_pem(key.public_key()))
    return key, created

"""The ``seq`` high-water mark, kept outside ``events.db`` so that seq can never go backwards.

SQLite alone cannot promise that: ``last_seq`` comes from ``sqlite_sequence``
inside the database, so a lost WAL, an emptied ``events.db`` or an older copy
put in its place starts numbering again at a seq subscribers have already seen
— the same number published twice with different content.  The mark lives in
three places the database cannot take with it:

``seq.json``   ``{"last", "reserved_through", "clean", "boot"}``, written atomically
               (temp file, fsync, rename, fsync of the directory).  It is written
               *ahead*: before seq ``reserved_through + 1`` is handed out, the next
               block of ``BLOCK`` numbers is reserved, so the cost is one fsync per
               block, not one per event.  A clean stop records the exact last seq.
``seq.live``   the last committed seq, overwritten in place after every commit,
               without fsync.  Like SQLite's WAL in ``synchronous=NORMAL`` it survives
               a crash of the process (``kill -9``) but not of the machine.
audit log      a ``seq_mark`` record at start, at every reservation and at a clean
               stop — hash-chained, so deleting ``seq.json`` does not erase the mark.

Why not ``node.json``: that is the runtime file, rewritten at every start and
removed at every clean stop, so the mark would vanish exactly when it matters.

At start (``resume``) the store's last seq is compared with the highest seq known
to have been committed.  Behind it → refuse (``SeqRegressionError``) unless the
operator passes ``--accept-seq-gap``, which continues above everything ever
reserved.  After an unclean stop in an earlier boot (a power cut may have eaten
the WAL's last commits and ``seq.live`` with them) the node cannot know exactly
what was published, so it skips past the whole reservation: a gap, audited, but
never a number used twice.

``seq.live`` is also locked (``flock``) while a store holds the mark: a second
node pointed at the same storage dir is refused, since two writers would hand
out the same seq twice.  The kernel drops the lock when the process dies.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bastion.edge.audit import read_record_line
from bastion.errors import BastionError
from bastion.models.atomic import atomic_write_bytes
from bastion.models.safe_read import read_bounded

if TYPE_CHECKING:
    from bastion.edge.audit import AuditLog

log = logging.getLogger(__name__)

BLOCK = 1000
MARK_FILE = "seq.json"
LIVE_FILE = "seq.live"
# Both files are read bounded: anyone who can write the storage dir could put a 300 MB file or a FIFO there.
# Larger, or not a regular file, is damage: seq.json falls back to the audit marks, seq.live reads as missing.
MAX_MARK_FILE_BYTES = 64 * 1024  # seq.json is ~100 bytes
MAX_LIVE_FILE_BYTES = 64  # one integer
AUDIT_KIND = "seq_mark"


class SeqRegressionError(BastionError):
    """The event store is behind the seq high-water mark: starting would publish old seq numbers again."""


class StoreInUseError(BastionError):
    """Another process holds this storage dir's seq mark: two writers would hand out the same seq twice."""


def boot_id() -> str | None:
    """This boot's id (Linux); an unclean stop in another boot means the page cache, and ``seq.live``, may be lost."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


@dataclass
class PriorMark:
    """What the mark files and the audit log say about earlier runs."""

    durable_low: int = 0  # highest seq known committed, surviving a power cut (clean stops)
    volatile_low: int = 0  # highest seq known committed, surviving a process crash only
    high: int = 0  # highest seq that may have been handed out (reservations)
    clean: bool = True  # every source says the last run stopped cleanly
    boot: str | None = None
    seen: bool = False  # any mark found at all
    live_seen: bool = False  # seq.live was there and held a number (absent or empty: deleted, or never written)

    def low(self, same_boot: bool) -> int:
        return max(self.durable_low, self.volatile_low) if self.clean or same_boot else self.durable_low


class SeqMark:
    """Reserve seq numbers durably ahead of use; refuse a store that fell behind them."""

    def __init__(self, directory: Path, audit: "AuditLog | None" = None, block: int = BLOCK) -> None:
        self.dir = Path(directory)
        self.audit = audit
        self.block = block
        self.boot = boot_id()
        self.reserved = 0
        self._live_fd: int | None = None
        self._live_failed = False
        self._live_trimmed = False

    # -- start ----------------------------------------------------------------------------------------
    def resume(self, store_last: int, accept_gap: bool = False) -> int:
        """The next seq to hand out, never at or below a seq handed out before. Reserves the first block."""
        self._open_live()  # and lock it: one writer per storage dir
        try:
            return self._resume(store_last, accept_gap)
        except BaseException:
            self._close_live()
            raise

    def _resume(self, store_last: int, accept_gap: bool) -> int:
        prior = self._read_prior()
        same_boot = prior.boot is not None and prior.boot == self.boot
        low = prior.low(same_boot)
        high = max(prior.high, low, store_last)
        if store_last < low:
            if not accept_gap:
                self._audit("seq_regression_refused", store_last=store_last, mark=low, reserved_through=high)
                raise SeqRegressionError(
                    f"the event store {self.dir / 'events.db'} ends at seq {store_last} but seq {low} was already "
                    "published (WAL lost, events.db emptied or replaced by an older copy); starting would reuse "
                    "seq numbers",
                    f"put back the events.db (with its -wal file) that holds seq {low}; if it is lost, start once "
                    "with `bastion node run --accept-seq-gap` to keep what the store holds and continue numbering "
                    f"above {high} (audited)",
                )
            next_seq = high + 1
            log.warning(
                "event store is behind the seq mark (%d < %d); continuing at %d as accepted", store_last, low, next_seq
            )
            self._audit("seq_gap_accepted", store_last=store_last, mark=low, next_seq=next_seq)
        elif not prior.clean and (not same_boot or not prior.live_seen) and high > store_last:
            # an earlier boot (power cut) or seq.live gone (deleted with the WAL): how far the last run got is
            # unknown, so skip past everything it may have handed out
            next_seq = high + 1
            why = (
                "unclean stop in an earlier boot (power cut?): the last commits may be lost"
                if not same_boot
                else f"unclean stop and {LIVE_FILE} missing: how far the last run got is unknown"
            )
            log.warning(
                "%s; seq continues at %d, after the reservation, so no number that may have been "
                "published is used again",
                why,
                next_seq,
            )
            self._audit("seq_skipped", store_last=store_last, next_seq=next_seq, reason=why)
        else:
            next_seq = store_last + 1
        self._reserve(next_seq - 1, "start")
        self.committed(next_seq - 1)
        return next_seq

    def _read_prior(self) -> PriorMark:
        prior = PriorMark()
        state = self._read_json()
        if state is not None:
            prior.seen = True
            last = _int(state.get("last"))
            clean = state.get("clean") is True
            if clean:
                prior.durable_low = last
            prior.volatile_low = max(prior.volatile_low, last)
            prior.high = max(prior.high, _int(state.get("reserved_through")))
            prior.clean, prior.boot = clean, state.get("boot")
        live = self._read_live()
        if live is not None:
            prior.live_seen = True
            prior.volatile_low = max(prior.volatile_low, live)
        marks = self._audit_marks()
        audit_high = 0
        for fields in marks:
            last, reserved = _int(fields.get("last")), _int(fields.get("reserved_through"))
            if fields.get("event") == "stop":  # exact: nothing above it had been handed out
                prior.durable_low = max(prior.durable_low, last)
                audit_high = reserved
            else:
                audit_high = max(audit_high, reserved)
            prior.volatile_low = max(prior.volatile_low, last)
        prior.high = max(prior.high, audit_high)
        if marks:
            latest = marks[-1]
            prior.clean = prior.clean and latest.get("event") == "stop"
            if state is None:
                prior.boot = latest.get("boot")
            prior.seen = True
        return prior

    def _read_json(self) -> dict[str, Any] | None:
        path = self.dir / MARK_FILE
        try:
            state = json.loads(read_bounded(path, MAX_MARK_FILE_BYTES))  # never a huge file or a FIFO
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError) as exc:  # written atomically: damage or tampering
            log.warning("%s is unreadable (%s); using the audit log's seq marks", path, exc)
            return None
        return state if isinstance(state, dict) else None

    def _read_live(self) -> int | None:
        """The last committed seq, or None when seq.live is missing, empty or garbled (``_open_live`` creates it
        empty before this reads it, so a deleted file reads as empty)."""
        try:
            return int(read_bounded(self.dir / LIVE_FILE, MAX_LIVE_FILE_BYTES).strip())
        except (OSError, ValueError):
            return None

    def _audit_marks(self) -> list[dict[str, Any]]:
        """Every ``seq_mark`` record's fields, oldest first; tolerant of lines it cannot read."""
        if self.audit is None:
            return []
        marks: list[dict[str, Any]] = []
        try:
            with open(self.audit.path, "rb") as fh:
                while True:
                    line, overlong = read_record_line(fh)  # bounded: an overlong line is damage, skipped
                    if not line:
                        break
                    if overlong or AUDIT_KIND.encode() not in line:
                        continue
                    try:
                        record = json.loads(line)
                    except (ValueError, RecursionError):  # damaged: verify names it
                        continue
                    if (
                        isinstance(record, dict)
                        and record.get("kind") == AUDIT_KIND
                        and isinstance(record.get("fields"), dict)
                    ):
                        marks.append(record["fields"])
        except FileNotFoundError:
            return []
        return marks

    # -- running ----------------------------------------------------------------------------------------
    def ensure(self, seq: int) -> None:
        """Call before handing out ``seq``: reserves the next block durably when ``seq`` is beyond the last one."""
        if seq > self.reserved:
            self._reserve(seq - 1, "reserve")

    def committed(self, seq: int) -> None:
        """Record ``seq`` as committed (page cache only). Never raises: the event is already stored."""
        if self._live_fd is None:
            return
        try:
            record = f"{seq:020d}\n".encode()
            os.pwrite(self._live_fd, record, 0)
            if not self._live_trimmed:  # junk left past the record (or a grown file) would read as damage forever
                os.ftruncate(self._live_fd, len(record))
                self._live_trimmed = True
        except OSError as exc:
            if not self._live_failed:
                self._live_failed = True
                log.warning("cannot update %s (%s); the reservation in %s still bounds seq", LIVE_FILE, exc, MARK_FILE)

    def close(self, last: int) -> None:
        """A clean stop: the exact last seq, durable. Nothing above it was handed out."""
        try:
            self._write(last, last, clean=True)
            self._audit(AUDIT_KIND, event="stop", last=last, reserved_through=last, boot=self.boot)
        finally:
            if self._live_fd is not None:
                self.committed(last)
            self._close_live()

    def as_dict(self) -> dict[str, Any]:
        return {"reserved_through": self.reserved, "block": self.block}

    # -- writing ------------------------------------------------------------------------------------------
    def _reserve(self, last: int, event: str) -> None:
        reserved = last + self.block
        self._write(last, reserved, clean=False)
        self._audit(AUDIT_KIND, event=event, last=last, reserved_through=reserved, boot=self.boot)
        self.reserved = reserved

    def _write(self, last: int, reserved: int, clean: bool) -> None:
        state = {
            "v": 1,
            "last": last,
            "reserved_through": reserved,
            "clean": clean,
            "boot": self.boot,
            "ts": round(time.time(), 3),
        }
        atomic_write_bytes(self.dir / MARK_FILE, json.dumps(state, indent=1).encode(), 0o640)

    def _open_live(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / LIVE_FILE, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the kernel when the process dies
        except OSError:
            os.close(fd)
            raise StoreInUseError(
                f"another node is writing the event store in {self.dir}",
                "stop it first, or give this node its own storage.dir",
            ) from None
        self._live_fd = fd
        self._live_trimmed = False

    def _close_live(self) -> None:
        if self._live_fd is not None:
            os.close(self._live_fd)
            self._live_fd = None

    def __del__(self) -> None:  # a node whose start failed after opening the store lets go of the lock
        try:
            self._close_live()
        except Exception:  # at interpreter shutdown os may already be gone
            pass

    def _audit(self, kind: str, **fields: Any) -> None:
        if self.audit is not None:
            self.audit.append(kind, **fields)


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0

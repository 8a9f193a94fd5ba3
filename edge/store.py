"""The event store: SQLite in WAL mode, one row per event, ``seq`` assigned and committed before publishing.

An event a subscriber ever saw is on disk first, so ``replay`` after a crash
(even ``kill -9``) returns everything that was published, with no gaps.

Two guards sit around SQLite:

* ``seq`` never goes backwards: with a ``SeqMark`` (edge/seqmark.py) the store
  reserves numbers durably outside the database before handing them out, and
  refuses to open behind the mark (lost WAL, emptied or older ``events.db``).
* A damaged file is named, not discovered by a client: ``PRAGMA quick_check``
  runs at open (a damaged store refuses to open, in one line), and any
  corruption met later puts the store into a sticky error state — nothing more
  is written into the damaged file, ``replay`` answers one clear line, and
  ``last_seq`` keeps answering from memory so heartbeats and ``status`` go on.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from bastion.errors import BastionError
from bastion.edge.protocol import DetectionEvent
from bastion.edge.store_tables import SideTables

if TYPE_CHECKING:
    from bastion.edge.audit import AuditLog
    from bastion.edge.seqmark import SeqMark

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    ts      REAL NOT NULL,
    source  TEXT NOT NULL,
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
"""
# SQLite result codes that mean "the file is damaged", as opposed to full, locked or read-only.
DAMAGE_CODES = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB (named in the sqlite3 module only from Python 3.11)
FULL_CODES = {10, 13}  # SQLITE_IOERR, SQLITE_FULL: a write that found no space (tmpfs, SD card)
# SQLite checkpoints the WAL into events.db only at 1,000 pages (~4 MB) by default, and each one-event commit
# appends whole 4 KiB pages to it: on a small storage disk the WAL filled the disk while events.db stayed at 4 KB,
# and space freed later went to the WAL again. 64 pages (~256 KiB) keeps the WAL small; journal_size_limit gives
# the file's space back after a checkpoint instead of keeping its largest size for ever.
WAL_AUTOCHECKPOINT_PAGES = 64
JOURNAL_SIZE_LIMIT = 512 * 1024
RECOVER_HINT = (
    "stop the node, move events.db aside (keep it for forensics), put a backup in its place if you have "
    "one, and start once with `bastion node run --accept-seq-gap` (seq continues above its mark)"
)


class StorageError(BastionError):
    """The event store cannot write (disk full, read-only, damaged): nothing is published unstored."""


def is_damage(exc: BaseException) -> bool:
    """True for corruption (SQLITE_CORRUPT/NOTADB, or an undecodable row), False for a full disk or a lock."""
    if isinstance(exc, ValueError):  # a row SQLite returned but that is not an event
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in DAMAGE_CODES
    return type(exc) is sqlite3.DatabaseError or any(w in str(exc) for w in ("malformed", "not a database"))


class EventStore(SideTables):
    def __init__(
        self, path: Path, mark: "SeqMark | None" = None, accept_seq_gap: bool = False, audit: "AuditLog | None" = None
    ) -> None:
        self.path = Path(path)
        self.mark = mark
        self.audit = audit
        self.error: str | None = None  # set once the file is known damaged; never cleared while open
        self.quick_check_s: float | None = None
        self._lock = threading.Lock()
        self._next = 1
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
            self._db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
            self._db.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
            self._db.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(
                f"cannot open the event store {self.path}: {exc}",
                "check that the storage directory exists, is writable and has free space",
            ) from None
        self._quick_check()
        last = self.last_seq()
        if self.error is not None:  # damage quick_check did not see, met while reading the last seq
            self._db.close()
            raise StorageError(self.error, RECOVER_HINT)
        try:
            self._next = mark.resume(last, accept_seq_gap) if mark is not None else last + 1
        except OSError as exc:
            self._db.close()
            raise StorageError(
                f"cannot write the seq high-water mark beside {self.path}: {exc.strerror or exc}",
                "free disk space or fix permissions of the storage directory",
            ) from None
        except BaseException:
            self._db.close()
            raise
        if self._next - 1 > last:  # an accepted or skipped gap: the store itself remembers where seq is
            self._raise_sequence(self._next - 1)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE … COMMIT; on any SQLite error the transaction is rolled back and the error re-raised."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            yield
            self._db.execute("COMMIT")
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise

    def _raise_sequence(self, seq: int) -> None:
        """Set AUTOINCREMENT's counter, so the store's own ``last_seq`` agrees with the mark from now on."""
        try:
            with self._transaction():
                if (
                    self._db.execute(
                        "UPDATE sqlite_sequence SET seq = ? WHERE name = 'events' AND seq < ?", (seq, seq)
                    ).rowcount
                    == 0
                    and not self._db.execute("SELECT 1 FROM sqlite_sequence WHERE name = 'events'").fetchone()
                ):
                    self._db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('events', ?)", (seq,))
        except sqlite3.Error as exc:
            self._db.close()
            raise StorageError(
                f"cannot record the new seq start in {self.path}: {exc}",
                "free disk space or fix permissions of the storage directory",
            ) from None

    def _quick_check(self) -> None:
        """Read every page once, so a damaged file is refused at start instead of met by the first ``replay``."""
        t0 = time.perf_counter()
        try:
            rows = [r[0] for r in self._db.execute("PRAGMA quick_check(5)").fetchall()]
        except sqlite3.DatabaseError as exc:
            rows = [str(exc)]
        self.quick_check_s = round(time.perf_counter() - t0, 4)
        log.info(
            "event store quick_check %s in %.3f s",
            "ok" if rows == ["ok"] else "FAILED",
            self.quick_check_s,
            extra={"path": str(self.path), "quick_check_s": self.quick_check_s},
        )
        if rows != ["ok"]:
            problem = "; ".join(str(r) for r in rows[:2])
            self._db.close()
            self._audit_damage(problem)
            raise StorageError(f"the event store {self.path} is damaged (quick_check: {problem})", RECOVER_HINT)

    # -- the error state -------------------------------------------------------------------------------
    def _failed(self, exc: BaseException, doing: str) -> StorageError:
        """The StorageError for ``exc``; corruption switches the store into its error state first."""
        reason = " ".join(str(exc).split())[:240]  # one line, whatever the library wrote (pydantic: several)
        if is_damage(exc):
            if self.error is None:
                self.error = f"the event store {self.path} is damaged ({reason}); publishing and replay are stopped"
                log.error("%s — %s", self.error, RECOVER_HINT)
                self._audit_damage(reason)
            return StorageError(self.error, RECOVER_HINT)
        return StorageError(
            f"cannot {doing} {self.path}: {reason}", "free disk space or fix permissions; publishing is paused"
        )

    def _audit_damage(self, reason: str) -> None:
        if self.audit is not None:
            try:
                self.audit.append("storage_damaged", path=str(self.path), reason=reason)
            except OSError as exc:
                log.error("cannot audit the damaged event store: %s", exc)

    def _check_usable(self) -> None:
        if self.error is not None:
            raise StorageError(self.error, RECOVER_HINT)

    def health(self) -> dict[str, Any]:
        """For ``status``: the start-up check's time, the error state, its size on disk, the seq reservation."""
        info: dict[str, Any] = {
            "quick_check_s": self.quick_check_s,
            "error": self.error,
            "bytes": store_bytes(self.path),
        }
        if self.mark is not None:
            info.update(self.mark.as_dict())
        return info

    # -- events ------------------------------------------------------------------------------------------
    def append(self, event: DetectionEvent, own_seq: tuple[str, ...] = ()) -> DetectionEvent:
        """Assign the next ``seq``, commit, and return the stored event (seq filled in). ``own_seq``: more fields
        that name this event's own seq (an object event whose snapshot is its object's best), filled with it."""
        with self._lock:
            self._check_usable()
            if self.mark is not None:
                try:
                    self.mark.ensure(self._next)  # durably reserved before it can be handed out
                except OSError as exc:
                    raise StorageError(
                        f"cannot reserve seq numbers beside {self.path}: {exc}",
                        "free disk space or fix permissions; publishing is paused",
                    ) from None
            stored = event.model_copy(update={"seq": self._next, **dict.fromkeys(own_seq, self._next)})
            row = (stored.seq, stored.ts, stored.source, stored.model_dump_json())
            try:
                self._insert(row)
            except sqlite3.Error as exc:
                if not self._give_wal_space_back(exc):
                    raise self._failed(exc, "store events in") from None
                try:  # once: the WAL's space is back, or the disk is full of events
                    self._insert(row)
                except sqlite3.Error as again:
                    raise self._failed(again, "store events in") from None
            self._next += 1
            if self.mark is not None:
                self.mark.committed(stored.seq)
            self._announce_commit()  # the sinks wake (edge/store_tables.py): committed first, then forwarded
            return stored

    def _insert(self, row: tuple[Any, ...]) -> None:
        with self._transaction():
            self._db.execute("INSERT INTO events (seq, ts, source, payload) VALUES (?, ?, ?, ?)", row)

    def _give_wal_space_back(self, exc: sqlite3.Error) -> bool:
        """On a write that found the disk full, checkpoint the WAL into events.db and truncate it.

        The WAL may hold the very space the write needed (written before the autocheckpoint could run, or kept
        while a checkpoint could not finish); TRUNCATE hands it back to the filesystem. True when it succeeded,
        so the write is worth one retry.
        """
        if is_damage(exc) or (getattr(exc, "sqlite_errorcode", 0) & 0xFF) not in FULL_CODES:
            return False
        try:
            busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as failed:
            log.debug("WAL checkpoint on a full disk failed: %s", failed)
            return False
        return not busy

    def since(self, seq: int, limit: int = 500) -> list:
        """Stored events after ``seq``, frame (v1) and object (v2) events alike, parsed and typed; a row that is not
        an event puts the store in its error state. One parser for every reader: ``edge/events_v2.read_events``."""
        from bastion.edge.events_v2 import read_events  # events_v2 builds on the store: imported where used

        return read_events(self, seq, limit)

    def last_seq(self) -> int:
        """The highest seq ever assigned. Never raises: heartbeats and ``status`` call it from other threads.

        AUTOINCREMENT's ``sqlite_sequence`` keeps the highest seq even after retention deletes rows;
        MAX(seq) covers a tampered ``sqlite_sequence``; ``_next - 1`` covers a seq mark above both and
        a store in its error state.
        """
        with self._lock:
            if self.error is None:
                try:
                    row = self._db.execute(
                        "SELECT MAX(s) FROM (SELECT seq AS s FROM sqlite_sequence WHERE name = "
                        "'events' UNION ALL SELECT MAX(seq) FROM events)"
                    ).fetchone()
                    return max(int(row[0] or 0), self._next - 1)
                except sqlite3.Error as exc:
                    self._failed(exc, "read")
            return self._next - 1

    def first_seq(self) -> int | None:
        with self._lock:
            self._check_usable()
            try:
                row = self._db.execute("SELECT MIN(seq) FROM events").fetchone()
            except sqlite3.Error as exc:
                raise self._failed(exc, "read") from None
        return int(row[0]) if row and row[0] is not None else None

    def count(self) -> int:
        with self._lock:
            self._check_usable()
            try:
                return int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])
            except sqlite3.Error as exc:
                raise self._failed(exc, "read") from None

    def enforce_retention(self, days: float | None, max_mb: float | None) -> int:
        """Delete events older than ``days`` and, oldest first, beyond ``max_mb``. Returns rows deleted."""
        deleted = 0
        with self._lock:
            self._check_usable()  # nothing is written into a damaged file
            try:
                if days is not None:
                    deleted += self._db.execute(
                        "DELETE FROM events WHERE ts < ?", (time.time() - days * 86400,)
                    ).rowcount
                if max_mb is not None:
                    while self._size_mb() > max_mb:
                        n = self._db.execute(
                            "DELETE FROM events WHERE seq IN (SELECT seq FROM events ORDER BY seq LIMIT 1000)"
                        ).rowcount
                        deleted += n
                        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                        self._db.execute("VACUUM")
                        if n == 0:
                            break
            except sqlite3.Error as exc:
                raise self._failed(exc, "apply retention to") from None
        if deleted:
            log.info("retention removed events", extra={"deleted": deleted})
        return deleted

    def _size_mb(self) -> float:
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        size = self._db.execute("PRAGMA page_size").fetchone()[0]
        return pages * size / 1e6

    # -- id counters (tracker ids, edge/track_ids.py) -------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self.mark is not None:
                try:
                    self.mark.close(self._next - 1)
                except OSError as exc:  # the reservation and seq.live still bound seq; the next start copes
                    log.warning("cannot record the clean stop's seq mark: %s", exc)


def store_bytes(db: Path) -> int:
    """``events.db`` with its WAL, in bytes (``status`` and the metrics): what the event log holds on disk now."""
    total = 0
    for path in (db, db.with_name(db.name + "-wal")):
        try:
            total += path.stat().st_size
        except OSError:
            pass
    return total

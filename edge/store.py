"""The event store: SQLite in WAL mode, one row per event, ``seq`` assigned and committed before publishing.

An event a subscriber ever saw is on disk first, so ``replay`` after a crash
(even ``kill -9``) returns everything that was published, with no gaps.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

from bastion.errors import BastionError
from bastion.edge.protocol import DetectionEvent

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


class StorageError(BastionError):
    """The event store cannot write (disk full, read-only, damaged): nothing is published unstored."""


class EventStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
            self._db.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"cannot open the event store {self.path}: {exc}",
                               "check that the storage directory exists, is writable and has free space") from None
        self._lock = threading.Lock()
        self._next = self.last_seq() + 1  # this process is the only writer (one node per store)

    def append(self, event: DetectionEvent) -> DetectionEvent:
        """Assign the next ``seq``, commit, and return the stored event (seq filled in)."""
        with self._lock:
            try:
                stored = event.model_copy(update={"seq": self._next})
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("INSERT INTO events (seq, ts, source, payload) VALUES (?, ?, ?, ?)",
                                 (stored.seq, stored.ts, stored.source, stored.model_dump_json()))
                self._db.execute("COMMIT")
                self._next += 1
                return stored
            except sqlite3.Error as exc:
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise StorageError(f"cannot store events in {self.path}: {exc}",
                                   "free disk space or fix permissions; publishing is paused") from None

    def since(self, seq: int, limit: int = 500) -> list[DetectionEvent]:
        with self._lock:
            rows = self._db.execute("SELECT payload FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                                    (seq, limit)).fetchall()
        return [DetectionEvent.model_validate_json(r[0]) for r in rows]

    def last_seq(self) -> int:
        """The highest seq ever assigned (AUTOINCREMENT keeps it even after retention deletes rows)."""
        with self._lock:
            row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        return int(row[0]) if row else 0

    def first_seq(self) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT MIN(seq) FROM events").fetchone()
        return int(row[0]) if row and row[0] is not None else None

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def enforce_retention(self, days: float | None, max_mb: float | None) -> int:
        """Delete events older than ``days`` and, oldest first, beyond ``max_mb``. Returns rows deleted."""
        deleted = 0
        with self._lock:
            if days is not None:
                deleted += self._db.execute("DELETE FROM events WHERE ts < ?", (time.time() - days * 86400,)).rowcount
            if max_mb is not None:
                while self._size_mb() > max_mb:
                    n = self._db.execute("DELETE FROM events WHERE seq IN (SELECT seq FROM events ORDER BY seq "
                                         "LIMIT 1000)").rowcount
                    deleted += n
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    self._db.execute("VACUUM")
                    if n == 0:
                        break
        if deleted:
            log.info("retention removed events", extra={"deleted": deleted})
        return deleted

    def _size_mb(self) -> float:
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        size = self._db.execute("PRAGMA page_size").fetchone()[0]
        return pages * size / 1e6

    def close(self) -> None:
        with self._lock:
            self._db.close()

"""The event store's side tables: track-id counters (edge/track_ids.py) and sink cursors (edge/sink_base.py),
and the commit signal the sinks wake on.

Both live in ``events.db`` beside the events, so one commit covers what they guard and one file is backed up;
each table is created on first use, so a store that never tracked or forwarded is untouched. A mixin of
``EventStore`` (edge/store.py), which supplies the connection, its lock and the error handling.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from typing import Callable, ContextManager, Iterable

log = logging.getLogger(__name__)
COUNTERS_SCHEMA = "CREATE TABLE IF NOT EXISTS id_counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)"
CURSORS_SCHEMA = "CREATE TABLE IF NOT EXISTS sink_cursors (name TEXT PRIMARY KEY, seq INTEGER NOT NULL)"


class SideTables:
    """Id counters and sink cursors over ``EventStore``'s connection (``_db``, ``_lock``, ``_transaction``).

    The names below are ``EventStore``'s own (``_check_usable`` refuses a store in its error state, ``_failed``
    puts it there and builds the one-line error)."""

    _db: sqlite3.Connection
    _lock: threading.Lock
    _transaction: Callable[[], ContextManager[None]]
    _check_usable: Callable[[], None]
    _failed: Callable[[BaseException, str], Exception]
    # Called after every commit of an event (``append``), under the store's lock: each must only signal (set an
    # ``Event``), never block or touch the store. A tuple replaced whole, so ``append`` reads it without a lock.
    _commit_listeners: tuple[Callable[[], None], ...] = ()

    def on_commit(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after each event is committed: a sink wakes on it instead of polling the log."""
        with self._lock:
            self._commit_listeners = (*self._commit_listeners, listener)

    def off_commit(self, listener: Callable[[], None]) -> None:
        with self._lock:
            self._commit_listeners = tuple(f for f in self._commit_listeners if f != listener)

    def _announce_commit(self) -> None:
        """After the commit, never before: a sink woken here reads an event that is already on disk."""
        listeners: Iterable[Callable[[], None]] = self._commit_listeners
        for listener in listeners:
            try:
                listener()
            except Exception:  # a listener's fault must not fail an append that is already committed
                log.exception("a commit listener failed")

    def reserve_ids(self, counter: str, count: int) -> range:
        """Durably reserve the next ``count`` numbers of ``counter``: committed before any is handed out, so
        a restart (even after ``kill -9``) continues above every number ever reserved; unused ones are skipped."""
        if count < 1:
            raise ValueError(f"reserve at least one id, not {count}")
        with self._lock:
            self._check_usable()
            try:
                with self._transaction():
                    self._db.execute(COUNTERS_SCHEMA)
                    row = self._db.execute("SELECT value FROM id_counters WHERE name = ?", (counter,)).fetchone()
                    start = int(row[0]) + 1 if row else 1
                    self._db.execute(
                        "INSERT INTO id_counters (name, value) VALUES (?, ?) "
                        "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                        (counter, start + count - 1),
                    )
            except sqlite3.Error as exc:
                raise self._failed(exc, f"reserve {counter} ids in") from None
        return range(start, start + count)

    def rows_since(self, seq: int, limit: int) -> list[tuple[int, float, str]]:
        """``(seq, ts, payload)`` after ``seq``, oldest first, as stored: a sink forwards the bytes it committed."""
        with self._lock:
            self._check_usable()
            try:
                rows = self._db.execute(
                    "SELECT seq, ts, payload FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)
                ).fetchall()
            except sqlite3.Error as exc:
                raise self._failed(exc, "read events from") from None
        return [(int(r[0]), float(r[1]), str(r[2])) for r in rows]

    def cursor(self, name: str) -> int:
        """The last seq sink ``name`` has had acknowledged (0: none yet). The table appears on first write."""
        with self._lock:
            self._check_usable()
            try:
                row = self._db.execute("SELECT seq FROM sink_cursors WHERE name = ?", (name,)).fetchone()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return 0
                raise self._failed(exc, "read sink cursors from") from None
            except sqlite3.Error as exc:
                raise self._failed(exc, "read sink cursors from") from None
        return int(row[0]) if row else 0

    def set_cursor(self, name: str, seq: int) -> None:
        """Commit sink ``name``'s cursor (it only moves forward): after a crash the sink resends from here."""
        with self._lock:
            self._check_usable()
            try:
                with self._transaction():
                    self._db.execute(CURSORS_SCHEMA)
                    self._db.execute(
                        "INSERT INTO sink_cursors (name, seq) VALUES (?, ?) "
                        "ON CONFLICT(name) DO UPDATE SET seq = MAX(seq, excluded.seq)",
                        (name, seq),
                    )
            except sqlite3.Error as exc:
                raise self._failed(exc, "write sink cursors in") from None

"""Store-and-forward: a sink reads the event log from its cursor and forwards it to one broker, on its own thread.

The store is the queue. Detection commits each event to SQLite and moves on; a sink never touches the
frame path. Its thread reads up to ``batch`` events after its cursor, publishes them with at most
``max_in_flight`` unacknowledged, and moves the cursor (committed in the store, ``sink_cursors``) to the
highest seq whose event *and every one before it* the broker acknowledged. A broker that is down for an hour
receives the whole backlog, in seq order, when it comes back; an event may arrive twice (published, then the
connection died before the ack), never zero times — consumers de-duplicate by ``seq`` (at-least-once).

A sink does not poll: the store calls ``notify`` after each commit (``EventStore.on_commit``), and the idle
thread sleeps on that signal, so an event leaves for the broker as soon as it is on disk and an idle node's
sinks do not wake at all. ``poll_s`` is only the backstop: the longest an idle sink sleeps before it looks
anyway (a wake lost to a bug delays an event by that much; it never loses one).

Failures are states, not exceptions: a refused login, a broker that never answers, a dropped connection or
a store that cannot be read puts the sink into ``retrying`` with ``error`` saying why, and it tries again after
a backoff that doubles up to ``backoff_max_s``. Nothing a broker does ends the thread.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from bastion.edge.store import StorageError
from bastion.edge.watched import WatchedThread
from bastion.errors import BastionError
from bastion.models.safe_read import NotRegular, TooLarge, read_bounded

if TYPE_CHECKING:
    from bastion.edge.sink_config import SinkConfig
    from bastion.edge.store import EventStore

log = logging.getLogger(__name__)
SINKS: dict[str, type["Sink"]] = {}


class SinkError(BastionError):
    """A broker refused, failed or did not answer: the sink retries (the reason goes into ``status``)."""


def register_sink(kind: str) -> Callable[[type["Sink"]], type["Sink"]]:
    def add(cls: type["Sink"]) -> type["Sink"]:
        SINKS[kind] = cls
        return cls

    return add


def event_kind(payload: dict[str, Any]) -> str:
    """An object event names its kind (``object.new``, ``line.cross`` …); a frame event is ``det``."""
    kind = payload.get("kind")
    return kind if isinstance(kind, str) and kind else "det"


class Sink(WatchedThread):
    """One broker, one thread, one cursor. Subclasses implement ``connect``, ``publish`` and ``disconnect``."""

    def __init__(self, config: "SinkConfig", store: "EventStore", node: str) -> None:
        self.config = config
        self.store = store
        self.node = node
        self.name = config.cursor_name
        self.state = "starting"  # connected | retrying | stopped
        self.error: str | None = None
        self.forwarded = 0  # acknowledged events since start (re-sends included)
        self.skipped = 0  # events retention deleted before they were forwarded
        self.reconnects = 0
        self.cursor = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sink-{self.name}", daemon=True)

    # -- what a broker implements --------------------------------------------------------------------
    def connect(self) -> None:
        """Connect and log in; raise ``SinkError`` (with the broker's reason) if it refuses or stays silent."""
        raise NotImplementedError

    def publish(self, rows: list[tuple[int, str, str, str]]) -> int:
        """Publish ``(seq, kind, source, payload)`` in order; return the highest seq acknowledged with all
        before it. Raise ``SinkError`` when nothing at all was acknowledged."""
        raise NotImplementedError

    def disconnect(self, clean: bool) -> None:
        """Drop the connection (``clean``: the node is stopping; say goodbye where the protocol has one)."""

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        self.store.on_commit(self.notify)
        self._thread.start()

    def notify(self) -> None:
        """New events are in the store (called by it after each commit): forward them now."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self.store.off_commit(self.notify)
        self._stop.set()
        self._wake.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)
        self.state = "stopped"

    @property
    def thread_name(self) -> str:
        return self._thread.name

    def status(self) -> dict[str, Any]:
        backlog = max(0, self.store.last_seq() - self.cursor)
        lag = 0.0
        if backlog:  # the age of the oldest event the broker has not acknowledged
            try:
                oldest = self.store.rows_since(self.cursor, 1)
            except StorageError:
                oldest = []
            lag = round(max(0.0, time.time() - oldest[0][1]), 3) if oldest else 0.0
        return {
            "type": self.config.type,
            "state": self.state,
            "error": self.error,
            "cursor": self.cursor,
            "backlog": backlog,
            "lag_s": lag,
            "forwarded": self.forwarded,
            "skipped": self.skipped,
            "reconnects": self.reconnects,
        }

    # -- the loop --------------------------------------------------------------------------------------
    def _run(self) -> None:
        connected = False
        backoff = self.config.backoff_s
        while not self._stop.is_set():
            try:
                if not connected:
                    self.cursor = self.store.cursor(self.name)
                    self.connect()
                    connected = True
                    self.state, self.error = "connected", None
                    log.info("sink %s connected", self.name)
                # cleared before the read, never after: a commit after this line sets it again, and one before
                # it is already visible to the read, so no event waits for the backstop
                self._wake.clear()
                if not self._forward_once():
                    self._wake.wait(self.config.poll_s)
                backoff = self.config.backoff_s
            except Exception as exc:  # a broker or the store failed: a state, then a retry; never the thread's end
                if self._stop.is_set():  # stopping cut a wait short: not a failure
                    break
                reason = _one_line(exc)
                if self.error != reason:
                    log.warning("sink %s: %s; retrying", self.name, reason)
                self.state, self.error = "retrying", reason
                if connected:
                    self.reconnects += 1
                connected = False
                self._safe_disconnect(clean=False)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.config.backoff_max_s)
        self._safe_disconnect(clean=connected)  # also a half-made connection that stopping interrupted
        self.state = "stopped"

    def _forward_once(self) -> bool:
        """Forward one batch after the cursor; False when there was nothing to forward."""
        rows = self.store.rows_since(self.cursor, self.config.batch)
        if not rows:
            return False
        if rows[0][0] > self.cursor + 1:  # retention deleted events this sink never forwarded
            gap = rows[0][0] - self.cursor - 1
            self.skipped += gap
            log.warning("sink %s: %d event(s) after seq %d were deleted before forwarding", self.name, gap, self.cursor)
        prepared = [_prepare(seq, payload) for seq, _, payload in rows]
        acked = self.publish(prepared)
        if acked > self.cursor:
            self.forwarded += sum(1 for seq, *_ in prepared if seq <= acked)
            self.store.set_cursor(self.name, acked)
            self.cursor = acked
        if acked < rows[-1][0]:
            raise SinkError(f"the broker acknowledged up to seq {acked} of {rows[-1][0]}")
        return True

    def _safe_disconnect(self, clean: bool) -> None:
        try:
            self.disconnect(clean)
        except Exception as exc:  # closing a dead connection may fail in any way; the next connect starts fresh
            log.debug("sink %s: disconnect: %s", self.name, exc)


def _prepare(seq: int, payload: str) -> tuple[int, str, str, str]:
    try:
        data = json.loads(payload)
    except ValueError:
        data = {}
    data = data if isinstance(data, dict) else {}
    return seq, event_kind(data), str(data.get("source", "unknown")), payload


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, (SinkError, StorageError)):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return " ".join(text.split())[:240]


MAX_SECRET_BYTES = 4096  # a password, alone in its file


def read_secret(path) -> str | None:
    """A password file's content, without the trailing newline; None without a file.

    Read bounded and only when a regular file (models/safe_read.py): a path that names /dev/zero, a FIFO (whose
    ``open`` alone blocks until a writer comes) or a log file by mistake is a sink.error line, not a sink thread
    that reads, or waits, forever."""
    if path is None:
        return None
    try:
        raw = read_bounded(path, MAX_SECRET_BYTES)
    except TooLarge:
        raise SinkError(f"the password file {path} is over {MAX_SECRET_BYTES} bytes: not a password file") from None
    except NotRegular:
        raise SinkError(f"the password file {path} is not a regular file (a FIFO, device or directory)") from None
    except OSError as exc:
        raise SinkError(f"cannot read the password file {path}: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise SinkError(f"the password file {path} is not UTF-8 text") from None

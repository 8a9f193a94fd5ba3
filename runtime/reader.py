"""The one source reader: a thread that opens a source through the registry, paces it, reconnects it with
capped backoff, and owns the counters ``status`` and ``bastion detect`` report.

Frames go into a small bounded queue.  A live source (a camera, a stream) or a file paced like one never waits
for the model: when the queue is full the *oldest* frame is dropped and counted.  An unpaced file or directory
waits instead, so no frame of it is ever lost.  The node runs one reader per source; ``bastion detect`` runs
one and iterates it (``iter_source``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from bastion.runtime.media import Frame
from bastion.runtime.sources import MAX_URI_CHARS, Opened, SourceSpec, SourceUnavailable, open_source, source_kind

log = logging.getLogger(__name__)

# A decoded frame larger than 8K UHD is a broken or hostile stream, not a camera: refused before it is queued.
MAX_FRAME_PIXELS = 7680 * 4320
MAX_BACKOFF_S = 30.0
MAX_SKIPPED_NAMES = 1000  # unreadable files remembered by name for the CLI's warnings; all are counted


@dataclass
class SourceStats:
    read: int = 0
    dropped: int = 0
    inferred: int = 0
    errors: int = 0
    reconnects: int = 0
    state: str = "starting"
    last_error: str = ""
    fps: float = 0.0
    _window: deque = field(default_factory=lambda: deque(maxlen=64))

    def mark_inferred(self, now: float) -> None:
        self.inferred += 1
        self._window.append(now)
        if len(self._window) >= 2 and self._window[-1] > self._window[0]:
            self.fps = (len(self._window) - 1) / (self._window[-1] - self._window[0])

    def current_fps(self, now: float) -> float:
        """The inference rate, 0 once nothing was inferred for a while: a stalled loop must not show its last rate."""
        if not self._window or now - self._window[-1] > max(2.0, 2.0 / self.fps if self.fps else 2.0):
            return 0.0
        return self.fps

    def as_dict(self, queue_depth: int) -> dict:
        return {
            "read": self.read,
            "dropped": self.dropped,
            "inferred": self.inferred,
            "errors": self.errors,
            "reconnects": self.reconnects,
            "state": self.state,
            "last_error": self.last_error,
            "fps": round(self.current_fps(time.time()), 2),
            "queue": queue_depth,
        }


class FrameQueue:
    """A bounded FIFO. ``put(drop_oldest=True)`` never blocks (the oldest item goes); otherwise it waits for room."""

    def __init__(self, maxsize: int) -> None:
        self._items: deque = deque(maxlen=maxsize)
        self._ready = threading.Condition()

    def put(self, item: object, drop_oldest: bool, stop: threading.Event) -> bool:
        """Add ``item``; True if an old item had to be dropped. A waiting put gives up when ``stop`` is set."""
        with self._ready:
            while not drop_oldest and len(self._items) == self._items.maxlen:
                if stop.is_set():
                    return False
                self._ready.wait(0.1)
            dropped = len(self._items) == self._items.maxlen
            self._items.append(item)
            self._ready.notify_all()
            return dropped

    def get(self, timeout: float = 0.0) -> object | None:
        """The oldest item, or None when none came within ``timeout`` seconds."""
        with self._ready:
            if not self._items and timeout > 0:
                self._ready.wait(timeout)
            if not self._items:
                return None
            item = self._items.popleft()
            self._ready.notify_all()
            return item

    def get_nowait(self) -> object | None:
        return self.get(0.0)

    def __len__(self) -> int:
        return len(self._items)


class SourceReader(threading.Thread):
    """Reads one source into ``queue`` until ``stop`` is set, a non-looping file ends, or it gives up.

    ``retries=None`` (the node): a source that fails is reopened for ever, backing off up to ``max_backoff_s``.
    ``retries=N`` (``bastion detect``): a source that never opened fails at once, and one that stops is
    reopened at most N times in a row; then ``error`` says why and the reader ends.
    """

    def __init__(
        self,
        spec: SourceSpec,
        queue_size: int = 4,
        wake: threading.Event | None = None,
        stop: threading.Event | None = None,
        max_backoff_s: float = MAX_BACKOFF_S,
        retries: int | None = None,
    ) -> None:
        super().__init__(name=f"source-{spec.name}", daemon=True)
        self.spec = spec
        self.kind = source_kind(spec.uri)
        self.queue = FrameQueue(queue_size)
        self.stats = SourceStats()
        self.wake = wake or threading.Event()
        self.stop_event = stop or threading.Event()
        self.max_backoff_s = max_backoff_s
        self.retries = retries
        self.native_fps = 0.0
        self.skipped: deque[str] = deque(maxlen=MAX_SKIPPED_NAMES)
        self.error: SourceUnavailable | None = None
        self.finished = threading.Event()
        self._backoff = 0.5
        self._index = 0
        self._failures = 0  # in a row; reset by a frame

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                try:
                    if self._read_once():
                        return
                except Exception as exc:  # a library or driver fault: retried like an unreachable source
                    if self.stats.last_error != f"{type(exc).__name__}: {exc}":
                        log.warning("source %s failed unexpectedly", self.spec.name, exc_info=True)
                    if self._failed(f"{type(exc).__name__}: {exc}"):
                        return
        finally:
            if self.stats.state not in ("finished", "failed"):
                self.stats.state = "stopped"
            self.finished.set()
            self.wake.set()

    def _read_once(self) -> bool:
        """Open the source and read it to its end; True when the reader is done for good."""
        try:
            opened = open_source(self.spec)
        except SourceUnavailable as exc:
            return self._failed(str(exc), exc)
        self.native_fps = opened.native_fps
        self.stats.state = "running"
        got = self._drain(opened)
        if self.stop_event.is_set():
            return True
        if got:
            self._backoff, self._failures = 0.5, 0
        if not opened.live and not self.spec.loop:
            self.stats.state = "finished"
            return True
        if opened.live:
            return self._failed("stream ended; reconnecting")
        if not got:  # a looping file that yields nothing: don't spin
            return self._failed("file yielded no frames")
        return False

    def _drain(self, opened: Opened) -> int:
        """Queue every frame of ``opened`` (paced when it asks); the number of good frames."""
        try:
            return self._queue_all(opened)
        finally:
            close = getattr(opened.captures, "close", None)
            if close is not None:
                close()  # releases the capture now, not when the generator is collected

    def _queue_all(self, opened: Opened) -> int:
        got = 0
        period = 1.0 / opened.pace_fps if opened.pace_fps else 0.0
        drop_oldest = opened.live or bool(period)  # paced like a camera, dropped like a camera
        next_at = time.monotonic()
        for capture in opened.captures:
            if self.stop_event.is_set():
                break
            if period:
                next_at += period
                delay = next_at - time.monotonic()
                if delay > 0:
                    self.stop_event.wait(delay)
                else:
                    next_at = time.monotonic()  # behind: don't try to catch up in a burst
            reason = capture.error or _refusal(capture.image)
            if reason:
                self._skipped(reason, capture.path)
                continue
            got += 1
            self._failures = 0
            self.stats.read += 1
            frame = Frame(self.spec.name, self._index, capture.image, time.time(), capture.path)
            if self.queue.put(frame, drop_oldest, self.stop_event):
                self.stats.dropped += 1
            self._index += 1
            self.wake.set()
        return got

    def _skipped(self, reason: str, path: str | None) -> None:
        message = reason if path is None or path in reason else f"{path}: {reason}"
        if message != self.stats.last_error:  # a stream of broken frames is one line, not one per frame
            log.warning("source %s: skipped %s", self.spec.name, message, extra={"source": self.spec.name})
        self.stats.errors += 1
        self.stats.last_error = message
        if path is not None:
            self.skipped.append(path)

    def _failed(self, message: str, error: SourceUnavailable | None = None) -> bool:
        """Record a failure; True when the reader gives up (``retries`` spent), else it waits out the backoff."""
        if self.stop_event.is_set():  # stopping: a read cut short by the stop is no fault to report
            return True
        self.stats.errors += 1
        self.stats.last_error = message
        self._failures += 1
        if self.retries is not None and (self.stats.read == 0 or self._failures > self.retries):
            self.error = error or SourceUnavailable(f"source {self.spec.name}: {message}")
            self.stats.state = "failed"
            return True
        self.stats.reconnects += 1
        self.stats.state = "reconnecting"
        log.warning("source %s: %s", self.spec.name, message, extra={"source": self.spec.name})
        self.stop_event.wait(self._backoff)
        self._backoff = min(self._backoff * 2, self.max_backoff_s)
        return False

    def close(self, timeout_s: float = 15.0) -> None:
        """Stop the reader and wait for its thread (bounded: a stalled stream read ends within its timeout)."""
        self.stop_event.set()
        if self.ident is not None:
            self.join(timeout_s)

    def frames(self, limit: int | None = None) -> Iterator[Frame]:
        """Iterate up to ``limit`` frames (starting the thread); raises the reader's ``error`` if it gave up.

        Closing the iterator stops the reader (a file reader waiting for room, a camera) at once."""
        if self.ident is None:
            self.start()
        count = 0
        try:
            while limit is None or count < limit:
                frame = self.queue.get(timeout=0.1)
                if frame is not None:
                    count += 1
                    yield frame  # type: ignore[misc]
                elif self.finished.is_set() and not len(self.queue):
                    if self.error is not None:
                        raise self.error
                    return
        finally:
            self.stop_event.set()


def _refusal(image: np.ndarray | None) -> str:
    if image is None:
        return "corrupt frame skipped"
    if image.ndim not in (2, 3) or image.shape[0] * image.shape[1] > MAX_FRAME_PIXELS:
        return f"frame of shape {image.shape} refused (more than {MAX_FRAME_PIXELS} pixels, or not an image)"
    return ""


def source_reader(uri: str | int, retries: int = 3, queue_size: int = 8) -> SourceReader:
    """The reader ``bastion detect`` uses: never paced; a source that cannot be opened fails at once
    (SourceUnavailable, one line), a stream that stops is reopened ``retries`` times."""
    if len(str(uri)) > MAX_URI_CHARS:
        raise SourceUnavailable(f"source name of {len(str(uri))} characters; at most {MAX_URI_CHARS}")
    return SourceReader(SourceSpec(name=str(uri), uri=uri, realtime=False), queue_size, retries=retries)


def iter_source(uri: str | int, skipped: list[str] | None = None, max_frames: int | None = None) -> Iterator[Frame]:
    """Frames of any source ``bastion detect`` takes, read ahead on a reader thread; unreadable files of a
    directory are skipped and named in ``skipped``."""
    reader = source_reader(uri)
    try:
        yield from reader.frames(max_frames)
    finally:
        reader.close()
        if skipped is not None:
            skipped.extend(reader.skipped)

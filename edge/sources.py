"""Frame sources for the node: one reader thread per source, never blocked by inference.

Each reader pushes into a small bounded queue that drops the *oldest* frame
when full (a camera must not stall because the model is slow), reconnects with
exponential backoff when a stream drops or a file is missing, and keeps
counters for ``status``.  Openers are registered by kind (file, dir, stream,
usb), Frigate-style, so a new kind is one small function.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

from bastion.edge.config import SourceConfig
from bastion.runtime.media import IMAGE_SUFFIXES, list_images

log = logging.getLogger(__name__)

STREAM_PREFIXES = ("rtsp://", "rtsps://", "http://", "https://", "rtmp://", "udp://", "tcp://")


class SourceUnavailable(Exception):
    """The source cannot be opened right now (missing file, unreachable camera); retried with backoff."""


@dataclass
class NodeFrame:
    source: str
    index: int
    image: np.ndarray
    ts: float  # unix time when read


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


class DropOldestQueue:
    """A bounded FIFO whose ``put`` never blocks: when full, the oldest item is discarded."""

    def __init__(self, maxsize: int) -> None:
        self._items: deque = deque(maxlen=maxsize)
        self._lock = threading.Lock()

    def put(self, item: object) -> bool:
        """Add ``item``; True if an old item had to be dropped."""
        with self._lock:
            dropped = len(self._items) == self._items.maxlen
            self._items.append(item)
            return dropped

    def get_nowait(self) -> object | None:
        with self._lock:
            return self._items.popleft() if self._items else None

    def __len__(self) -> int:
        return len(self._items)


# -- openers: config → iterator of BGR frames (raise SourceUnavailable when they cannot start) -------------
Opener = Callable[[SourceConfig], tuple[Iterator[np.ndarray | None], float, bool]]
_OPENERS: dict[str, Opener] = {}


def register_opener(kind: str) -> Callable[[Opener], Opener]:
    def wrap(fn: Opener) -> Opener:
        _OPENERS[kind] = fn
        return fn

    return wrap


def source_kind(uri: str | int) -> str:
    if isinstance(uri, int) or (isinstance(uri, str) and uri.isdigit()):
        return "usb"
    if uri.startswith(STREAM_PREFIXES):
        return "stream"
    path = Path(uri)
    if path.is_dir():
        return "dir"
    return "file"


def _capture_frames(cap: cv2.VideoCapture) -> Iterator[np.ndarray]:
    try:
        while True:
            ok, image = cap.read()
            if not ok:
                return
            yield image
    finally:
        cap.release()


def _open_capture(target: str | int, what: str) -> cv2.VideoCapture:
    cap = cv2.VideoCapture(target)
    if not cap.isOpened():
        cap.release()
        raise SourceUnavailable(f"cannot open {what}")
    return cap


@register_opener("file")
def open_file(cfg: SourceConfig) -> tuple[Iterator[np.ndarray | None], float, bool]:
    path = Path(str(cfg.uri))
    if not path.is_file():  # a FIFO or device would block or never end: refused, and named for what it is
        raise SourceUnavailable(f"not a regular file: {path}" if path.exists() else f"file not found: {path}")
    cap = _open_capture(str(path), f"video {path}")
    fps = cfg.fps or cap.get(cv2.CAP_PROP_FPS) or 25.0
    return _capture_frames(cap), (fps if cfg.realtime else 0.0), True


@register_opener("dir")
def open_dir(cfg: SourceConfig) -> tuple[Iterator[np.ndarray | None], float, bool]:
    files = list_images(Path(str(cfg.uri)))
    if not files:
        raise SourceUnavailable(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {cfg.uri}")

    def frames() -> Iterator[np.ndarray | None]:
        for f in files:
            yield cv2.imread(str(f))  # None for a corrupt file: counted as an error, skipped

    return frames(), (cfg.fps or 0.0), True


@register_opener("stream")
def open_stream(cfg: SourceConfig) -> tuple[Iterator[np.ndarray | None], float, bool]:
    cap = _open_capture(str(cfg.uri), f"stream {cfg.name}")
    return _capture_frames(cap), (cfg.fps or 0.0), False


@register_opener("usb")
def open_usb(cfg: SourceConfig) -> tuple[Iterator[np.ndarray | None], float, bool]:
    cap = _open_capture(int(cfg.uri), f"USB camera {cfg.uri}")
    return _capture_frames(cap), (cfg.fps or 0.0), False


class SourceReader(threading.Thread):
    """Reads one source into its queue until ``stop`` is set (or a non-looping file ends)."""

    def __init__(
        self,
        cfg: SourceConfig,
        queue_size: int,
        wake: threading.Event,
        stop: threading.Event,
        max_backoff_s: float = 30.0,
    ) -> None:
        super().__init__(name=f"source-{cfg.name}", daemon=True)
        self.cfg = cfg
        self.queue = DropOldestQueue(queue_size)
        self.stats = SourceStats()
        self.wake = wake
        self.stop_event = stop
        self.max_backoff_s = max_backoff_s
        self.kind = source_kind(cfg.uri)
        self.finished = threading.Event()

    def run(self) -> None:
        self._backoff = 0.5
        self._index = 0
        try:
            while not self.stop_event.is_set():
                try:
                    if self._read_once():
                        return
                except Exception as exc:
                    if self.stats.last_error != f"{type(exc).__name__}: {exc}":
                        log.warning("source %s failed unexpectedly", self.cfg.name, exc_info=True)
                    self._failed(f"{type(exc).__name__}: {exc}")
                    self._wait_backoff()
        finally:
            if self.stats.state not in ("finished",):
                self.stats.state = "stopped"
            self.finished.set()
            self.wake.set()

    def _wait_backoff(self) -> None:
        self.stop_event.wait(self._backoff)
        self._backoff = min(self._backoff * 2, self.max_backoff_s)

    def _read_once(self) -> bool:
        """Open the source and read it to its end; True when the reader is done for good."""
        try:
            frames, fps, is_file = _OPENERS[self.kind](self.cfg)
        except SourceUnavailable as exc:
            self._failed(str(exc))
            self._wait_backoff()
            return False
        self.stats.state = "running"
        got = 0
        period = 1.0 / fps if fps else 0.0
        next_at = time.monotonic()
        for image in frames:
            if self.stop_event.is_set():
                return True
            if period:
                next_at += period
                delay = next_at - time.monotonic()
                if delay > 0:
                    self.stop_event.wait(delay)
                else:
                    next_at = time.monotonic()  # behind: don't try to catch up in a burst
            if image is None:
                self.stats.errors += 1
                self.stats.last_error = "corrupt frame skipped"
                continue
            got += 1
            self.stats.read += 1
            if self.queue.put(NodeFrame(self.cfg.name, self._index, image, time.time())):
                self.stats.dropped += 1
            self._index += 1
            self.wake.set()
        if got:
            self._backoff = 0.5
        if is_file and not self.cfg.loop:
            self.stats.state = "finished"
            return True
        if not is_file:
            self._failed("stream ended; reconnecting")
            self._wait_backoff()
        elif not got:  # a looping file that yields nothing: don't spin
            self._failed("file yielded no frames")
            self._wait_backoff()
        return False

    def _failed(self, message: str) -> None:
        self.stats.errors += 1
        self.stats.reconnects += 1
        self.stats.state = "reconnecting"
        self.stats.last_error = message
        log.warning("source %s: %s", self.cfg.name, message, extra={"source": self.cfg.name})

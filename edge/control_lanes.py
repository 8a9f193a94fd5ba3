"""Control work that takes long runs off the control thread, in lanes; answers go back through an outbox.

The control thread must answer ``status``, ``replay`` and ``ping`` within a poll
turn even while a language model streams an answer or a reload unpacks and
verifies a large bundle.  Such a request is validated on the control thread and
handed, as a ``Deferred``, to its lane: one worker thread with a bounded queue
(a request past the queue gets a one-line "busy" answer at once).

A ZeroMQ socket belongs to one thread, so a lane never touches the ROUTER: it
puts each reply in the ``Outbox`` and waits until the control thread has sent
it (or given up on a reader that stopped reading, or on a client that left).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import zmq

log = logging.getLogger(__name__)

Send = Callable[[dict[str, Any], float], bool]  # (reply fields, stall_s) -> sent


@dataclass
class Deferred:
    """What a handler returns for work that must not hold the control thread.

    ``replies`` yields the reply fields in order (one for ``reload``; ``text`` pieces,
    then ``done``, for ``ask``); nothing in it runs until its lane takes it.  Each
    reply waits up to ``stall_s`` for room in the client's queue; if it cannot be
    sent the generator is closed, so the work stops with its reader.
    """

    lane: str
    replies: Iterator[dict[str, Any]]
    stall_s: float
    failure: str  # the error reply's prefix when the work raises: "generation failed"
    streams: bool = False  # its answer is a stream: while it waits, the client hears {"done": false, "queued": n}


@dataclass
class Job:
    deferred: Deferred
    identity: bytes
    request_id: object
    client: bytes


@dataclass
class _Outgoing:
    identity: bytes
    data: bytes
    deadline: float
    done: threading.Event = field(default_factory=threading.Event)
    sent: bool = False

    def finish(self, sent: bool) -> None:
        self.sent = sent
        self.done.set()


class Outbox:
    """Messages lane threads want sent on the control socket; only the control thread sends them.

    ``send`` (any thread) queues one message, wakes the control thread through an
    inproc socket it polls, and waits for the verdict.  ``deliver`` (the control
    thread) sends what it can without blocking; a message whose reader's queue is
    full waits, retried every turn, until its deadline.  Each lane waits for its
    message, so at most one per lane is ever held here.
    """

    _names = itertools.count()

    def __init__(self, ctx: zmq.Context, stop: threading.Event) -> None:
        self.stop = stop
        self._queue: queue.SimpleQueue[_Outgoing] = queue.SimpleQueue()
        self._waiting: list[_Outgoing] = []
        address = f"inproc://bastion-outbox-{id(self)}-{next(self._names)}"
        self.wake_socket = ctx.socket(zmq.PULL)  # the control thread polls it
        self.wake_socket.linger = 0
        self.wake_socket.bind(address)
        self._ring = ctx.socket(zmq.PUSH)
        self._ring.linger = 0
        self._ring.sndhwm = 1  # one pending wake is enough: the control thread drains the whole queue
        self._ring.connect(address)
        self._ring_lock = threading.Lock()  # lanes share the ringing socket

    @property
    def busy(self) -> bool:
        """Messages wait for room: the control thread should poll again soon."""
        return bool(self._waiting)

    def send(self, identity: bytes, data: bytes, stall_s: float) -> bool:
        item = _Outgoing(identity, data, time.monotonic() + stall_s)
        self._queue.put(item)
        with self._ring_lock:
            try:
                self._ring.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # a wake is already pending (or the server is closing)
        while not item.done.wait(0.05):
            if self.stop.is_set():
                return False
        return item.sent

    def deliver(self, sock: zmq.Socket) -> None:
        while True:  # drain the wakes; the queue below is what counts
            try:
                self.wake_socket.recv(zmq.NOBLOCK)
            except zmq.ZMQError:
                break
        while True:
            try:
                self._waiting.append(self._queue.get_nowait())
            except queue.Empty:
                break
        still: list[_Outgoing] = []
        for item in self._waiting:
            try:
                sock.send_multipart([item.identity, item.data], zmq.NOBLOCK)
                item.finish(True)
            except zmq.Again:  # the reader has 8 answers unread
                if time.monotonic() > item.deadline or self.stop.is_set():
                    item.finish(False)
                else:
                    still.append(item)
            except zmq.ZMQError:  # EHOSTUNREACH: the client went away
                item.finish(False)
        self._waiting = still

    def close(self) -> None:
        for item in self._waiting:
            item.finish(False)
        self._waiting = []
        self.wake_socket.close(linger=0)
        self._ring.close(linger=0)


class Lane(threading.Thread):
    """One worker with at most ``depth`` jobs waiting behind the one it runs; beyond that, ``submit`` says no."""

    def __init__(
        self,
        name: str,
        depth: int,
        send: Callable[[Job, dict[str, Any], float], bool],
        spent: Callable[[bytes, float], None],
        log_failure: Callable[[str, BaseException], None],
        stop: threading.Event,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.depth = depth
        self._send, self._spent, self._log_failure, self._stopping = send, spent, log_failure, stop
        self._waiting: deque[Job] = deque()
        self._turn = threading.Condition()
        self.running: Job | None = None
        self.done = 0

    def submit(self, job: Job) -> int | None:
        """Queue ``job``: how many jobs are ahead of it (0: it starts now), or None when the lane already runs
        one and ``depth`` more wait (the caller answers "busy")."""
        with self._turn:
            ahead = len(self._waiting) + (self.running is not None)
            if ahead > self.depth:
                return None
            self._waiting.append(job)
            self._turn.notify()
            return ahead

    def waiting(self) -> list[Job]:
        """The jobs not started yet, first first."""
        with self._turn:
            return list(self._waiting)

    def run(self) -> None:
        while not self._stopping.is_set():
            with self._turn:
                if not self._waiting:
                    self._turn.wait(0.1)
                    continue
                job = self.running = self._waiting.popleft()
            started = time.monotonic()
            try:
                self._run(job)
            finally:
                with self._turn:
                    self.running = None
                self.done += 1
                self._spent(job.client, time.monotonic() - started)  # charged to that client's time budget
        with self._turn:  # closing: what still waits never started; close it so nothing lingers
            left, self._waiting = list(self._waiting), deque()
        for job in left:
            _close(job.deferred.replies)

    def _run(self, job: Job) -> None:
        deferred = job.deferred
        try:
            for fields in deferred.replies:
                if not self._send(job, fields, deferred.stall_s):
                    return  # gone or not reading: the work stops with its reader
        except Exception as exc:  # a failure ends this answer, never the lane
            self._log_failure(deferred.failure, exc)
            self._send(job, {"ok": False, "error": f"{deferred.failure}: {exc}"}, deferred.stall_s)
        finally:
            _close(deferred.replies)


def _close(replies: Iterator[dict[str, Any]]) -> None:
    """End the work's generator (its ``finally`` runs: an ask is audited); a failure there is logged, never
    allowed to end the lane."""
    close = getattr(replies, "close", None)
    if close is None:
        return
    try:
        close()
    except Exception as exc:
        log.warning("closing a control job failed: %s: %s", type(exc).__name__, exc)

"""The SDK ``Client``: talk to a node, and follow its events without gaps or duplicates.

``for event in client.events(since=seq)`` first replays what the store holds
after ``seq``, then continues live.  Every event carries the store's ``seq``:
anything at or below the last one delivered is a duplicate and is skipped; a
jump ahead (a dropped PUB message, a node restart) is filled from ``replay``
before the live event is delivered.  A node that sends neither events nor
heartbeats for ``dead_after_s`` is treated as gone: the client reconnects and
resumes from its last ``seq``.

A node's ``seq`` and audit head never go backwards; ``SeqGuard`` (edge/seq_guard.py)
holds what this client saw and raises ``NodeSeqWentBackwards`` /
``NodeAuditWentBackwards`` when one does.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import zmq

from bastion.edge import answers
from bastion.edge.answers import NodeRequestError
from bastion.edge.clip_client import Clip, fetch_clip
from bastion.edge.client_events import EventsMixin, check_event_seq, replay_answer
from bastion.edge.curve import apply_client, load_public
from bastion.edge.events_v2 import OBJECT_TOPIC_PREFIX, NodeEvent
from bastion.edge.protocol import (
    EVENT_TOPIC_PREFIX,
    HEARTBEAT_TOPIC,
    MAX_REQUEST_BYTES,
    json_or_none,
)
from bastion.edge.seq_guard import NodeAuditWentBackwards, NodeSeqWentBackwards, SeqGuard
from bastion.errors import BastionError, ConfigError
from bastion.lm_limits import check_max_new_tokens

log = logging.getLogger(__name__)
__all__ = ["Client", "NodeUnavailable", "NodeRequestError", "NodeSeqWentBackwards", "NodeAuditWentBackwards"]


class NodeUnavailable(BastionError):
    """The node did not answer in time (down, wrong address, or a CurveZMQ key it refuses)."""


# One published event or heartbeat (~8000 detections); larger is dropped unread, replay fills it.
MAX_EVENT_BYTES = 2**20
EVENT_QUEUE = 128  # published messages libzmq holds for a slow reader (≤ 128 MiB); beyond, dropped and replayed
MAX_ANSWER_BYTES = 64 * 2**20  # a node's largest answer is a ~4 MB replay page (edge/control_ops.py MAX_REPLAY_BYTES)


def _decode(raw: bytes) -> dict[str, Any]:
    """A control answer as a dict, or NodeRequestError: what a broken or hostile node sends (nested, not JSON, not an
    object) is one clear error, never a RecursionError or AttributeError in the caller's program."""
    answer = json_or_none(raw)
    if not isinstance(answer, dict):
        raise NodeRequestError(
            f"the node's answer is not a protocol message ({len(raw)} bytes: {raw[:40]!r})",
            "is this endpoint a bastion node of this version?",
        )
    return answer


class Client(EventsMixin):
    def __init__(
        self,
        control: str = "tcp://127.0.0.1:7701",
        events: str | None = None,
        server_key: str | Path | None = None,
        client_key: Path | None = None,
        timeout_s: float = 5.0,
        retries: int = 2,
        dead_after_s: float = 5.0,
    ) -> None:
        self.control_endpoint = control
        self._events_endpoint = events
        self.server_key = load_public(server_key) if server_key else None
        self.client_key = Path(client_key) if client_key else None
        self.timeout_s = timeout_s
        self.retries = retries
        self.dead_after_s = dead_after_s
        self.ctx = zmq.Context()
        self._ids = itertools.count(1)
        self._dealer: zmq.Socket | None = None
        self._seq = SeqGuard()
        self._node: str | None = None  # the node id last heard at this endpoint
        self.skipped_messages = 0  # malformed messages from the events socket, skipped (see events())
        self._subs: dict[zmq.Socket, threading.Lock] = {}  # events() generators' sockets, each held while in use
        self._dealer_use = threading.RLock()  # held while a request sends or polls on the control socket
        self._closing = threading.Lock()  # one close() at a time: two threads in Context.term abort libzmq

    # -- request / reply ---------------------------------------------------------------------------------
    def _socket(
        self, kind: int, endpoint: str, max_bytes: int = MAX_ANSWER_BYTES, queue: int | None = None
    ) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.linger = 0
        sock.maxmsgsize = max_bytes  # a larger message is dropped by libzmq, never buffered
        if queue is not None:
            sock.rcvhwm = queue  # set before connect, or libzmq ignores it
        try:  # a bad key file or endpoint: close the socket, or close()'s ctx.term() waits on it forever
            if self.server_key is not None:
                apply_client(sock, self.server_key, self.client_key)
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise ConfigError(
                f"{endpoint!r} is not an endpoint ZeroMQ can connect to ({exc})", "give one like tcp://127.0.0.1:7701"
            ) from None
        except BaseException:
            sock.close(linger=0)
            raise
        return sock

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one control request; retries on a fresh socket (lazy pirate), then NodeUnavailable.

        The node's own error text is raised as NodeRequestError, also when it could not
        read the request's id (it answers ``id: null`` then; this client has one request
        in flight, so that answer is ours).  A "rate limited" answer is waited out and
        the request sent again, within the timeout.
        """
        request_id = next(self._ids)
        payload = json.dumps({"op": op, "id": request_id, **fields}).encode()
        if len(payload) > MAX_REQUEST_BYTES:
            raise NodeRequestError(
                f"{op} request of {len(payload)} bytes exceeds the node's {MAX_REQUEST_BYTES}-byte limit",
                "send less (a shorter prompt or bundle path)",
            )
        with self._dealer_turn():
            return self._request(op, payload, request_id)

    @contextlib.contextmanager
    def _dealer_turn(self) -> Iterator[None]:
        """The control socket is this thread's while the block runs; close() from another thread then leaves it to
        Context.term, whose ETERM lands here and closes it in the thread that was using it."""
        with self._dealer_use:
            try:
                yield
            except zmq.ZMQError as exc:
                if exc.errno == zmq.ETERM and self._dealer is not None:
                    self._dealer.close(linger=0)
                    self._dealer = None
                raise

    def _request(self, op: str, payload: bytes, request_id: int) -> dict[str, Any]:
        for attempt in range(self.retries + 1):
            if self._dealer is None:
                self._dealer = self._socket(zmq.DEALER, self.control_endpoint)
            self._dealer.send(payload)
            deadline = time.monotonic() + self.timeout_s
            while (left := deadline - time.monotonic()) > 0:
                if not self._dealer.poll(int(left * 1000)):
                    break
                answer = _decode(self._dealer.recv())
                if answer.get("id") != request_id and not (answer.get("id") is None and not answer.get("ok", True)):
                    continue  # a late answer to an earlier, timed-out request
                wait = answer.get("retry_after_s", 0.1)
                wait = min(max(wait, 0.0), self.timeout_s) if isinstance(wait, (int, float)) and wait == wait else 0.1
                if answer.get("rate_limited") and time.monotonic() + wait < deadline:
                    time.sleep(wait)
                    self._dealer.send(payload)
                    continue
                if not answer.get("ok", False):
                    raise NodeRequestError(f"node refused {op}: {str(answer.get('error', 'unknown error'))[:200]}")
                return answer
            self._dealer.close(linger=0)
            self._dealer = None
            if attempt < self.retries:  # say so while waiting: a script with no node must not sit silent
                log.warning(
                    "no answer from %s to %r in %.0f s; trying again (%d more)",
                    self.control_endpoint,
                    op,
                    self.timeout_s,
                    self.retries - attempt,
                )
        hint = "is the node running? with CurveZMQ: are the server key and your client key right?"
        tries = self.retries + 1
        raise NodeUnavailable(
            f"no answer from {self.control_endpoint} to {op!r} in {tries * self.timeout_s:g} s "
            f"({tries} tries of {self.timeout_s:g} s)",
            hint,
        )

    def status(self) -> dict[str, Any]:
        """The node's status; NodeSeqWentBackwards if its last_seq is below a seq this client saw from it."""
        status = answers.status(self.request("status"))
        self._node = status["node"]
        self._seq.saw(status["node"], status["last_seq"], "status last_seq")
        audit = status.get("audit") or {}
        self._seq.saw_audit(status["node"], audit.get("count"), audit.get("head"))
        return status

    def audit_head(self, node: str | None = None) -> tuple[int, str] | None:
        """(record count, last hash) of the node's audit log as last seen in its heartbeats or status.

        Keep it somewhere the node cannot reach: ``bastion audit verify audit.log
        --expect-count N --expect-head HASH`` later proves the log was not cut short.
        """
        return self._seq.latest_audit(node or self._node or "")

    def replay(self, since: int = 0, limit: int = 500) -> list[NodeEvent]:
        """Up to ``limit`` stored events after ``since``, ascending; an invalid one raises NodeRequestError."""
        events, last_seq = answers.replay(replay_answer(self, since, limit), since)  # v2, or v1 for an old node
        node = events[0].node if events else self._node
        if node is not None and last_seq is not None:
            self._seq.saw(node, last_seq, "replay last_seq")
        return events

    def ask_stream(self, prompt: str, max_new_tokens: int = 128) -> Iterator[str]:
        """The node's answer, piece by piece as it is generated; ``max_new_tokens`` is 1..MAX_NEW_TOKENS
        (``bastion.lm_limits``), checked here before anything is sent (ConfigError).  While the ask waits behind
        others the node says ``{"queued": n}`` every second (no text): that keeps this wait alive; a full queue is
        NodeRequestError "node refused ask: busy: …"."""
        check_max_new_tokens(max_new_tokens)
        first = self.request("ask", prompt=prompt, max_new_tokens=max_new_tokens)
        request_id = first["id"]
        answer = first
        while True:
            if answer.get("done"):
                return
            if text := answers.text_piece(answer):
                yield text
            with self._dealer_turn():
                if self._dealer is None:  # closed while this answer was suspended
                    raise zmq.ZMQError(zmq.ETERM)
                if not self._dealer.poll(int(self.timeout_s * 1000)):
                    raise NodeUnavailable(f"the node stopped answering mid-stream ({self.control_endpoint})")
                answer = _decode(self._dealer.recv())
            if answer.get("id") != request_id:
                continue
            if not answer.get("ok", False):
                raise NodeRequestError(f"node refused ask: {str(answer.get('error', 'unknown error'))[:200]}")

    def ask(self, prompt: str, max_new_tokens: int = 128) -> str:
        return "".join(self.ask_stream(prompt, max_new_tokens))

    def snapshot(self, seq: int) -> bytes:
        """The JPEG the node kept for event ``seq`` (decrypted by the node; CurveZMQ protects it in transit); a
        ``seq`` that is no event seq is ConfigError before anything is sent."""
        return answers.snapshot(self.request("snapshot", seq=check_event_seq(seq, "snapshot")))

    def clip(self, seq: int, out: str | Path | None = None) -> Clip:
        """The evidence clip the node kept for event ``seq`` (an object.end or zone/line event, with
        ``storage.clips``): ``Clip.meta`` (codec, container, frames, size, fps, time span) and ``Clip.data`` (the
        video, decrypted by the node, fetched in chunks and checked against its sha256); with ``out`` also written
        there (a directory, or a name ending in ``/``, gets ``clip-<seq>.avi``). A clip still recording, dropped or pruned is
        NodeRequestError with the node's one-line reason; a ``seq`` that is no event seq is ConfigError before
        anything is sent."""
        clip = fetch_clip(self, check_event_seq(seq, "clip"))
        if out is not None:
            clip.save(out)  # a str keeps its trailing '/': a folder
        return clip

    def reload(self, bundle: str, allow_downgrade: bool = False, persist: bool = False) -> dict[str, Any]:
        """Switch the node to ``bundle``; an older version of the model it runs needs ``allow_downgrade``;
        ``persist`` pins it so the node runs it after a restart too (an admin key's right, docs/security.md).
        Only the flags that are set are sent, so a node from before them still understands a plain reload."""
        flags = {k: True for k, v in (("allow_downgrade", allow_downgrade), ("persist", persist)) if v}
        return self.request("reload", bundle=bundle, **flags)

    # -- events ------------------------------------------------------------------------------------------
    def events_endpoint(self) -> str:
        if self._events_endpoint is None:
            bound = answers.events_endpoint(self.status())
            self._events_endpoint = _reachable(bound, self.control_endpoint)
        return self._events_endpoint

    def _replay_all(self, since: int) -> Iterator[NodeEvent]:
        while True:
            batch = self.replay(since)
            yield from batch
            if not batch:
                return
            since = batch[-1].seq

    def _follow_events(  # Client.events (edge/client_events.py) filters what this yields by kind
        self, since: int | None = None, idle_timeout_s: float | None = None, duration_s: float | None = None
    ) -> Iterator[NodeEvent]:
        """Events after ``since`` (None: only new ones), replayed then live, each exactly once, in seq order.

        Raises NodeUnavailable if the node stays unreachable for ``idle_timeout_s`` (default: forever).
        Ends after ``duration_s`` seconds even when no event comes (default: never).

        What the events socket publishes is a hint, what ``replay`` returns is the truth: a malformed published
        message (wrong frame count, not JSON, not a valid event or heartbeat, over ``MAX_EVENT_BYTES``) is skipped,
        logged and counted in ``skipped_messages``, and does not count as a sign of life.  Skipping loses nothing:
        if a broken event still names a seq, that event is fetched from the store at once; otherwise the next event
        or heartbeat shows the gap and it is filled from the store.  An invalid event in the store itself cannot be
        replaced by another copy, so it raises NodeRequestError naming its seq rather than vanish.
        """
        end = time.monotonic() + duration_s if duration_s is not None else None
        status = self.status()
        if since is not None and since > status["last_seq"]:  # a bookmark from before the node's store went back
            self._seq.saw(status["node"], since, "bookmark")
            self._seq.saw(status["node"], status["last_seq"], "status last_seq")  # raises, naming both
        last = status["last_seq"] if since is None else since
        gone_since: float | None = None
        while True:
            sub = self._socket(zmq.SUB, self.events_endpoint(), MAX_EVENT_BYTES, EVENT_QUEUE)
            sub.setsockopt(zmq.SUBSCRIBE, EVENT_TOPIC_PREFIX)
            sub.setsockopt(zmq.SUBSCRIBE, OBJECT_TOPIC_PREFIX)
            sub.setsockopt(zmq.SUBSCRIBE, HEARTBEAT_TOPIC)
            in_use = self._subs[sub] = threading.Lock()  # held while this generator polls; close() skips it then
            try:
                for event in self._replay_all(last):  # subscribed first, so nothing falls between
                    last = event.seq
                    self._seq.delivered(event)
                    yield event
                gone_since = None
                heard = time.monotonic()
                while end is None or time.monotonic() < end:
                    with in_use:
                        if sub.closed:  # this client was closed while the generator was suspended
                            raise zmq.ZMQError(zmq.ETERM)
                        frames = sub.recv_multipart() if sub.poll(200) else None
                    if frames is None:
                        if time.monotonic() - heard > self.dead_after_s:
                            raise NodeUnavailable("no heartbeat from the node")
                        continue
                    message = answers.published(frames, self.skipped_messages)
                    event, beat = message.event, message.heartbeat
                    if beat is not None:
                        heard = time.monotonic()
                        self._seq.saw(beat.node, beat.last_seq, "heartbeat last_seq", "heartbeat")
                        self._seq.saw_audit(beat.node, beat.audit_count, beat.audit_head, "heartbeat")
                        ahead = beat.last_seq
                    elif event is not None:
                        heard = time.monotonic()
                        ahead = event.seq - 1
                    else:  # malformed: not heard from; a seq it claims is fetched from the store, never lost
                        self.skipped_messages += 1
                        if message.seq is None:
                            continue
                        ahead = message.seq
                    if ahead > last:  # we missed something: fill the gap from the store
                        for missed in self._replay_all(last):
                            if missed.seq > ahead:
                                break
                            last = missed.seq
                            self._seq.delivered(missed)
                            yield missed
                    if event is not None:
                        if event.seq > last:
                            last = event.seq
                            self._seq.delivered(event)
                            yield event
                        else:
                            self._seq.check_repeat(event)  # the replay/live overlap, or a node gone back
                return  # duration_s is over
            except NodeUnavailable:
                now = time.monotonic()
                gone_since = gone_since or now
                if idle_timeout_s is not None and now - gone_since > idle_timeout_s:
                    raise
                log.warning("node unreachable; reconnecting and resuming after seq %d", last)
                time.sleep(0.5)
            finally:
                with in_use:
                    sub.close(linger=0)
                self._subs.pop(sub, None)

    def close(self) -> None:
        """Close this client's sockets and end its context.

        The SUB socket of an ``events()`` generator still held open but suspended (an exception in the loop body,
        a saved iterator) is closed here — ``Context.term`` had waited for ever on it. A socket another thread is
        polling right now (an events() loop, a request) is left to ``term``, which interrupts the poll (ETERM) so
        that thread closes it itself: a ZeroMQ socket is never closed under a thread using it. A generator resumed
        after this raises ``zmq.ZMQError`` once it needs the node again (events it had already fetched may still
        come first).

        One Client serves one thread at a time; ``close()`` is the one call that may come from another (twice is
        harmless)."""
        with self._closing:
            if not self.ctx.closed:
                self._close()

    def _close(self) -> None:
        if self._dealer is not None and self._dealer_use.acquire(blocking=False):
            try:
                if self._dealer is not None:
                    self._dealer.close(linger=0)
                    self._dealer = None
            finally:
                self._dealer_use.release()
        for sub, in_use in list(self._subs.items()):
            if in_use.acquire(blocking=False):
                try:
                    sub.close(linger=0)
                finally:
                    in_use.release()
        self.ctx.term()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reachable(bound: str, control: str) -> str:
    """A node bound to 0.0.0.0/* is reached at the host the control endpoint used."""
    bound_host = urlsplit(bound).hostname or ""
    if bound_host in ("0.0.0.0", "*", "::", ""):
        host = urlsplit(control).hostname or "127.0.0.1"
        port = bound.rsplit(":", 1)[-1]
        return f"tcp://{host}:{port}"
    return bound

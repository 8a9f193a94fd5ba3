"""The SDK ``Client``: talk to a node, and follow its events without gaps or duplicates.

``for event in client.events(since=seq)`` first replays what the store holds
after ``seq``, then continues live.  Every event carries the store's ``seq``:
anything at or below the last one delivered is a duplicate and is skipped; a
jump ahead (a dropped PUB message, a node restart) is filled from ``replay``
before the live event is delivered.  A node that sends neither events nor
heartbeats for ``dead_after_s`` is treated as gone: the client reconnects and
resumes from its last ``seq``.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import zmq

from bastion.edge.curve import apply_client, load_public
from bastion.edge.protocol import EVENT_TOPIC_PREFIX, HEARTBEAT_TOPIC, DetectionEvent, Heartbeat
from bastion.errors import BastionError

log = logging.getLogger(__name__)


class NodeUnavailable(BastionError):
    """The node did not answer in time (down, wrong address, or a CurveZMQ key it refuses)."""


class NodeRequestError(BastionError):
    """The node answered with an error."""


class Client:
    def __init__(self, control: str = "tcp://127.0.0.1:7701", events: str | None = None,
                 server_key: str | Path | None = None, client_key: Path | None = None,
                 timeout_s: float = 5.0, retries: int = 2, dead_after_s: float = 5.0) -> None:
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

    # -- request / reply ---------------------------------------------------------------------------------
    def _socket(self, kind: int, endpoint: str) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.linger = 0
        if self.server_key is not None:
            apply_client(sock, self.server_key, self.client_key)
        sock.connect(endpoint)
        return sock

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one control request; retries on a fresh socket (lazy pirate), then NodeUnavailable."""
        request_id = next(self._ids)
        payload = json.dumps({"op": op, "id": request_id, **fields}).encode()
        for attempt in range(self.retries + 1):
            if self._dealer is None:
                self._dealer = self._socket(zmq.DEALER, self.control_endpoint)
            self._dealer.send(payload)
            deadline = time.monotonic() + self.timeout_s
            while (left := deadline - time.monotonic()) > 0:
                if not self._dealer.poll(int(left * 1000)):
                    break
                answer = json.loads(self._dealer.recv())
                if answer.get("id") != request_id:
                    continue  # a late answer to an earlier, timed-out request
                if not answer.get("ok", False):
                    raise NodeRequestError(f"node refused {op}: {answer.get('error', 'unknown error')}")
                return answer
            self._dealer.close(linger=0)
            self._dealer = None
            log.debug("control request timed out", extra={"op": op, "attempt": attempt})
        hint = "is the node running? with CurveZMQ: are the server key and your client key right?"
        raise NodeUnavailable(f"no answer from {self.control_endpoint} to {op!r} in {self.timeout_s:.0f} s", hint)

    def status(self) -> dict[str, Any]:
        return self.request("status")["status"]

    def replay(self, since: int = 0, limit: int = 500) -> list[DetectionEvent]:
        answer = self.request("replay", since=since, limit=limit)
        return [DetectionEvent.model_validate(e) for e in answer["events"]]

    def ask_stream(self, prompt: str, max_new_tokens: int = 128) -> Iterator[str]:
        """The node's answer, piece by piece as it is generated."""
        first = self.request("ask", prompt=prompt, max_new_tokens=max_new_tokens)
        request_id = first["id"]
        answer = first
        while True:
            if answer.get("done"):
                return
            if answer.get("text"):
                yield answer["text"]
            if not self._dealer.poll(int(self.timeout_s * 1000)):
                raise NodeUnavailable(f"the node stopped answering mid-stream ({self.control_endpoint})")
            answer = json.loads(self._dealer.recv())
            if answer.get("id") != request_id:
                continue
            if not answer.get("ok", False):
                raise NodeRequestError(f"node refused ask: {answer.get('error', 'unknown error')}")

    def ask(self, prompt: str, max_new_tokens: int = 128) -> str:
        return "".join(self.ask_stream(prompt, max_new_tokens))

    def snapshot(self, seq: int) -> bytes:
        """The JPEG the node kept for event ``seq`` (decrypted by the node; CurveZMQ protects it in transit)."""
        import base64

        return base64.b64decode(self.request("snapshot", seq=seq)["jpeg_b64"])

    def reload(self, bundle: str) -> dict[str, Any]:
        return self.request("reload", bundle=bundle)

    # -- events ------------------------------------------------------------------------------------------
    def events_endpoint(self) -> str:
        if self._events_endpoint is None:
            bound = self.status()["endpoints"]["events"]
            self._events_endpoint = _reachable(bound, self.control_endpoint)
        return self._events_endpoint

    def _replay_all(self, since: int) -> Iterator[DetectionEvent]:
        while True:
            batch = self.replay(since)
            yield from batch
            if not batch:
                return
            since = batch[-1].seq

    def events(self, since: int | None = None, idle_timeout_s: float | None = None,
               duration_s: float | None = None) -> Iterator[DetectionEvent]:
        """Events after ``since`` (None: only new ones), replayed then live, each exactly once, in seq order.

        Raises NodeUnavailable if the node stays unreachable for ``idle_timeout_s`` (default: forever).
        Ends after ``duration_s`` seconds even when no event comes (default: never).
        """
        end = time.monotonic() + duration_s if duration_s is not None else None
        last = self.status()["last_seq"] if since is None else since
        gone_since: float | None = None
        while True:
            sub = self._socket(zmq.SUB, self.events_endpoint())
            sub.setsockopt(zmq.SUBSCRIBE, EVENT_TOPIC_PREFIX)
            sub.setsockopt(zmq.SUBSCRIBE, HEARTBEAT_TOPIC)
            try:
                for event in self._replay_all(last):  # subscribed first, so nothing falls between
                    last = event.seq
                    yield event
                gone_since = None
                heard = time.monotonic()
                while end is None or time.monotonic() < end:
                    if not sub.poll(200):
                        if time.monotonic() - heard > self.dead_after_s:
                            raise NodeUnavailable("no heartbeat from the node")
                        continue
                    topic, payload = sub.recv_multipart()
                    heard = time.monotonic()
                    if topic == HEARTBEAT_TOPIC:
                        ahead = Heartbeat.model_validate_json(payload).last_seq
                    else:
                        event = DetectionEvent.model_validate_json(payload)
                        ahead = event.seq - 1
                    if ahead > last:  # we missed something: fill the gap from the store
                        for missed in self._replay_all(last):
                            if missed.seq > ahead:
                                break
                            last = missed.seq
                            yield missed
                    if topic != HEARTBEAT_TOPIC and event.seq > last:
                        last = event.seq
                        yield event
                return  # duration_s is over
            except NodeUnavailable:
                now = time.monotonic()
                gone_since = gone_since or now
                if idle_timeout_s is not None and now - gone_since > idle_timeout_s:
                    raise
                log.warning("node unreachable; reconnecting and resuming after seq %d", last)
                time.sleep(0.5)
            finally:
                sub.close(linger=0)

    def close(self) -> None:
        if self._dealer is not None:
            self._dealer.close(linger=0)
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

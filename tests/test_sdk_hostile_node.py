"""The SDK against a hostile or broken node (#15 adversarial pass): whatever a fake node on 127.0.0.1 publishes or
answers, the integrator's program sees SDK exceptions (``BastionError``) or its events exactly once in seq order —
never a ValueError, KeyError or pydantic ValidationError from inside the SDK."""

from __future__ import annotations

import json
import threading

import pytest
import zmq

from bastion.edge.client import MAX_EVENT_BYTES, Client, NodeRequestError
from bastion.edge.protocol import HEARTBEAT_TOPIC, DetectionEvent

NODE = "fake-node"


def _event(seq: int, detections: int = 0) -> dict:
    item = {"cls": 0, "name": "person", "conf": 0.9, "box": [1.0, 2.0, 3.0, 4.0]}
    return DetectionEvent(
        seq=seq, node=NODE, source="cam", ts=1.0, frame=seq, model="m" * 64, detections=[item] * detections
    ).model_dump()


class FakeNode:
    """A ROUTER answering ``status``/``replay``/``snapshot`` from plain dicts, and a PUB sending ``published``
    (a list of multipart messages) over and over until stopped: real sockets, hostile content."""

    def __init__(
        self,
        store: list[dict],
        published: list[list[bytes]],
        status: object = None,
        answers: dict[str, dict] | None = None,
    ) -> None:
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.pub = self.ctx.socket(zmq.PUB)
        for sock in (self.router, self.pub):
            sock.linger = 0
        self.control = f"tcp://127.0.0.1:{self.router.bind_to_random_port('tcp://127.0.0.1')}"
        self.events = f"tcp://127.0.0.1:{self.pub.bind_to_random_port('tcp://127.0.0.1')}"
        last = store[-1]["seq"] if store else 0
        self.store, self.published, self.answers = store, published, answers or {}
        self.status = status if status is not None else {"node": NODE, "last_seq": last}
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._serve, daemon=True),
            threading.Thread(target=self._publish, daemon=True),
        ]

    def _serve(self) -> None:
        while not self.stop.is_set():
            if not self.router.poll(50):
                continue
            ident, raw = self.router.recv_multipart()
            request = json.loads(raw)
            op, rid = request["op"], request["id"]
            if op in self.answers:
                answer = {"id": rid, **self.answers[op]}
            elif op == "status":
                answer = {"id": rid, "ok": True, "status": self.status}
            elif op == "replay":
                events = [e for e in self.store if e["seq"] > request["since"]]
                answer = {"id": rid, "ok": True, "events": events}
            else:
                answer = {"id": rid, "ok": False, "error": "unknown op"}
            self.router.send_multipart([ident, json.dumps(answer).encode()])

    def _publish(self) -> None:
        while not self.stop.wait(0.02):
            for message in self.published:
                self.pub.send_multipart(message)

    def __enter__(self) -> "FakeNode":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=5)
        self.router.close()
        self.pub.close()
        self.ctx.term()


def _follow(node: FakeNode, seconds: float = 1.5) -> tuple[list[int], Client]:
    client = Client(node.control, events=node.events, timeout_s=3, retries=0, dead_after_s=5)
    try:
        return [e.seq for e in client.events(since=0, duration_s=seconds)], client
    finally:
        client.close()


def _heartbeat(last_seq: int) -> list[bytes]:
    return [HEARTBEAT_TOPIC, json.dumps({"node": NODE, "ts": 1.0, "last_seq": last_seq}).encode()]


@pytest.mark.parametrize(
    "hostile",
    [
        [b"det.cam", b"a", b"third frame"],  # was: ValueError (too many values to unpack)
        [b"det.cam"],  # one frame
        [b"det.cam", b"not json"],  # was: pydantic ValidationError
        [b"det.cam", json.dumps({"seq": "x"}).encode()],
        [b"det.cam", b"[" * 50_000],
        [HEARTBEAT_TOPIC, b"{}"],  # a heartbeat without fields
        [HEARTBEAT_TOPIC, json.dumps({"node": NODE, "ts": 1, "last_seq": [1]}).encode()],
    ],
    ids=["3-frames", "1-frame", "not-json", "bad-seq", "nested", "empty-heartbeat", "bad-heartbeat"],
)
def test_a_malformed_published_message_is_skipped_counted_and_events_still_come_once(hostile):
    store = [_event(1), _event(2)]
    with FakeNode(store, [hostile, [b"det.cam", json.dumps(store[0]).encode()], hostile, _heartbeat(2)]) as node:
        delivered, client = _follow(node)
    assert delivered == [1, 2]  # exactly once, in order: the store's copies
    assert client.skipped_messages > 0


def test_a_malformed_event_with_a_seq_is_filled_from_the_store_not_lost():
    """Only the live copy of event 2 is broken (and no heartbeat ever says 2 exists): its seq alone makes the
    client fetch event 2 from the store, so an event is never silently skipped."""
    store = [_event(1), _event(2)]
    broken = dict(store[1], detections="garbage")
    with FakeNode(store, [[b"det.cam", json.dumps(broken).encode()]]) as node:
        node.status = {"node": NODE, "last_seq": 0}
        client = Client(node.control, events=node.events, timeout_s=3, retries=0, dead_after_s=5)
        try:
            delivered = [e.seq for e in client.events(duration_s=1.5)]
        finally:
            client.close()
    assert delivered == [1, 2]
    assert client.skipped_messages > 0


def test_a_published_message_over_the_bound_is_dropped_unread():
    store = [_event(1)]
    huge = _event(2, detections=MAX_EVENT_BYTES // 60)  # a valid event, but larger than any node sends
    assert len(json.dumps(huge)) > MAX_EVENT_BYTES
    with FakeNode(store, [[b"det.cam", json.dumps(huge).encode()], _heartbeat(1)]) as node:
        delivered, _ = _follow(node)
    assert delivered == [1]  # event 2 exists nowhere but in the dropped message


@pytest.mark.parametrize(
    "answer, call",
    [
        ({"ok": True}, "status"),  # was: KeyError 'status'
        ({"ok": True, "status": []}, "status"),
        ({"ok": True, "status": {"node": NODE}}, "status"),  # no last_seq
        ({"ok": True, "status": {"node": NODE, "last_seq": "7"}}, "status"),
        ({"ok": True, "status": {"node": NODE, "last_seq": 0, "audit": {"count": "x", "head": 1}}}, "status"),
        ({"ok": True}, "replay"),  # was: KeyError 'events'
        ({"ok": True, "events": [{"seq": 1}]}, "replay"),  # was: pydantic ValidationError
        ({"ok": True, "events": 5}, "replay"),
        ({"ok": True}, "snapshot"),  # was: KeyError 'jpeg_b64'
        ({"ok": True, "jpeg_b64": "*not base64*"}, "snapshot"),
        ({"ok": True, "status": {"node": NODE, "last_seq": 0}}, "events_endpoint"),  # no endpoints
    ],
)
def test_an_answer_missing_or_mistyping_a_field_is_one_sdk_error(answer, call):
    op = {"events_endpoint": "status"}.get(call, call)
    with FakeNode([], [], answers={op: answer}) as node:
        client = Client(node.control, timeout_s=3, retries=0)
        try:
            with pytest.raises(NodeRequestError, match="node's answer to"):
                {
                    "status": client.status,
                    "replay": client.replay,
                    "snapshot": lambda: client.snapshot(1),
                    "events_endpoint": client.events_endpoint,
                }[call]()
        finally:
            client.close()


def test_a_malformed_event_in_the_store_is_raised_not_skipped():
    """The store is the source of truth: an event it returns that does not validate cannot be replaced by another
    copy, so it stops the iteration with one SDK error naming its seq rather than vanish."""
    with FakeNode([{"seq": 1, "node": NODE}], [_heartbeat(1)]) as node:
        client = Client(node.control, events=node.events, timeout_s=3, retries=0)
        try:
            with pytest.raises(NodeRequestError, match="node's answer to replay"):
                list(client.events(since=0, duration_s=1))
        finally:
            client.close()

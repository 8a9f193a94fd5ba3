"""The control protocol as one typed request per op, dispatched by a table, and the slow ops off the control thread
(#16 item 7, #18 item 5): a real node on 127.0.0.1, its real language model held mid-answer by the test."""

import json
import threading
import time

import pytest
import zmq

from bastion.edge.client import Client, NodeRequestError
from bastion.edge.control_ops import HANDLERS
from bastion.edge.protocol import OPS, AskRequest, ProtocolError, ReplayRequest, parse_request
from test_node import running_node

WAIT_MS = 10_000  # how long a test waits for an answer before it calls the node stuck (not a speed check)


def test_every_op_the_protocol_accepts_has_one_handler_and_no_handler_is_unreachable():
    assert set(HANDLERS) == set(OPS) == {"ping", "status", "replay", "reload", "snapshot", "clip", "ask"}


@pytest.mark.parametrize(
    "request_,says",
    [
        ({"op": "status", "since": 3}, "status: since: Extra inputs are not permitted"),  # another op's field
        ({"op": "ping", "prompt": "hi"}, "ping: prompt: Extra inputs"),
        ({"op": "replay", "bundle": "x"}, "replay: bundle: Extra inputs"),
        ({"op": "reload"}, "reload: bundle: Field required"),
        ({"op": "reload", "bundle": ""}, "reload: bundle: String should have at least 1 character"),
        ({"op": "snapshot"}, "snapshot: seq: Field required"),
        ({"op": "ask"}, "ask: prompt: Field required"),
        ({"op": "ask", "prompt": "x", "max_new_tokens": 0}, "ask: max_new_tokens: Input should be greater"),
        ({"op": "replay", "limit": 5001}, "replay: limit: Input should be less than or equal to 5000"),
        (
            {"op": "nope", "id": 4},
            'request has an unknown op "nope"; ops: ask, clip, ping, reload, replay, snapshot, status',
        ),
        ({"op": ["x"] * 10_000}, "request has an unknown op list; ops:"),
        ({"id": 5}, "request has no 'op'; ops:"),
    ],
)
def test_each_op_takes_only_its_own_bounded_fields_and_says_which_in_one_line(request_, says):
    with pytest.raises(ProtocolError) as caught:
        parse_request(json.dumps(request_).encode())
    assert str(caught.value).startswith(says) and len(str(caught.value)) <= 201, str(caught.value)
    assert caught.value.request_id == request_.get("id")


def test_a_request_parses_into_its_op_type_with_the_defaults_of_version_1():
    replay = parse_request(b'{"op": "replay", "id": "r"}')
    assert isinstance(replay, ReplayRequest) and (replay.since, replay.limit, replay.id) == (0, 500, "r")
    ask = parse_request(b'{"op": "ask", "prompt": "hi"}')
    assert isinstance(ask, AskRequest) and ask.max_new_tokens == 128


def test_what_the_sdk_sends_for_each_op_is_what_the_node_parses():
    """The wire stays version 1: every request the SDK's Client makes validates as its op's own type."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    sent: list[bytes] = []

    def fake_node():
        while router.poll(3000):
            identity, payload = router.recv_multipart()
            sent.append(payload)
            router.send_multipart([identity, json.dumps({"v": 1, "id": None, "ok": False, "error": "x"}).encode()])

    server = threading.Thread(target=fake_node, daemon=True)
    server.start()
    calls = {
        "ping": lambda c: c.request("ping"),
        "status": lambda c: c.status(),
        "replay": lambda c: c.replay(since=7, limit=9),
        "snapshot": lambda c: c.snapshot(3),
        "clip": lambda c: c.clip(4),
        "reload": lambda c: c.reload("yolov5n"),
        "reload (downgrade)": lambda c: c.reload("yolov5n", allow_downgrade=True),
        "ask": lambda c: list(c.ask_stream("hello", max_new_tokens=5)),
    }
    try:
        with Client(f"tcp://127.0.0.1:{port}", timeout_s=3, retries=0) as client:
            for call in calls.values():
                with pytest.raises(NodeRequestError, match="node refused"):
                    call(client)
    finally:
        server.join()
        router.close()
        ctx.term()
    parsed = [parse_request(raw) for raw in sent]
    assert [r.op for r in parsed] == [name.split()[0] for name in calls]
    assert parsed[2].since == 7 and parsed[4].seq == 4 and parsed[4].offset == 0
    assert parsed[6].allow_downgrade and parsed[7].prompt == "hello"


class _HeldGenerator:
    """The node's real language model, held after its first piece until the test lets it go on."""

    def __init__(self, real) -> None:
        self.real = real
        self.held = threading.Event()
        self.release = threading.Event()
        self.log: list[tuple[str, str]] = []

    def generate(self, prompt, max_new_tokens=None):
        self.log.append(("start", prompt))
        for i, piece in enumerate(self.real.generate(prompt, max_new_tokens)):
            yield piece
            if i == 0 and not self.release.is_set():
                self.held.set()
                self.release.wait(30)
        self.log.append(("end", prompt))

    def close(self) -> None:
        self.real.close()


def _dealer(ctx, endpoint):
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    return sock


def _send(sock, message: dict) -> None:
    sock.send(json.dumps(message).encode())


def _next(sock, what: str) -> dict:
    assert sock.poll(WAIT_MS), f"no answer to {what}"
    return json.loads(sock.recv())


def _eventually(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _until_done(sock, what: str) -> tuple[list[str], dict]:
    pieces = []
    while not (answer := _next(sock, what)).get("done"):
        assert answer["ok"], answer
        if "text" in answer:
            pieces.append(answer["text"])
    return pieces, answer


def test_status_replay_and_reload_are_answered_while_an_ask_streams_and_asks_queue_then_get_busy(tmp_path):
    with running_node(tmp_path, lm="stories260K", lm_queue=1) as node:
        lm = node.generator = _HeldGenerator(node.generator)
        ctx = zmq.Context()
        asker, waiter, late, other = (_dealer(ctx, node.server.control_endpoint) for _ in range(4))
        try:
            _send(asker, {"op": "ask", "id": "a", "prompt": "Once upon a time", "max_new_tokens": 20})
            first = _next(asker, "the first ask")
            assert first["ok"] and first["text"] and not first["done"]
            assert lm.held.wait(WAIT_MS / 1000)  # the answer is now held half-way

            for i, request in enumerate(({"op": "status"}, {"op": "replay", "since": 0}, {"op": "ping"})):
                _send(other, {**request, "id": i})
                assert _next(other, request["op"])["ok"], request  # answered while the ask is mid-stream
            _send(other, {"op": "reload", "id": "r", "bundle": "/no/such/bundle"})
            assert "reload refused" in _next(other, "reload")["error"]

            _send(waiter, {"op": "ask", "id": "b", "prompt": "The dog", "max_new_tokens": 5})
            queued = _next(waiter, "the second ask")
            assert queued == {"v": 1, "id": "b", "ok": True, "done": False, "queued": 1}
            _send(late, {"op": "ask", "id": "c", "prompt": "The cat", "max_new_tokens": 5})
            busy = _next(late, "the third ask")
            assert busy["id"] == "c" and busy["busy"] and not busy["ok"]
            assert busy["error"].startswith("busy:") and "lm_queue: 1" in busy["error"]
            assert lm.log == [("start", "Once upon a time")]  # all of this while the first answer was held
            _send(other, {"op": "status", "id": "s"})
            lanes = _next(other, "status")["status"]["lanes"]
            assert lanes["lm"] == {"running": True, "waiting": 1, "depth": 1, "done": 0}, lanes

            lm.release.set()
            rest, done = _until_done(asker, "the first ask")
            assert done["ok"] and done["tokens"] == 1 + len(rest)
            pieces, done_b = _until_done(waiter, "the second ask")
            assert done_b["ok"] and done_b["tokens"] == len(pieces) > 0
        finally:
            lm.release.set()
            for sock in (asker, waiter, late, other):
                sock.close()
            ctx.term()
    assert lm.log == [
        ("start", "Once upon a time"),
        ("end", "Once upon a time"),
        ("start", "The dog"),
        ("end", "The dog"),
    ]
    asks = [json.loads(x) for x in (tmp_path / "data" / "audit.log").read_text().splitlines()]
    assert [r["fields"]["tokens_out"] for r in asks if r["kind"] == "ask"] == [done["tokens"], done_b["tokens"]]


def test_a_reload_unpacks_and_verifies_its_bundle_off_the_control_thread(tmp_path):
    with running_node(tmp_path) as node:
        real_load, loading, release = node._load_detector, threading.Event(), threading.Event()

        def held_load(*args, **kwargs):
            loading.set()
            release.wait(30)
            return real_load(*args, **kwargs)

        node._load_detector = held_load
        ctx = zmq.Context()
        reloader, second, third, other = (_dealer(ctx, node.server.control_endpoint) for _ in range(4))
        try:
            _send(reloader, {"op": "reload", "id": 1, "bundle": "yolov5n"})
            assert loading.wait(WAIT_MS / 1000)
            _send(other, {"op": "status", "id": 2})
            assert _next(other, "status")["ok"]  # answered while the bundle is loading
            assert not reloader.poll(0)  # and the reload has not answered yet
            for sock in (second, third):  # one waits behind the running reload, the other is told busy
                _send(sock, {"op": "reload", "id": 3, "bundle": "yolov5n"})
            poller = zmq.Poller()
            poller.register(second, zmq.POLLIN)
            poller.register(third, zmq.POLLIN)
            ready = dict(poller.poll(WAIT_MS))
            assert len(ready) == 1, "one of the two reloads must be answered at once, the other must wait"
            told, waits = (second, third) if second in ready else (third, second)
            busy = _next(told, "a reload beyond the queue")
            assert busy["busy"] and busy["error"].startswith("busy: a reload is running")
            release.set()
            for sock in (reloader, waits):
                answer = _next(sock, "reload")
                assert answer["ok"] and answer["model"]["name"] == "yolov5n", answer
        finally:
            release.set()
            for sock in (reloader, second, third, other):
                sock.close()
            ctx.term()


def test_the_sdk_keeps_waiting_for_an_ask_queued_longer_than_its_timeout(tmp_path):
    """A queued ask hears "queued" every second, so an SDK client with a 2 s timeout waits its turn, then streams."""
    with running_node(tmp_path, lm="stories260K") as node:
        lm = node.generator = _HeldGenerator(node.generator)
        ctx = zmq.Context()
        asker = _dealer(ctx, node.server.control_endpoint)
        answer: list = []
        try:
            _send(asker, {"op": "ask", "id": "a", "prompt": "Once upon a time", "max_new_tokens": 8})
            assert _next(asker, "the first ask")["text"] and lm.held.wait(WAIT_MS / 1000)
            with Client(node.server.control_endpoint, timeout_s=2, retries=0) as client:

                def ask():
                    try:
                        answer.append(client.ask("The dog", max_new_tokens=5))
                    except Exception as exc:
                        answer.append(exc)

                waiter = threading.Thread(target=ask)
                waiter.start()
                assert _eventually(lambda: node.server.lanes["lm"].waiting(), WAIT_MS / 1000)
                time.sleep(4.5)  # held past the client's 2 s timeout, twice over
                lm.release.set()
                waiter.join(WAIT_MS / 1000)
            assert _until_done(asker, "the first ask")[1]["ok"]
        finally:
            lm.release.set()
            asker.close()
            ctx.term()
    assert answer and isinstance(answer[0], str) and answer[0], f"the queued ask gave up while it waited: {answer}"
    assert lm.log[-2:] == [("start", "The dog"), ("end", "The dog")]


def test_replay_pages_cross_store_chunks_without_losing_or_repeating_an_event(tmp_path):
    from test_hardening_control import _stored_events_and_no_source

    quiet = _stored_events_and_no_source(tmp_path, events=130, boxes=1)  # more than two of the store reads a page makes
    with running_node(tmp_path, sources=quiet) as node:
        ctx = zmq.Context()
        sock = _dealer(ctx, node.server.control_endpoint)
        try:
            pages = []
            for since, limit in ((0, 120), (120, 50), (0, 5000), (130, 1)):
                _send(sock, {"op": "replay", "id": since, "since": since, "limit": limit})
                answer = _next(sock, "replay")
                pages.append(([e["seq"] for e in answer["events"]], answer["more"], answer["last_seq"]))
        finally:
            sock.close()
            ctx.term()
    assert pages == [
        (list(range(1, 121)), True, 130),  # the limit reached: ask again after 120
        (list(range(121, 131)), False, 130),
        (list(range(1, 131)), False, 130),
        ([], False, 130),
    ]


def test_a_replay_page_of_large_events_reads_only_about_what_it_sends(tmp_path):
    from test_hardening_control import _stored_events_and_no_source

    quiet = _stored_events_and_no_source(tmp_path, events=300, boxes=300)  # ~30 KB each: ~140 fill a 4 MB page
    with running_node(tmp_path, sources=quiet) as node:
        rows_since, read = node.store.rows_since, []

        def counted(since, limit):  # every stored row replay reads goes through rows_since (edge/events_v2.py)
            rows = rows_since(since, limit)
            read.extend(row[0] for row in rows)
            return rows

        node.store.rows_since = counted
        ctx = zmq.Context()
        sock = _dealer(ctx, node.server.control_endpoint)
        try:
            _send(sock, {"op": "replay", "id": 1, "since": 0, "limit": 500})
            answer = _next(sock, "replay")
        finally:
            sock.close()
            ctx.term()
    sent = [e["seq"] for e in answer["events"]]
    assert answer["more"] and sent == list(range(1, len(sent) + 1)) and 100 < len(sent) < 300
    assert sorted(set(read)) == read and len(read) < len(sent) + 60, (len(read), len(sent))  # not all 300

"""Request fields are strict types (#18 review): a number field takes a JSON integer only — never ``"5"``, ``5.0``
or ``true``, which pydantic's lax mode coerced to 5 (or 1) — a flag ``true``/``false`` only, a text field a
string. Each op with a bad-typed field, sent over a real node's control socket, is one line naming the op and the
field, echoing the request id (#15 item 8), and the same request with the right type is not refused for it."""

import json

import pytest
import zmq

from bastion.edge.client import NodeRequestError
from bastion.edge.snapshots import generate_key_file
from bastion.errors import ConfigError
from test_node import client_for, running_node

# (op, the rest of a valid request, the field, a right value, what pydantic says of a wrong one, wrong values)
NUMBER = "Input should be a valid integer"
FIELDS = [
    ("replay", {}, "since", 0, NUMBER, ["5", 5.0, True]),
    ("replay", {}, "limit", 5, NUMBER, ["5", 5.0, True]),
    ("replay", {}, "v", 2, NUMBER, ["2", 2.0, True]),
    ("snapshot", {}, "seq", 1, NUMBER, ["1", 1.0, True]),
    ("clip", {}, "seq", 1, NUMBER, ["1", 1.0, True]),
    ("clip", {"seq": 1}, "offset", 0, NUMBER, ["0", 0.0, False]),
    ("ask", {"prompt": "hi"}, "max_new_tokens", 4, NUMBER, ["4", 4.0, True]),
    ("ask", {}, "prompt", "hi", "Input should be a valid string", [5, ["hi"]]),
    ("reload", {"bundle": "/nowhere"}, "allow_downgrade", False, "Input should be a valid boolean", [0, "false"]),
    ("reload", {"bundle": "/nowhere"}, "persist", False, "Input should be a valid boolean", [0, "false"]),
    ("reload", {}, "bundle", "/nowhere", "Input should be a valid string", [5]),
]
CASES = [(op, rest, field, bad, says) for op, rest, field, _, says, bads in FIELDS for bad in bads]


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("strict")
    key = generate_key_file(tmp_path / "snapshot.key")
    storage = {"dir": str(tmp_path / "data"), "snapshots": True, "snapshot_key": str(key)}
    with running_node(tmp_path, storage=storage, control_burst=1000, control_rate_per_s=1000) as started:
        yield started


@pytest.fixture(scope="module")
def dealer(node):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(node.server.control_endpoint)
    yield sock
    sock.close()
    ctx.term()


def ask(sock, request):
    sock.send(json.dumps(request).encode())
    assert sock.poll(5000), "the node did not answer"
    return json.loads(sock.recv())


@pytest.mark.parametrize(("op", "rest", "field", "bad", "says"), CASES, ids=[f"{c[0]}-{c[2]}-{c[3]!r}" for c in CASES])
def test_a_bad_typed_field_is_one_line_that_names_it_and_echoes_the_id(dealer, op, rest, field, bad, says):
    answer = ask(dealer, {"op": op, "id": f"r-{field}", **rest, field: bad})
    assert answer["ok"] is False and answer["id"] == f"r-{field}", answer
    assert answer["error"] == f"{op}: {field}: {says}", answer


@pytest.mark.parametrize(
    ("op", "rest", "field", "good"), [f[:4] for f in FIELDS], ids=[f"{f[0]}-{f[2]}" for f in FIELDS]
)
def test_the_right_type_is_not_refused_for_its_type(dealer, op, rest, field, good):
    answer = ask(dealer, {"op": op, "id": 7, **rest, field: good})
    assert answer["id"] == 7 and "Input should be" not in answer.get("error", ""), answer


def test_the_sdk_sends_integers_and_a_caller_string_is_the_nodes_one_line(node):
    client = client_for(node)
    try:
        assert client.replay(0, 3) is not None
        with pytest.raises(NodeRequestError, match="this node keeps no clips"):
            client.clip(1)  # seq and offset went as ints: parsed, then refused for what the node has
        with pytest.raises(ConfigError, match="seq='1' is not an event seq"):
            client.snapshot("1")  # the caller's mistake, said before anything is sent
        with pytest.raises(NodeRequestError, match="snapshot: seq: Input should be a valid integer"):
            client.request("snapshot", seq="1")  # sent anyway (another SDK): the node's one line
    finally:
        client.close()

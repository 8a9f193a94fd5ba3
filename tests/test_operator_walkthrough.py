"""Issue #18 the way a new operator meets it, from the docs only: `bastion node init`, then clips, an MQTT sink to
a real Mosquitto and metrics turned on by uncommenting the example's own lines; the node run on the vendored
person clip; `node status`, `node tail`, a Prometheus scrape, an MQTT subscriber and `node clip`; the broker
killed and started again. And the slips that walk-through found: each one line at config load (or a sink.error),
never a crash, never a lost event."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest

from bastion.cli import main
from bastion.edge.client import Client
from bastion.edge.config import load_config
from bastion.edge.node import Node
from bastion.edge.sink_base import MAX_SECRET_BYTES, SinkError, read_secret
from bastion.errors import ConfigError
from conftest import REPO
from test_sinks import MOSQUITTO, MqttListener, wait_for
from test_sinks import mosquitto as mosquitto  # a fixture: pytest finds it by name

SOURCES = [{"name": "cam", "uri": "/tmp"}]


# -- slips an operator makes in node.yaml ----------------------------------------------------------------------
SLIPS = [  # what an operator writes, what the one line must say
    ({"zones": [{"name": "z", "points": [[0, 0], [1, 0], [1, 1], [0, 0]]}]}, "point 4 repeats point 1 (a zone closes"),
    ({"zones": [{"name": "z", "points": [[0, 0], [1, 0], [1, 0], [1, 1]]}]}, "point 3 repeats point 2"),
    ({"zones": [{"name": "z", "points": [[0, 0], [1, 0], [1, 1]], "classes": []}]}, "classes: [] counts no class"),
    ({"lines": [{"name": "l", "a": [-0.1, 0.5], "b": [1.5, 0.5]}]}, "line point (-0.1, 0.5) lies outside [0, 1]"),
    ({"lines": [{"name": "l", "a": [0.5, 0.1], "b": [0.5, float("nan")]}]}, "finite number"),
]


@pytest.mark.parametrize(("objects", "says"), SLIPS, ids=[s for _, s in SLIPS])
def test_a_rule_an_operator_gets_wrong_is_one_line_that_names_the_slip(objects, says):
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"sources": SOURCES, "objects": objects})
    assert says in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


NODE_RUN_SLIPS = [  # the issue's bad input, met where an operator meets it: `bastion node run`, before anything runs
    (
        {"sinks": [{"type": "kafka"}]},
        "'kafka' found using 'type' does not match any of the expected tags: 'mqtt', 'nats'",
    ),
    ({"objects": {"zones": [{"name": "z", "points": [[0, 0], [1, 1], [1, 0], [0, 1]]}]}}, "intersects itself"),
    ({"objects": {"zones": [{"name": "z", "points": [[0, 0], [1.5, 0], [1, 1]]}]}}, "lies outside [0, 1]"),
    ({"objects": {"lines": [{"name": "l", "a": [0.2, 0.2], "b": [0.2, 0.2]}]}}, "line 'l' has zero length"),
    ({"metrics": "0.0.0.0:9108"}, "beyond loopback and metrics are not authenticated"),
]


@pytest.mark.parametrize(("extra", "says"), NODE_RUN_SLIPS, ids=[s for _, s in NODE_RUN_SLIPS])
def test_node_run_with_the_issues_bad_input_exits_1_with_one_line(tmp_path, capsys, extra, says):
    (tmp_path / "node.yaml").write_text(json.dumps({"sources": [{"name": "cam", "uri": str(tmp_path)}], **extra}))
    assert main(["node", "run", "--config", str(tmp_path / "node.yaml")]) == 1
    raw = capsys.readouterr().err
    err = " ".join(raw.split())
    assert err.startswith("error: node config") and says in err and len(raw.strip().splitlines()) == 1, raw
    assert not (tmp_path / "node-data").exists()  # refused before anything was made


def test_a_password_file_that_holds_no_password_is_one_line_not_a_sink_that_reads_forever(tmp_path):
    assert read_secret(None) is None
    (tmp_path / "pw").write_text("s3cret\n")
    assert read_secret(tmp_path / "pw") == "s3cret"
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "log").write_bytes(b"x" * (MAX_SECRET_BYTES + 1))
    for path, says in [
        ("/dev/zero", "is not a regular file"),  # once read whole: the sink thread never came back
        (tmp_path / "log", f"is over {MAX_SECRET_BYTES} bytes"),
        (tmp_path / "binary", "is not UTF-8 text"),
        (tmp_path / "missing", "cannot read the password file"),
    ]:
        with pytest.raises(SinkError, match=re.escape(says)):
            read_secret(path)


@pytest.mark.parametrize("since", [2**63, 2**64, -1, True, "5"])
def test_events_since_no_node_can_hold_is_the_callers_mistake_and_leaves_the_client_usable(since):
    client = Client("tcp://127.0.0.1:1", timeout_s=0.2, retries=0)  # nothing is asked: no node needed
    try:
        with pytest.raises(ConfigError, match="is not a seq"):
            next(client.events(since=since))
        assert not client._seq.high  # not taken as a bookmark: the client is not left refusing every answer
    finally:
        client.close()


@pytest.mark.parametrize("seq", [0, -3, 2**63, True, "7", 7.0, None])
def test_a_snapshot_or_clip_of_no_event_seq_is_the_callers_mistake_before_anything_is_sent(seq):
    client = Client("tcp://127.0.0.1:1", timeout_s=0.2, retries=0)  # nothing is asked: no node needed
    try:
        for fetch in (client.snapshot, client.clip):
            with pytest.raises(ConfigError, match="is not an event seq"):
                fetch(seq)
    finally:
        client.close()


def test_any_integer_type_is_an_event_seq_and_a_long_bad_one_is_shown_cut_in_one_line():
    import numpy as np

    from bastion.edge.client_events import check_event_seq

    assert check_event_seq(np.int64(5), "snapshot") == 5 and type(check_event_seq(np.int64(5), "clip")) is int
    with pytest.raises(ConfigError) as refused:
        check_event_seq("x" * 10_000, "snapshot")
    assert "seq='xxxxx" in str(refused.value) and "…" in str(refused.value) and len(str(refused.value)) < 200


# -- the walk-through --------------------------------------------------------------------------------------------
def operator_config(tmp_path, mqtt_port: int):
    """`node init`'s example with its commented clips, sinks and metrics lines turned on, as docs and comments say."""
    assert main(["node", "init", "--out", str(tmp_path / "node.yaml")]) == 0
    assert main(["node", "snapshot-key", "--out", str(tmp_path / "keys" / "snapshot.key")]) == 0
    text = (tmp_path / "node.yaml").read_text()
    for key in ("snapshot_key", "clips", "clip_pre_s", "clip_post_s"):
        text, n = re.subn(rf"^  # ({key}:)", r"  \1", text, flags=re.M)
        assert n == 1, key
    text, n = re.subn(r"^# (sinks:.*\n)# ( +- type: mqtt.*\n)# ( +host: .*\n)", r"\1\2\3", text, flags=re.M)
    assert n == 1, "the example's mqtt sink"
    text = text.replace("    host: 127.0.0.1\n", f"    host: 127.0.0.1\n    port: {mqtt_port}\n    backoff_max_s: 1\n")
    text, n = re.subn(r"^# (metrics: )127\.0\.0\.1:9108", r"\g<1>127.0.0.1:0", text, flags=re.M)
    assert n == 1, "the example's metrics line"
    text = text.replace("tcp://127.0.0.1:7700", "tcp://127.0.0.1:*").replace(
        "tcp://127.0.0.1:7701", "tcp://127.0.0.1:*"
    )
    text = text.replace("realtime: true", "realtime: false")  # as fast as the model goes: the test stays short
    text = text.replace("clip_pre_s: 3", "clip_pre_s: 1").replace("clip_post_s: 3", "clip_post_s: 1")
    (tmp_path / "node.yaml").write_text(text)
    config = load_config(tmp_path / "node.yaml")
    config.imgsz, config.threads = 320, 1
    return config


def said(capsys) -> str:
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.slow
@pytest.mark.skipif(MOSQUITTO is None, reason="no mosquitto binary (apt-get install mosquitto)")
def test_an_operator_walks_issue_18_from_the_docs_and_every_seq_reaches_mqtt_across_a_broker_restart(
    tmp_path, mosquitto, capsys
):
    broker = mosquitto()
    listener = MqttListener.connected(broker.port)
    node = Node(operator_config(tmp_path, broker.port))
    node.start()
    client = Client(node.server.control_endpoint, timeout_s=10)
    control = ["--control", node.server.control_endpoint]
    try:
        cross = wait_for(lambda: next((e.seq for e in client.replay(0, 5000) if e.kind == "line.cross"), None), 90)
        wait_for(lambda: not node.clips.recording(cross), 30, "the clip of the line.cross")

        assert main(["node", "status", *control]) == 0
        shown = said(capsys)
        assert "sink mqtt (mqtt) connected" in shown and "clips: recording" in shown, shown
        metrics_url = re.search(r"metrics: (http://\S+/metrics)", shown).group(1)  # where to point Prometheus
        scraped = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
        table = (REPO / "docs" / "bridges.md").read_text().split("## Metrics", 1)[1]
        families = set(re.findall(r"^# TYPE (bastion_\w+) ", scraped, flags=re.M))
        assert {"bastion_up", "bastion_sink_connected", "bastion_clips_recorded_total"} <= families, families
        undocumented = {f for f in families if f"`{f}`" not in table}  # spelled out: an operator greps for it
        assert not undocumented, f"docs/bridges.md's metrics table lacks {undocumented}"

        assert main(["node", "tail", *control, "--since", "0", "--duration", "0.5", "--json"]) == 0
        kinds = {json.loads(line)["kind"] for line in capsys.readouterr().out.splitlines()}
        assert {"object.new", "zone.enter", "line.cross"} <= kinds, kinds
        ahead = client.status()["last_seq"] + 10_000  # a typo, or a bookmark from before the store went back
        assert main(["node", "tail", *control, "--since", str(ahead), "--duration", "0.5"]) == 1
        assert f"--since {ahead} is past the node's last event" in " ".join(capsys.readouterr().err.split())

        assert main(["node", "clip", str(cross), "--out", f"{tmp_path / 'evidence'}/", "--json", *control]) == 0
        meta = json.loads(capsys.readouterr().out)
        assert meta["kind"] == "line.cross" and (tmp_path / "evidence" / f"clip-{cross}.avi").stat().st_size > 0

        broker.kill()  # kill -9: the sink retries, the node goes on, the events wait in its store
        sink = wait_for(lambda: (s := client.status()["sinks"]["mqtt"])["state"] == "retrying" and s, 30, "retrying")
        acked = sink["cursor"]  # all the broker acknowledged before it died; what follows must all arrive
        wait_for(lambda: client.status()["last_seq"] > acked, 60, "events while the broker is down")
        broker.start()
        last = client.status()["last_seq"]
        wait_for(lambda: client.status()["sinks"]["mqtt"]["cursor"] >= last, 60, "the backlog after the restart")
        wait_for(lambda: set(range(acked + 1, last + 1)) <= set(listener.seqs), 30, "every seq at the subscriber")
        after = [s for s in listener.seqs if s > acked]
        assert sorted(set(after)) == [s for i, s in enumerate(after) if s not in after[:i]]  # in order, first sight
        assert client.status()["state"] == "running"
    finally:
        client.close()
        node.close()
        listener.close()


def test_docs_protocol_md_describes_every_op_and_names_the_role_each_needs():
    from bastion.edge.roles import OP_ROLES

    text = (REPO / "docs" / "protocol.md").read_text()
    roles = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(observer|operator|admin)` \| ([^|]+)\|", text, re.M)}
    assert set(roles) == {"observer", "operator", "admin"}, roles
    for op, role in OP_ROLES.items():
        assert re.search(rf"^\| `{op}` \| ", text, re.M), f"docs/protocol.md has no row for the {op} op"
        assert f"`{op}`" in roles[role], f"docs/protocol.md's Roles table does not give {op} to {role}"
    assert "`degraded`: storage, audit or clip writes failing" in text

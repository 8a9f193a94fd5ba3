"""Issue #15: a full disk never silences the node, no worker thread dies unnoticed, and the audit trail cannot
be cut short, forged onto or rewritten without the node key noticing. Real tmpfs mounts (skipped where mounting
is not permitted), real sockets on 127.0.0.1, real subprocesses."""

import contextlib
import json
import os
import socket as pysocket
import subprocess
import sys
import threading
import time
import uuid

import pytest
import yaml
import zmq

from bastion.edge.audit import AuditLog, verify_audit_log
from bastion.edge.client import Client
from bastion.edge.config import load_config
from bastion.edge.node import Node
from bastion.errors import ConfigError
from bastion.models.keys import load_public_key
from conftest import REPO, SAMPLES, run_cli

VIDEO = SAMPLES / "one-by-one-person-detection.mp4"


def node_config(tmp_path, storage, **over):
    cfg = {
        "id": "hard-node",
        "model": "yolov5n",
        "imgsz": 320,
        "threads": 1,
        "sources": [{"name": "cam1", "uri": str(VIDEO), "loop": True, "realtime": True, "fps": 40}],
        "endpoints": {"events": "tcp://127.0.0.1:*", "control": "tcp://127.0.0.1:*"},
        "storage": {"dir": str(storage)},
        "heartbeat_s": 0.2,
    }
    cfg.update(over)
    path = tmp_path / f"node-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@contextlib.contextmanager
def running_node(tmp_path, storage=None, **over):
    node = Node(load_config(node_config(tmp_path, storage or tmp_path / "data", **over)))
    node.start()
    try:
        yield node
    finally:
        node.close()


@contextlib.contextmanager
def tmpfs(path, size="2m"):
    """A real small filesystem; skips the test where mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory, name="filler"):
    """Write zeros into ``directory`` until the filesystem says ENOSPC; return the file."""
    filler = directory / name
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    return filler


def wait_for(predicate, timeout_s=20.0, step=0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def kinds(log):
    return [json.loads(line)["kind"] for line in log.read_text().splitlines() if line.strip()]


# -- item 2: a full disk pauses the node, never kills a thread ----------------------------------------------------
def test_full_disk_pauses_storage_keeps_every_thread_alive_and_recovers(tmp_path):
    data = tmp_path / "data"
    with tmpfs(data, size="8m"):
        with running_node(tmp_path, data) as node, Client(node.server.control_endpoint, timeout_s=3) as c:
            assert wait_for(lambda: node.published >= 3)
            filler = fill(data)
            status = wait_for(lambda: (s := c.status())["storage_error"] and s, timeout_s=30)
            assert status["storage_error"], "a full disk must show in status"
            inferred = status["sources"]["cam1"]["inferred"]
            time.sleep(1.5)
            status = c.status()
            assert status["sources"]["cam1"]["inferred"] > inferred  # the inference thread is not a zombie
            assert all(t["alive"] for t in status["threads"].values()), status["threads"]
            assert status["state"] == "degraded"
            published = node.published
            filler.unlink()
            assert wait_for(lambda: c.status()["storage_error"] is None, timeout_s=30)
            assert wait_for(lambda: node.published > published)
            assert wait_for(lambda: c.status()["audit"]["pending"] == 0)
            assert c.status()["state"] == "running"
        result = verify_audit_log(data / "audit.log", load_public_key(data / "node-audit.pub"))
        assert result.ok, result.reason
        assert "storage_error" in kinds(data / "audit.log")


def test_the_node_own_wal_never_fills_the_disk_for_good(tmp_path):
    """Adversarial pass: on a 4 MB storage disk events.db stayed at 4 KB while events.db-wal grew to 4 MB (SQLite
    checkpoints only at 1,000 pages), so the node filled its disk with its own WAL, and space freed later went to
    the WAL again within a second. The WAL is checkpointed every few hundred KB (and truncated when a write finds
    the disk full): the disk fills with events, and the space a small freed file gives back stores events."""
    data = tmp_path / "data"
    with tmpfs(data, size="4m"):
        with running_node(tmp_path, data) as node, Client(node.server.control_endpoint, timeout_s=3) as c:
            assert wait_for(lambda: node.published >= 3)
            ballast = fill(data, "ballast")
            os.truncate(ballast, max(0, ballast.stat().st_size - 512 * 1024))  # ~512 KB left for the node
            spare = data / "spare"
            spare.write_bytes(b"\0" * 128 * 1024)
            assert wait_for(lambda: c.status()["storage_error"] is None, timeout_s=30)  # filling may have hit it
            db_start = (data / "events.db").stat().st_size
            assert wait_for(lambda: c.status()["storage_error"], timeout_s=120), "the node never filled its disk"
            wal = data / "events.db-wal"
            wal_size = wal.stat().st_size if wal.exists() else 0
            db_grew = (data / "events.db").stat().st_size - db_start
            assert wal_size <= 512 * 1024, f"the WAL holds {wal_size} bytes, events.db grew by {db_grew}"
            assert db_grew >= 128 * 1024, f"the events went into the WAL ({wal_size} bytes), not events.db"
            seq = c.status()["last_seq"]
            spare.unlink()  # 128 KB back: room for a hundred events or more, not a few dozen WAL frames
            assert wait_for(lambda: c.status()["storage_error"] is None, timeout_s=30)
            wait_for(lambda: c.status()["storage_error"], timeout_s=60)
            stored = c.status()["last_seq"] - seq
            assert stored >= 80, f"128 KB freed stored only {stored} events"
            assert all(t["alive"] for t in c.status()["threads"].values())


def test_audit_append_on_a_full_disk_is_all_or_nothing_and_deferred(tmp_path):
    data = tmp_path / "fs"
    with tmpfs(data, size="64k"):
        audit = AuditLog(data / "audit.log")
        audit.append("first", note="x" * 100)
        filler = fill(data)
        before = (data / "audit.log").read_bytes()
        for n in range(5):  # each is longer than what is left: a short write must never stay on disk
            audit.append("while_full", n=n, reason="y" * 6000)  # > a page: part of it would fit
        assert (data / "audit.log").read_bytes() == before
        assert audit.pending == 5 and "No space" in (audit.error or "")
        assert verify_audit_log(data / "audit.log").ok
        filler.unlink()
        assert audit.flush()
        assert audit.pending == 0 and audit.error is None
        result = verify_audit_log(data / "audit.log")
        assert result.ok and result.records == 6
        assert kinds(data / "audit.log") == ["first"] + ["while_full"] * 5


def test_records_beyond_the_memory_bound_are_counted_as_lost_not_silently_dropped(tmp_path, monkeypatch):
    from bastion.edge import audit as audit_module

    monkeypatch.setattr(audit_module, "MAX_PENDING", 3)
    data = tmp_path / "fs"
    with tmpfs(data, size="64k"):
        audit = AuditLog(data / "audit.log")
        audit.append("first")
        filler = fill(data)
        for n in range(5):
            audit.append("while_full", n=n, reason="y" * 6000)
        assert audit.pending == 3
        filler.unlink()
        assert audit.flush()
        records = [json.loads(line) for line in (data / "audit.log").read_text().splitlines()]
        assert [r["kind"] for r in records] == ["first"] + ["while_full"] * 3 + ["audit_records_lost"]
        assert records[-1]["fields"]["count"] == 2
        assert verify_audit_log(data / "audit.log").ok


def test_torn_tail_is_truncated_at_start_and_recorded(tmp_path):
    log = tmp_path / "audit.log"
    audit = AuditLog(log)
    audit.append("a")
    audit.append("b")
    good = log.read_bytes()
    torn = b'{"fields": {}, "i": 2, "kind": "c", "prev": "ab'
    log.write_bytes(good + torn)
    assert not verify_audit_log(log).ok  # a torn record breaks verification ...
    AuditLog(log)  # ... until the next start repairs it
    result = verify_audit_log(log)
    assert result.ok, result.reason
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["kind"] for r in records] == ["a", "b", "audit_tail_repaired"]
    assert records[-1]["fields"]["bytes_removed"] == len(torn)
    assert log.read_bytes().startswith(good)


# -- item 2: a dead worker thread stops the node loudly -------------------------------------------------------------
def test_worker_thread_dying_is_reported_and_stops_the_node(tmp_path):
    with running_node(tmp_path) as node:
        assert wait_for(lambda: node.published >= 1)

        def boom(*_a, **_k):
            raise RuntimeError("injected fault")

        node._emit = boom
        assert wait_for(lambda: node.failure, timeout_s=10)
        assert "node-infer" in node.failure and "injected fault" in node.failure
        status = node.status_dict()
        assert status["state"] == "failed" and not status["threads"]["node-infer"]["alive"]
        assert "injected fault" in status["threads"]["node-infer"]["error"]
        assert node.stop_event.is_set()
    assert "thread_died" in kinds(tmp_path / "data" / "audit.log")


def test_the_prepare_thread_dying_is_reported_and_stops_the_node(tmp_path):
    """Pre-processing has its own thread now (edge/pipeline.py): its death is as loud as the inference's."""
    with running_node(tmp_path) as node:
        assert wait_for(lambda: node.published >= 1)

        def boom(*_a, **_k):
            raise RuntimeError("injected fault")

        node.detector.prepare = boom
        assert wait_for(lambda: node.failure, timeout_s=10)
        assert "node-prepare" in node.failure and "injected fault" in node.failure
        status = node.status_dict()
        assert status["state"] == "failed" and not status["threads"]["node-prepare"]["alive"]
        assert node.stop_event.is_set()
    assert "thread_died" in kinds(tmp_path / "data" / "audit.log")


def test_a_source_fault_is_retried_and_never_ends_its_reader(tmp_path, monkeypatch):
    from bastion.runtime import sources

    real, calls = sources._OPENERS["video"], []

    def flaky(cfg):
        calls.append(cfg.name)
        if len(calls) <= 2:
            raise RuntimeError("decoder fault")  # not a SourceUnavailable: a library or driver bug
        return real(cfg)

    monkeypatch.setitem(sources._OPENERS, "video", flaky)
    with running_node(tmp_path) as node:
        assert wait_for(lambda: node.published >= 2, timeout_s=30)
        status = node.status_dict()
        assert status["sources"]["cam1"]["errors"] >= 2 and status["threads"]["source-cam1"]["alive"]
        assert status["state"] == "running" and node.failure is None


def test_node_process_exits_nonzero_when_a_worker_thread_dies(tmp_path):
    config = node_config(tmp_path, tmp_path / "data")
    code = (
        "import egress_guard; egress_guard.install()\n"
        "from bastion.edge.node import Node\n"
        "def boom(self, *a, **k):\n    raise RuntimeError('injected fault')\n"
        "Node._emit = boom\n"
        "from bastion.cli import run; run()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    proc = subprocess.run(
        [sys.executable, "-c", code, "node", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode not in (0, None), proc.stderr
    assert "node-infer" in proc.stderr and "injected fault" in proc.stderr
    assert "Traceback" not in proc.stderr.splitlines()[-1]


def test_watchdog_pings_only_while_the_inference_loop_is_alive(tmp_path, monkeypatch):
    address = str(tmp_path / "notify.sock")
    listener = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(0.2)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", "600000")  # ping every 0.3 s

    def drain(seconds):
        got, deadline = [], time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError, pysocket.timeout):
                got.append(listener.recv(64))
        return got

    hang = threading.Event()
    with running_node(tmp_path) as node:
        assert drain(1.5).count(b"WATCHDOG=1") >= 2
        real = node.detector.detect_prepared

        def stuck(*a, **k):
            hang.wait(20)
            return real(*a, **k)

        node.detector.detect_prepared = stuck
        drain(1.0)  # the loop is now stuck inside a batch; pings sent before it went stale are read and dropped
        assert b"WATCHDOG=1" not in drain(1.5), "the watchdog must not vouch for a stuck inference loop"
        status = node.status_dict()
        assert status["sources"]["cam1"]["fps"] == 0  # not the rate from before it got stuck
        assert status["threads"]["node-infer"]["last_turn_s"] > 2
        hang.set()
        assert b"WATCHDOG=1" in drain(2.0)
    listener.close()


# -- item 6: anchored audit chain ------------------------------------------------------------------------------
def _run_and_stop(tmp_path):
    with running_node(tmp_path) as node, Client(node.server.control_endpoint, timeout_s=3) as c:
        assert wait_for(lambda: node.published >= 1)
        status = c.status()
    return tmp_path / "data", status


def test_heartbeat_and_status_publish_the_audit_head(tmp_path):
    with running_node(tmp_path) as node, Client(node.server.control_endpoint, timeout_s=3) as c:
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.linger = 0
        sub.setsockopt(zmq.SUBSCRIBE, b"hb")
        sub.connect(node.server.events_endpoint)
        assert sub.poll(5000)
        beat = json.loads(sub.recv_multipart()[1])
        sub.close()
        ctx.term()
        audit = c.status()["audit"]
        lines = (tmp_path / "data" / "audit.log").read_text().splitlines()
        for count, head in ((beat["audit_count"], beat["audit_head"]), (audit["count"], audit["head"])):
            assert json.loads(lines[count - 1])["hash"] == head
        assert audit["key_id"]
        proc = run_cli("node", "status", "--storage", str(tmp_path / "data"))
        assert proc.returncode == 0 and "running" in proc.stdout and "audit log:" in proc.stdout, proc.stderr


def test_signed_checkpoints_catch_forged_append_rewrite_and_truncation(tmp_path):
    data, status = _run_and_stop(tmp_path)
    log, pub = data / "audit.log", data / "node-audit.pub"
    assert oct((data / "node-audit.key").stat().st_mode & 0o777) == "0o600"
    assert kinds(log)[-1] == "checkpoint"  # a clean stop anchors the head
    ok = run_cli("audit", "verify", str(log), "--key", str(pub))
    assert ok.returncode == 0, ok.stderr
    good = log.read_bytes()
    count = len(good.splitlines())
    head = json.loads(good.splitlines()[-1])["hash"]

    # a forged append: a perfectly chained record, without the node key
    AuditLog(log).append("bundle_loaded", sha256="f" * 64)
    assert verify_audit_log(log).ok  # the chain alone cannot tell ...
    forged = run_cli("audit", "verify", str(log), "--key", str(pub))
    assert forged.returncode == 1 and "not anchored" in forged.stderr  # ... the node key can

    # truncation: drop the last three records (the checkpoint included); a known head catches it
    log.write_bytes(b"".join(good.splitlines(keepends=True)[:-3]))
    assert verify_audit_log(log).ok
    cut = run_cli("audit", "verify", str(log), "--expect-count", str(count), "--expect-head", head, "--json")
    result = json.loads(cut.stdout)
    assert cut.returncode == 1 and f"truncated after record {count - 4}" in result["reason"]
    assert status["audit"]["count"] <= count

    # a full rewrite with a consistent chain signed by another key
    other = tmp_path / "forger"
    from bastion.models.keys import generate_keypair, load_private_key

    pair = generate_keypair(other / "forger")
    log.unlink()
    forger = AuditLog(log, signer=load_private_key(pair.private_path))
    for record in (json.loads(line) for line in good.splitlines()):
        if record["kind"] != "checkpoint":
            forger.append(record["kind"], **record["fields"])
    forger.checkpoint()
    assert verify_audit_log(log).ok
    rewritten = run_cli("audit", "verify", str(log), "--key", str(pub))
    assert rewritten.returncode == 1 and "another key" in rewritten.stderr

    # and a rewrite that simply leaves the checkpoints out
    log.unlink()
    plain = AuditLog(log)
    for record in (json.loads(line) for line in good.splitlines()):
        if record["kind"] != "checkpoint":
            plain.append(record["kind"], **record["fields"])
    stripped = run_cli("audit", "verify", str(log), "--key", str(pub))
    assert stripped.returncode == 1 and "no checkpoint" in stripped.stderr


def test_a_tampered_checkpoint_signature_is_refused(tmp_path):
    data, _ = _run_and_stop(tmp_path)
    log = data / "audit.log"
    lines = log.read_text().splitlines()
    last = json.loads(lines[-1])
    last["fields"]["sig"] = "00" * 64
    from bastion.edge.audit import _digest

    last["hash"] = _digest(last)
    lines[-1] = json.dumps(last, sort_keys=True)
    log.write_text("\n".join(lines) + "\n")
    result = verify_audit_log(log)
    assert not result.ok and "signature" in result.reason


# -- low items: config bounds, bad files, relative paths -------------------------------------------------------------
@pytest.mark.parametrize(
    "field,value",
    [
        ("heartbeat_s", float("inf")),
        ("heartbeat_s", 0.000001),
        ("heartbeat_s", float("nan")),
        ("health_log_s", float("inf")),
        ("health_log_s", 0.0001),
        ("audit_checkpoint_s", float("inf")),
    ],
)
def test_intervals_are_bounded_in_the_schema(tmp_path, field, value):
    with pytest.raises(ConfigError, match=field):
        load_config(node_config(tmp_path, tmp_path / "data", **{field: value}))


@pytest.mark.parametrize("source", [{"fps": float("inf")}, {"fps": 1e-9}])
def test_source_rates_are_bounded(tmp_path, source):
    path = node_config(tmp_path, tmp_path / "data", sources=[{"name": "cam1", "uri": str(VIDEO), **source}])
    with pytest.raises(ConfigError, match="fps"):
        load_config(path)


def test_config_with_invalid_utf8_exits_1_in_one_line(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_bytes(b"id: caf\xe9\nsources: []\n")
    proc = run_cli("node", "run", "--config", str(path))
    assert proc.returncode == 1, proc.stderr
    assert "UTF-8" in proc.stderr and "Traceback" not in proc.stderr and "internal error" not in proc.stderr


def test_storage_dir_under_proc_exits_1_in_one_line(tmp_path):
    proc = run_cli("node", "run", "--config", str(node_config(tmp_path, "/proc/bastion-node-data")))
    assert proc.returncode == 1, proc.stderr
    assert "/proc/bastion-node-data" in proc.stderr and "internal error" not in proc.stderr
    assert "Traceback" not in proc.stderr


def test_relative_paths_in_the_config_resolve_from_its_directory(tmp_path, monkeypatch):
    etc = tmp_path / "etc"
    etc.mkdir()
    config = etc / "node.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "sources": [{"name": "cam1", "uri": "video.mp4"}],
                "security": {
                    "server_secret_key": "keys/node.key_secret",
                    "allowed_clients": ["keys/clients"],
                    "audit_key": "keys/audit.key",
                },
                "storage": {"dir": "data", "snapshots": True, "snapshot_key": "keys/snap.key"},
            }
        )
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(config)
    assert cfg.security.server_secret_key == etc / "keys" / "node.key_secret"
    assert cfg.security.allowed_clients == [etc / "keys" / "clients"]
    assert cfg.security.audit_key == etc / "keys" / "audit.key"
    assert cfg.storage.snapshot_key == etc / "keys" / "snap.key"
    assert cfg.storage.dir == etc / "data"
    assert cfg.sources[0].uri == str(etc / "video.mp4")


def test_unwritable_runtime_file_at_start_exits_1_in_one_line(tmp_path):
    data = tmp_path / "data"
    (data / "node.json").mkdir(parents=True)  # something in the way of node.json, as a full disk would be
    proc = run_cli("node", "run", "--config", str(node_config(tmp_path, data)), timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "node.json" in proc.stderr and "internal error" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("field,value", [("imgsz", 100_000), ("threads", 100_000), ("lm_max_prompt_chars", 10**9)])
def test_sizes_are_bounded_in_the_schema(tmp_path, field, value):
    with pytest.raises(ConfigError, match=field):
        load_config(node_config(tmp_path, tmp_path / "data", **{field: value}))


def test_a_deeply_nested_line_in_the_audit_log_is_damage_not_internal_error(tmp_path):
    """Adversarial pass: one complete line of nested JSON in audit.log made `audit verify` and the node's start
    (chain head, seq marks) die with `internal error: RecursionError` (exit 2). It is a damaged record: verify
    names it in one line (exit 1); the node opens the log, reads its seq marks and chains on."""
    from bastion.edge.seqmark import SeqMark

    log = tmp_path / "audit.log"
    audit = AuditLog(log)
    audit.append("a")
    nested = b'{"kind": "seq_mark", "fields": ' + b"[" * 100000 + b"]" * 100000 + b"}\n"
    with open(log, "ab") as fh:
        fh.write(nested)
    proc = run_cli("audit", "verify", str(log))
    assert proc.returncode == 1, proc.stderr
    assert "internal error" not in proc.stderr and "line 2 is not an audit record" in proc.stderr
    reopened = AuditLog(log)  # finds the head past the damaged line
    mark = SeqMark(tmp_path, reopened)
    try:
        assert mark.resume(0) == 1
    finally:
        mark._close_live()


OVERLONG_SCRIPT = r"""
import json, sys
from pathlib import Path
from bastion.edge.audit import AuditLog, verify_audit_log
from bastion.edge.seqmark import SeqMark

def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) * 1024

base, size = hwm(), int(sys.argv[2])
d = Path(sys.argv[1])
complete, torn = d / "complete" / "audit.log", d / "torn" / "audit.log"
for log in (complete, torn):
    log.parent.mkdir()
    AuditLog(log).append("a")
    with open(log, "r+b") as fh:  # a sparse line of `size` bytes: cheap to write, costly to read whole
        fh.truncate(log.stat().st_size + size)
with open(complete, "ab") as fh:
    fh.write(b"\n")
verdict = verify_audit_log(complete)
reopened = AuditLog(complete)  # chains on past the overlong last line
reopened.append("b")
after_b = reopened.head()[0]
mark = SeqMark(complete.parent, reopened)
first = mark.resume(0)
mark._close_live()
repaired = AuditLog(torn)  # cuts the torn 300 MB tail off, hashing it in chunks
print(json.dumps({"ok": verdict.ok, "reason": verdict.reason, "next": after_b, "first": first,
                  "torn_left": torn.stat().st_size, "kinds": [json.loads(l)["kind"] for l in open(torn)],
                  "grew": hwm() - base}))
"""


def test_an_overlong_audit_line_is_damage_read_in_bounded_memory(tmp_path):
    """Adversarial pass: audit lines were read whole (verify, the node's seq-mark reader, the torn-tail repair),
    so whoever can write audit.log could append a 2 GB line without a newline and make node start and `audit
    verify` load all of it. A 300 MB sparse line (complete, and torn) is read in bounded memory: verify names it
    as damage, the node chains on past it and reads its seq marks, and a torn one is cut off and recorded."""
    size = 300 * 2**20
    proc = subprocess.run(
        [sys.executable, "-c", OVERLONG_SCRIPT, str(tmp_path), str(size)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["grew"] < 64 * 2**20, f"peak RSS grew by {out['grew'] / 2**20:.0f} MiB reading a 300 MiB line"
    assert not out["ok"] and "line 2 is not an audit record" in out["reason"]
    assert out["next"] == 3 and out["first"] == 1  # records a, the overlong line, b
    assert out["kinds"] == ["a", "audit_tail_repaired"]
    assert out["torn_left"] < 4096


def test_audit_readers_cap_a_line_at_max_record_bytes(tmp_path):
    """The cap is one constant every reader uses: a 2 KiB line under a 1 KiB cap is damage, not a record."""
    from bastion.edge import audit as audit_module

    log = tmp_path / "audit.log"
    AuditLog(log).append("a", note="x" * 2048)
    with open(log, "rb") as fh:
        line, overlong = audit_module.read_record_line(fh, limit=1024)
        assert overlong and len(line) == 1024
        assert fh.read() == b""  # the rest of the long line was skipped, not left for the next read
    with open(log, "rb") as fh:
        line, overlong = audit_module.read_record_line(fh)
        assert not overlong and json.loads(line)["kind"] == "a"


def test_a_refused_start_anchors_its_audit_records(tmp_path):
    """Adversarial pass: a node that refused to start (bundle refused, store behind its seq mark) left its last
    records after the last signed checkpoint, so `audit verify --key` said 'NOT intact … appended without the node
    key' for a log nobody had touched. The refusal is anchored like a clean stop."""
    data = tmp_path / "data"
    with running_node(tmp_path, data):
        pass
    with pytest.raises(ConfigError.__mro__[1]):  # any BastionError
        Node(load_config(node_config(tmp_path, data, model=str(tmp_path / "no-such-bundle"))))
    kinds = [json.loads(x)["kind"] for x in (data / "audit.log").read_text().splitlines()]
    assert "bundle_refused" in kinds
    result = verify_audit_log(data / "audit.log", key=load_public_key(data / "node-audit.pub"))
    assert result.ok, result.reason


@pytest.mark.parametrize("key", ["/dev/zero", "fifo"])
def test_a_key_that_is_not_a_regular_file_is_one_line_not_read_forever(tmp_path, key):
    """Adversarial pass: `audit verify --key /dev/zero` read without end (a FIFO blocked forever)."""
    log = tmp_path / "audit.log"
    AuditLog(log).append("a")
    if key == "fifo":
        key = str(tmp_path / "key.pub")
        os.mkfifo(key)
    try:
        proc = run_cli("audit", "verify", str(log), "--key", key, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"audit verify --key {key} never finished")
    assert proc.returncode == 1 and "internal error" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("content", ["not json", '{"pid": 1}', "[" * 100000])
def test_node_status_with_a_damaged_runtime_file_is_one_line(tmp_path, content):
    """Adversarial pass: `node status --storage DIR` with a damaged node.json was internal error (exit 2)."""
    (tmp_path / "node.json").write_text(content)
    proc = run_cli("node", "status", "--storage", str(tmp_path), timeout=30)
    assert proc.returncode == 1 and "internal error" not in proc.stderr, proc.stderr
    assert "node.json" in proc.stderr


def test_a_fifo_source_is_named_for_what_it_is(tmp_path):
    """Adversarial pass: a source uri that is a FIFO was reported as 'file not found' while the file was there."""
    from bastion.edge.config import SourceConfig
    from bastion.runtime.sources import SourceUnavailable, open_source

    fifo = tmp_path / "cam.fifo"
    os.mkfifo(fifo)
    with pytest.raises(SourceUnavailable, match="not a regular file"):
        open_source(SourceConfig(name="cam1", uri=str(fifo)))

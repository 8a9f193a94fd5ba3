"""Issue #15 items 4 and 5: seq never goes backwards, and a damaged event store is named, never an internal error.

Real files throughout: a real node subprocess killed with ``kill -9`` and its WAL
deleted, a real events.db emptied or swapped for an older copy, and a real
SQLite b-tree page overwritten with garbage.
"""

import contextlib
import json
import logging
import os
import random
import re
import shutil
import sqlite3
import struct
import subprocess
import sys
import time

import pytest

from bastion.edge.audit import verify_audit_log
from bastion.edge.client import Client, NodeRequestError
from bastion.edge.config import load_config
from bastion.edge.node import RUNTIME_FILE, Node
from bastion.edge.protocol import DetectionEvent, DetectionItem
from bastion.edge.store import EventStore
from bastion.errors import BastionError
from conftest import REPO, run_cli
from test_node import VIDEO, take, write_config

QUIET = [{"name": "cam1", "uri": str(VIDEO), "loop": True, "fps": 40, "roi": [0.0, 0.0, 0.01, 0.01]}]


def audit_kinds(data):
    return [json.loads(x)["kind"] for x in (data / "audit.log").read_text().splitlines()]


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@contextlib.contextmanager
def node_from(config, **kw):
    node = Node(load_config(config), **kw)
    node.start()
    try:
        yield node
    finally:
        node.close()


def assert_refused(config, match, **kw):
    """Node() must raise; a node that starts anyway is closed, so a failing test fails instead of hanging."""
    try:
        node = Node(load_config(config), **kw)
    except BastionError as exc:
        assert re.search(match, str(exc)), str(exc)
        return
    node.start()
    node.close()
    pytest.fail("the node started on an event store behind its seq high-water mark")


def seqs_from(node, n, since=0):
    with Client(node.server.control_endpoint, timeout_s=3) as client:
        return [e.seq for e in take(client.events(since=since), n)]


# -- item 4: the high-water mark ----------------------------------------------------------------------------


def _start_process(config, data, *extra):
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    cmd = [
        sys.executable,
        "-c",
        "import egress_guard; egress_guard.install(); from bastion.cli import run; run()",
        "node",
        "run",
        "--config",
        str(config),
        *extra,
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    runtime = data / RUNTIME_FILE
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if runtime.is_file() and json.loads(runtime.read_text())["pid"] == proc.pid:
            return proc, json.loads(runtime.read_text())
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(proc.stderr.read())


def test_wal_lost_after_kill_9_refuses_to_start_and_accept_gap_continues_above_the_mark(tmp_path):
    config, data = write_config(tmp_path), tmp_path / "data"
    proc, info = _start_process(config, data)
    try:
        with Client(info["control"], timeout_s=3) as client:
            seen = [e.seq for e in take(client.events(since=0), 12)]
    finally:
        proc.kill()  # SIGKILL: no clean stop, the committed events live only in the WAL
        proc.wait()
    assert seen == list(range(1, 13))
    assert (data / "events.db-wal").is_file()
    for name in ("events.db-wal", "events.db-shm"):
        (data / name).unlink()

    refused = run_cli("node", "run", "--config", str(config), timeout=60)
    assert refused.returncode == 1, refused.stderr
    lines = error_lines(refused.stderr)
    assert len(lines) == 1 and "Traceback" not in refused.stderr
    assert "seq" in lines[0] and "--accept-seq-gap" in lines[0]
    assert "seq_regression_refused" in audit_kinds(data)

    proc, info = _start_process(config, data, "--accept-seq-gap")
    try:
        with Client(info["control"], timeout_s=3) as client:
            after = [e.seq for e in take(client.events(since=0), 3)]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert after and min(after) > max(seen)  # numbering continued above everything ever handed out
    assert "seq_gap_accepted" in audit_kinds(data)
    assert verify_audit_log(data / "audit.log").ok


def test_emptied_events_db_refuses_to_start(tmp_path):
    config, data = write_config(tmp_path), tmp_path / "data"
    with node_from(config) as node:
        seen = seqs_from(node, 4)
    assert seen == [1, 2, 3, 4]
    (data / "events.db").write_bytes(b"")
    for name in ("events.db-wal", "events.db-shm"):
        (data / name).unlink(missing_ok=True)
    assert_refused(config, r"seq.*--accept-seq-gap")


def test_older_copy_of_events_db_refuses_even_without_the_mark_file_and_gap_is_accepted_audited(tmp_path):
    config, data = write_config(tmp_path), tmp_path / "data"
    with node_from(config) as node:
        seqs_from(node, 3)
    assert not (data / "events.db-wal").exists()  # a clean stop leaves one self-contained file
    shutil.copy(data / "events.db", tmp_path / "old.db")
    with node_from(config) as node:
        seqs_from(node, 3, since=node.store.last_seq())
        high = node.store.last_seq()
    shutil.copy(tmp_path / "old.db", data / "events.db")
    assert_refused(config, "already published")
    for name in ("seq.json", "seq.live"):  # the audit log still remembers the high-water mark
        (data / name).unlink()
    assert_refused(config, "already published")
    with node_from(config, accept_seq_gap=True) as node:
        after = seqs_from(node, 2, since=EventStore(data / "events.db").last_seq())
        assert min(after) > high
    kinds = audit_kinds(data)
    assert kinds.count("seq_regression_refused") == 2 and "seq_gap_accepted" in kinds
    assert verify_audit_log(data / "audit.log").ok
    with node_from(config) as node:  # the accepted gap is a one-off: the next start is an ordinary one
        assert node.store.last_seq() >= max(after)


def _event():
    return DetectionEvent(
        seq=0,
        node="n",
        source="cam1",
        ts=time.time(),
        frame=0,
        model="0" * 64,
        detections=[DetectionItem(cls=0, name="person", conf=0.9, box=[1, 2, 3, 4])],
    )


def test_seq_is_reserved_ahead_in_blocks_not_fsynced_per_event(tmp_path, monkeypatch):
    from bastion.edge import seqmark
    from bastion.edge.audit import AuditLog

    writes = []
    real = seqmark.atomic_write_bytes
    monkeypatch.setattr(seqmark, "atomic_write_bytes", lambda p, b, *a: (writes.append(json.loads(b)), real(p, b, *a)))
    audit = AuditLog(tmp_path / "audit.log")
    mark = seqmark.SeqMark(tmp_path, audit, block=10)
    store = EventStore(tmp_path / "events.db", mark=mark)
    assert [store.append(_event()).seq for _ in range(25)] == list(range(1, 26))
    assert [w["reserved_through"] for w in writes] == [10, 20, 30]  # start, then one durable write per block
    assert json.loads((tmp_path / "seq.json").read_text())["reserved_through"] == 30
    store.close()
    final = json.loads((tmp_path / "seq.json").read_text())
    assert final["clean"] and final["last"] == 25
    marks = [json.loads(x)["fields"] for x in (tmp_path / "audit.log").read_text().splitlines()]
    assert [m["event"] for m in marks] == ["start", "reserve", "reserve", "stop"]


def test_unclean_stop_in_the_same_boot_continues_and_across_a_reboot_skips_past_the_reservation(tmp_path):
    from bastion.edge.audit import AuditLog
    from bastion.edge.seqmark import SeqMark

    audit = AuditLog(tmp_path / "audit.log")

    def crash(store):  # the process dies: no stop mark is written, the kernel drops its lock
        store._db.close()
        store.mark._close_live()

    store = EventStore(tmp_path / "events.db", mark=SeqMark(tmp_path, audit, block=10))
    for _ in range(4):
        store.append(_event())
    crash(store)
    store = EventStore(tmp_path / "events.db", mark=SeqMark(tmp_path, audit, block=10))
    assert store.append(_event()).seq == 5  # same boot: the page cache kept everything, no gap
    crash(store)
    state = json.loads((tmp_path / "seq.json").read_text())
    state["boot"] = "another-boot"  # as after a power cut: the last WAL commits may be gone
    (tmp_path / "seq.json").write_text(json.dumps(state))
    store = EventStore(tmp_path / "events.db", mark=SeqMark(tmp_path, audit, block=10))
    assert store.append(_event()).seq == state["reserved_through"] + 1
    store.close()
    assert "seq_skipped" in [json.loads(x)["kind"] for x in (tmp_path / "audit.log").read_text().splitlines()]


# -- item 5: a damaged store ----------------------------------------------------------------------------------


def _fill(path, n):
    store = EventStore(path)
    items = [DetectionItem(cls=i, name=f"class-{i}", conf=0.5, box=[1.0, 2.0, 3.0, 4.0]) for i in range(6)]
    for i in range(n):
        store.append(
            DetectionEvent(seq=0, node="n", source="cam1", ts=time.time(), frame=i, model="0" * 64, detections=items)
        )
    store.close()
    assert not path.with_name(path.name + "-wal").exists()


def _table_pages(path):
    """(interior pages, leaf pages in key order) of the events table b-tree, read from the file itself."""
    con = sqlite3.connect(path)
    size = con.execute("PRAGMA page_size").fetchone()[0]
    root = con.execute("SELECT rootpage FROM sqlite_master WHERE name = 'events'").fetchone()[0]
    con.close()
    data = path.read_bytes()
    interior, leaves = [], []

    def walk(n):
        page = data[(n - 1) * size : n * size]
        head = 100 if n == 1 else 0
        if page[head] == 0x0D:
            leaves.append(n)
            return
        assert page[head] == 0x05
        interior.append(n)
        cells = struct.unpack(">H", page[head + 3 : head + 5])[0]
        pointers = [struct.unpack(">H", page[head + 12 + 2 * i : head + 14 + 2 * i])[0] for i in range(cells)]
        for child in [struct.unpack(">I", page[p : p + 4])[0] for p in pointers]:
            walk(child)
        walk(struct.unpack(">I", page[head + 8 : head + 12])[0])

    walk(root)
    return size, root, interior, leaves


def _garble(path, size, pages):
    rng = random.Random(15)
    with open(path, "r+b") as fh:
        for n in pages:
            fh.seek((n - 1) * size)
            fh.write(bytes(rng.getrandbits(8) for _ in range(size)))
            fh.flush()
            os.fsync(fh.fileno())


def test_interior_page_corruption_refuses_to_start_in_one_line(tmp_path):
    config, data = write_config(tmp_path, sources=QUIET), tmp_path / "data"
    data.mkdir()
    _fill(data / "events.db", 6000)
    size, root, interior, leaves = _table_pages(data / "events.db")
    assert len(leaves) > 100 and root in interior
    victim = [p for p in interior if p != root] or [root]
    _garble(data / "events.db", size, victim[len(victim) // 2 : len(victim) // 2 + 1])
    proc = run_cli("node", "run", "--config", str(config), timeout=60)
    assert proc.returncode == 1, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "damaged" in lines[0] and "Traceback" not in proc.stderr
    assert "internal error" not in proc.stderr


def test_corruption_while_running_gives_a_clear_reply_and_status_never_internal_error(tmp_path, caplog):
    config, data = write_config(tmp_path, sources=QUIET), tmp_path / "data"
    data.mkdir()
    _fill(data / "events.db", 12000)  # several times SQLite's page cache, so early pages are read from disk again
    size, _, _, leaves = _table_pages(data / "events.db")
    with node_from(config) as node, Client(node.server.control_endpoint, timeout_s=5) as client:
        assert client.status()["storage_error"] is None
        _garble(data / "events.db", size, leaves[:40])
        with caplog.at_level(logging.INFO, logger="bastion"):
            with pytest.raises(NodeRequestError) as refused:
                client.replay(since=0)
            message = str(refused.value)
            assert "damaged" in message and "internal error" not in message and "\n" not in message
            status = client.status()
            assert "damaged" in status["storage_error"] and "damaged" in status["store"]["error"]
            assert status["store"]["quick_check_s"] >= 0  # the start-up check's time is reported
            with pytest.raises(NodeRequestError, match="damaged"):  # it stays in the error state
                client.replay(since=100)
            assert client.status()["last_seq"] == 12000  # heartbeats and status keep working
    assert not [r for r in caplog.records if r.exc_info], "a damaged store is reported, not a traceback"
    assert "storage_damaged" in audit_kinds(data)


def test_an_accepted_gap_is_kept_by_the_store_itself_even_if_no_event_follows(tmp_path):
    from bastion.edge.audit import AuditLog
    from bastion.edge.seqmark import SeqMark, SeqRegressionError

    audit = AuditLog(tmp_path / "audit.log")
    store = EventStore(tmp_path / "events.db", mark=SeqMark(tmp_path, audit, block=10))
    for _ in range(7):
        store.append(_event())
    store.close()
    (tmp_path / "events.db").unlink()
    with pytest.raises(SeqRegressionError):
        EventStore(tmp_path / "events.db", mark=SeqMark(tmp_path, audit, block=10))
    store = EventStore(tmp_path / "events.db", mark=SeqMark(tmp_path, audit, block=10), accept_seq_gap=True)
    assert store.last_seq() == 7
    store.close()  # stopped before any new event
    store = EventStore(tmp_path / "events.db", mark=SeqMark(tmp_path, audit, block=10))  # an ordinary start
    assert store.append(_event()).seq == 8
    store.close()


def test_a_second_writer_on_the_same_storage_dir_is_refused(tmp_path):
    from bastion.edge.seqmark import SeqMark

    first = EventStore(tmp_path / "events.db", mark=SeqMark(tmp_path))
    first.append(_event())
    with pytest.raises(BastionError, match="another node"):  # two writers would hand out the same seq twice
        EventStore(tmp_path / "events.db", mark=SeqMark(tmp_path))
    assert EventStore(tmp_path / "events.db").last_seq() == 1  # readers are welcome
    first.close()
    second = EventStore(tmp_path / "events.db", mark=SeqMark(tmp_path))
    assert second.append(_event()).seq == 2
    second.close()


def test_a_row_that_is_not_an_event_is_damage_in_one_line(tmp_path):
    store = EventStore(tmp_path / "events.db")
    store.append(_event())
    store._db.execute("UPDATE events SET payload = '{not json' WHERE seq = 1")
    with pytest.raises(BastionError, match="damaged") as refused:
        store.since(0)
    assert "\n" not in str(refused.value) and store.error and store.last_seq() == 1
    store.close()


def test_seq_live_lost_with_the_wal_after_kill_9_never_reuses_a_seq(tmp_path):
    """Found by the adversarial pass: kill -9, then the WAL *and* seq.live deleted (seq.json still says
    'last 0, unclean') restarted numbering at 1 in the same boot. Without seq.live the node cannot know how far
    it got, so it must skip past the reservation (or refuse), never hand out 1..N again."""
    from bastion.edge.audit import AuditLog
    from bastion.edge.seqmark import SeqMark

    audit = AuditLog(tmp_path / "audit.log")
    store = EventStore(tmp_path / "events.db", mark=SeqMark(tmp_path, audit, block=10))
    published = [store.append(_event()).seq for _ in range(4)]
    store._db.close()  # the process dies: no stop mark
    store.mark._close_live()
    for name in ("events.db", "events.db-wal", "events.db-shm", "seq.live"):
        (tmp_path / name).unlink(missing_ok=True)
    try:
        store = EventStore(tmp_path / "events.db", mark=SeqMark(tmp_path, audit, block=10))
    except BastionError:
        return  # refusing is as good as skipping
    try:
        assert store.append(_event()).seq > max(published)
    finally:
        store.close()


def test_a_deeply_nested_seq_json_falls_back_to_the_audit_marks(tmp_path):
    """Adversarial pass: a seq.json of nested JSON made the node's start die with RecursionError (exit 2)."""
    from bastion.edge.audit import AuditLog
    from bastion.edge.seqmark import SeqMark

    audit = AuditLog(tmp_path / "audit.log")
    store = EventStore(tmp_path / "events.db", mark=SeqMark(tmp_path, audit, block=10))
    published = [store.append(_event()).seq for _ in range(3)]
    store.close()
    (tmp_path / "seq.json").write_text("[" * 100000 + "]" * 100000)
    (tmp_path / "events.db").unlink()  # and the store emptied: the audit log's marks still hold seq 3
    for name in ("events.db-wal", "events.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    with pytest.raises(BastionError, match="seq 3 was already published"):
        EventStore(tmp_path / "events.db", mark=SeqMark(tmp_path, audit, block=10))
    assert published == [1, 2, 3]


def test_a_wal_that_filled_the_disk_gives_its_space_back_once_a_small_file_is_freed(tmp_path):
    """Adversarial pass: the node's own WAL filled a small storage disk and kept the space (SQLite checkpoints at
    1,000 pages, and a WAL file never shrinks by itself). Here a reader's snapshot holds every checkpoint back
    until the WAL fills a 1 MB tmpfs; once it lets go and 128 KB is freed, the WAL is checkpointed, cut back to
    its size limit, and events are stored again — hundreds, not the few WAL frames that 128 KB would hold."""
    from bastion.edge.store import JOURNAL_SIZE_LIMIT, StorageError
    from test_hardening_node import tmpfs

    data = tmp_path / "fs"
    with tmpfs(data, size="1m"):
        store = EventStore(data / "events.db")
        spare = data / "spare"
        spare.write_bytes(b"\0" * 128 * 1024)
        reader = sqlite3.connect(str(data / "events.db"))
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM events").fetchone()
        with pytest.raises(StorageError, match="full"):
            for _ in range(100_000):
                store.append(_event())
        wal = data / "events.db-wal"
        assert wal.stat().st_size > 512 * 1024  # the disk is full of WAL
        reader.rollback()
        reader.close()
        spare.unlink()
        for _ in range(300):
            store.append(_event())
        assert wal.stat().st_size <= JOURNAL_SIZE_LIMIT
        store.close()


SEQ_FILES_SCRIPT = r"""
import json, os, sys, time
from pathlib import Path
from bastion.edge.audit import AuditLog
from bastion.edge.protocol import DetectionEvent
from bastion.edge.seqmark import SeqMark
from bastion.edge.store import EventStore
from bastion.errors import BastionError

def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) * 1024

d, how = Path(sys.argv[1]), sys.argv[2]
audit = AuditLog(d / "audit.log")
store = EventStore(d / "events.db", mark=SeqMark(d, audit, block=10))
for _ in range(3):
    store.append(DetectionEvent(seq=0, node="n", source="cam1", ts=time.time(), frame=0, model="0" * 64,
                                detections=[]))
store.close()
for name in ("events.db", "events.db-wal", "events.db-shm", "seq.json"):
    (d / name).unlink(missing_ok=True)
if how == "fifo":
    os.mkfifo(d / "seq.json")
else:
    for name in ("seq.json", "seq.live"):
        with open(d / name, "wb") as fh:
            fh.truncate(300 * 2**20)
base = hwm()
try:
    EventStore(d / "events.db", mark=SeqMark(d, audit, block=10))
    print(json.dumps({"refused": None, "grew": hwm() - base}))
except BastionError as exc:
    print(json.dumps({"refused": str(exc), "grew": hwm() - base}))
"""


@pytest.mark.parametrize("how", ["sparse", "fifo"])
def test_seq_mark_files_are_read_bounded(tmp_path, how):
    """seq.json and seq.live were read whole: a 300 MB file (anyone who can write the storage dir) cost its size in
    RSS at start, and a FIFO in seq.json's place hung the start for ever. They are read bounded (regular files
    only); an unreadable seq.json falls back to the audit log's marks, which still refuse a store behind seq 3."""
    proc = subprocess.run(
        [sys.executable, "-c", SEQ_FILES_SCRIPT, str(tmp_path), how],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["refused"] and "seq 3 was already published" in out["refused"]
    assert out["grew"] < 64 * 2**20, f"peak RSS grew by {out['grew'] / 2**20:.0f} MiB reading seq files"


def test_a_grown_seq_live_is_trimmed_by_the_first_commit(tmp_path):
    """Junk past the 21-byte record (a grown or tampered file) made seq.live read as missing at every later start,
    so every unclean restart skipped a whole reservation; the first commit trims the file back to one record."""
    from bastion.edge import seqmark
    from bastion.edge.audit import AuditLog

    (tmp_path / seqmark.LIVE_FILE).write_bytes(b"7" * 4096)
    mark = seqmark.SeqMark(tmp_path, AuditLog(tmp_path / "audit.log"), block=10)
    store = EventStore(tmp_path / "events.db", mark=mark)
    assert store.append(_event()).seq == 1
    assert mark._read_live() == 1 and (tmp_path / seqmark.LIVE_FILE).stat().st_size == 21
    store.close()


def test_reading_back_a_store_with_object_events_is_not_damage(tmp_path):
    """Object events (protocol v2) share the log with frame events: every reader of the store parses both, so an
    object row is never mistaken for a damaged one (EventStore.since once parsed frame events only)."""
    from bastion.edge.events_v2 import ObjectNew

    store = EventStore(tmp_path / "events.db")
    store.append(_event())
    new = dict(kind="object.new", source="cam1", ts=time.time(), frame=3, track=1, cls=0, name="person")
    store.append(ObjectNew(seq=0, node="n", model="0" * 64, conf=0.8, box=[1, 2, 3, 4], **new))
    store.append(_event())
    events = store.since(0)
    assert [e.seq for e in events] == [1, 2, 3] and isinstance(events[1], ObjectNew) and events[1].track == 1
    assert store.error is None
    store.close()

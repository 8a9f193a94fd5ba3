"""The object layer wired into a real node (#18 items 1-2, 7): tracked objects, a line, protocol v2, the SDK's
``events(kinds=…)`` and ``bastion node tail`` — real ZeroMQ on 127.0.0.1, real SQLite, the real model on a
cut of the vendored person clip."""

import contextlib
import json
import re
import sqlite3
import threading
import time

import cv2
import numpy as np
import pytest
import zmq

from bastion.edge.client import Client
from bastion.edge.config import load_config
from bastion.edge.events_v2 import LineCross, ObjectNew, kind_of, read_events
from bastion.edge.node import Node
from bastion.edge.protocol import DetectionEvent
from bastion.edge.store import EventStore
from bastion.runtime.media import iter_video
from conftest import SAMPLES, run_cli
from test_node import take, write_config

VIDEO = SAMPLES / "one-by-one-person-detection.mp4"
# The first walker enters at the left around frame 60, stands at the table, and leaves at the right by frame
# 195; the next one comes in at 228 (frames looked at one by one).
FIRST_WALKER = (40, 220)
# A vertical line right of the table (x = 0.7), drawn top to bottom: "in" is right-to-left, so her exit is
# "out". The table's x = 0.5 would not do: she is announced (min_hits) about when her feet pass it.
MIDDLE = {"name": "exit", "a": [0.7, 0.02], "b": [0.7, 0.98], "classes": ["person"]}


@pytest.fixture(scope="module")
def walker_clip(tmp_path_factory):
    """Frames 40..250 of the person clip as their own file (one person, one walk), at the clip's 10 fps."""
    path = tmp_path_factory.mktemp("clip") / "walker.mp4"
    writer = None
    for frame in iter_video(VIDEO):
        if frame.index >= FIRST_WALKER[1]:
            break
        if frame.index >= FIRST_WALKER[0]:
            if writer is None:
                h, w = frame.image.shape[:2]
                writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (w, h))
            writer.write(frame.image)
    writer.release()
    return path


def objects_config(tmp_path, clip, objects=None, **over):
    source = {"name": "cam1", "uri": str(clip), "loop": False, "realtime": False, "classes": ["person"]}
    return write_config(tmp_path, sources=[source], objects=objects or {"lines": [MIDDLE]}, **over)


@contextlib.contextmanager
def node_from(path):
    node = Node(load_config(path))
    node.start()
    try:
        yield node
    finally:
        node.close()


def stored(tmp_path):
    store = EventStore(tmp_path / "data" / "events.db")
    try:
        return read_events(store, 0, 1_000_000)
    finally:
        store.close()


def wait_for_end(node, timeout_s=240):
    """Until the clip is read to its end and the object layer has closed it (object.end, reason stop or lost)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if node.readers[0].stats.state == "finished" and "cam1" in node._closed_sources:
            return
        time.sleep(0.2)
    raise AssertionError(f"the clip did not finish in {timeout_s} s: {node.status_dict()['sources']}")


class Subscriber(threading.Thread):
    """Every published event, checked against the store the moment it arrives: its seq must already be there."""

    def __init__(self, endpoint, db):
        super().__init__(daemon=True)
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(endpoint)
        self.db = db
        self.seen, self.missing = [], []
        self.stop = threading.Event()

    def run(self):
        conn = sqlite3.connect(self.db)
        try:
            while not self.stop.is_set():
                if not self.sub.poll(100):
                    continue
                topic, payload = self.sub.recv_multipart()
                if topic == b"hb":
                    continue
                seq = json.loads(payload)["seq"]
                self.seen.append((topic, seq))
                if conn.execute("SELECT 1 FROM events WHERE seq = ?", (seq,)).fetchone() is None:
                    self.missing.append(seq)
        finally:
            conn.close()
            self.sub.close(linger=0)
            self.ctx.term()


def test_one_walker_is_one_object_with_one_id_that_crosses_the_line_out(tmp_path, walker_clip):
    path = objects_config(tmp_path, walker_clip, objects={"lines": [MIDDLE], "frame_events": True})
    with node_from(path) as node:
        sub = Subscriber(node.server.events_endpoint, tmp_path / "data" / "events.db")
        sub.start()
        wait_for_end(node)
        status = node.status_dict()
        time.sleep(0.5)
        sub.stop.set()
        sub.join(5)
    events = stored(tmp_path)
    frames = [e for e in events if isinstance(e, DetectionEvent)]
    objects = [e for e in events if not isinstance(e, DetectionEvent)]
    news = [e for e in objects if e.kind == "object.new"]
    assert len(news) == 1, [(e.kind, e.track) for e in objects]
    track = news[0].track
    assert {e.track for e in objects} == {track}  # one stable id for the whole walk
    kinds = [e.kind for e in objects]
    assert kinds[0] == "object.new" and kinds[-1] == "object.end" and kinds.count("object.end") == 1
    crossings = [e for e in objects if isinstance(e, LineCross)]
    assert [(c.line, c.direction, c.count_out, c.count_in) for c in crossings] == [("exit", "out", 1, 0)]
    # every detection of a frame event carries the track; the walker's frames carry her id
    tracked = [d.track for e in frames for d in e.detections]
    assert len(frames) > 100 and tracked.count(track) >= 0.9 * len(tracked)
    assert len(objects) * 10 < len(frames)  # far fewer object events than frame events
    # commit before publish: what a subscriber received was in the store when it arrived
    assert any(topic.startswith(b"obj.") for topic, _ in sub.seen) and sub.missing == []
    assert status["objects"]["ids_allocated"] >= 1 and status["objects"]["active_tracks"] == {}  # all ended
    assert status["events_by_kind"]["object.new"] == 1 and status["events_by_kind"]["det"] == len(frames)
    assert "precision" in status["model"]


def test_lifecycle_events_name_the_seq_of_the_objects_best_stored_snapshot(tmp_path, walker_clip):
    """object.new stores its frame; an update that beats the best stored sighting stores its own; every lifecycle
    event names the seq of the best one so far (best_snapshot_seq), and that snapshot is served."""
    from bastion.edge.snapshots import generate_key_file

    key = generate_key_file(tmp_path / "snap.key")
    storage = {"dir": str(tmp_path / "data"), "snapshots": True, "snapshot_key": str(key)}
    objects = {"lines": [MIDDLE], "update_min_s": 0.0, "conf_jump": 0.02}  # many updates: some beat the best
    with node_from(objects_config(tmp_path, walker_clip, objects=objects, storage=storage)) as node:
        wait_for_end(node)
        events = [e for e in stored(tmp_path) if e.kind in ("object.new", "object.update", "object.end")]
        kept = sorted(int(p.name.split(".")[0]) for p in node.vault.dir.iterdir() if p.name[0].isdigit())
        with Client(node.server.control_endpoint, timeout_s=10) as client:
            end = events[-1]
            jpeg = client.snapshot(end.best_snapshot_seq)
    assert end.kind == "object.end" and events[0].kind == "object.new"
    assert events[0].best_snapshot_seq == events[0].seq  # object.new stored its own frame
    storing = [e for e in events if e.best_snapshot_seq == e.seq]  # the events that stored a frame
    assert len(storing) >= 2, "no update ever beat object.new's sighting: the test shows nothing"
    assert [e.seq for e in storing] == kept  # a snapshot on disk for each of them, none for any other event
    assert all(a.conf < b.conf for a, b in zip(storing, storing[1:]))  # each beat the one before
    best = storing[-1]
    assert end.best_snapshot_seq == best.seq and best.conf == max(e.conf for e in storing)
    for event in events:  # each names the best stored up to it
        assert event.best_snapshot_seq == max((e.seq for e in storing if e.seq <= event.seq), default=None)
    assert jpeg[:2] == b"\xff\xd8" and cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).ndim == 3


def test_without_snapshots_no_event_names_a_snapshot(tmp_path, walker_clip):
    with node_from(objects_config(tmp_path, walker_clip)) as node:
        wait_for_end(node)
    events = stored(tmp_path)
    assert events and all(getattr(e, "best_snapshot_seq", None) is None for e in events)


def test_frame_events_are_off_by_default_and_ids_continue_across_a_restart(tmp_path, walker_clip):
    path = objects_config(tmp_path, walker_clip)
    with node_from(path) as node:
        wait_for_end(node)
    first = stored(tmp_path)
    assert first and not any(isinstance(e, DetectionEvent) for e in first)  # frame events off by default
    first_ids = {e.track for e in first}
    with node_from(path) as node:  # the same store, a new node: ids come from the store's counter
        wait_for_end(node)
        client = Client(node.server.control_endpoint, timeout_s=5)
        try:
            news = take(client.events(since=0, kinds=["object.new"]), 2, timeout_s=30)
            assert all(isinstance(e, ObjectNew) for e in news) and len(news) == 2
            with pytest.raises(Exception, match="unknown event kind 'object.nwe'"):
                next(client.events(since=0, kinds=["object.nwe"]))
        finally:
            client.close()
        # a v1 reader (a replay request without v) is refused in one line, not served what it cannot parse
        v1 = Client(node.server.control_endpoint, timeout_s=5)
        try:
            answer = v1.request("replay", since=0, limit=10)
        except Exception as exc:  # the SDK raises the node's refusal
            answer = {"error": str(exc)}
        finally:
            v1.close()
        assert "protocol v2 object events" in answer["error"]
        tail = run_cli(
            "node", "tail", "--control", node.server.control_endpoint, "--since", "0", "--json",
            "--kinds", "object.new,object.end", "--duration", "2",
        )  # fmt: skip
        status = run_cli("node", "status", "--control", node.server.control_endpoint)
        plain = run_cli(
            "node", "tail", "--control", node.server.control_endpoint, "--since", "0", "--kinds", "line.cross",
            "--duration", "1",
        )  # fmt: skip
    assert tail.returncode == 0, tail.stderr
    assert status.returncode == 0, status.stderr
    said = " ".join(status.stdout.split())  # rich wraps at 80 columns in a pipe
    assert "objects: tracker bytetrack" in said and "frame events off" in said and "precision: " in said
    assert re.search(r"inference: [1-9]\d* batches, mean [\d.]+ ms; events published by kind: .*object\.new \d", said)
    assert re.search(r"event store \d+\.\d MB", said), said  # the metrics' numbers, in the text view too
    assert plain.returncode == 0, plain.stderr
    assert [" ".join(line.split()[2:4]) for line in plain.stdout.splitlines()] == ["line.cross cam1"] * 2
    assert all("line exit out" in line for line in plain.stdout.splitlines())
    lines = [json.loads(line) for line in tail.stdout.splitlines()]
    assert [line["kind"] for line in lines] == ["object.new", "object.end"] * 2
    second_ids = {e.track for e in stored(tmp_path)} - first_ids
    assert second_ids and min(second_ids) > max(first_ids)  # never reused across the restart
    assert [kind_of(e) for e in news] == ["object.new", "object.new"] and news[1].track in second_ids


def test_node_init_writes_a_config_with_one_zone_and_one_line_over_the_sample(tmp_path):
    proc = run_cli("node", "init", "--out", str(tmp_path / "node.yaml"))
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "node.yaml").read_text()
    config = load_config(tmp_path / "node.yaml")
    objects = config.objects
    assert objects is not None and objects.tracker == "bytetrack" and not objects.frame_events
    assert [z.name for z in objects.zones] == ["table"] and [ln.name for ln in objects.lines] == ["exit"]
    assert objects.lines[0].a[0] == objects.lines[0].b[0] == MIDDLE["a"][0]  # the line the walker test sees crossed
    assert config.sources[0].uri.endswith("one-by-one-person-detection.mp4")
    assert "/dev/video0" in text and "rtsp://" in text
    for folder in (tmp_path / "new-dir", tmp_path):  # "DIR/" (made), or an existing folder: node.yaml in it
        target = folder / "node.yaml"
        target.unlink(missing_ok=True)
        proc = run_cli("node", "init", "--out", f"{folder}/")
        assert proc.returncode == 0 and target.is_file() and target.read_text() == text, proc.stderr


def test_a_reload_to_a_model_without_a_rules_class_is_refused_and_the_old_model_keeps_running(tmp_path, walker_clip):
    from bastion.edge.client import NodeRequestError
    from bastion.runtime.detect import Detector

    zone = {"name": "table", "points": [[0.4, 0.4], [0.9, 0.4], [0.9, 1.0], [0.4, 1.0]], "classes": ["person"]}
    path = objects_config(tmp_path, walker_clip, objects={"zones": [zone]})
    with node_from(path) as node:
        running = node.detector
        other = Detector.load("yolov5n", imgsz=320, threads=1)
        other.names = [f"class{i}" for i in range(len(other.names))]  # the same model, no class named person
        node._load_detector = lambda bundle, audit_refusal=True: other
        client = Client(node.server.control_endpoint, timeout_s=10)
        try:
            with pytest.raises(NodeRequestError, match="reload refused: .*'person'"):
                client.reload("yolov5n")
        finally:
            client.close()
        assert node.detector is running


def test_this_sdk_still_reads_a_v1_node_that_refuses_the_v_field():
    """A node of the version before (replay without ``v``: extra fields refused) is asked again without it."""
    from test_sdk_hostile_node import FakeNode, _event, _heartbeat

    asked = []

    class OldNode(FakeNode):
        def _serve(self):
            while not self.stop.is_set():
                if not self.router.poll(50):
                    continue
                ident, raw = self.router.recv_multipart()
                request = json.loads(raw)
                asked.append(sorted(request))
                if request["op"] == "status":
                    answer = {"ok": True, "status": self.status}
                elif "v" in request:  # what protocol v1's parse_request answers an unknown field
                    answer = {"ok": False, "error": "replay: v: Extra inputs are not permitted"}
                else:
                    answer = {"ok": True, "events": [e for e in self.store if e["seq"] > request["since"]]}
                self.router.send_multipart([ident, json.dumps({"id": request["id"], **answer}).encode()])

    with OldNode([_event(1, 1), _event(2, 1)], [_heartbeat(2)]) as node:
        client = Client(node.control, events=node.events, timeout_s=3, retries=0)
        try:
            got = take(client.events(since=0, kinds=["det"], duration_s=1), 2, timeout_s=15)
        finally:
            client.close()
    assert [e.seq for e in got] == [1, 2] and all(isinstance(e, DetectionEvent) for e in got)
    replays = [keys for keys in asked if "since" in keys]
    assert "v" in replays[0] and "v" not in replays[-1]

"""Evidence clips (#18 item 6): a ring of JPEG frames per source, a clip around each object.end and rule event,
encoded by OpenCV, sealed with the snapshot key, served by the ``clip`` op to ``Client.clip`` — a real node on the
vendored person clip, real ZeroMQ on 127.0.0.1, real files; a write that fails is shown and detection goes on."""

import base64
import hashlib
import shutil
import time
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import yaml

from bastion.edge import clip_op
from bastion.edge.client import Client, NodeRequestError
from bastion.edge.clip_client import fetch_clip
from bastion.edge.clip_codec import encode
from bastion.edge.clip_meta import ClipMeta
from bastion.edge.clip_op import clip_answer
from bastion.edge.clip_ring import FrameRing, RingFrame, compress
from bastion.edge.clip_store import ClipVault
from bastion.edge.clips import ClipRecorder
from bastion.edge.events_v2 import kind_of
from bastion.edge.node import Node
from bastion.edge.store import StorageError
from bastion.edge.snapshots import generate_key_file, load_key
from bastion.errors import BastionError, ConfigError
from conftest import SAMPLES, run_cli
from node_kit import one_camera_node_config

# The person clip's first walker crosses x = 0.7 (right of the table) on her way out and is lost soon after:
# one line.cross and one object.end within the first ~230 frames (tests/test_node_objects.py looked at them).
EXIT = {"name": "exit", "a": [0.7, 0.02], "b": [0.7, 0.98], "classes": ["person"]}
WHOLE_VIEW = {"name": "view", "points": [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]}
CLIP_MAGIC = (b"RIFF", b"AVI ", b"ftyp", b"BCLIP1", b"object.end", b"line.cross")


def frame(ts, size=1000, index=0):
    return RingFrame(ts, index, bytes(size), 64, 48)


# -- the ring ---------------------------------------------------------------------------------------------------
def test_the_ring_keeps_at_most_its_seconds_and_its_bytes_oldest_out_first():
    by_time = FrameRing(max_s=2.0, max_bytes=10**9)
    by_bytes = FrameRing(max_s=100.0, max_bytes=10_000)
    for i in range(30):  # 4 frames a second for 7.25 s, 1000 bytes each
        by_time.push(frame(i * 0.25, index=i))
        by_bytes.push(frame(i * 0.25, index=i))
    assert [f.index for f in by_time.since(0)] == list(range(21, 30))  # 2 s back from the newest, no more
    assert [f.index for f in by_bytes.since(0)] == list(range(20, 30)) and by_bytes.bytes == 10_000
    assert by_bytes.as_dict()["evicted"] == 20 and by_time.as_dict()["span_s"] == 2.0
    by_bytes.push(frame(8.0, size=20_000))  # larger than the whole bound: not kept, nothing else lost for it
    assert len(by_bytes) == 10 and by_bytes.bytes == 10_000
    assert [f.index for f in by_bytes.since(6.5)] == [26, 27, 28, 29]
    with pytest.raises(ValueError):
        FrameRing(max_s=1, max_bytes=0)


def test_clips_beyond_max_pending_are_dropped_counted_and_remembered(tmp_path):
    storage = one_camera_node_config(tmp_path).storage.model_copy(update={"clip_max_pending": 2})
    vault = ClipVault(tmp_path / "clips", bytes(32), "n1")
    recorder = ClipRecorder(vault, storage, lambda: 1)
    for seq in (1, 2, 3, 4):
        recorder.trigger(seq, "object.end", "cam1", 10.0)
    recorder.trigger(5, "object.new", "cam1", 10.0)  # not a kind that keeps a clip
    assert [recorder.recording(s) for s in (1, 2, 3, 5)] == [True, True, False, False]
    assert recorder.status()["dropped"] == {"busy": 2} and recorder.status()["in_flight"] == 2
    assert "2 clips were in flight (clip_max_pending)" in recorder.outcome(3)
    assert recorder.outcome(5) is None
    node = SimpleNamespace(clips=recorder, store=SimpleNamespace(last_seq=lambda: 5, first_seq=lambda: 1))
    said = {seq: clip_answer(node, seq, 0)["error"] for seq in (1, 3, 5, 6)}  # what the clip op answers
    assert said == {
        1: "the clip of event 1 is still recording: ask again in a few seconds",
        3: "event 3 has no clip: not recorded: 2 clips were in flight (clip_max_pending)",
        5: "event 5 has no clip (clips are kept for object.end and zone/line events)",
        6: "no event 6 on this node (the last is 5)",
    }
    assert clip_answer(SimpleNamespace(clips=None), 1, 0)["error"] == "this node keeps no clips (storage.clips is off)"


def test_clip_counters_are_metrics_and_a_node_without_clips_has_none():
    from prometheus_client import CollectorRegistry, generate_latest

    from bastion.edge.metrics import StatusCollector

    def scrape(status):
        registry = CollectorRegistry()
        registry.register(StatusCollector(lambda: status))
        return generate_latest(registry).decode()

    clips = {"state": "paused", "error": "cannot write clips to /x: No space left on device", "recorded": 3,
             "failed": 2, "frames_dropped": 5, "pruned": 1, "dropped": {"busy": 4, "paused": 1}, "in_flight": 1,
             "stored": 3, "stored_bytes": 4096}  # fmt: skip
    text = scrape({"state": "degraded", "clips": clips})
    for line in (
        "bastion_clips_error 1.0",
        "bastion_clips_recorded_total 3.0",
        "bastion_clips_failed_total 2.0",
        "bastion_clips_frames_dropped_total 5.0",
        'bastion_clips_dropped_total{reason="busy"} 4.0',
        "bastion_clips_stored_bytes 4096.0",
    ):
        assert line in text.splitlines(), line
    assert "bastion_clips" not in scrape({"state": "running", "clips": None})


class _Answers:
    """A node that answers ``clip`` requests from a list (what a broken or hostile node might send)."""

    def __init__(self, answers):
        self.answers, self.asked = list(answers), []

    def request(self, op, **fields):
        self.asked.append(fields)
        return self.answers.pop(0)


def _chunks(video, step, **meta_over):
    meta = {
        "seq": 9, "kind": "line.cross", "source": "cam1", "codec": "mjpeg", "container": "avi", "frames": 3,
        "width": 8, "height": 8, "fps": 10.0, "start_ts": 1.0, "end_ts": 1.2, "event_ts": 1.1, "size": len(video),
        "sha256": hashlib.sha256(video).hexdigest(), **meta_over,
    }  # fmt: skip
    return [
        {"clip": meta, "offset": at, "data_b64": base64.b64encode(video[at : at + step]).decode(),
         "more": at + step < len(video)}
        for at in range(0, len(video), step)
    ]  # fmt: skip


def test_client_clip_puts_chunks_together_and_holds_the_node_to_its_metadata(tmp_path):
    video = bytes(range(256)) * 10
    node = _Answers(_chunks(video, 1000))
    clip = fetch_clip(node, 9)
    assert clip.data == video and [a["offset"] for a in node.asked] == [0, 1000, 2000]
    assert clip.save(tmp_path).name == "clip-9.avi" and (tmp_path / "clip-9.avi").read_bytes() == video
    forged = _chunks(video, 1000)
    forged[1]["data_b64"] = base64.b64encode(b"x" * 1000).decode()
    cases = {
        "does not match its metadata": forged,
        "changed between two of its chunks": [_chunks(video, 1000)[0], _chunks(video, 1000, frames=4)[1]],
        "starts at 1000, not at the 0": _chunks(video, 1000)[1:],
        "is the clip of event 9, not 8": _chunks(video, 1000),
        "holds no base64 video": [{**_chunks(video, 5000)[0], "data_b64": "%%%"}],
        "has no valid clip metadata": [{**_chunks(video, 5000)[0], "clip": {"seq": 9}}],
        "sent more than the 100 bytes": _chunks(video, 1000, size=100),
    }
    for says, answers in cases.items():
        with pytest.raises(NodeRequestError, match=says):
            fetch_clip(_Answers(answers), 8 if "not 8" in says else 9)


def test_frames_are_kept_as_jpeg_and_scaled_down_to_the_width_bound():
    image = np.random.default_rng(0).integers(0, 255, (720, 1280, 3), np.uint8)
    kept = compress(5.0, 3, image, max_width=640, quality=80)
    assert (kept.width, kept.height) == (640, 360) and kept.jpeg[:2] == b"\xff\xd8"
    assert len(kept.jpeg) < image.nbytes / 4  # compressed, not an array
    assert compress(5.0, 3, image[:100, :200], 640, 80).width == 200  # narrower frames are left as they are


# -- codec and vault -------------------------------------------------------------------------------------------
def _clip_of(frames, tmp_path, codec="mjpeg"):
    encoded = encode(frames, 10.0, codec, 2**26)
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / f"plain.{encoded.container}"
    path.write_bytes(encoded.data)
    return encoded, decoded(path)


def decoded(path):
    cap = cv2.VideoCapture(str(path))
    shapes = []
    while True:
        ok, image = cap.read()
        if not ok:
            break
        shapes.append(image.shape)
    cap.release()
    return shapes


@pytest.mark.parametrize("codec", ["mjpeg", "mp4v", "h264"])
def test_a_clip_encodes_to_a_video_opencv_reads_back_and_names_the_codec_it_used(tmp_path, codec):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (240, 320, 3), np.uint8) for _ in range(6)]
    frames = [compress(10 + i / 10, i, im, 1280, 80) for i, im in enumerate(images)]
    encoded, shapes = _clip_of(frames, tmp_path, codec)
    assert shapes == [(240, 320, 3)] * 6 and encoded.frames == 6
    assert encoded.codec in (codec, "mjpeg")  # h264 where the OpenCV build has it, else said to be mjpeg
    assert {"mjpeg": "avi", "mp4v": "mp4", "h264": "mp4"}[encoded.codec] == encoded.container


def test_without_memfd_the_video_goes_through_a_private_temp_file_that_is_removed(tmp_path, monkeypatch):
    import os
    import tempfile

    monkeypatch.delattr(os, "memfd_create")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    image = np.full((120, 160, 3), 60, np.uint8)
    encoded, shapes = _clip_of([compress(1 + i / 10, i, image, 1280, 80) for i in range(3)], tmp_path / "out")
    assert shapes == [(120, 160, 3)] * 3 and encoded.data[:4] == b"RIFF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the scratch directory is gone


def test_a_sealed_clip_is_not_a_video_on_disk_and_opens_only_as_its_own_event(tmp_path):
    key = load_key(generate_key_file(tmp_path / "k"))
    vault = ClipVault(tmp_path / "clips", key, "n1")
    image = np.full((120, 160, 3), 90, np.uint8)
    encoded, _ = _clip_of([compress(1 + i / 10, i, image, 1280, 80) for i in range(4)], tmp_path)
    meta = ClipMeta(
        seq=7, kind="object.end", source="cam1", codec=encoded.codec, container=encoded.container, frames=4,
        width=160, height=120, fps=10.0, start_ts=1.0, end_ts=1.3, event_ts=1.2, size=len(encoded.data),
        sha256=__import__("hashlib").sha256(encoded.data).hexdigest(),
    )  # fmt: skip
    path = vault.save(meta, encoded.data)
    blob = path.read_bytes()
    assert not any(magic in blob for magic in CLIP_MAGIC) and decoded(path) == []
    assert vault.load(7) == (meta, encoded.data)
    path.rename(vault.path(8))  # moved to another event: does not decrypt
    with pytest.raises(BastionError, match="does not decrypt"):
        vault.load(8)
    with pytest.raises(BastionError, match="no clip for event 7"):
        vault.load(7)
    for seq in (20, 21, 22):
        vault.seal(seq, bytes(1000))
    assert vault.prune_to(2100) == [8, 20] and vault.seqs() == [21, 22]  # the disk budget, oldest first
    assert vault.delete_before(22) == 1 and vault.seqs() == [22]  # retention: the clip goes with its event


def test_clips_need_the_key_and_tracked_objects(tmp_path):
    with pytest.raises(ConfigError, match="clips are stored encrypted"):
        one_camera_node_config(tmp_path, storage={"dir": str(tmp_path), "clips": True}, objects={})
    key = generate_key_file(tmp_path / "k")
    with pytest.raises(ConfigError, match="storage.clips needs tracked objects"):
        one_camera_node_config(tmp_path, storage={"dir": str(tmp_path), "clips": True, "snapshot_key": str(key)})
    with pytest.raises(ConfigError, match="clip_pre_s"):
        one_camera_node_config(
            tmp_path, storage={"dir": str(tmp_path), "clips": True, "snapshot_key": str(key), "clip_pre_s": 1e9}
        )


def test_the_clips_example_in_docs_events_md_is_a_valid_storage_section(tmp_path):
    from conftest import REPO

    text = (REPO / "docs" / "events.md").read_text().split("## Evidence clips", 1)[1]
    storage = yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])["storage"]
    config = one_camera_node_config(tmp_path, storage=storage, objects={})
    assert config.storage.clips and config.storage.clip_codec == "mjpeg" and config.storage.clip_max_pending == 4


# -- a real node -------------------------------------------------------------------------------------------------
def clip_node_config(tmp_path, objects=None):
    key = generate_key_file(tmp_path / "snapshot.key")
    source = {"name": "cam1", "uri": str(SAMPLES / "one-by-one-person-detection.mp4"), "loop": True}
    return one_camera_node_config(
        tmp_path,
        sources=[{**source, "realtime": False, "classes": ["person"]}],  # as fast as the model goes
        objects=objects or {"lines": [EXIT]},
        storage={
            "dir": str(tmp_path / "data"),
            "clips": True,
            "snapshot_key": str(key),
            "clip_pre_s": 1.0,
            "clip_post_s": 1.0,
            "clip_max_width": 384,  # half the clip's 768: the size bound is applied
        },
    )


def wait_for(what, check, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no {what} in {timeout_s} s")


def kinds_stored(client):
    return {kind_of(e): e.seq for e in reversed(client.replay(0, 5000))}  # the first seq of each kind


def clip_ready(node, client, kinds):
    """The seqs of the first event of each of ``kinds`` once each has its clip kept (or given up on)."""
    seqs = kinds_stored(client)
    if not all(k in seqs for k in kinds):
        return None
    if any(node.clips.recording(seqs[k]) for k in kinds):
        return None
    return {k: seqs[k] for k in kinds}


def test_clips_of_an_object_end_and_a_line_cross_are_kept_sealed_served_and_pruned(tmp_path, monkeypatch):
    monkeypatch.setattr(clip_op, "CLIP_CHUNK_BYTES", 10_000)  # a clip (~11 KB a frame) comes in several answers
    node = Node(clip_node_config(tmp_path))
    node.start()
    client = Client(node.server.control_endpoint, timeout_s=10)
    try:
        seqs = wait_for("clips", lambda: clip_ready(node, client, ["line.cross", "object.end"]))
        for kind, seq in seqs.items():
            clip = client.clip(seq, out=tmp_path)
            assert clip.meta.kind == kind and clip.meta.seq == seq and clip.meta.codec == "mjpeg"
            assert clip.meta.size > 2 * clip_op.CLIP_CHUNK_BYTES  # so it was put together from chunks
            assert clip.meta.start_ts <= clip.meta.event_ts <= clip.meta.end_ts + 1e-6  # before and after
            shapes = decoded(tmp_path / f"clip-{seq}.avi")
            assert len(shapes) == clip.meta.frames >= 2 and set(shapes) == {(216, 384, 3)}
            blob = node.clips.vault.path(seq).read_bytes()
            assert not any(magic in blob for magic in CLIP_MAGIC)  # sealed: no container, no JPEG, no metadata
        news = kinds_stored(client)["object.new"]
        with pytest.raises(NodeRequestError, match=f"event {news} has no clip .clips are kept for object.end"):
            client.clip(news)
        last = client.status()["last_seq"]
        with pytest.raises(NodeRequestError, match=f"no event {last + 100} on this node"):
            client.clip(last + 100)
        status = client.status()
        assert status["clips"]["recorded"] >= 2 and status["clips"]["error"] is None
        assert status["clips"]["rings"]["cam1"]["span_s"] <= 1.0 + 1e-6  # the ring holds clip_pre_s, no more
        node.config.storage.retention_days = 1e-9  # every event is now past retention
        node.enforce_retention()
        assert not node.clips.vault.path(seqs["object.end"]).exists()
        with pytest.raises(NodeRequestError, match="no longer stored .retention removed it and its clip"):
            client.clip(seqs["object.end"])
    finally:
        client.close()
        node.close()


def test_a_clips_dir_that_cannot_be_made_refuses_the_start_in_one_line(tmp_path):
    config = clip_node_config(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "clips").write_text("not a directory")
    with pytest.raises(StorageError, match="cannot use the clips dir .*clips: File exists"):
        Node(config)


def test_a_clip_write_that_fails_is_shown_in_status_and_detection_goes_on(tmp_path):
    node = Node(clip_node_config(tmp_path, {"zones": [WHOLE_VIEW]}))  # zone.enter as soon as she is announced
    clips_dir = node.clips.vault.dir
    shutil.rmtree(clips_dir)
    clips_dir.write_text("a file where the clips directory was: every clip write fails")
    node.start()
    client = Client(node.server.control_endpoint, timeout_s=10)
    try:
        seq = wait_for("a failed clip", lambda: clip_ready(node, client, ["zone.enter"]))["zone.enter"]
        with pytest.raises(NodeRequestError, match=f"event {seq} has no clip: it could not be kept: cannot write"):
            client.clip(seq)
        before = client.status()["published"]
        status = wait_for("more events", lambda: (s := client.status())["published"] > before and s)
        assert status["state"] == "degraded" and status["failure"] is None
        assert "cannot write clips to" in status["clips"]["error"] and status["clips"]["failed"] >= 1
        assert all(t["alive"] for name, t in status["threads"].items() if name.startswith("node-"))
        shown = run_cli("node", "status", "--control", node.server.control_endpoint)
        assert shown.returncode == 0, shown.stderr
        said = " ".join(shown.stdout.split())  # rich wraps at 80 columns in a pipe
        assert "clips: paused" in said or "clips: recording" in said, said
        assert "failed — cannot write clips to" in said, said
    finally:
        client.close()
        node.close()

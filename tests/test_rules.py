"""Object events and rules (edge/object_layer.py, edge/rules.py): what an operator is told, and when."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml

from bastion.edge.config import load_config
from bastion.edge.object_layer import ObjectLayer
from bastion.edge.rules_config import ObjectsConfig
from bastion.edge.track_ids import MemoryIdAllocator
from bastion.errors import ConfigError
from bastion.runtime.detections import Detections

NAMES = ["person", "car"]
W, H = 1000, 500  # frame size: normalised x = px / 1000, y = px / 500
SHAPE = (H, W, 3)


def det_at(centres, conf=0.9, cls=0, size=(40, 80)) -> Detections:
    """Boxes whose bottom centre (the default anchor) is at each normalised (x, y)."""
    w, h = size
    boxes = [[x * W - w / 2, y * H - h, x * W + w / 2, y * H] for x, y in centres]
    n = len(boxes)
    return Detections(
        np.asarray(boxes, np.float32).reshape(-1, 4),
        np.broadcast_to(np.asarray(conf, np.float32), (n,)).copy(),
        np.broadcast_to(np.asarray(cls, np.int64), (n,)).copy(),
        NAMES,
    )


def play(config: ObjectsConfig, frames, fps: float = 10.0):
    layer = ObjectLayer(config, MemoryIdAllocator(), NAMES)
    events = []
    for f, det in enumerate(frames):
        events += layer.process("cam", f, 1000.0 + f / fps, det, SHAPE).events
    return events


def kinds(events, *wanted):
    return [e for e in events if e.kind in wanted]


def test_line_crossings_have_a_direction_and_running_counts_and_passing_beside_the_line_is_not_one():
    # A vertical line down the middle of the upper half, a→b pointing down: moving right to left is "in"
    # (from the left of a→b to its right, as drawn on the image).
    config = ObjectsConfig(min_hits=1, lines=[{"name": "door", "a": [0.5, 0.0], "b": [0.5, 0.6]}])
    xs = np.concatenate([np.linspace(0.8, 0.2, 61), np.linspace(0.2, 0.8, 61), np.linspace(0.8, 0.2, 61)])
    crossing = [det_at([(x, 0.4)]) for x in xs]
    crosses = kinds(play(config, crossing), "line.cross")
    assert [(e.direction, e.count_in, e.count_out) for e in crosses] == [("in", 1, 0), ("out", 1, 1), ("in", 2, 1)]
    assert crosses[0].line == "door" and crosses[0].track == crosses[2].track

    beside = [det_at([(x, 0.9)]) for x in xs]  # below the segment's end: changes side, never crosses it
    assert kinds(play(config, beside), "line.cross") == []


def test_a_line_counts_only_its_classes_and_boxes_of_its_minimum_size():
    line = {"name": "door", "a": [0.5, 0.0], "b": [0.5, 1.0]}
    walk = [det_at([(x, 0.5)], cls=1) for x in np.linspace(0.8, 0.2, 61)]  # a car, 40×80 px = 0.64 % of the frame
    assert len(kinds(play(ObjectsConfig(min_hits=1, lines=[line]), walk), "line.cross")) == 1
    assert kinds(play(ObjectsConfig(min_hits=1, lines=[{**line, "classes": ["person"]}]), walk), "line.cross") == []
    assert kinds(play(ObjectsConfig(min_hits=1, lines=[{**line, "min_area": 0.01}]), walk), "line.cross") == []


def test_a_zone_sees_only_its_classes_and_boxes_of_its_minimum_size():
    zone = {"name": "gate", "points": [[0.405, 0.2], [0.595, 0.2], [0.595, 0.8], [0.405, 0.8]]}
    walk = [det_at([(x, 0.5)], cls=1) for x in np.linspace(0.2, 0.8, 61)]  # a car, 40×80 px = 0.64 % of the frame
    assert len(kinds(play(ObjectsConfig(min_hits=1, zones=[zone]), walk), "zone.enter", "zone.leave")) == 2
    for narrower in ({"classes": ["person"]}, {"min_area": 0.01}):
        config = ObjectsConfig(min_hits=1, zones=[{**zone, **narrower}])
        events = play(config, walk)
        assert kinds(events, "zone.enter", "zone.leave", "loiter") == [], narrower
        assert all(e.zones == [] for e in kinds(events, "object.new", "object.update", "object.end"))


def test_zone_enter_loiter_and_leave_with_dwell_time():
    zone = {"name": "gate", "points": [[0.405, 0.2], [0.595, 0.2], [0.595, 0.8], [0.405, 0.8]], "loiter_s": 2.0}
    # Walk in at 10 px a frame, stand 4 s (at 10 fps), walk out.
    path = np.concatenate([np.linspace(0.2, 0.5, 31), [0.5] * 40, np.linspace(0.5, 0.8, 31)])
    events = play(ObjectsConfig(min_hits=1, zones=[zone]), [det_at([(x, 0.5)]) for x in path])
    rule = kinds(events, "zone.enter", "loiter", "zone.leave")
    assert [e.kind for e in rule] == ["zone.enter", "loiter", "zone.leave"]
    enter, loiter, leave = rule
    inside = np.flatnonzero((path > 0.405) & (path < 0.595))
    assert enter.frame == inside[0] and leave.frame == inside[-1] + 1
    assert loiter.frame == inside[0] + 20 and loiter.dwell_s == pytest.approx(2.0)
    assert leave.dwell_s == pytest.approx((leave.frame - enter.frame) / 10) and leave.reason == "left"
    updates = kinds(events, "object.update")
    assert [u.zones for u in updates if u.reason == "zone"] == [["gate"], []]


def test_a_visit_ends_with_zone_leave_when_the_object_is_lost_inside():
    config = ObjectsConfig(min_hits=1, track_buffer=5, zones=[{"name": "z", "points": [[0, 0], [1, 0], [1, 1]]}])
    frames = [det_at([(0.7, 0.5)])] * 10 + [det_at([])] * 10
    events = play(config, frames)
    assert [e.kind for e in events if e.kind != "object.update"] == [
        "object.new",
        "zone.enter",
        "zone.leave",
        "object.end",
    ]
    leave, end = events[-2:]
    assert leave.reason == "lost" and end.reason == "lost" and end.zones == []


def test_object_new_waits_for_min_hits_and_a_shorter_sighting_makes_no_event_at_all():
    steady = [det_at([(0.5, 0.5)])] * 10
    events = play(ObjectsConfig(min_hits=5), steady)
    assert [(e.kind, e.frame) for e in events] == [("object.new", 4)]
    brief = [det_at([(0.5, 0.5)])] * 4 + [det_at([])] * 40
    assert play(ObjectsConfig(min_hits=5, track_buffer=10), brief) == []


def test_object_end_reports_first_and_last_seen_and_the_best_sighting():
    confs = [0.6, 0.7, 0.95, 0.8, 0.7, 0.6]
    frames = [det_at([(0.5, 0.5)], conf=c) for c in confs] + [det_at([])] * 4
    end = kinds(play(ObjectsConfig(min_hits=2, track_buffer=3, track_thresh=0.5), frames), "object.end")
    assert len(end) == 1
    assert end[0].first_seen == pytest.approx(1000.0) and end[0].last_seen == pytest.approx(1000.5)
    assert end[0].best_conf == pytest.approx(0.95) and end[0].best_frame == 2


def test_updates_are_rate_limited_periodic_and_on_change():
    minute = [det_at([(0.5, 0.5)])] * 600  # 60 s at 10 fps, nothing changes
    updates = kinds(play(ObjectsConfig(min_hits=1, update_s=10), minute), "object.update")
    assert [u.reason for u in updates] == ["periodic"] * 5
    assert [round(u.ts - 1000.0, 1) for u in updates] == [10.0, 20.0, 30.0, 40.0, 50.0]

    # The confidence swings by 0.3 every frame: worth telling, but at most once per update_min_s.
    flapping = [det_at([(0.5, 0.5)], conf=0.95 if f % 2 else 0.65) for f in range(100)]  # 10 s
    updates = kinds(play(ObjectsConfig(min_hits=1, update_s=60, update_min_s=2.0), flapping), "object.update")
    assert [u.reason for u in updates] == ["conf"] * 4
    gaps = np.diff([u.ts for u in updates])
    assert gaps.min() >= 2.0

    # A class change is reported (after update_min_s), the class is the one with most confidence overall.
    turns = [det_at([(0.5, 0.5)], cls=0)] * 5 + [det_at([(0.5, 0.5)], cls=1)] * 30
    updates = kinds(play(ObjectsConfig(min_hits=1, update_s=60, update_min_s=1.0), turns), "object.update")
    assert [(u.reason, u.name) for u in updates] == [("class", "car")]
    assert updates[0].frame == 10  # the car's votes outweigh the person's at its 6th sighting


def write_node_config(tmp_path, objects) -> str:
    path = tmp_path / "node.yaml"
    config = {"sources": [{"name": "cam", "uri": str(tmp_path)}], "objects": objects}
    path.write_text(yaml.safe_dump(config))
    return path


BAD_RULES = [
    ({"tracker": "sort"}, "unknown tracker 'sort'; known: bytetrack, none"),
    ({"zones": [{"name": "z", "points": [[0, 0], [1, 1], [1, 0], [0, 1]]}]}, "intersects itself"),
    ({"zones": [{"name": "z", "points": [[0, 0], [1.2, 0], [1, 1]]}]}, "outside [0, 1]"),
    ({"zones": [{"name": "z", "points": [[0, 0], [0.5, 0.5], [1, 1]]}]}, "no area"),
    ({"lines": [{"name": "l", "a": [0.3, 0.3], "b": [0.3, 0.3]}]}, "zero length"),
    ({"lines": [{"name": "l", "source": "gate", "a": [0, 0], "b": [1, 1]}]}, "names source 'gate'"),
    ({"low_thresh": 0.6}, "low_thresh 0.6 is above track_thresh 0.5"),
]


@pytest.mark.parametrize(("objects", "message"), BAD_RULES, ids=[m for _, m in BAD_RULES])
def test_a_bad_rule_is_one_clear_line_at_config_load(tmp_path, objects, message):
    with pytest.raises(ConfigError) as caught:
        load_config(write_node_config(tmp_path, objects))
    text = str(caught.value)
    assert message in text and "\n" not in text and "objects" in text


def test_a_rule_class_the_model_does_not_know_is_refused_at_start():
    config = ObjectsConfig(zones=[{"name": "z", "points": [[0, 0], [1, 0], [1, 1]], "classes": ["dragon"]}])
    with pytest.raises(ConfigError, match="unknown class name 'dragon'"):
        ObjectLayer(config, MemoryIdAllocator(), NAMES)


def test_node_run_with_a_self_intersecting_zone_exits_1_with_one_line(tmp_path):
    bad = write_node_config(tmp_path, {"zones": [{"name": "z", "points": [[0, 0], [1, 1], [1, 0], [0, 1]]}]})
    proc = subprocess.run(
        [sys.executable, "-m", "bastion.cli", "node", "run", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "intersects itself" in proc.stderr and "Traceback" not in proc.stderr and len(lines) <= 2, proc.stderr


def test_closing_a_source_ends_its_objects_with_reason_stop_and_its_tracker_starts_afresh():
    layer = ObjectLayer(
        ObjectsConfig(min_hits=2, zones=[{"name": "z", "points": [[0, 0], [1, 0], [1, 1]]}]), MemoryIdAllocator()
    )
    for f in range(5):
        layer.process("cam", f, 1000.0 + f, det_at([(0.7, 0.5), (0.2, 0.9)]), SHAPE)
    events = layer.close_source("cam", 1010.0, 5)
    assert sorted((e.kind, e.reason, e.name) for e in events) == [
        ("object.end", "stop", "person"),
        ("object.end", "stop", "person"),
        ("zone.leave", "stop", "person"),
    ]
    assert layer.close_source("cam", 1011.0, 6) == []
    assert [e.kind for e in layer.process("cam", 0, 1012.0, det_at([(0.7, 0.5)]), SHAPE).events] == []


def test_the_example_in_docs_events_md_is_a_valid_config(tmp_path):
    from conftest import REPO

    text = (REPO / "docs" / "events.md").read_text()
    example = yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    example["objects"]["zones"][0]["source"] = "cam"  # the example names a source this test's config has not
    config = load_config(write_node_config(tmp_path, example["objects"]))
    assert config.objects.tracker == "bytetrack" and [z.name for z in config.objects.zones] == ["gate"]
    assert config.objects.lines[0].classes == ["person", "car"]

"""What ``bastion bench track`` measures (its command line: bastion/bench_track.py): tracking quality on a synthetic MOT set with known truth, and the per-frame cost.

The set is made here, from a seed, so anyone can rebuild it: the hand-boxed person of the vendored frame
``one-by-one-person-detection-0100.jpg`` (tests/conftest.py PERSON_BOX) is cut out, scaled and mirrored
into people who walk along known straight, slightly wavering paths over the vendored parking-lot frame
(mirrored for every other sequence). They enter and leave at the edges, some stand still, pairs are sent
at each other to **cross** (the nearer one, lower in the frame, hides the other), and a **pillar** cut
from the background stands in front of everyone, hiding whoever passes behind it.

Detections come from one of two places:

* ``truth`` (default): a simulated detector on the known boxes, visibility-aware (what the renderer knows
  is hidden): a box jitters by ~3 % of its size, an object less than 30 % visible is missed, one 30–70 %
  visible is found at a low score (ByteTrack's second association is for exactly that), 3 % are missed at
  random, and ~0.3 false positives a frame appear. Fast, and it measures the tracker alone.
* a detector bundle (``--detector yolov5n``): the real model on the rendered frames (persons only), so the
  number includes what the detector gets wrong.

Scores: edge-free MOTA, IDF1 and ID switches (bastion/mot_metrics.py; the headline is ID switches per 100
true tracks). Cost: the object layer (tracker + two zones + two lines) timed per frame with 20 people.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from bastion.edge.object_layer import ObjectLayer
from bastion.edge.rules_config import ObjectsConfig
from bastion.edge.track_ids import MemoryIdAllocator
from bastion.mot_metrics import Frame, score
from bastion.runtime.detections import Detections

SAMPLES = Path(__file__).resolve().parent / "samples" / "images"
PERSON_IMAGE = SAMPLES / "one-by-one-person-detection-0100.jpg"
PERSON_BOX = (383, 12, 514, 392)  # drawn by hand (tests/conftest.py)
BACKGROUND = SAMPLES / "car-detection-0060.jpg"
NAMES = ["person"]
FPS = 30.0
MIN_VISIBLE = 0.3  # truth below this visibility is not scored (MOT17 practice: heavily hidden ≈ not visible)


@dataclass
class Walker:
    start: int  # first frame
    x: float  # box left at the start frame, pixels
    y: float  # box bottom
    vx: float  # pixels per frame
    vy: float
    height: float
    flip: bool
    wobble: float  # amplitude of a slow sideways sway, pixels
    phase: float

    def box(self, f: int) -> np.ndarray:
        t = f - self.start
        x = self.x + self.vx * t + self.wobble * np.sin(self.phase + t / 15)
        y = self.y + self.vy * t
        w = self.height * (PERSON_BOX[2] - PERSON_BOX[0]) / (PERSON_BOX[3] - PERSON_BOX[1])
        return np.array([x, y - self.height, x + w, y])


@dataclass
class Sequence:
    background: np.ndarray
    pillar: tuple[int, int]  # x1, x2 of the column drawn over everyone
    walkers: list[Walker]
    frames: int


def make_sequence(rng: np.random.Generator, index: int, people: int, frames: int) -> Sequence:
    bg = cv2.imread(str(BACKGROUND))
    if index % 2:
        bg = bg[:, ::-1].copy()
    h, w = bg.shape[:2]
    walkers = []
    for k in range(people):
        height = float(rng.uniform(90, 200))
        bottom = float(rng.uniform(height + 5, h - 5))
        kind = k % 5
        if kind == 4:  # stands about
            walkers.append(
                Walker(
                    int(rng.integers(0, frames // 2)),
                    rng.uniform(0, w - 60),
                    bottom,
                    0,
                    0,
                    height,
                    bool(rng.integers(2)),
                    6,
                    rng.uniform(0, 6),
                )
            )
            continue
        speed = float(rng.uniform(1.5, 4.5)) * (1 if rng.integers(2) else -1)
        x0 = -50.0 if speed > 0 else float(w)
        walkers.append(
            Walker(
                int(rng.integers(0, frames // 2)),
                x0,
                bottom,
                speed,
                float(rng.uniform(-0.4, 0.4)),
                height,
                speed < 0,
                float(rng.uniform(0, 8)),
                rng.uniform(0, 6),
            )
        )
        if kind == 0:  # a partner sent the other way along nearly the same row: they cross
            meet = walkers[-1].start + int(rng.integers(40, 120))
            xm = x0 + speed * (meet - walkers[-1].start)
            back = -speed * float(rng.uniform(0.7, 1.3))
            start = max(0, meet - int(abs((xm - (w if back < 0 else -50.0)) / back)))
            x_start = xm - back * (meet - start)
            walkers.append(
                Walker(
                    start,
                    x_start,
                    bottom + float(rng.uniform(-25, 25)),
                    back,
                    0,
                    height * float(rng.uniform(0.9, 1.1)),
                    back < 0,
                    2,
                    0,
                )
            )
    x1 = int(rng.integers(w // 4, 3 * w // 4))
    return Sequence(bg, (x1, x1 + int(rng.integers(25, 45))), walkers, frames)


def _sprite(width: int, height: int, flip: bool, cache: dict) -> np.ndarray:
    key = (width, height, flip)
    if key not in cache:
        person = cv2.imread(str(PERSON_IMAGE))[PERSON_BOX[1] : PERSON_BOX[3], PERSON_BOX[0] : PERSON_BOX[2]]
        sprite = cv2.resize(person, (width, height), interpolation=cv2.INTER_AREA)
        cache[key] = sprite[:, ::-1] if flip else sprite
    return cache[key]


def render(
    seq: Sequence, f: int, cache: dict, draw: bool
) -> tuple[np.ndarray | None, list[tuple[int, np.ndarray, float]]]:
    """The frame (when ``draw``) and the truth: (walker index, box clipped to the frame, visible fraction)."""
    h, w = seq.background.shape[:2]
    canvas = seq.background.copy() if draw else None
    live = [(i, wk.box(f)) for i, wk in enumerate(seq.walkers) if f >= wk.start]
    live = [(i, b) for i, b in live if b[2] > 0 and b[0] < w and b[3] > 0 and b[1] < h]
    live.sort(key=lambda item: item[1][3])  # far (higher in the frame) first; nearer ones are drawn over them
    truth = []
    for rank, (i, box) in enumerate(live):
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        cx1, cy1, cx2, cy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
        if cx2 <= cx1 or cy2 <= cy1:
            continue
        seen = np.ones((cy2 - cy1, cx2 - cx1), bool)
        for _, nearer in live[rank + 1 :]:
            nx1, ny1, nx2, ny2 = (int(round(v)) for v in nearer)
            seen[max(ny1 - cy1, 0) : max(ny2 - cy1, 0), max(nx1 - cx1, 0) : max(nx2 - cx1, 0)] = False
        px1, px2 = seq.pillar
        seen[:, max(px1 - cx1, 0) : max(px2 - cx1, 0)] = False
        visible = seen.sum() / max((x2 - x1) * (y2 - y1), 1)
        truth.append((i, np.array([cx1, cy1, cx2, cy2], np.float32), float(visible)))
        if canvas is not None:
            sprite = _sprite(x2 - x1, y2 - y1, seq.walkers[i].flip, cache)
            canvas[cy1:cy2, cx1:cx2] = sprite[cy1 - y1 : cy2 - y1, cx1 - x1 : cx2 - x1]
    if canvas is not None:
        px1, px2 = seq.pillar
        canvas[:, px1:px2] = seq.background[:, px1 + 60 : px2 + 60] if px2 + 60 <= w else 90
    return canvas, truth


def simulated_detections(truth: list[tuple[int, np.ndarray, float]], rng: np.random.Generator, shape) -> Detections:
    boxes, confs = [], []
    for _, box, visible in truth:
        if visible < MIN_VISIBLE or rng.random() < 0.03:
            continue
        size = np.array([box[2] - box[0], box[3] - box[1]] * 2)
        boxes.append(box + rng.normal(0, 0.03, 4) * size)
        conf = float(np.clip(rng.normal(0.82, 0.07), 0.5, 0.99))
        confs.append(conf * 0.45 if visible < 0.7 else conf)
    for _ in range(rng.poisson(0.3)):
        h = rng.uniform(60, 200)
        x, y = rng.uniform(0, shape[1] - h / 3), rng.uniform(0, shape[0] - h)
        boxes.append(np.array([x, y, x + h / 3, y + h]))
        confs.append(float(rng.uniform(0.1, 0.65)))
    n = len(boxes)
    return Detections(
        np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(confs, np.float32), np.zeros(n, np.int64), NAMES
    )


def run_set(
    config: ObjectsConfig,
    seed: int,
    sequences: int,
    frames: int,
    people: int,
    detect: Callable[[np.ndarray], Detections] | None,
    on_sequence: Callable[[int], None] = lambda i: None,
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    scored: list[Frame] = []
    cache: dict = {}
    for s in range(sequences):
        seq = make_sequence(rng, s, people, frames)
        layer = ObjectLayer(config, MemoryIdAllocator(), NAMES)
        for f in range(frames):
            image, truth = render(seq, f, cache, draw=detect is not None)
            det = (
                detect(image)
                if detect is not None and image is not None
                else simulated_detections(truth, rng, seq.background.shape)
            )
            tracked = layer.process(f"seq{s}", f, f / FPS, det, seq.background.shape).detections
            gt = {s * 1000 + i: box for i, box, visible in truth if visible >= MIN_VISIBLE}
            hyp = {s * 100_000 + int(t): tracked.xyxy[k] for k, t in enumerate(tracked.tracker_id) if t >= 0}
            scored.append((gt, hyp))
        on_sequence(s)
    return score(scored).as_dict()


def time_layer(config: ObjectsConfig, seed: int, objects: int = 20, frames: int = 600) -> dict[str, float]:
    """Per-frame cost of ObjectLayer.process with ``objects`` people in view, two zones and two lines.

    Wall time (``*_ms``) and the thread's CPU time (``cpu_*_ms``, ``time.thread_time``): on a shared machine
    the wall tail is other processes taking the core mid-frame; the CPU time is what the layer itself costs."""
    rng = np.random.default_rng(seed)
    rules = config.model_copy(
        update={
            "zones": ObjectsConfig(
                zones=[
                    {"name": "left", "points": [[0, 0.3], [0.4, 0.3], [0.4, 1], [0, 1]], "loiter_s": 5},
                    {"name": "right", "points": [[0.6, 0.3], [1, 0.3], [1, 1], [0.6, 1]]},
                ]
            ).zones,
            "lines": ObjectsConfig(
                lines=[{"name": "mid", "a": [0.5, 0], "b": [0.5, 1]}, {"name": "low", "a": [0, 0.8], "b": [1, 0.8]}]
            ).lines,
        }
    )
    layer = ObjectLayer(rules, MemoryIdAllocator(), NAMES)
    start = rng.uniform([0, 100], [700, 400], (objects, 2))
    velocity = rng.uniform(-3, 3, (objects, 2))
    times, cpu = [], []
    for f in range(frames):
        xy = np.abs((start + velocity * f - [0, 100]) % [1400, 600] - [700, 300])  # bounce inside the frame
        xy[:, 0] = 700 - xy[:, 0]
        xy[:, 1] = 400 - xy[:, 1]
        boxes = np.concatenate([xy, xy + [30, 90]], axis=1) + rng.normal(0, 1.5, (objects, 4))
        det = Detections(
            boxes.astype(np.float32),
            rng.uniform(0.6, 0.95, objects).astype(np.float32),
            np.zeros(objects, np.int64),
            NAMES,
        )
        c0, t0 = time.thread_time(), time.perf_counter()
        layer.process("cam", f, f / FPS, det, (432, 768, 3))
        times.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    ms = np.asarray(times[30:]) * 1000  # after the tracks are established
    cpu_ms = np.asarray(cpu[30:]) * 1000
    return {
        "objects": objects,
        "frames": len(ms),
        "mean_ms": round(float(ms.mean()), 4),
        "p50_ms": round(float(np.percentile(ms, 50)), 4),
        "p99_ms": round(float(np.percentile(ms, 99)), 4),
        "cpu_mean_ms": round(float(cpu_ms.mean()), 4),
        "cpu_p50_ms": round(float(np.percentile(cpu_ms, 50)), 4),
        "cpu_p99_ms": round(float(np.percentile(cpu_ms, 99)), 4),
    }


def detector_fn(model: str, imgsz: int | None, threads: int | None) -> Callable[[np.ndarray], Detections]:
    """A real detector bundle on the rendered frames, persons only."""
    from bastion.runtime.detect import Detector

    detector = Detector.load(model, threads=threads, imgsz=imgsz, classes=["person"])

    def detect(image: np.ndarray) -> Detections:
        found = detector.detect(image)
        return Detections(found.xyxy, found.conf, np.zeros(len(found), np.int64), NAMES)

    return detect


CLIPS = ("one-by-one-person-detection.mp4", "car-detection.mp4")


def event_volume(model: str, imgsz: int | None, threads: int | None) -> dict[str, Any]:
    """Events per minute of video on the sample clips: one frame event per frame with a detection (the node
    today) against the object layer's events (default ``objects:`` settings, no rules)."""
    from bastion.runtime.detect import Detector
    from bastion.runtime.media import iter_video

    detector = Detector.load(model, threads=threads, imgsz=imgsz)
    result = {}
    for clip in CLIPS:
        path = SAMPLES.parent / clip
        fps = cv2.VideoCapture(str(path)).get(cv2.CAP_PROP_FPS) or 30.0
        layer = ObjectLayer(ObjectsConfig(), MemoryIdAllocator())
        frame_events = object_events = frames = 0
        for frame in iter_video(path):
            det = detector.detect(frame.image)
            frame_events += bool(len(det))
            object_events += len(layer.process(clip, frame.index, frame.index / fps, det, frame.image.shape).events)
            frames += 1
        object_events += len(layer.close_source(clip, frames / fps, frames))
        minutes = frames / fps / 60
        result[clip] = {
            "frames": frames,
            "fps": round(fps, 2),
            "frame_events_per_min": round(frame_events / minutes, 1),
            "object_events_per_min": round(object_events / minutes, 1),
            "ratio": round(frame_events / max(object_events, 1), 1),
        }
    return result


def bench_track(
    seed: int = 0,
    sequences: int = 6,
    frames: int = 300,
    people: int = 12,
    track_buffer: int = 30,
    detector: str | None = None,
    imgsz: int | None = None,
    threads: int | None = None,
    on_sequence: Callable[[int], None] = lambda i: None,
    volume_model: str | None = None,
    cost_only: bool = False,
    objects: int = 20,
) -> dict[str, Any]:
    config = ObjectsConfig(track_buffer=track_buffer)
    if cost_only:  # the per-frame cost alone: no set to render and score
        return {"cost": time_layer(config, seed, objects)}
    detect = detector_fn(detector, imgsz, threads) if detector else None
    t0 = time.perf_counter()
    quality = run_set(config, seed, sequences, frames, people, detect, on_sequence)
    return {
        "set": {
            "seed": seed,
            "sequences": sequences,
            "frames_per_sequence": frames,
            "people_per_sequence": people,
            "fps": FPS,
            "detections": detector or "truth (simulated detector)",
            "min_visible": MIN_VISIBLE,
        },
        "tracker": config.model_dump(include={"tracker", "track_thresh", "low_thresh", "match_thresh", "track_buffer"}),
        "quality": quality,
        "quality_wall_s": round(time.perf_counter() - t0, 2),
        "cost": time_layer(config, seed, objects),
        "metrics": "bastion/mot_metrics.py (no motmetrics/trackeval installed; CLEAR MOT and IDF1 at IoU 0.5)",
        **({"event_volume": event_volume(volume_model, imgsz, threads)} if volume_model else {}),
    }

"""The demo's data: training frames sampled from the vendored clips, and the hand-labelled frames held out from them.

The ground truth (``bastion/samples/groundtruth``, see its README) is frames of the same two clips the demo
trains on. Holding it out fairly means more than not training on those exact frames: at 10 fps the frame next to a
scored one is a near-copy of it, so no training frame is taken within ``GROUND_TRUTH_GAP`` frames of one.
"""

from __future__ import annotations

import re
from pathlib import Path

from bastion.sample_paths import SAMPLES

GROUND_TRUTH = SAMPLES / "groundtruth"
GROUND_TRUTH_GAP = 13  # frames: 1.3 s of the person clip, 1.04 s of the car clip
TRAIN_EVERY = 8  # every 8th frame of each clip is a training image (minus the ground truth's neighbourhood)
_FRAME_NAME = re.compile(r"^(?P<clip>.+)-(?P<frame>\d{5})$")


def ground_truth_frames(images: Path = GROUND_TRUTH / "images") -> dict[str, set[int]]:
    """Clip stem → frame indices of the labelled frames (their file names are ``<clip>-<frame:05d>.jpg``)."""
    held: dict[str, set[int]] = {}
    for path in sorted(images.glob("*.jpg")) if images.is_dir() else []:
        m = _FRAME_NAME.match(path.stem)
        if m:
            held.setdefault(m["clip"], set()).add(int(m["frame"]))
    return held


def training_frame_indices(
    total: int, every: int = TRAIN_EVERY, held_out: set[int] = frozenset(), gap: int = GROUND_TRUTH_GAP
) -> list[int]:
    """Every ``every``-th frame index below ``total`` that is at least ``gap`` frames from every held-out one."""
    return [i for i in range(total) if trains_on(i, every, held_out, gap)]


def trains_on(index: int, every: int, held_out: set[int], gap: int = GROUND_TRUTH_GAP) -> bool:
    """Whether frame ``index`` is a training frame: on the ``every`` grid and not near a held-out frame."""
    return index % every == 0 and all(abs(index - g) >= gap for g in held_out)


def sample_frames(videos: list[Path], out: Path, every: int = TRAIN_EVERY, held_out=None) -> list[Path]:
    """The demo's unlabelled training images as JPEGs: every ``every``-th frame of the clips, minus the
    neighbourhood of the held-out frames (``held_out``: clip stem → frame indices, default the ground truth)."""
    from bastion.runtime.media import iter_video
    from bastion.runtime.outputs import save_image

    held_out = ground_truth_frames() if held_out is None else held_out
    written = []
    for video in videos:
        held = held_out.get(video.stem, set())
        for frame in iter_video(video):
            if trains_on(frame.index, every, held):
                path = out / f"{video.stem}-{frame.index:05d}.jpg"
                save_image(path, frame.image)
                written.append(path)
    return written


COCO_NAMES = {0: "person", 1: "bicycle", 2: "car", 3: "motorcycle", 5: "bus", 7: "truck"}  # the ids the set uses


def ground_truth_summary(root: Path = GROUND_TRUTH) -> dict | None:
    """What the report says about the ground truth: where, how many boxes of what, how many empty frames."""
    labels = sorted((root / "labels").glob("*.txt")) if (root / "labels").is_dir() else []
    if not labels:
        return None
    boxes: dict[str, int] = {}
    empty = 0
    for path in labels:
        ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
        empty += not ids
        for i in ids:
            name = COCO_NAMES.get(int(i), f"class {i}")
            boxes[name] = boxes.get(name, 0) + 1
    where = root.relative_to(SAMPLES.parent.parent) if root.is_relative_to(SAMPLES.parent.parent) else root
    return {"path": str(where), "frames": len(labels), "boxes": boxes, "empty": empty, "gap": GROUND_TRUTH_GAP}


def operating_point(
    model: str,
    classes: list[str],
    class_map: dict[str, str],
    root: Path = GROUND_TRUTH,
    iou: float = 0.5,
    allow_unsigned: bool = False,
) -> dict | None:
    """The served model at its own confidence threshold on the hand-labelled frames — what a person watching the
    node sees. mAP ranks detections down to conf 0.001, so a false person at 0.45 on an empty wall costs it
    nothing while every real person scores higher; these counts do not forgive it. Greedy matching, highest
    confidence first, same class, IoU ≥ ``iou``; ``class_map`` maps teacher names to the demo's (car → vehicle)."""
    import numpy as np

    from bastion.runtime.detect import Detector
    from bastion.runtime.media import read_image

    labels = sorted((root / "labels").glob("*.txt")) if (root / "labels").is_dir() else []
    if not labels:
        return None
    detector = Detector.load(model, threads=1, allow_unsigned=allow_unsigned)
    mission = set(classes)
    tp = fp = fn = empty = 0
    on_empty: list[str] = []
    try:
        for path in labels:
            image = read_image(root / "images" / f"{path.stem}.jpg")
            h, w = image.shape[:2]
            truth = []
            for line in path.read_text().splitlines():
                if line.strip():
                    c, x, y, bw, bh = line.split()
                    name = COCO_NAMES.get(int(c), c)
                    cx, cy, bw, bh = float(x) * w, float(y) * h, float(bw) * w, float(bh) * h
                    truth.append((class_map.get(name, name), (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)))
            found = detector.detect(image)
            named = [
                (class_map.get(found.names[int(k)], found.names[int(k)]), b, float(s))
                for b, s, k in zip(found.xyxy, found.conf, found.cls)
            ]
            named = sorted((d for d in named if d[0] in mission), key=lambda d: -d[2])
            used = [False] * len(truth)
            for name, box, _score in named:
                best, best_iou = None, iou
                for i, (tname, tbox) in enumerate(truth):
                    overlap = _iou(np.asarray(box), np.asarray(tbox))
                    if not used[i] and tname == name and overlap >= best_iou:
                        best, best_iou = i, overlap
                if best is None:
                    fp += 1
                else:
                    used[best] = True
                    tp += 1
            fn += used.count(False)
            if not truth:
                empty += 1
                if named:
                    on_empty.append(f"{path.stem}: " + ", ".join(f"{n} {s:.2f}" for n, _, s in named))
    finally:
        detector.close()
    return {
        "frames": len(labels),
        "conf": round(float(detector.conf), 3),
        "iou": iou,
        "true_positives": tp,
        "false_positives": fp,
        "missed": fn,
        "precision": round(tp / (tp + fp), 3) if tp + fp else None,
        "recall": round(tp / (tp + fn), 3) if tp + fn else None,
        "empty_frames": empty,
        "empty_frames_with_detections": on_empty,
    }


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0

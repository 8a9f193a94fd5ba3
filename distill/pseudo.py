"""Pseudo-labels: the teachers' fused, narrowed detections as a YOLO training set (ground truth wins).

For every image: each teacher detects (low threshold, to keep soft scores),
its classes are narrowed/merged through the ClassMap, the teachers are fused
with weighted boxes fusion, and boxes above the per-class threshold become hard
YOLO labels.  All fused boxes above a small floor are kept with their scores in
``soft/<stem>.json``, and the score of every hard label is written line for line
to ``scores/<split>/<stem>.txt`` for the soft-target loss (soft_targets.py).  Images with ground-truth labels
use those instead; a deterministic share of them is held out as the validation
split that every candidate is scored on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import yaml

from bastion.distill.classmap import ClassMap
from bastion.distill.wbf import weighted_boxes_fusion
from bastion.errors import ConfigError
from bastion.models.manifest import sha256_file
from bastion.runtime.detect import Detector
from bastion.runtime.media import read_image

if TYPE_CHECKING:
    from bastion.distill.labellers import Labeller

log = logging.getLogger(__name__)
SOFT_FLOOR = 0.05


@dataclass
class LabelStats:
    images: int = 0
    train: int = 0
    val: int = 0
    ground_truth: int = 0
    pseudo: int = 0
    corrupt: list[str] = field(default_factory=list)
    boxes_per_class: dict[str, int] = field(default_factory=dict)


def held_out(name: str, fraction: float) -> bool:
    """Deterministic split: the same image is always on the same side."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def read_gt(label_file: Path, class_map: ClassMap) -> np.ndarray:
    """YOLO labels in the teacher's class space → [N,5] (student class, cx, cy, w, h); errors name the line."""
    rows = []
    for lineno, line in enumerate(label_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            cls, *xywh = int(parts[0]), *map(float, parts[1:5])
        except (ValueError, IndexError):
            raise ConfigError(f"{label_file}:{lineno}: expected 'class cx cy w h'") from None
        if len(xywh) != 4 or not all(0.0 <= v <= 1.0 for v in xywh):
            raise ConfigError(f"{label_file}:{lineno}: coordinates must be 4 numbers in [0, 1]")
        if cls in class_map.to_student:
            rows.append([class_map.to_student[cls], *xywh])
    return np.asarray(rows, np.float32).reshape(-1, 5)


def teacher_boxes(teacher: Detector, class_map: ClassMap, image: np.ndarray) -> tuple[np.ndarray, ...]:
    """One teacher's detections, narrowed to student classes, in normalised xyxy."""
    det = teacher.detect(image)
    h, w = image.shape[:2]
    keep = np.array([int(c) in class_map.to_student for c in det.cls], dtype=bool)
    boxes = det.xyxy[keep] / np.array([w, h, w, h], np.float32)
    labels = np.array([class_map.to_student[int(c)] for c in det.cls[keep]], np.int64)
    return boxes, det.conf[keep], labels


THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)


def fused_boxes(
    image: np.ndarray, teachers: list[Detector], maps: list[ClassMap], weights: list[float] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every teacher on one image, narrowed, fused with WBF: (normalised xyxy, scores, student classes)."""
    return weighted_boxes_fusion(*zip(*(teacher_boxes(t, m, image) for t, m in zip(teachers, maps))), weights=weights)


def choose_thresholds(
    samples: list[tuple[np.ndarray, np.ndarray]],
    teachers: list[Detector],
    maps: list[ClassMap],
    n_classes: int,
    fallback: float = 0.25,
) -> tuple[list[float], dict]:
    """Per-class pseudo-label thresholds: the one maximising F1 (IoU 0.5) of the fused teachers against ground truth.

    ``samples``: (image, ground truth [N,5] student class + normalised cx cy w h). Matching is greedy by score,
    once at the lowest threshold (a higher threshold only drops predictions, never re-matches them), so every
    grid value is scored from the same matches. Classes without ground truth keep ``fallback``.
    """
    from bastion.runtime.nms import box_iou

    scores: list[list[float]] = [[] for _ in range(n_classes)]
    matched: list[list[bool]] = [[] for _ in range(n_classes)]
    n_gt = np.zeros(n_classes, np.int64)
    for image, gt in samples:
        boxes, conf, labels = fused_boxes(image, teachers, maps)
        gt_xyxy = (
            np.concatenate([gt[:, 1:3] - gt[:, 3:5] / 2, gt[:, 1:3] + gt[:, 3:5] / 2], 1)
            if len(gt)
            else np.zeros((0, 4), np.float32)
        )
        for c in range(n_classes):
            g = gt_xyxy[gt[:, 0] == c] if len(gt) else gt_xyxy
            n_gt[c] += len(g)
            free = np.ones(len(g), bool)
            for i in np.argsort(-conf):
                if labels[i] != c:
                    continue
                hit = False
                if free.any():
                    ious = np.where(free, box_iou(boxes[i], g), 0.0)
                    j = int(np.argmax(ious))
                    if ious[j] >= 0.5:
                        free[j], hit = False, True
                scores[c].append(float(conf[i]))
                matched[c].append(hit)
    chosen, detail = [], {}
    for c in range(n_classes):
        if n_gt[c] == 0:
            chosen.append(fallback)
            detail[c] = {"threshold": fallback, "reason": "no ground-truth boxes of this class: default"}
            continue
        sc, hit = np.asarray(scores[c]), np.asarray(matched[c], bool)
        f1 = []
        for t in THRESHOLD_GRID:
            tp = int((hit & (sc >= t)).sum())
            fp = int((~hit & (sc >= t)).sum())
            f1.append(2 * tp / max(2 * tp + fp + (n_gt[c] - tp), 1))
        best = int(np.argmax(f1))
        chosen.append(float(THRESHOLD_GRID[best]))
        detail[c] = {"threshold": float(THRESHOLD_GRID[best]), "f1": round(f1[best], 4), "gt_boxes": int(n_gt[c])}
    return chosen, detail


def _readable(path: Path) -> str | None:
    """None when ``path`` reads as an image (a ground-truth image the teachers skip), else why not."""
    try:
        read_image(path)
    except Exception as exc:
        return str(exc)
    return None


def _link(src: Path, dst: Path) -> None:
    try:
        os.symlink(src.resolve(), dst)
    except OSError:
        shutil.copy2(src, dst)


def build_dataset(
    images: list[Path],
    labels_dir: Path | None,
    labeller: Labeller,
    maps: list[ClassMap],
    student: list[str],
    thresholds: list[float],
    out: Path,
    val_fraction: float = 0.25,
    tick: Callable[[], None] | None = None,
    val_set: tuple[list[Path], Path] | None = None,
) -> LabelStats:
    """Label ``images`` into ``out`` (YOLO layout + scores); ``val_set`` = (images, labels dir) held out instead
    of a share of the labelled images.

    ``labeller`` runs the teachers over the images without ground truth (in this process, or on Ray:
    ``labellers.py``) and hands back their fused boxes in order; every file is written here, the same way
    whoever ran the teachers."""
    stats = LabelStats(boxes_per_class={c: 0 for c in student})
    if val_set is not None:
        clash = {p.name for p in images} & {p.name for p in val_set[0]}
        if clash:
            raise ConfigError(
                f"{sorted(clash)[0]} is in both --images and --val-images",
                "a held-out image must not be trained on: keep the two sets apart",
            )
    for split in ("train", "val"):
        for kind in ("images", "labels", "scores"):
            (out / kind / split).mkdir(parents=True, exist_ok=True)
    (out / "soft").mkdir(exist_ok=True)
    work = []  # (image, fixed split, its ground-truth file or None): known before any teacher runs
    for path, fixed_split in [(p, None) for p in images] + [(p, "val") for p in (val_set[0] if val_set else [])]:
        gt_dir = val_set[1] if fixed_split else labels_dir
        gt_file = gt_dir / f"{path.stem}.txt" if gt_dir else None
        work.append((path, fixed_split, gt_file if gt_file is not None and gt_file.is_file() else None))
    fused = labeller.fuse([p for p, fixed, gt in work if not fixed and gt is None])
    for path, fixed_split, gt_file in work:
        if tick:
            tick()
        has_gt = gt_file is not None
        outcome = next(fused)[1] if not fixed_split and not has_gt else _readable(path)
        if isinstance(outcome, str):  # corrupt: skipped, counted, reported
            stats.corrupt.append(f"{path.name}: {outcome}")
            continue
        stats.images += 1
        # held out: ground-truth images when there are labels; otherwise pseudo-labelled ones (then scores
        # measure agreement with the teachers, and the report says so)
        split = fixed_split or (
            "val"
            if val_set is None and (has_gt or labels_dir is None) and held_out(path.name, val_fraction)
            else "train"
        )
        if fixed_split and not has_gt:  # a held-out image without a label file: it shows no object
            rows = np.zeros((0, 5), np.float32)
            stats.ground_truth += 1
        elif has_gt:
            rows = read_gt(gt_file, maps[0])
            stats.ground_truth += 1
        else:
            boxes, scores, labels = outcome.boxes, outcome.scores, outcome.labels
            soft = [
                {"cls": int(c), "score": round(float(s), 4), "box": [round(float(v), 5) for v in b]}
                for b, s, c in zip(boxes, scores, labels)
                if s >= SOFT_FLOOR
            ]
            (out / "soft" / f"{path.stem}.json").write_text(json.dumps(soft))
            keep = scores >= np.asarray([thresholds[c] for c in labels], np.float32)
            b = np.clip(boxes[keep], 0, 1)
            rows = (
                np.concatenate(
                    [labels[keep, None].astype(np.float32), (b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], axis=1
                )
                if keep.any()
                else np.zeros((0, 5), np.float32)
            )
            # one teacher score per label line: the soft classification target (soft_targets.py)
            (out / "scores" / split / f"{path.stem}.txt").write_text("".join(f"{s:.4f}\n" for s in scores[keep]))
            stats.pseudo += 1
        for row in rows:
            stats.boxes_per_class[student[int(row[0])]] += 1
        _link(path, out / "images" / split / path.name)
        (out / "labels" / split / f"{path.stem}.txt").write_text(
            "".join(f"{int(r[0])} {r[1]:.6f} {r[2]:.6f} {r[3]:.6f} {r[4]:.6f}\n" for r in rows)
        )
        setattr(stats, split, getattr(stats, split) + 1)
    if stats.images == 0:
        raise ConfigError("no readable images to label", "check --images")
    (out / "data.yaml").write_text(
        yaml.safe_dump(
            {
                "train": "images/train",
                "val": "images/val",  # relative: the run directory can move
                "names": dict(enumerate(student)),
            },
            sort_keys=False,
        )
    )
    (out / DATASET_MANIFEST).write_text(json.dumps(dataset_manifest(out), indent=1))
    return stats


DATASET_MANIFEST = "dataset.json"


def dataset_manifest(out: Path) -> dict:
    """Every image and label the run trained and scored on, by name and sha256: what a shipped bundle carries so
    anyone can check which data made it (the images themselves stay where they are)."""
    entries: dict[str, list[dict]] = {}
    for split in ("train", "val"):
        rows = []
        for image in sorted((out / "images" / split).iterdir()):
            label = out / "labels" / split / f"{image.stem}.txt"
            rows.append(
                {
                    "image": image.name,
                    "sha256": sha256_file(image),
                    "labels_sha256": sha256_file(label) if label.is_file() else None,
                }
            )
        entries[split] = rows
    return {"format": "bastion dataset manifest 1", "splits": entries}

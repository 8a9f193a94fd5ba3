"""``Detections``: the boxes found in one image, in original-image pixels."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import cv2
import numpy as np

from bastion.errors import ConfigError

_PALETTE = np.array(
    [
        (56, 56, 255),
        (151, 157, 255),
        (31, 112, 255),
        (29, 178, 255),
        (49, 210, 207),
        (10, 249, 72),
        (23, 204, 146),
        (134, 219, 61),
        (52, 147, 26),
        (187, 212, 0),
        (168, 153, 44),
        (255, 194, 0),
        (147, 69, 52),
        (255, 115, 100),
        (236, 24, 0),
        (255, 56, 132),
        (133, 0, 82),
        (255, 56, 203),
        (200, 149, 255),
        (199, 55, 255),
    ],
    dtype=np.uint8,
)  # BGR


def class_colour(cls: int) -> tuple[int, int, int]:
    b, g, r = _PALETTE[cls % len(_PALETTE)]
    return int(b), int(g), int(r)


@dataclass
class Detections:
    """Boxes ``xyxy`` float32 [N,4] (original pixels), ``conf`` float32 [N], ``cls`` int64 [N].

    ``tracker_id`` int64 [N] once a tracker has seen them (edge/tracking.py): the object's per-source id,
    ``-1`` for a detection no confirmed track owns yet; ``None`` when nothing tracked them.
    """

    xyxy: np.ndarray
    conf: np.ndarray
    cls: np.ndarray
    names: list[str] = field(default_factory=list)
    tracker_id: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.tracker_id is not None and len(self.tracker_id) != len(self.conf):
            raise ValueError(f"tracker_id has {len(self.tracker_id)} entries for {len(self.conf)} detections")

    @classmethod
    def empty(cls, names: list[str]) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), names)

    def __len__(self) -> int:
        return len(self.conf)

    def name_of(self, cls_id: int) -> str:
        return self.names[cls_id] if 0 <= cls_id < len(self.names) else str(cls_id)

    def __getitem__(self, keep: np.ndarray | slice) -> "Detections":
        """The detections a boolean mask, index array or slice selects (``tracker_id`` kept along)."""
        tracks = None if self.tracker_id is None else self.tracker_id[keep]
        return Detections(self.xyxy[keep], self.conf[keep], self.cls[keep], self.names, tracks)

    def to_dict(self) -> list[dict[str, Any]]:
        """JSON-ready list: ``{cls, name, conf, box: [x1, y1, x2, y2]}`` per detection, plus ``track`` (the
        tracker id, None for a detection no confirmed track owns) once a tracker has seen them."""
        items = [
            {
                "cls": int(c),
                "name": self.name_of(int(c)),
                "conf": round(float(s), 4),
                "box": [round(float(v), 1) for v in b],
            }
            for b, s, c in zip(self.xyxy, self.conf, self.cls)
        ]
        if self.tracker_id is not None:
            for item, track in zip(items, self.tracker_id):
                item["track"] = int(track) if track >= 0 else None
        return items

    def counts(self) -> dict[str, int]:
        return dict(Counter(self.name_of(int(c)) for c in self.cls))

    def filter(self, classes: Iterable[int | str] | None = None, min_conf: float | None = None) -> "Detections":
        """Keep detections of the given classes (ids or names) and/or at least ``min_conf``."""
        keep = np.ones(len(self), dtype=bool)
        if classes is not None:
            keep &= np.isin(self.cls, class_ids(classes, self.names))
        if min_conf is not None:
            keep &= self.conf >= min_conf
        return self[keep]

    def draw(self, image: np.ndarray, thickness: int | None = None) -> np.ndarray:
        """A copy of the BGR ``image`` with boxes and labels (OpenCV Hershey font: nothing to download)."""
        canvas = image.copy()
        h, w = canvas.shape[:2]
        lw = thickness or max(1, round((h + w) / 600))
        scale = lw / 3
        for box, conf, cls in zip(self.xyxy, self.conf, self.cls):
            colour = class_colour(int(cls))
            x1, y1, x2, y2 = (int(round(v)) for v in box)
            cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, lw, cv2.LINE_AA)
            label = f"{self.name_of(int(cls))} {conf:.2f}"
            (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, max(lw - 1, 1))
            top = y1 - th - base - 2 if y1 - th - base - 2 >= 0 else y1
            cv2.rectangle(canvas, (x1, top), (x1 + tw + 2, top + th + base + 2), colour, -1, cv2.LINE_AA)
            cv2.putText(
                canvas,
                label,
                (x1 + 1, top + th + 1),
                cv2.FONT_HERSHEY_SIMPLEX,
                scale,
                (255, 255, 255),
                max(lw - 1, 1),
                cv2.LINE_AA,
            )
        return canvas


def class_ids(classes: Iterable[int | str], names: list[str]) -> list[int]:
    """Class names or ids → ids; an unknown name is a ConfigError listing a few valid ones."""
    lookup = {n: i for i, n in enumerate(names)}
    ids = []
    for c in classes:
        if isinstance(c, (int, np.integer)) or (isinstance(c, str) and c.isdigit()):
            idx = int(c)
            if not 0 <= idx < len(names):
                raise ConfigError(f"class id {idx} is out of range (model has {len(names)} classes)")
            ids.append(idx)
        elif c in lookup:
            ids.append(lookup[c])
        else:
            sample = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ConfigError(f"unknown class name {c!r}", f"this model knows: {sample}")
    return ids

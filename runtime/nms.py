"""Non-maximum suppression in vectorised numpy, class-aware by coordinate offset."""

from __future__ import annotations

import numpy as np


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box against many (continuous coordinates, no +1)."""
    xx1 = np.maximum(box[0], boxes[:, 0])
    yy1 = np.maximum(box[1], boxes[:, 1])
    xx2 = np.minimum(box[2], boxes[:, 2])
    yy2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(xx2 - xx1, 0, None) * np.clip(yy2 - yy1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_keep: int | None = None) -> np.ndarray:
    """Greedy NMS: indices of kept boxes, highest score first.

    A box is suppressed when its IoU with a kept, higher-scoring box is *above*
    ``iou_threshold`` (the torchvision/OpenCV convention).
    """
    if len(boxes) == 0:
        return np.empty(0, dtype=np.int64)
    order = np.argsort(-scores, kind="stable")
    boxes = boxes[order].astype(np.float32, copy=False)
    keep: list[int] = []
    alive = np.arange(len(boxes))
    while alive.size:
        i = alive[0]
        keep.append(i)
        if max_keep is not None and len(keep) >= max_keep:
            break
        rest = alive[1:]
        if rest.size == 0:
            break
        alive = rest[box_iou(boxes[i], boxes[rest]) <= iou_threshold]
    return order[np.asarray(keep, dtype=np.int64)]


def batched_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    iou_threshold: float,
    max_keep: int | None = None,
) -> np.ndarray:
    """Class-aware NMS: boxes of different classes never suppress each other.

    Each class is shifted by a distinct offset larger than any coordinate, so a
    single NMS pass handles all classes at once.
    """
    if len(boxes) == 0:
        return np.empty(0, dtype=np.int64)
    span = float(np.max(boxes[:, 2:]) - min(0.0, float(np.min(boxes[:, :2])))) + 1.0
    shifted = boxes + (classes.astype(np.float32) * span)[:, None]
    return nms(shifted, scores, iou_threshold, max_keep)

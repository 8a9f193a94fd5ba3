"""Weighted boxes fusion (Solovyev et al., 2019): merge several detectors' boxes for one image.

Unlike NMS, which keeps one box per cluster, WBF averages the cluster's
coordinates weighted by confidence, so an ensemble's agreement sharpens the box.
A box seen by only some of the models has its score scaled down by the share
of model weight that saw it.  Boxes are xyxy in any consistent unit.
"""

from __future__ import annotations

import numpy as np


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return inter / np.maximum(union, 1e-9)


def weighted_boxes_fusion(
    boxes: list[np.ndarray],
    scores: list[np.ndarray],
    labels: list[np.ndarray],
    weights: list[float] | None = None,
    iou_thr: float = 0.55,
    skip_thr: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fuse per-model (boxes [N,4], scores [N], labels [N]) → fused (boxes, scores, labels), best first."""
    n_models = len(boxes)
    weights = list(weights) if weights is not None else [1.0] * n_models
    if len(weights) != n_models:
        raise ValueError("one weight per model")
    total_weight = float(sum(weights))
    rows = []
    for m, (b, s, l) in enumerate(zip(boxes, scores, labels)):
        for box, score, label in zip(np.asarray(b, np.float64), np.asarray(s, np.float64), np.asarray(l)):
            if score >= skip_thr:
                rows.append((int(label), score * weights[m], weights[m], box))
    out_boxes, out_scores, out_labels = [], [], []
    for label in sorted({r[0] for r in rows}):
        items = sorted((r for r in rows if r[0] == label), key=lambda r: -r[1])
        clusters: list[list[tuple]] = []
        fused: list[np.ndarray] = []
        for item in items:
            match = -1
            if fused:
                ious = _iou(item[3], np.stack(fused))
                best = int(np.argmax(ious))
                if ious[best] > iou_thr:
                    match = best
            if match < 0:
                clusters.append([item])
                fused.append(item[3].copy())
            else:
                clusters[match].append(item)
                s = np.array([c[1] for c in clusters[match]])
                fused[match] = (np.stack([c[3] for c in clusters[match]]) * s[:, None]).sum(0) / s.sum()
        for cluster, box in zip(clusters, fused):
            mean_score = sum(c[1] for c in cluster) / len(cluster)
            seen_weight = sum(c[2] for c in cluster)
            out_boxes.append(box)
            out_scores.append(mean_score * min(seen_weight, total_weight) / total_weight)
            out_labels.append(label)
    if not out_boxes:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
    order = np.argsort(-np.asarray(out_scores))
    return (
        np.asarray(out_boxes, np.float32)[order],
        np.asarray(out_scores, np.float32)[order],
        np.asarray(out_labels, np.int64)[order],
    )

"""The teachers' soft scores in the student's classification target (Ultralytics ``v8DetectionLoss``).

The loss (docs/distillation.md): Ultralytics' task-aligned assigner gives every
positive anchor *a* assigned to box *g* of class *c* the target
``t[a, c] = align(a, g)`` (its normalised alignment metric, 0 elsewhere), and the
loss is ``BCE(pred, t)`` summed and divided by ``sum(t)``; the box and DFL losses
are weighted by ``sum_c t[a, c]``.  With soft targets the target becomes

    t[a, c] = align(a, g) * s_g

where ``s_g`` is the fused teacher confidence of a pseudo-label (1.0 for a
ground-truth box).  A box the teachers were unsure of therefore teaches a
weaker class score *and* weighs less in the box loss, instead of counting as
much as a certain one; ground truth is untouched.  Normalising by ``sum(t)`` of
the soft targets keeps the loss scale of the hard-label case.

The score travels with each box through Ultralytics' augmentations (mosaic,
perspective, flips filter and concatenate ``cls`` row by row) because it is
stored *inside* the class value: ``cls = class + score / 2``.  ``int(cls)`` is
still the class everywhere Ultralytics truncates it, and the fractional part is
decoded here, at the assigner, before anything compares classes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
SCORE_SCALE = 0.5  # cls = class + score * SCORE_SCALE, so the fraction stays below 1 for score <= 1


def encode(cls: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Class ids [N,1] and scores [N] → classes carrying their score in the fraction."""
    scores = np.clip(np.asarray(scores, np.float32).reshape(-1, 1), 1e-3, 1.0)
    return np.floor(np.asarray(cls, np.float32).reshape(-1, 1)) + scores * SCORE_SCALE


def decode(encoded):  # numpy array or torch tensor
    """Inverse of :func:`encode`: (class ids, scores); a plain integer class decodes to score 1."""
    if isinstance(encoded, np.ndarray):
        cls = np.floor(encoded)
        frac = encoded - cls
        return cls, np.where(frac > 0, frac / SCORE_SCALE, 1.0).astype(np.float32)
    cls = encoded.floor()
    frac = encoded - cls
    return cls, (frac / SCORE_SCALE).where(frac > 0, frac.new_ones(()))


def score_file(labels_file: Path) -> Path:
    """Where the pseudo-label scores of ``labels/<split>/x.txt`` live: ``scores/<split>/x.txt``."""
    return labels_file.parent.parent.parent / "scores" / labels_file.parent.name / labels_file.name


def read_scores(labels_file: Path) -> dict[tuple, float]:
    """Scores of one image's label rows, keyed by (class, rounded box) so row order does not matter."""
    sfile = score_file(labels_file)
    if not sfile.is_file() or not labels_file.is_file():
        return {}
    rows = [line.split() for line in labels_file.read_text().splitlines() if line.strip()]
    scores = [float(v) for v in sfile.read_text().split()]
    if len(rows) != len(scores):
        log.warning("ignoring %s: %d scores for %d labels", sfile, len(scores), len(rows))
        return {}
    return {_key(int(r[0]), [float(v) for v in r[1:5]]): s for r, s in zip(rows, scores)}


def _key(cls: int, xywh) -> tuple:
    return (cls, *(round(float(v), 4) for v in xywh))


def attach_scores(labels: list[dict[str, Any]], label_files: list[str]) -> tuple[int, int]:
    """Encode the teachers' scores into the ``cls`` of an Ultralytics dataset's labels, in place.

    ``label_files`` are the dataset's own label paths (``YOLODataset.label_files``),
    one per entry of ``labels``.  Returns (soft boxes, all boxes); boxes without a
    score (ground truth) keep an integer class, which decodes to score 1.
    """
    by_image = {Path(f).stem: Path(f) for f in label_files}
    soft = total = 0
    for lb in labels:
        cls = lb["cls"]
        total += len(cls)
        label_file = by_image.get(Path(lb["im_file"]).stem)
        table = read_scores(label_file) if label_file else {}
        if not table or not len(cls):
            continue
        scores = np.array([table.get(_key(int(c), b), 1.0) for c, b in zip(cls.reshape(-1), lb["bboxes"])], np.float32)
        soft += int((scores < 1.0).sum())
        lb["cls"] = encode(cls, scores)
    return soft, total


def soft_detection_loss(model):  # Ultralytics DetectionModel → v8DetectionLoss
    """A ``v8DetectionLoss`` whose assigner decodes the scores and scales the targets by them."""
    from ultralytics.utils.loss import v8DetectionLoss

    loss = v8DetectionLoss(model)
    loss.assigner = SoftTargetAssigner(loss.assigner)
    return loss


class SoftTargetAssigner:
    """Wraps Ultralytics' TaskAlignedAssigner: hard classes in, targets scaled by the teachers' scores out."""

    def __init__(self, assigner) -> None:
        self.assigner = assigner

    def __call__(self, pd_scores, pd_bboxes, anc_points, gt_labels, gt_bboxes, mask_gt, **kwargs):
        import torch

        if gt_labels.shape[1] == 0:  # no boxes in this batch: nothing to scale
            return self.assigner(pd_scores, pd_bboxes, anc_points, gt_labels, gt_bboxes, mask_gt, **kwargs)
        cls, scores = decode(gt_labels)
        scores = torch.where(mask_gt.bool(), scores, torch.ones_like(scores))  # padding rows: irrelevant
        labels, bboxes, targets, fg_mask, gt_idx = self.assigner(
            pd_scores, pd_bboxes, anc_points, cls, gt_bboxes, mask_gt, **kwargs
        )
        per_anchor = scores.squeeze(-1).gather(1, gt_idx)  # (b, anchors): score of the assigned box
        targets = targets * (per_anchor * fg_mask).unsqueeze(-1)
        return labels, bboxes, targets, fg_mask, gt_idx

"""MOTA, IDF1 and ID switches, computed here because no metrics library is in the lock or the venv.

``motmetrics`` (pandas, scipy, xmltodict) and ``trackeval`` were checked for: neither is installed, and
adding either for one benchmark would pull pandas/scipy into the dev lock. The definitions below follow
the papers and motmetrics' defaults, at an IoU threshold of 0.5:

* **CLEAR MOT** (Bernardin & Stiefelhagen, 2008). Per frame, a ground-truth object keeps its previous
  hypothesis if they still overlap (IoU ≥ 0.5); the rest are matched by maximum total IoU (Hungarian).
  Unmatched truth is a miss (FN), an unmatched hypothesis a false positive (FP), and a truth matched to a
  different hypothesis than the last time it was matched is an **ID switch**.
  ``MOTA = 1 - (FN + FP + IDSW) / number of truth boxes``.
* **IDF1** (Ristani et al., 2016): one global one-to-one assignment of truth trajectories to hypothesis
  trajectories maximising the frames where a pair overlaps (IoU ≥ 0.5); ``IDTP`` is that number of
  frames, ``IDF1 = 2 IDTP / (number of truth boxes + number of hypothesis boxes)``.

A frame is ``(truth, hypotheses)``, each a dict id -> xyxy box.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np

from bastion.edge.assignment import hungarian
from bastion.edge.tracking import iou_matrix

IOU_MIN = 0.5
Frame = tuple[dict[int, np.ndarray], dict[int, np.ndarray]]


@dataclass
class MotScores:
    mota: float
    idf1: float
    id_switches: int
    id_switches_per_100_tracks: float
    false_positives: int
    misses: int
    truth_boxes: int
    truth_tracks: int
    hypothesis_tracks: int
    recall: float
    precision: float

    def as_dict(self) -> dict[str, float | int]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def _max_iou_matching(iou: np.ndarray) -> list[tuple[int, int]]:
    """Pairs (row, col) with IoU ≥ IOU_MIN maximising total IoU."""
    if iou.size == 0:
        return []
    n = max(iou.shape)
    square = np.zeros((n, n))
    square[: iou.shape[0], : iou.shape[1]] = np.where(iou >= IOU_MIN, iou, 0.0)
    cols = hungarian(-square)
    return [(r, int(c)) for r, c in enumerate(cols) if r < iou.shape[0] and c < iou.shape[1] and iou[r, c] >= IOU_MIN]


def score(frames: list[Frame]) -> MotScores:
    fn = fp = switches = truth_boxes = hyp_boxes = 0
    last_match: dict[int, int] = {}  # truth id -> hypothesis id it was last matched to
    overlap: dict[tuple[int, int], int] = defaultdict(int)  # (truth, hyp) -> frames with IoU ≥ 0.5
    truth_ids: set[int] = set()
    hyp_ids: set[int] = set()
    for truth, hyps in frames:
        truth_boxes += len(truth)
        hyp_boxes += len(hyps)
        truth_ids |= set(truth)
        hyp_ids |= set(hyps)
        t_ids, h_ids = list(truth), list(hyps)
        iou = iou_matrix(
            np.asarray([truth[t] for t in t_ids]).reshape(-1, 4), np.asarray([hyps[h] for h in h_ids]).reshape(-1, 4)
        )
        for i, j in zip(*np.nonzero(iou >= IOU_MIN)):
            overlap[(t_ids[i], h_ids[j])] += 1
        matched: dict[int, int] = {}  # truth row -> hyp col
        for i, t in enumerate(t_ids):  # keep last frame's correspondences that still hold
            h = last_match.get(t)
            if h in hyps:
                j = h_ids.index(h)
                if iou[i, j] >= IOU_MIN and j not in matched.values():
                    matched[i] = j
        rows = [i for i in range(len(t_ids)) if i not in matched]
        cols = [j for j in range(len(h_ids)) if j not in matched.values()]
        for r, c in _max_iou_matching(iou[np.ix_(rows, cols)]):
            matched[rows[r]] = cols[c]
        for i, j in matched.items():
            t, h = t_ids[i], h_ids[j]
            if t in last_match and last_match[t] != h:
                switches += 1
            last_match[t] = h
        fn += len(t_ids) - len(matched)
        fp += len(h_ids) - len(matched)
    idtp = _id_true_positives(overlap, sorted(truth_ids), sorted(hyp_ids))
    matches = truth_boxes - fn
    return MotScores(
        mota=1.0 - (fn + fp + switches) / max(truth_boxes, 1),
        idf1=2 * idtp / max(truth_boxes + hyp_boxes, 1),
        id_switches=switches,
        id_switches_per_100_tracks=100.0 * switches / max(len(truth_ids), 1),
        false_positives=fp,
        misses=fn,
        truth_boxes=truth_boxes,
        truth_tracks=len(truth_ids),
        hypothesis_tracks=len(hyp_ids),
        recall=matches / max(truth_boxes, 1),
        precision=matches / max(hyp_boxes, 1),
    )


def _id_true_positives(overlap: dict[tuple[int, int], int], truth_ids: list[int], hyp_ids: list[int]) -> int:
    if not truth_ids or not hyp_ids:
        return 0
    n = max(len(truth_ids), len(hyp_ids))
    gain = np.zeros((n, n))
    t_index = {t: i for i, t in enumerate(truth_ids)}
    h_index = {h: j for j, h in enumerate(hyp_ids)}
    for (t, h), frames in overlap.items():
        gain[t_index[t], h_index[h]] = frames
    cols = hungarian(-gain)
    return int(sum(gain[r, c] for r, c in enumerate(cols)))

"""Our numpy NMS against OpenCV's on random boxes, and class-awareness."""

import cv2
import numpy as np
import pytest

from bastion.runtime.nms import batched_nms, nms


def random_boxes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    xy = rng.uniform(0, 200, (n, 2))
    wh = rng.uniform(5, 120, (n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    # distinct scores so ordering is unambiguous
    scores = rng.permutation(np.linspace(0.05, 0.99, n)).astype(np.float32)
    return boxes, scores


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("iou", [0.3, 0.45, 0.7])
def test_nms_matches_opencv(seed: int, iou: float):
    rng = np.random.default_rng(seed)
    boxes, scores = random_boxes(rng, 300)
    ours = nms(boxes, scores, iou)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    theirs = np.asarray(cv2.dnn.NMSBoxes(xywh.tolist(), scores.tolist(), 0.0, iou)).reshape(-1)
    assert sorted(ours.tolist()) == sorted(theirs.tolist())
    assert len(ours) < len(boxes)  # the random set does overlap: NMS had work to do


def test_nms_keeps_highest_score_first_and_respects_max_keep():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.5, 0.9, 0.7], np.float32)
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert nms(boxes, scores, 0.5, max_keep=1).tolist() == [1]


def test_batched_nms_never_suppresses_across_classes():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    classes = np.array([0, 1, 0])
    assert sorted(batched_nms(boxes, scores, classes, 0.5).tolist()) == [0, 1]


def test_empty_input():
    assert nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5).size == 0

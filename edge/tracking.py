"""Multi-object trackers behind one small registry; ByteTrack first, in numpy (no torch, scipy or ``lap``).

A tracker is made per source and fed every inferred frame of it, in order, with or without detections
(an empty frame is what ages a lost track). ``update`` returns, for each detection, the id of the confirmed
track that owns it (``-1``: none yet) and the ids whose tracks ended this frame (lost for longer than
``track_buffer`` frames).

Why not a package: ``trackers`` and ``supervision`` (both with ByteTrack) pull matplotlib, scipy, requests,
av and the GUI build of OpenCV next to the node's headless one, none of which a field node should carry.
ByteTrack itself is small: a Kalman filter (edge/kalman.py), IoU costs and a gated assignment
(edge/assignment.py, exact, what ``lap.lapjv(..., cost_limit=...)`` solves).

ByteTrack (Zhang et al., 2022) in one paragraph: detections at or above ``track_thresh`` are matched to the
predicted boxes of tracked and recently lost tracks first (IoU fused with the score); the tracks left over
then get a second chance against the low-score detections (``low_thresh``…``track_thresh``), which is what
keeps an object through a partial occlusion where its score drops; a new track needs a second sighting to
be confirmed; a lost track is kept ``track_buffer`` frames to be found again under the same id.

Public ids come from an ``IdAllocator`` (edge/track_ids.py): taken when a track is confirmed, so
flickering false positives burn no ids, and never reused within a node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from bastion.edge import kalman
from bastion.edge.assignment import gated_assignment
from bastion.edge.rules_config import ObjectsConfig
from bastion.edge.track_ids import IdAllocator

SECOND_MATCH_THRESH = 0.5  # ByteTrack's fixed limits for the low-score and the unconfirmed associations
UNCONFIRMED_MATCH_THRESH = 0.7
DUPLICATE_IOU_COST = 0.15  # a tracked and a lost track this close are one object: the younger one goes


@dataclass
class TrackerOutput:
    tracker_id: np.ndarray | None  # [N] int64 per input detection (-1: no confirmed track); None: untracked
    ended: list[int] = field(default_factory=list)  # public ids whose tracks ended this frame


class Tracker(Protocol):
    def update(self, xyxy: np.ndarray, conf: np.ndarray, cls: np.ndarray) -> TrackerOutput: ...

    def live_ids(self) -> list[int]: ...


TRACKERS: dict[str, Callable[[ObjectsConfig, IdAllocator], Tracker]] = {}


def register_tracker(name: str):
    def add(factory):
        TRACKERS[name] = factory
        return factory

    return add


def make_tracker(config: ObjectsConfig, ids: IdAllocator) -> Tracker:
    return TRACKERS[config.tracker](config, ids)  # the config validated the name against this registry


@register_tracker("none")
class NoTracker:
    """Detections pass untracked (``tracker_id`` None): frame-level events only, no object events."""

    def __init__(self, config: ObjectsConfig, ids: IdAllocator) -> None:
        pass

    def update(self, xyxy: np.ndarray, conf: np.ndarray, cls: np.ndarray) -> TrackerOutput:
        return TrackerOutput(None)

    def live_ids(self) -> list[int]:
        return []


@dataclass
class _Track:
    """A track's bookkeeping; its Kalman state is row ``i`` of ``ByteTrack.mean``/``cov`` (``i``: its place in
    ``ByteTrack.tracks``), so a frame's predict and correct are one numpy call each, with no stacking."""

    score: float
    last_frame: int
    track_id: int = -1  # public id, once confirmed
    lost: bool = False
    start_frame: int = 0

    @property
    def confirmed(self) -> bool:
        return self.track_id >= 0


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[len(a), len(b)] IoU of two sets of xyxy boxes."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    # np.maximum(x, 0) and a product of the two sides, not np.clip and np.prod: the same numbers, and on
    # 20 x 20 boxes the wrappers' overhead was most of the time
    wh = np.maximum(np.minimum(a[:, None, 2:], b[None, :, 2:]) - np.maximum(a[:, None, :2], b[None, :, :2]), 0.0)
    inter = wh[..., 0] * wh[..., 1]
    side_a = np.maximum(a[:, 2:] - a[:, :2], 0.0)
    side_b = np.maximum(b[:, 2:] - b[:, :2], 0.0)
    area_a = side_a[:, 0] * side_a[:, 1]
    area_b = side_b[:, 0] * side_b[:, 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


@register_tracker("bytetrack")
class ByteTrack:
    def __init__(self, config: ObjectsConfig, ids: IdAllocator) -> None:
        self.config = config
        self.ids = ids
        self.frame = 0
        self.tracks: list[_Track] = []  # tracked (confirmed or not) and lost, in creation order
        self.mean = np.zeros((0, 8))  # [len(tracks), 8] Kalman state (x, y, a, h and their velocities)
        self.cov = np.zeros((0, 8, 8))  # [len(tracks), 8, 8]

    def live_ids(self) -> list[int]:
        return [t.track_id for t in self.tracks if t.confirmed]

    def update(self, xyxy: np.ndarray, conf: np.ndarray, cls: np.ndarray) -> TrackerOutput:
        cfg = self.config
        self.frame += 1
        boxes = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(conf, dtype=np.float64).reshape(-1)
        owner = np.full(len(scores), -1, dtype=np.int64)
        self._predict()

        high = np.flatnonzero(scores >= cfg.track_thresh)
        low = np.flatnonzero((scores > cfg.low_thresh) & (scores < cfg.track_thresh))
        unconfirmed = [i for i, t in enumerate(self.tracks) if not t.confirmed]
        pool = [i for i, t in enumerate(self.tracks) if t.confirmed]

        # 1: confirmed tracks (tracked or lost) against the confident detections, IoU fused with score.
        matched, left_tracks, left_high = self._associate(pool, high, boxes, scores, cfg.match_thresh, fuse=True)
        hits = list(matched)
        for track, d in matched:
            self._hit(track, scores[d], owner, d)
        # 2: tracks still being seen last frame against the low-score detections (partial occlusion).
        tracked_left = [i for i in left_tracks if not self.tracks[i].lost]
        matched, still_left, _ = self._associate(tracked_left, low, boxes, scores, SECOND_MATCH_THRESH, fuse=False)
        hits += matched
        for track, d in matched:
            self._hit(track, scores[d], owner, d)
        for i in still_left:
            self.tracks[i].lost = True
        # 3: unconfirmed tracks against the confident detections left: a second sighting confirms.
        matched, dropped, new = self._associate(
            unconfirmed, left_high, boxes, scores, UNCONFIRMED_MATCH_THRESH, fuse=True
        )
        hits += matched
        for track, d in matched:
            self._hit(track, scores[d], owner, d)
        self._correct(hits, boxes)
        removed = set(dropped)
        # 4: what nobody claimed and is confident enough starts a track.
        self._start([d for d in new if scores[d] >= cfg.new_track_thresh], boxes, scores, owner)

        ended = []
        for i, track in enumerate(self.tracks):
            if track.lost and self.frame - track.last_frame > cfg.track_buffer:
                removed.add(i)
        removed |= self._duplicates()
        for i in sorted(removed):
            track = self.tracks[i]
            if track.confirmed:
                ended.append(track.track_id)
                owner[owner == track.track_id] = -1  # a duplicate dropped in the frame it was seen
        if removed:
            keep = [i for i in range(len(self.tracks)) if i not in removed]
            self.tracks = [self.tracks[i] for i in keep]
            self.mean, self.cov = self.mean[keep], self.cov[keep]
        return TrackerOutput(owner, ended)

    # -- steps -------------------------------------------------------------------------------------------
    def _predict(self) -> None:
        if not self.tracks:
            return
        lost = [i for i, t in enumerate(self.tracks) if t.lost]
        self.mean[lost, 7] = 0.0  # a lost track's height stops changing (ByteTrack)
        self.mean, self.cov = kalman.predict(self.mean, self.cov)

    def _boxes(self, rows: list[int]) -> np.ndarray:
        """[N, 4] xyxy of the current Kalman estimates of tracks ``rows``."""
        return kalman.xyah_to_xyxy(self.mean[rows, :4])

    def _associate(
        self, tracks: list[int], dets: np.ndarray, boxes: np.ndarray, scores: np.ndarray, thresh: float, fuse: bool
    ) -> tuple[list[tuple[int, int]], list[int], list[int]]:
        """Match track rows ``tracks`` to detections ``dets``: (row, detection) pairs, rows left, detections left."""
        if not tracks or len(dets) == 0:
            return [], list(tracks), [int(d) for d in dets]
        similarity = iou_matrix(self._boxes(tracks), boxes[dets])
        if fuse:
            similarity = similarity * scores[dets][None, :]
        pairs, left_t, left_d = gated_assignment(1.0 - similarity, thresh)
        return (
            [(tracks[r], int(dets[c])) for r, c in pairs],
            [tracks[r] for r in left_t],
            [int(dets[c]) for c in left_d],
        )

    def _correct(self, hits: list[tuple[int, int]], boxes: np.ndarray) -> None:
        """One batched Kalman update for every track matched this frame."""
        if not hits:
            return
        rows = [i for i, _ in hits]
        mean, cov = kalman.update(self.mean[rows], self.cov[rows], kalman.xyxy_to_xyah(boxes[[d for _, d in hits]]))
        self.mean[rows], self.cov[rows] = mean, cov

    def _hit(self, row: int, score: float, owner: np.ndarray, d: int) -> None:
        track = self.tracks[row]
        track.score = float(score)
        track.last_frame = self.frame
        track.lost = False
        if not track.confirmed:
            track.track_id = self.ids.next_id()
        owner[d] = track.track_id

    def _start(self, dets: list[int], boxes: np.ndarray, scores: np.ndarray, owner: np.ndarray) -> None:
        """New tracks for detections ``dets``, in their order (the first frame's are confirmed at once)."""
        if not dets:
            return
        mean, cov = kalman.initiate(kalman.xyxy_to_xyah(boxes[dets]))
        for d in dets:
            track = _Track(float(scores[d]), self.frame, start_frame=self.frame)
            if self.frame == 1:  # ByteTrack confirms the very first frame's tracks at once
                track.track_id = self.ids.next_id()
                owner[d] = track.track_id
            self.tracks.append(track)
        self.mean = np.concatenate([self.mean, mean])
        self.cov = np.concatenate([self.cov, cov])

    def _duplicates(self) -> set[int]:
        """A lost track overlapping a tracked one is the same object counted twice: drop the younger."""
        tracked = [i for i, t in enumerate(self.tracks) if not t.lost and t.confirmed and t.last_frame == self.frame]
        lost = [i for i, t in enumerate(self.tracks) if t.lost]
        if not tracked or not lost:
            return set()
        cost = 1.0 - iou_matrix(self._boxes(tracked), self._boxes(lost))
        gone: set[int] = set()
        for i, j in zip(*np.nonzero(cost < DUPLICATE_IOU_COST)):
            a, b = self.tracks[tracked[i]], self.tracks[lost[j]]
            age_a, age_b = a.last_frame - a.start_frame, b.last_frame - b.start_frame
            gone.add(lost[j] if age_a > age_b else tracked[i])
        return gone

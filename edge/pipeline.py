"""The node's frame pipeline: source queues → prepare thread → inference thread → filters → store → publish.

Decoding happens on each source's reader thread (``runtime/reader.py``) and pre-processing (resize, pad,
normalise) on the prepare thread, so the inference thread only runs the model, post-processes and stores:
the same overlap ``detect_stream`` gives ``bastion detect``.  Frames are dropped only at the source queues
(the oldest of a live source, never one of an unpaced file), before any work is spent on them; between
the two stages a small queue holds prepared batches and waits for room instead, so nothing prepared is lost.

A batch is prepared for the detector that is current when it is prepared; if ``reload`` swapped the model in
between, the inference thread prepares it again for the new one (input sizes may differ).  Both threads run
under the node's ``Supervisor``: either one dying stops the node loudly (``status``, audit, exit code).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from bastion.edge.config import NodeConfig, SourceConfig
from bastion.edge.protocol import DetectionEvent, DetectionItem
from bastion.edge.store import StorageError
from bastion.runtime.detect import Detector
from bastion.runtime.detections import Detections, class_ids
from bastion.runtime.media import Frame
from bastion.runtime.preprocess import Placement
from bastion.runtime.reader import SourceReader

if TYPE_CHECKING:
    from bastion.edge.audit import AuditLog
    from bastion.edge.server import NodeServer
    from bastion.edge.snapshots import SnapshotVault
    from bastion.edge.store import EventStore
    from bastion.edge.supervisor import Supervisor

log = logging.getLogger(__name__)
INFER = "node-infer"
PREPARE = "node-prepare"
PREPARED_DEPTH = 2  # batches ready for the model: one running, one waiting is enough to hide pre-processing


@dataclass
class PreparedBatch:
    frames: list[Frame]
    tensors: list[tuple[np.ndarray, Placement]]
    detector: Detector  # the one whose input spec prepared ``tensors``


def source_filter(cfg: SourceConfig, names: list[str]) -> Callable[[Detections, tuple[int, ...]], Detections]:
    """The per-source filter (classes, confidence, region of interest); unknown class names fail at start."""
    ids = class_ids(cfg.classes, names) if cfg.classes else None

    def apply(det: Detections, shape: tuple[int, ...]) -> Detections:
        det = det.filter(classes=ids, min_conf=cfg.conf)
        if cfg.roi is not None and len(det):
            h, w = shape[:2]
            cx = (det.xyxy[:, 0] + det.xyxy[:, 2]) / 2 / w
            cy = (det.xyxy[:, 1] + det.xyxy[:, 3]) / 2 / h
            x1, y1, x2, y2 = cfg.roi
            keep = (cx >= x1) & (cx <= x2) & (cy >= y1) & (cy <= y2)
            det = Detections(det.xyxy[keep], det.conf[keep], det.cls[keep], det.names)
        return det

    return apply


class FramePipeline:
    """The node's pipeline stages, mixed into ``Node``; these are the node's parts they use."""

    config: NodeConfig
    detector: Detector
    _detector_lock: threading.Lock
    readers: list[SourceReader]
    stop_event: threading.Event
    wake: threading.Event
    supervisor: Supervisor
    store: EventStore
    server: NodeServer
    audit: AuditLog
    vault: SnapshotVault | None
    storage_error: str | None
    published: int

    def _spawn_pipeline(self, running: Callable[[], bool]) -> None:
        self._prepared: queue.Queue[PreparedBatch] = queue.Queue(maxsize=PREPARED_DEPTH)
        self.source_filters = {s.name: source_filter(s, self.detector.names) for s in self.config.sources}
        self._by_name = {r.spec.name: r for r in self.readers}
        self._preparer = self.supervisor.spawn(PREPARE, self._prepare_loop, running)
        self._worker = self.supervisor.spawn(INFER, self._infer_loop, running)

    def _next_frames(self) -> list[Frame]:
        """Up to max_batch frames, one per source in turn, so no source starves the others."""
        frames: list[Frame] = []
        progress = True
        while progress and len(frames) < self.config.max_batch:
            progress = False
            for reader in self.readers:
                item = reader.queue.get_nowait()
                if item is not None:
                    frames.append(item)  # type: ignore[arg-type]
                    progress = True
                    if len(frames) >= self.config.max_batch:
                        break
        return frames

    def _prepare_loop(self) -> None:
        """Take frames round-robin, pre-process them, hand the batch on; ends once stopped and drained."""
        while True:
            self.supervisor.beat(PREPARE)
            frames = self._next_frames()
            if not frames:
                if self.stop_event.is_set():
                    return
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            detector = self.detector
            batch = PreparedBatch(frames, [detector.prepare(f.image) for f in frames], detector)
            while True:  # wait for room: what was prepared is not thrown away
                self.supervisor.beat(PREPARE)
                try:
                    self._prepared.put(batch, timeout=0.05)
                    break
                except queue.Full:
                    if not self._worker.is_alive():  # nobody will take it (a death stops the node)
                        return

    def _infer_loop(self) -> None:
        while True:
            self.supervisor.beat(INFER)
            try:
                batch = self._prepared.get(timeout=0.05)
            except queue.Empty:
                if self.stop_event.is_set() and not self._preparer.is_alive():
                    return
                continue
            with self._detector_lock:
                detector = self.detector
                tensors = batch.tensors
                if batch.detector is not detector:  # reloaded since: its input may differ
                    tensors = [detector.prepare(f.image) for f in batch.frames]
                results = detector.detect_prepared(tensors)
            now = time.time()
            for frame, det in zip(batch.frames, results):
                self._by_name[frame.source].stats.mark_inferred(now)
                det = self.source_filters[frame.source](det, frame.image.shape)
                if len(det):
                    self._emit(frame, det, detector.bundle_sha256)

    def _emit(self, frame: Frame, det: Detections, model_sha: str) -> None:
        """Store the event (seq assigned, committed), keep its snapshot, then publish it."""
        event = DetectionEvent(
            seq=0,
            node=self.config.id,
            source=frame.source,
            ts=frame.ts,
            frame=frame.index,
            model=model_sha,
            detections=[DetectionItem(**d) for d in det.to_dict()],
        )
        try:
            stored = self.store.append(event)
        except StorageError as exc:
            if self.storage_error is None:
                log.error("event store failed; publishing paused until it recovers: %s", exc)
                self.audit.append("storage_error", reason=str(exc))
            self.storage_error = str(exc)
            return
        if self.storage_error is not None:
            log.warning("event store recovered; publishing resumed")
            self.storage_error = None
        if self.vault is not None:
            try:
                self.vault.save(stored.seq, frame.image)
                # Retention may have run since the event was committed: it deletes rows before snapshots, so
                # either it saw this file, or the row is already gone here and the snapshot goes with it.
                first = self.store.first_seq()
                if first is None or first > stored.seq:
                    self.vault.delete_before(stored.seq + 1)
            except Exception as exc:  # the event is stored; a missing snapshot is logged, not fatal
                log.warning("snapshot of event %d not saved: %s", stored.seq, exc)
        self.server.publish(stored)
        self.published += 1

    def _join_pipeline(self) -> None:
        """After the readers stopped: let both stages drain what was queued, then end."""
        for thread, limit in ((self._preparer, 30), (self._worker, 30)):
            if thread.is_alive():
                thread.join(timeout=limit)

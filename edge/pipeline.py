"""The node's frame pipeline: source queues → prepare thread → inference thread → filters → store → publish.

Decoding happens on each source's reader thread (``runtime/reader.py``) and pre-processing (resize, pad,
normalise) on the prepare thread, so the inference thread only runs the model, post-processes and stores:
the same overlap ``detect_stream`` gives ``bastion detect``.  Frames are dropped only at the source queues
(the oldest of a live source, never one of an unpaced file), before any work is spent on them; between
the two stages a small queue holds prepared batches and waits for room instead, so nothing prepared is lost.

With an ``objects:`` section every inferred frame of a source also goes, in frame order, through the object
layer (edge/object_layer.py: tracker + zones/lines): detections gain ``track`` and the layer's object events
(protocol v2, edge/events_v2.py) are stored and committed, then published, exactly like frame events. Frame
events are then kept only when ``objects.frame_events`` asks for them (or the tracker is ``none``).

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
from bastion.edge.events_v2 import FRAME_KIND, ObjectEventMessage
from bastion.edge.latency import LatencyHistogram
from bastion.edge.object_events import ObjectEvent
from bastion.edge.object_layer import ObjectLayer
from bastion.edge.protocol import DetectionEvent, DetectionItem
from bastion.edge.store import StorageError
from bastion.edge.track_ids import StoreIdAllocator
from bastion.runtime.detect import Detector
from bastion.runtime.detections import Detections, class_ids
from bastion.runtime.media import Frame
from bastion.runtime.preprocess import Placement
from bastion.runtime.reader import SourceReader

if TYPE_CHECKING:
    from bastion.edge.audit import AuditLog
    from bastion.edge.clips import ClipRecorder
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


class CountingIds:
    """The store's id allocator, counting what it handed out (``status``: ids allocated since start)."""

    def __init__(self, ids: StoreIdAllocator) -> None:
        self.ids = ids
        self.allocated = 0

    def next_id(self) -> int:
        value = self.ids.next_id()
        self.allocated += 1
        return value


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
    clips: ClipRecorder | None
    storage_error: str | None
    published: int

    def _spawn_pipeline(self, running: Callable[[], bool]) -> None:
        self._prepared: queue.Queue[PreparedBatch] = queue.Queue(maxsize=PREPARED_DEPTH)
        self.source_filters = {s.name: source_filter(s, self.detector.names) for s in self.config.sources}
        self._by_name = {r.spec.name: r for r in self.readers}
        self.events_by_kind: dict[str, int] = {}
        self.inference_latency = LatencyHistogram()  # status and metrics: time per batch in the model
        self.objects: ObjectLayer | None = None
        self.track_ids: CountingIds | None = None
        objects = self.config.objects
        if objects is not None:  # ConfigError here (a rule's class the model lacks) refuses the start
            self.track_ids = CountingIds(StoreIdAllocator(self.store))
            self.objects = ObjectLayer(objects, self.track_ids, class_names=self.detector.names)
        self.frame_events = objects is None or objects.tracker == "none" or objects.frame_events
        self._closed_sources: set[str] = set()
        self._track_cost = [0.0, 0]  # seconds in the object layer, frames it processed (status: ms_per_frame)
        self._last_frame: dict[str, tuple[int, float]] = {}
        self._best_snapshot: dict[tuple[str, int], tuple[float, int]] = {}  # live object -> (conf, seq) stored
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
                    self._close_objects(list(self._last_frame))
                    return
                self._close_objects(
                    [r.spec.name for r in self.readers if r.stats.state == "finished" and not len(r.queue)]
                )
                continue
            with self._detector_lock:
                detector = self.detector
                tensors = batch.tensors
                if batch.detector is not detector:  # reloaded since: its input may differ
                    tensors = [detector.prepare(f.image) for f in batch.frames]
                started = time.perf_counter()
                results = detector.detect_prepared(tensors)
                self.inference_latency.observe(time.perf_counter() - started)
            now = time.time()
            for frame, det in zip(batch.frames, results):
                self._by_name[frame.source].stats.mark_inferred(now)
                det = self.source_filters[frame.source](det, frame.image.shape)
                self._last_frame[frame.source] = (frame.index, frame.ts)
                if self.clips is not None:  # the clips' ring buffer (edge/clips.py): a queue put, never a wait
                    self.clips.offer(frame)
                if self.objects is not None:
                    det = self._track(frame, det, detector.bundle_sha256)
                if len(det) and self.frame_events:
                    self._emit(frame, det, detector.bundle_sha256)

    def _track(self, frame: Frame, det: Detections, model_sha: str) -> Detections:
        """The object layer's step for this frame: its events stored then published; detections gain ``track``."""
        assert self.objects is not None
        started = time.perf_counter()
        try:
            result = self.objects.process(frame.source, frame.index, frame.ts, det, frame.image.shape)
        except StorageError as exc:  # no id block could be reserved: like a failed append, never the thread's end
            self._storage_failed(exc)
            return det
        self._track_cost[0] += time.perf_counter() - started
        self._track_cost[1] += 1
        for event in result.events:
            self._emit_object(event, model_sha, frame)
        return result.detections

    def _close_objects(self, sources: list[str]) -> None:
        """object.end (reason stop) for what a finished source or a stopping node still follows; once a source."""
        if self.objects is None:
            return
        for name in sources:
            if name in self._closed_sources or name not in self._last_frame:
                continue
            self._closed_sources.add(name)
            index, ts = self._last_frame[name]
            for event in self.objects.close_source(name, ts, index):
                self._emit_object(event, self.detector.bundle_sha256, None)
            if self.clips is not None:
                self.clips.source_closed(name)

    def _emit_object(self, event: ObjectEvent, model_sha: str, frame: Frame | None) -> None:
        """Commit and publish ``event``; with snapshots on, keep the object's best stored frame and name its seq.

        object.new stores its frame; an object.update stores its frame only when the sighting beats the best one
        stored so far (a confidence rise of at least ``conf_jump`` makes such an update). Lifecycle events carry
        ``best_snapshot_seq``: the event itself when it stored a better frame, else the earlier one that did.
        No frame is held in memory beyond its own event; the map holds one (conf, seq) per live object."""
        key = (event.source, event.track)
        best = self._best_snapshot.get(key)
        lifecycle = event.kind in ("object.new", "object.update", "object.end")
        better = (
            self.vault is not None
            and frame is not None
            and event.kind in ("object.new", "object.update")
            and (best is None or event.conf > best[0])
        )
        fields = event.to_dict()
        if lifecycle and not better and best is not None:
            fields["best_snapshot_seq"] = best[1]
        message = ObjectEventMessage(seq=0, node=self.config.id, model=model_sha, **fields)
        own = ("best_snapshot_seq",) if better else ()
        stored, saved = self._commit_and_publish(message, event.kind, frame if better else None, own_seq=own)
        if event.kind == "object.end":
            self._best_snapshot.pop(key, None)
        elif saved and stored is not None:  # a frame that failed to save is no best: the next better one tries again
            self._best_snapshot[key] = (event.conf, stored.seq)

    def _storage_failed(self, exc: StorageError) -> None:
        if self.storage_error is None:
            log.error("event store failed; publishing paused until it recovers: %s", exc)
            self.audit.append("storage_error", reason=str(exc))
        self.storage_error = str(exc)

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
        self._commit_and_publish(event, FRAME_KIND, frame)

    def _commit_and_publish(
        self,
        event: DetectionEvent | ObjectEventMessage,
        kind: str,
        frame: Frame | None,
        own_seq: tuple[str, ...] = (),
    ) -> tuple[DetectionEvent | ObjectEventMessage | None, bool]:
        """Commit (seq assigned), keep the frame's snapshot if given, then publish: a subscriber never sees a
        seq the store lacks. Returns the stored event (None: the store failed) and whether a snapshot was saved."""
        saved = False
        try:
            stored = self.store.append(event, own_seq)  # type: ignore[arg-type]  # any event with seq/ts/source
        except StorageError as exc:
            self._storage_failed(exc)
            return None, False
        if self.storage_error is not None:
            log.warning("event store recovered; publishing resumed")
            self.storage_error = None
        if self.vault is not None and frame is not None:
            try:
                self.vault.save(stored.seq, frame.image)
                saved = True
                # Retention may have run since the event was committed: it deletes rows before snapshots, so
                # either it saw this file, or the row is already gone here and the snapshot goes with it.
                first = self.store.first_seq()
                if first is None or first > stored.seq:
                    self.vault.delete_before(stored.seq + 1)
            except Exception as exc:  # the event is stored; a missing snapshot is logged, not fatal
                log.warning("snapshot of event %d not saved: %s", stored.seq, exc)
        if self.clips is not None:  # before publishing: a reader asking at once hears "still recording"
            self.clips.trigger(stored.seq, kind, stored.source, stored.ts)
        self.server.publish(stored)  # type: ignore[arg-type]
        self.published += 1
        self.events_by_kind[kind] = self.events_by_kind.get(kind, 0) + 1
        return stored, saved

    def tracker_status(self) -> dict[str, object] | None:
        """Per source: objects followed now; and ids allocated since start (None: no object layer)."""
        if self.objects is None or self.track_ids is None:
            return None
        return {
            "tracker": self.objects.config.tracker,
            "frame_events": self.frame_events,
            "ids_allocated": self.track_ids.allocated,
            "active_tracks": self.objects.active_tracks(),
            "ms_per_frame": round(1000 * self._track_cost[0] / max(self._track_cost[1], 1), 3),  # tracker + rules
        }

    def _join_pipeline(self) -> None:
        """After the readers stopped: let both stages drain what was queued, then end."""
        for thread, limit in ((self._preparer, 30), (self._worker, 30)):
            if thread.is_alive():
                thread.join(timeout=limit)

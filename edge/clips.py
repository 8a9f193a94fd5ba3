"""Evidence clips: a few seconds before and after each object.end and zone/line event, encrypted at rest.

How a clip is made, and what it costs the inference loop (nothing but a queue put):

* ``offer(frame)`` — the inference thread hands over each inferred frame, at most ``clip_fps`` a source;
  at most ``FRAME_QUEUE`` raw frames wait, more are dropped (counted), never waited for.
* the ``node-clip-frames`` thread JPEG-compresses them (edge/clip_ring.py) into a ring per source, bounded
  by ``clip_pre_s`` seconds and ``clip_ring_mb``, and adds them to the clips being recorded.
* ``trigger(seq, …)`` — after an event is committed: its clip starts with the ring's frames from
  ``clip_pre_s`` before the event and collects until ``clip_post_s`` after it (or the source ends, or its
  frames stop coming for ``STALL_S``). At most ``clip_max_pending`` clips are in flight (recording or
  encoding); more are dropped, counted and remembered, so ``clip`` answers why.
* the ``node-clip-encode`` thread writes each finished clip as a video (edge/clip_codec.py), seals it with
  the snapshot key (edge/clip_store.py: temp file, fsync, rename) and keeps the clips' disk budget.

A failure never reaches the inference loop: a write that fails (full disk, read-only, missing directory)
is counted, shown in ``status`` (``clips.error``, state ``paused``) and pauses new clips for ``PAUSE_S``;
anything else a clip raises is logged with its traceback and counted. The two threads run under the node's
supervisor, so a bug that kills one still stops the node loudly rather than silently.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from bastion.edge.clip_codec import clip_fps, encode
from bastion.edge.clip_meta import MAX_CLIP_BYTES, ClipMeta
from bastion.edge.clip_ring import FrameRing, RingFrame, compress
from bastion.edge.clip_store import ClipVault
from bastion.errors import BastionError

if TYPE_CHECKING:
    from bastion.edge.config import Storage
    from bastion.runtime.media import Frame

log = logging.getLogger(__name__)
CLIP_KINDS = frozenset({"object.end", "zone.enter", "zone.leave", "loiter", "line.cross"})
FRAME_QUEUE = 8  # raw frames waiting for JPEG compression (a 1080p frame is 6 MB: this bounds them)
STALL_S = 10.0  # a clip whose source sends no frame for this long after its end is due is finished as it is
PAUSE_S = 10.0  # after a failed write, new clips wait this long before the disk is tried again
REMEMBERED = 1024  # why recent clips were not kept (dropped, failed, pruned), for the clip op's answer
FRAMES = "node-clip-frames"
ENCODE = "node-clip-encode"


@dataclass
class _Recording:
    seq: int
    kind: str
    source: str
    event_ts: float
    end_ts: float
    frames: list[RingFrame]
    due: float = field(default_factory=time.monotonic)  # monotonic time after which a silent source is stalled
    bytes: int = 0


class ClipRecorder:
    def __init__(self, vault: ClipVault, storage: Storage, first_seq: Callable[[], int | None]) -> None:
        self.vault = vault
        self.cfg = storage
        self.first_seq = first_seq  # the store's oldest event: a clip whose event retention removed is not kept
        self._frames: queue.Queue[Frame | None] = queue.Queue(maxsize=FRAME_QUEUE)
        self._triggers: queue.Queue[tuple] = queue.Queue()  # few (one per rule/end event); bounded by max_pending
        self._encode: queue.Queue[_Recording | None] = queue.Queue()
        self._rings: dict[str, FrameRing] = {}
        self._recording: dict[int, _Recording] = {}  # frames thread only
        self._offered: dict[str, float] = {}  # inference thread only: last frame ts handed over per source
        self._lock = threading.Lock()
        self._in_flight: set[int] = set()  # recording or encoding: the control thread reads it
        self._outcomes: OrderedDict[int, str] = OrderedDict()
        self._paused_until = 0.0
        self._stopping = threading.Event()
        self.error: str | None = None
        self.counts = {"recorded": 0, "failed": 0, "frames_dropped": 0, "pruned": 0}
        self.dropped: dict[str, int] = {}
        self.codec: str | None = None
        self.stored, self.stored_bytes = vault.usage()

    # -- the inference thread's side (never blocks) -------------------------------------------------------
    def offer(self, frame: Frame) -> None:
        last = self._offered.get(frame.source)
        if last is not None and 0 <= frame.ts - last < 0.999 / self.cfg.clip_fps:  # a clock set back: keep it
            return
        try:
            self._frames.put_nowait(frame)
            self._offered[frame.source] = frame.ts
        except queue.Full:
            self.counts["frames_dropped"] += 1

    def trigger(self, seq: int, kind: str, source: str, ts: float) -> None:
        """Record a clip for event ``seq`` (committed) if ``kind`` keeps one; the answer comes later."""
        if kind not in CLIP_KINDS:
            return
        with self._lock:
            if time.monotonic() < self._paused_until:
                self._drop(seq, "paused", f"clips are paused after a failed write ({self.error})")
            elif len(self._in_flight) >= self.cfg.clip_max_pending:
                self._drop(seq, "busy", f"{self.cfg.clip_max_pending} clips were in flight (clip_max_pending)")
            else:
                self._in_flight.add(seq)
                self._triggers.put((seq, kind, source, ts))

    def source_closed(self, source: str) -> None:
        """The source ended (a file without loop, or the node stopping): its clips finish with what they have."""
        self._triggers.put((None, "closed", source, 0.0))

    # -- what the control op and status ask -----------------------------------------------------------------
    def recording(self, seq: int) -> bool:
        with self._lock:
            return seq in self._in_flight

    def outcome(self, seq: int) -> str | None:
        with self._lock:
            return self._outcomes.get(seq)

    def state(self) -> str:
        return "paused" if time.monotonic() < self._paused_until else "recording"

    def status(self) -> dict[str, object]:
        with self._lock:
            in_flight = len(self._in_flight)
        return {
            "state": self.state(),
            "error": self.error,
            **self.counts,
            "dropped": dict(self.dropped),
            "in_flight": in_flight,
            "stored": self.stored,
            "stored_bytes": self.stored_bytes,
            "codec": self.codec,
            "rings": {name: ring.as_dict() for name, ring in list(self._rings.items())},
        }

    def _drop(self, seq: int, why: str, reason: str) -> None:
        """Under ``_lock``: count and remember that ``seq`` keeps no clip, and why."""
        self.dropped[why] = self.dropped.get(why, 0) + 1
        self._remember(seq, f"not recorded: {reason}")

    def _remember(self, seq: int, reason: str) -> None:
        self._outcomes[seq] = reason
        while len(self._outcomes) > REMEMBERED:
            self._outcomes.popitem(last=False)

    # -- the frames thread ----------------------------------------------------------------------------------
    def frames_loop(self) -> None:
        """Compress offered frames into the rings, start clips on triggers, finish clips that are complete."""
        while True:
            self._take_triggers()
            try:
                frame = self._frames.get(timeout=0.05)
            except queue.Empty:
                frame = None
            if frame is not None:
                self._add(frame)
            self._finish_due(frame)
            if self._stopping.is_set() and self._frames.empty() and self._triggers.empty():
                self._take_triggers()
                for recording in list(self._recording.values()):
                    self._finished(recording)
                self._encode.put(None)
                return

    def _take_triggers(self) -> None:
        while True:
            try:
                seq, kind, source, ts = self._triggers.get_nowait()
            except queue.Empty:
                return
            if seq is None:  # a source closed: its clips are complete
                for recording in [r for r in self._recording.values() if r.source == source]:
                    self._finished(recording)
                continue
            ring = self._rings.get(source)
            frames = ring.since(ts - self.cfg.clip_pre_s) if ring is not None else []
            recording = _Recording(seq, kind, source, ts, ts + self.cfg.clip_post_s, frames)
            recording.bytes = sum(len(f.jpeg) for f in frames)
            recording.due = time.monotonic() + self.cfg.clip_post_s + STALL_S
            self._recording[seq] = recording

    def _add(self, frame: Frame) -> None:
        kept = compress(frame.ts, frame.index, frame.image, self.cfg.clip_max_width, self.cfg.clip_quality)
        if kept is None:
            return
        ring = self._rings.get(frame.source)
        if ring is None:
            ring = self._rings[frame.source] = FrameRing(self.cfg.clip_pre_s, int(self.cfg.clip_ring_mb * 2**20))
        ring.push(kept)
        for recording in self._recording.values():
            if recording.source == frame.source and kept.ts <= recording.end_ts:
                if recording.bytes + len(kept.jpeg) <= MAX_CLIP_BYTES // 2:  # the video must fit its own bound
                    recording.frames.append(kept)
                    recording.bytes += len(kept.jpeg)

    def _finish_due(self, frame: Frame | None) -> None:
        now = time.monotonic()
        for recording in list(self._recording.values()):
            past = frame is not None and frame.source == recording.source and frame.ts > recording.end_ts
            if past or now > recording.due:
                self._finished(recording)

    def _finished(self, recording: _Recording) -> None:
        del self._recording[recording.seq]
        self._encode.put(recording)

    # -- the encode thread --------------------------------------------------------------------------------
    def encode_loop(self) -> None:
        """Encode, seal and keep each finished clip; every failure is counted and shown, none ends the loop."""
        while True:
            recording = self._encode.get()
            if recording is None:
                return
            try:
                self._keep(recording)
            except OSError as exc:  # the disk: full, read-only, gone. Pause rather than fail clip after clip
                self._failed(recording.seq, f"cannot write clips to {self.vault.dir}: {exc.strerror or exc}", True)
            except BastionError as exc:
                self._failed(recording.seq, str(exc), False)
            except Exception as exc:  # a bug: its traceback in the log, counted in status, the next clip goes on
                log.exception("clip of event %d failed", recording.seq)
                self._failed(recording.seq, f"{type(exc).__name__}: {exc}", False)
            finally:
                with self._lock:
                    self._in_flight.discard(recording.seq)

    def _keep(self, recording: _Recording) -> None:
        if not recording.frames:
            with self._lock:
                self._drop(recording.seq, "no_frames", "no frame of its source was seen around the event")
            return
        frames = recording.frames
        encoded = encode(frames, clip_fps(frames, self.cfg.clip_fps), self.cfg.clip_codec, MAX_CLIP_BYTES)
        meta = ClipMeta(
            seq=recording.seq,
            kind=recording.kind,
            source=recording.source,
            codec=encoded.codec,
            container=encoded.container,
            frames=encoded.frames,
            width=encoded.width,
            height=encoded.height,
            fps=encoded.fps,
            start_ts=frames[0].ts,
            end_ts=frames[-1].ts,
            event_ts=recording.event_ts,
            size=len(encoded.data),
            sha256=hashlib.sha256(encoded.data).hexdigest(),
        )
        self.vault.save(meta, encoded.data)
        self.codec = encoded.codec
        # Retention may have run since the event was committed: it deletes rows before clips, so either it saw
        # this file, or the row is already gone here and the clip goes with it.
        first = self.first_seq()
        if first is None or first > recording.seq:
            self.vault.delete_before(recording.seq + 1)
        self._prune()
        if self.error is not None:
            log.warning("clips recovered: event %d's clip was written", recording.seq)
        self.error = None
        self.counts["recorded"] += 1

    def _failed(self, seq: int, reason: str, pause: bool) -> None:
        if self.error != reason:
            log.error("clip of event %d not kept: %s", seq, reason)
        self.error = reason
        self.counts["failed"] += 1
        with self._lock:
            self._remember(seq, f"it could not be kept: {reason}")
            if pause:
                self._paused_until = time.monotonic() + PAUSE_S

    def _prune(self) -> None:
        """Keep the clips' disk budget (``clip_max_mb``), oldest first; refresh what status says is stored."""
        gone = self.vault.prune_to(int(self.cfg.clip_max_mb * 1e6))
        if gone:
            self.counts["pruned"] += len(gone)
            with self._lock:
                for seq in gone:
                    self._remember(seq, f"removed to keep the clips within clip_max_mb ({self.cfg.clip_max_mb:g} MB)")
        self.stored, self.stored_bytes = self.vault.usage()

    def apply_retention(self, first_seq: int) -> int:
        """Delete the clips of events retention removed (seq below ``first_seq``) and keep the disk budget."""
        removed = self.vault.delete_before(first_seq)
        self._prune()
        return removed

    def stop(self) -> None:
        """Finish what is recording with the frames it has, encode it, then let both threads end."""
        self._stopping.set()

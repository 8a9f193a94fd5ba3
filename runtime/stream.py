"""Detection over a stream of frames with decode + pre-processing overlapped with inference.

A reader thread decodes and letterboxes the next frames while the main thread
runs the model; frames of equal input size are batched when the model has a
dynamic batch axis.  Order is preserved.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from bastion.runtime.detect import Detector
from bastion.runtime.detections import Detections
from bastion.runtime.media import Frame, prefetch


def detect_stream(
    detector: Detector, frames: Iterable[Frame], batch: int = 1, depth: int = 8
) -> Iterator[tuple[Frame, Detections]]:
    """Yield ``(frame, detections)`` in input order."""
    batch = max(1, batch if detector.dynamic_batch else 1)

    def prepared() -> Iterator[tuple[Frame, tuple]]:
        for frame in frames:
            yield frame, detector.prepare(frame.image)

    pending: list[tuple[Frame, tuple]] = []
    for item in prefetch(prepared(), depth=max(depth, 2 * batch)):
        pending.append(item)
        if len(pending) >= batch:
            yield from _flush(detector, pending)
            pending = []
    if pending:
        yield from _flush(detector, pending)


def _flush(detector: Detector, pending: list[tuple[Frame, tuple]]) -> Iterator[tuple[Frame, Detections]]:
    results = detector.detect_prepared([p for _, p in pending])
    for (frame, _), det in zip(pending, results):
        yield frame, det

"""Detection over a stream of frames, overlapping decode, pre-processing and inference.

A reader thread decodes and prepares the next frames; ``workers`` threads run
inference + post-processing concurrently on the same session (ONNX Runtime's
``run`` is thread-safe, and OpenCV/numpy/ORT release the GIL; a backend that is
not gets one worker).  On small CPUs several single-threaded inferences in
flight use the cores better than one inference spread over all of them
(measured: docs/benchmarks.md), so for streams the detector is best opened with
``threads=1`` and ``workers`` = cores.
Frames of equal input size are batched when ``batch`` > 1 and the model has a
dynamic batch axis.  Results come out in input order.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable, Iterator

import cv2

from bastion.runtime.detect import Detector
from bastion.runtime.detections import Detections
from bastion.runtime.media import Frame, prefetch


def default_workers() -> int:
    """Concurrent inferences for a stream: one per core, at most 4."""
    return max(1, min(os.cpu_count() or 1, 4))


def detect_stream(
    detector: Detector, frames: Iterable[Frame], batch: int = 1, workers: int = 1, depth: int = 8
) -> Iterator[tuple[Frame, Detections]]:
    """Yield ``(frame, detections)`` in input order.

    A backend that is not thread-safe (``Detector.thread_safe`` False: one execution context shared by every
    call) gets one inference worker whatever ``workers`` asks; decoding and pre-processing still overlap it.
    """
    batch = max(1, batch if detector.dynamic_batch else 1)
    workers = max(1, workers) if getattr(detector, "thread_safe", True) else 1

    def prepared() -> Iterator[tuple[Frame, tuple]]:
        for frame in frames:
            yield frame, detector.prepare(frame.image)

    def chunks() -> Iterator[list[tuple[Frame, tuple]]]:
        pending: list[tuple[Frame, tuple]] = []
        for item in prefetch(prepared(), depth=max(depth, 2 * batch * workers)):
            pending.append(item)
            if len(pending) >= batch:
                yield pending
                pending = []
        if pending:
            yield pending

    def run(chunk: list[tuple[Frame, tuple]]) -> list[tuple[Frame, Detections]]:
        return list(zip((f for f, _ in chunk), detector.detect_prepared([p for _, p in chunk])))

    if workers == 1:
        for chunk in chunks():
            yield from run(chunk)
        return
    in_flight: deque[Future] = deque()
    # the cores belong to the inference workers: OpenCV's own thread pool (resize) would only contend with them.
    # The setting is process-wide, so it is restored when the stream ends.
    cv_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bastion-infer") as pool:
        try:
            for chunk in chunks():
                in_flight.append(pool.submit(run, chunk))
                while len(in_flight) > workers or (in_flight and in_flight[0].done()):
                    yield from in_flight.popleft().result()
            while in_flight:
                yield from in_flight.popleft().result()
        finally:
            for future in in_flight:
                future.cancel()
            cv2.setNumThreads(cv_threads)

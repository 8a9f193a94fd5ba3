"""A source's recent frames, JPEG-compressed, bounded by seconds AND bytes: the "pre" part of evidence clips.

Why JPEG and not arrays: one 1080p BGR frame is 6 MB, so ten seconds at 10 fps would be 600 MB a camera;
the same frames as JPEG at quality 80 are ~100-300 KB each. Why two bounds: seconds say what a clip may
reach back to, bytes say what the node may spend whatever the scene (a noisy night image compresses badly).
The oldest frames go first when either bound is passed. One writer (the clip thread, edge/clips.py); not
thread-safe on its own.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class RingFrame:
    """One kept frame: when it was read, its index in its source, its JPEG bytes and its (scaled) size."""

    ts: float
    index: int
    jpeg: bytes
    width: int
    height: int


def compress(ts: float, index: int, image: np.ndarray, max_width: int, quality: int) -> RingFrame | None:
    """``image`` (BGR) scaled down to ``max_width`` if wider, as a ``RingFrame``; None if OpenCV cannot encode it."""
    height, width = image.shape[:2]
    if width > max_width:
        height = max(2, round(height * max_width / width)) // 2 * 2  # even sizes: what every codec takes
        width = max_width // 2 * 2
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        return None
    return RingFrame(ts, index, jpeg.tobytes(), width, height)


class FrameRing:
    """Frames of one source, oldest first, at most ``max_s`` seconds older than the newest and ``max_bytes``."""

    def __init__(self, max_s: float, max_bytes: int) -> None:
        if max_s < 0 or max_bytes < 1:
            raise ValueError(f"a frame ring needs max_s >= 0 and max_bytes >= 1, not {max_s}, {max_bytes}")
        self.max_s = max_s
        self.max_bytes = max_bytes
        self._frames: deque[RingFrame] = deque()
        self.bytes = 0
        self.evicted = 0  # frames pushed out by either bound since start

    def __len__(self) -> int:
        return len(self._frames)

    def push(self, frame: RingFrame) -> None:
        """Keep ``frame``; drop the oldest while the ring is over either bound (a single frame larger than
        ``max_bytes`` is not kept at all: the bound holds)."""
        if len(frame.jpeg) > self.max_bytes:
            self.evicted += 1
            return
        self._frames.append(frame)
        self.bytes += len(frame.jpeg)
        while self._frames and (self.bytes > self.max_bytes or frame.ts - self._frames[0].ts > self.max_s):
            self.bytes -= len(self._frames.popleft().jpeg)
            self.evicted += 1

    def since(self, ts: float) -> list[RingFrame]:
        """The kept frames read at or after ``ts``, oldest first (the pre-event part of a clip)."""
        return [f for f in self._frames if f.ts >= ts]

    def newest_ts(self) -> float | None:
        return self._frames[-1].ts if self._frames else None

    def as_dict(self) -> dict[str, float | int]:
        span = self._frames[-1].ts - self._frames[0].ts if self._frames else 0.0
        return {"frames": len(self._frames), "bytes": self.bytes, "span_s": round(span, 2), "evicted": self.evicted}

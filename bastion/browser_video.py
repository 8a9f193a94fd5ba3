"""A copy of the demo's annotated video that a web browser plays.

``annotated.mp4`` is MPEG-4 Part 2 (OpenCV's always-available ``mp4v``): video players open it, Chromium does not.
The report links this copy instead: H.264 in MP4 where this OpenCV build can encode it (the pip wheels cannot:
no GPL x264), else VP8 in WebM (the pip wheels' FFmpeg has libvpx; every Chromium and Firefox plays it), else an
animated WebP shown as an ``<img>`` (OpenCV's own encoder, no FFmpeg needed). The first the build can open wins.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BrowserFormat:
    suffix: str
    fourcc: str | None  # None: an animated image (``cv2.imwriteanimation``)
    html: str  # "video" or "img": the element that shows it
    what: str


FORMATS = (
    BrowserFormat(".mp4", "avc1", "video", "H.264 in MP4"),
    BrowserFormat(".webm", "VP80", "video", "VP8 in WebM"),
    BrowserFormat(".webp", None, "img", "animated WebP"),
)
BROWSER_WIDTH = 640  # the preview's width in pixels (the full-size video stays in annotated.mp4)
MAX_ANIMATION_FRAMES = 120  # an animated image holds every frame in memory until it is written


class BrowserVideoWriter:
    """``stem`` + the chosen format's suffix, written under a temp name and renamed into place on ``close``."""

    def __init__(self, stem: Path, fps: float, size_wh: tuple[int, int], formats=FORMATS, total_frames: int = 0):
        self.fps = fps or 25.0
        width, height = size_wh
        scale = min(1.0, BROWSER_WIDTH / width)
        self.size = (int(round(width * scale / 2) * 2), int(round(height * scale / 2) * 2))  # even: 4:2:0 codecs
        self.writer = None
        self.frames = 0
        self._images: list[np.ndarray] = []
        self._step = max(1, -(-total_frames // MAX_ANIMATION_FRAMES)) if total_frames else 1
        for fmt in formats:
            self.format = fmt
            self.path = Path(f"{stem}{fmt.suffix}")
            self.tmp = self.path.with_name(f".{self.path.stem}.tmp{fmt.suffix}")
            if fmt.fourcc is None:
                if hasattr(cv2, "imwriteanimation"):
                    break
                continue
            self.tmp.parent.mkdir(parents=True, exist_ok=True)
            with _quiet_stderr():  # a build without the codec says so on fd 2, in FFmpeg's words, every time
                writer = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*fmt.fourcc), self.fps, self.size)
            if writer.isOpened():
                self.writer = writer
                break
            writer.release()
            self.tmp.unlink(missing_ok=True)
        else:
            self.format = None
        log.info("browser copy of the video: %s", self.format.what if self.format else "none (no encoder)")

    def write(self, image: np.ndarray) -> None:
        if self.format is None:
            return
        if self.format.fourcc is None and self.frames % self._step:
            self.frames += 1
            return
        small = cv2.resize(image, self.size, interpolation=cv2.INTER_AREA)
        if self.writer is not None:
            self.writer.write(small)
        elif len(self._images) < MAX_ANIMATION_FRAMES:
            self._images.append(small)
        self.frames += 1

    def close(self, keep: bool = True) -> Path | None:
        """The written file, or None (nothing written, an error, or no encoder)."""
        if self.format is None:
            return None
        if self.writer is not None:
            self.writer.release()
        elif keep and self._images:
            animation = cv2.Animation()
            animation.frames = self._images
            animation.durations = [int(round(1000 * self._step / self.fps))] * len(self._images)
            animation.loop_count = 0
            keep = bool(cv2.imwriteanimation(str(self.tmp), animation))
        if keep and self.frames and self.tmp.is_file() and self.tmp.stat().st_size:
            with open(self.tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(self.tmp, self.path)
            return self.path
        self.tmp.unlink(missing_ok=True)
        return None


def browser_copy(video: Path, stem: Path, formats: tuple[BrowserFormat, ...] = FORMATS) -> dict[str, str] | None:
    """``video`` re-encoded by :class:`BrowserVideoWriter` (after the fact, so it costs the timed loop nothing):
    ``{"path", "format", "element"}``, or None when nothing could be written."""
    from bastion.runtime.media import iter_video, video_info

    if not Path(video).is_file():
        return None
    info = video_info(video)
    size = (int(info["width"]), int(info["height"]))
    writer = BrowserVideoWriter(stem, info["fps"], size, formats, total_frames=int(info["frames"]))
    try:
        for frame in iter_video(video):
            writer.write(frame.image)
    except BaseException:
        writer.close(keep=False)
        raise
    path = writer.close()
    return {"path": str(path), "format": writer.format.what, "element": writer.format.html} if path else None


@contextlib.contextmanager
def _quiet_stderr():
    """fd 2 to /dev/null for the duration (FFmpeg and OpenCV write there directly, not through Python)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)

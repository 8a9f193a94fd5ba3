"""JPEG ring frames → one video file's bytes, with OpenCV's VideoWriter, never in clear on disk.

VideoWriter only writes to a path. The plain video must not touch the storage disk (a stolen unit's free
blocks would give it back), so on Linux it is written to an anonymous in-memory file (``memfd_create``)
reached through a symlink whose name carries the container's extension (OpenCV picks the muxer by it);
the symlink holds no data. Where memfd is missing the video goes to a private (0700) temp directory and
is deleted as soon as it is read back.

Codecs, by preference (``storage.clip_codec``): ``mjpeg`` (MJPG in .avi, what every OpenCV build writes
offline, frame-exact), ``mp4v`` (MPEG-4 part 2 in .mp4, ~5× smaller), ``h264`` (``avc1`` in .mp4, only where
the OpenCV build has an H.264 encoder — opencv-python-headless on PyPI does not). Each falls back to MJPEG;
the codec that was used is recorded in the clip's metadata.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np

from bastion.edge.clip_ring import RingFrame
from bastion.errors import BastionError

log = logging.getLogger(__name__)
# codec name -> (fourcc, container) tried in order
CODECS: dict[str, list[tuple[str, str]]] = {
    "mjpeg": [("MJPG", "avi")],
    "mp4v": [("mp4v", "mp4"), ("MJPG", "avi")],
    "h264": [("avc1", "mp4"), ("MJPG", "avi")],
}
FOURCC_NAMES = {"MJPG": "mjpeg", "mp4v": "mp4v", "avc1": "h264"}
_UNAVAILABLE: set[tuple[str, str]] = set()  # writers this process found missing (the build does not change)


@dataclass(frozen=True)
class EncodedClip:
    data: bytes
    codec: str  # mjpeg | mp4v | h264: what was written, not what was asked for
    container: str  # avi | mp4
    frames: int
    width: int
    height: int
    fps: float


def clip_fps(frames: Sequence[RingFrame], cap: float) -> float:
    """The rate the frames were kept at (their span over their count), within [1, cap]: played back at it,
    the clip lasts about as long as what it shows."""
    if len(frames) < 2:
        return float(cap)
    span = frames[-1].ts - frames[0].ts
    rate = (len(frames) - 1) / span if span > 0 else cap
    return float(min(max(rate, 1.0), cap))


def encode(frames: Sequence[RingFrame], fps: float, codec: str, max_bytes: int) -> EncodedClip:
    """The frames as one video (BastionError: no frame decodes, no writer opens, or it came out past ``max_bytes``)."""
    if not frames:
        raise BastionError("a clip needs at least one frame")
    width, height = frames[0].width, frames[0].height
    for fourcc, container in CODECS[codec]:
        if (fourcc, container) in _UNAVAILABLE:
            continue
        with _scratch(container) as (path, read_back):
            writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), fps, (width, height))
            if not writer.isOpened():
                writer.release()
                if fourcc != "MJPG":  # not in this OpenCV build: said once, not tried for every clip
                    _UNAVAILABLE.add((fourcc, container))
                log.warning("clip codec %s (%s) is not available here; trying the next", fourcc, container)
                continue
            written = 0
            try:
                for frame in frames:
                    image = cv2.imdecode(np.frombuffer(frame.jpeg, np.uint8), cv2.IMREAD_COLOR)
                    if image is None:
                        continue
                    if image.shape[1] != width or image.shape[0] != height:  # the source changed size mid-clip
                        image = cv2.resize(image, (width, height))
                    writer.write(image)
                    written += 1
            finally:
                writer.release()
            if not written:
                raise BastionError("no frame of the clip could be decoded")
            data = read_back(max_bytes)
            if not data:
                raise BastionError(f"OpenCV wrote an empty {container} file ({fourcc})")
            return EncodedClip(data, FOURCC_NAMES[fourcc], container, written, width, height, round(fps, 3))
    raise BastionError(f"no video writer opens for codec {codec} (not even MJPEG): this OpenCV cannot write clips")


@contextlib.contextmanager
def _scratch(container: str) -> Iterator[tuple[str, object]]:
    """A path VideoWriter can write to, and a function reading back (at most n bytes of) what it wrote."""
    directory = tempfile.mkdtemp(prefix="bastion-clip-")  # 0700; holds only a symlink when memfd exists
    fd = -1
    try:
        path = os.path.join(directory, f"clip.{container}")
        memfd = getattr(os, "memfd_create", None)
        if memfd is not None and os.path.isdir(f"/proc/{os.getpid()}/fd"):  # a file in memory, reached by a link
            fd = memfd("bastion-clip", getattr(os, "MFD_CLOEXEC", 0))
            os.symlink(f"/proc/{os.getpid()}/fd/{fd}", path)

        def read_back(limit: int) -> bytes:
            if fd >= 0:
                size = os.fstat(fd).st_size
                if size > limit:
                    raise BastionError(f"the clip came out at {size} bytes, over the {limit}-byte bound")
                return os.pread(fd, size, 0)
            target = Path(path)
            if not target.exists():
                return b""
            if target.stat().st_size > limit:
                raise BastionError(f"the clip came out at {target.stat().st_size} bytes, over the {limit}-byte bound")
            return target.read_bytes()

        yield path, read_back
    finally:
        if fd >= 0:
            os.close(fd)
        shutil.rmtree(directory, ignore_errors=True)

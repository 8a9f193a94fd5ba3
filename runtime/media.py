"""Reading images and videos from disk with clear errors; corrupt files are skipped, not fatal.

Where frames come from by URI (files, directories, streams, USB cameras) is ``runtime/sources.py``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from itertools import islice
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

import cv2
import numpy as np

from bastion.errors import ImageReadError, InputNotFoundError
from bastion.models.safe_read import TooLarge, read_bounded

log = logging.getLogger(__name__)

# A camera frame or photo is a few MB; a file this large in an image folder is a mistake or an attack, and
# reading it whole would take the memory of the unit (issue #15: one 10 GB file aborted ``bastion detect DIR``).
MAX_IMAGE_BYTES = 256 * 2**20
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm", ".mpg", ".mpeg", ".ts"}


@dataclass
class Frame:
    """One image to detect on, the one frame type of ``bastion detect`` and the field node alike.

    ``source`` names the source (the node's source name, or the path/URI ``bastion detect`` was given) and
    ``index`` counts its frames from 0 (across reconnects: the node's event ``frame``); ``ts`` is the unix time
    it was read; ``path`` is the file it came from when one source reads many files (a directory of images).
    """

    source: str
    index: int
    image: np.ndarray
    ts: float = field(default_factory=time.time)
    path: str | None = None


def as_bgr(image: np.ndarray) -> np.ndarray:
    """Grey or BGRA arrays → 3-channel BGR; anything else with 3 channels passes through."""
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim == 3 and image.shape[2] == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    return image


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to BGR uint8, or raise ImageReadError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"image not found: {path}")
    try:  # the size is checked before anything is buffered; a FIFO or device is refused, not waited on
        data = np.frombuffer(read_bounded(path, MAX_IMAGE_BYTES), dtype=np.uint8)
    except TooLarge as exc:
        raise ImageReadError(
            f"{path} is {exc.size / 2**20:.0f} MiB, more than an image file may be "
            f"({MAX_IMAGE_BYTES // 2**20} MiB); not read",
            "is it really an image? split or re-encode it",
        ) from None
    except OSError as exc:
        raise ImageReadError(f"cannot read image {path} ({exc.strerror or exc})") from None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise ImageReadError(f"cannot decode image {path} (corrupt, truncated or not an image)")
    return image


def list_images(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def iter_image_files(paths: Iterable[Path], skipped: list[str] | None = None) -> Iterator[Frame]:
    """Decode each file; a corrupt one is logged, recorded in ``skipped`` and passed over."""
    for i, path in enumerate(paths):
        try:
            image = read_image(path)
        except ImageReadError as exc:
            log.warning("skipping unreadable image: %s", exc, extra={"path": str(path)})
            if skipped is not None:
                skipped.append(str(path))
            continue
        yield Frame(str(path), i, image, path=str(path))


def iter_video(path: str | Path, max_frames: int | None = None) -> Iterator[Frame]:
    """Decode a video file frame by frame."""
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ImageReadError(f"cannot open video {path} (corrupt or unsupported codec)")
    for index, image in enumerate(islice(read_capture(cap), max_frames)):
        yield Frame(str(path), index, image)


def read_capture(cap: cv2.VideoCapture) -> Iterator[np.ndarray]:
    """The frames of an opened capture until it ends; the capture is released however the loop stops."""
    try:
        while True:
            ok, image = cap.read()
            if not ok:
                return
            yield image
    finally:
        cap.release()


def video_info(path: str | Path) -> dict[str, float]:
    cap = cv2.VideoCapture(str(path))
    try:
        return {
            "fps": cap.get(cv2.CAP_PROP_FPS) or 0.0,
            "frames": cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0.0,
            "width": cap.get(cv2.CAP_PROP_FRAME_WIDTH),
            "height": cap.get(cv2.CAP_PROP_FRAME_HEIGHT),
        }
    finally:
        cap.release()


T = TypeVar("T")
_END = object()


def prefetch(items: Iterable[T], depth: int = 4) -> Iterator[T]:
    """Produce ``items`` on a background thread so decoding overlaps the consumer's work.

    OpenCV decoding and ONNX Runtime both release the GIL, so a reader thread
    keeps the next frames ready while the current batch is inferred.
    Exceptions in the producer are re-raised in the consumer.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put(_END)
        except BaseException as exc:  # hand it to the consumer
            buffer.put(exc)

    thread = threading.Thread(target=produce, name="bastion-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()

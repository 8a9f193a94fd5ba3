"""Where frames come from, for ``bastion detect`` and the field node alike: one registry of openers.

A source is named by a URI — a video file, one image, a directory of images, an ``rtsp://``/``http://``…
stream, or a USB camera (``0``, ``/dev/video0``).  ``source_kind`` maps the URI to a kind and each kind has
one opener, registered Frigate-style (``@register_opener("usb")``), so a new kind is one small function and
the CLI and the node can never disagree on what a URI means.  An opener only opens: pacing, reconnecting,
counting and queueing belong to the one reader (``runtime/reader.py``).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Iterator, NamedTuple

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from bastion.errors import BastionError, ImageReadError
from bastion.runtime.media import IMAGE_SUFFIXES, VIDEO_SUFFIXES, list_images, read_capture, read_image

STREAM_PREFIXES = ("rtsp://", "rtsps://", "http://", "https://", "rtmp://", "udp://", "tcp://")
USB_DEVICE = re.compile(r"/dev/video(\d{1,3})")
MAX_USB_INDEX = 255
MAX_URI_CHARS = 4096  # PATH_MAX; a longer "path" is a mistake or an attack
# A stream that does not answer (a camera off the network, a firewall that drops instead of refusing) would
# otherwise hold the open for FFmpeg's own timeout, minutes; a stalled one would hold a read for ever.
STREAM_TIMEOUT_MS = 10_000


class SourceUnavailable(BastionError):
    """The source cannot be read right now (missing file, unreachable camera): the node retries it with
    backoff, ``bastion detect`` says so in one line and exits 1."""


class SourceSpec(BaseModel):
    """What a source is and how to read it; the node's ``SourceConfig`` adds its filters to this."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # .inf / .nan in YAML are floats too

    name: str = Field(min_length=1, max_length=MAX_URI_CHARS)
    uri: Annotated[str, Field(min_length=1, max_length=MAX_URI_CHARS)] | int
    loop: bool = False  # files: start again at the end
    realtime: bool = True  # files: pace at the file's native fps (like a camera)
    fps: float | None = Field(None, ge=0.001, le=1000)  # pace/limit to this rate instead


class Capture(NamedTuple):
    """One item an opener yields: the BGR pixels, or None with the reason when this one cannot be decoded."""

    image: np.ndarray | None
    path: str | None = None  # the file it came from (a directory's images)
    error: str = ""


@dataclass
class Opened:
    """An opened source: its captures and how the reader must treat them."""

    captures: Iterator[Capture]
    pace_fps: float  # 0: as fast as the consumer takes them (no frame is ever dropped)
    live: bool  # a camera or stream: it does not wait for the model, and is reopened when it ends
    native_fps: float = 0.0  # the source's own rate, when it says (for writing a video of it)


Opener = Callable[[SourceSpec], Opened]
_OPENERS: dict[str, Opener] = {}


def register_opener(kind: str) -> Callable[[Opener], Opener]:
    def wrap(fn: Opener) -> Opener:
        _OPENERS[kind] = fn
        return fn

    return wrap


def source_kind(uri: str | int) -> str:
    """'usb', 'stream', 'dir', 'image' or 'video' (any other file: OpenCV decides whether it can read it)."""
    if isinstance(uri, int) or uri.isdigit() or USB_DEVICE.fullmatch(uri):
        return "usb"
    if uri.lower().startswith(STREAM_PREFIXES):
        return "stream"
    path = Path(uri)
    if path.is_dir():
        return "dir"
    return "image" if path.suffix.lower() in IMAGE_SUFFIXES else "video"


def open_source(spec: SourceSpec) -> Opened:
    """Open ``spec`` with the opener of its kind; raises SourceUnavailable (or a driver's own error)."""
    return _OPENERS[source_kind(spec.uri)](spec)


def usb_index(uri: str | int) -> int:
    match = USB_DEVICE.fullmatch(uri) if isinstance(uri, str) else None
    index = int(match.group(1) if match else uri)
    if not 0 <= index <= MAX_USB_INDEX:
        raise SourceUnavailable(f"USB camera index {index} is out of range", f"use 0..{MAX_USB_INDEX}")
    return index


def _quiet_video_io() -> None:
    """OpenCV and FFmpeg print their own warnings for every failed open; the reader says it once, clearly.

    Set on the first open, not at import, and only where the user has not chosen a level."""
    if "OPENCV_LOG_LEVEL" not in os.environ:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET; read by OpenCV at each open


def _capture(target: str | int, what: str, hint: str | None = None, backend: int = cv2.CAP_ANY, params=()):
    _quiet_video_io()
    cap = cv2.VideoCapture(target, backend, list(params))
    if not cap.isOpened():
        cap.release()
        raise SourceUnavailable(f"cannot open {what}", hint)
    return cap


def _frames_of(cap: cv2.VideoCapture) -> Iterator[Capture]:
    return (Capture(image) for image in read_capture(cap))


def _regular_file(uri: str | int) -> Path:
    path = Path(str(uri))
    if not path.exists():
        raise SourceUnavailable(f"input not found: {path}", "check the path")
    if not path.is_file():  # a FIFO or device would block or never end: refused, and named for what it is
        raise SourceUnavailable(f"not a regular file: {path}")
    return path


@register_opener("video")
def open_video(spec: SourceSpec) -> Opened:
    path = _regular_file(spec.uri)
    suffixes = ", ".join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))
    cap = _capture(str(path), f"video {path} (corrupt or unsupported codec)", f"bastion reads {suffixes}")
    native = cap.get(cv2.CAP_PROP_FPS) or 0.0
    pace = (spec.fps or native or 25.0) if spec.realtime else 0.0
    return Opened(_frames_of(cap), pace, live=False, native_fps=native)


@register_opener("image")
def open_image(spec: SourceSpec) -> Opened:
    path = _regular_file(spec.uri)
    try:
        image = read_image(path)  # bounded in bytes (media.MAX_IMAGE_BYTES)
    except ImageReadError as exc:
        raise SourceUnavailable(exc.message, exc.hint) from None
    return Opened(iter([Capture(image, str(path))]), spec.fps or 0.0, live=False)


@register_opener("dir")
def open_dir(spec: SourceSpec) -> Opened:
    directory = Path(str(spec.uri))
    files = list_images(directory)
    if not files:
        raise SourceUnavailable(
            f"no images in {directory}", f"expected files ending in {', '.join(sorted(IMAGE_SUFFIXES))}"
        )

    def captures() -> Iterator[Capture]:
        for path in files:
            try:
                yield Capture(read_image(path), str(path))
            except ImageReadError as exc:  # counted as an error and skipped, never fatal
                yield Capture(None, str(path), str(exc))

    return Opened(captures(), spec.fps or 0.0, live=False)


@register_opener("stream")
def open_stream(spec: SourceSpec) -> Opened:
    timeouts = (cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, STREAM_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, STREAM_TIMEOUT_MS)
    cap = _capture(
        str(spec.uri),
        f"stream {redacted(str(spec.uri))}",
        "is the camera on and reachable, and the URL (path, port, credentials) right?",
        cv2.CAP_FFMPEG,
        timeouts,
    )
    return Opened(_frames_of(cap), spec.fps or 0.0, live=True, native_fps=cap.get(cv2.CAP_PROP_FPS) or 0.0)


@register_opener("usb")
def open_usb(spec: SourceSpec) -> Opened:
    index = usb_index(spec.uri)
    hint = "is a camera plugged in? `ls /dev/video*` lists those this machine sees"
    if sys.platform.startswith("linux") and not Path(f"/dev/video{index}").exists():
        raise SourceUnavailable(f"no USB camera at /dev/video{index}", hint)
    cap = _capture(index, f"USB camera {index}", hint)
    return Opened(_frames_of(cap), spec.fps or 0.0, live=True, native_fps=cap.get(cv2.CAP_PROP_FPS) or 0.0)


def redacted(uri: str) -> str:
    """A stream URL without its password, fit for a log line or a status answer."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", uri)

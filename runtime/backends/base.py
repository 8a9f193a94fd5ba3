"""The one lifecycle every backend follows (after Polygraphy's runners).

``open -> (warm-up) -> run(feeds) ... -> close``.  A backend knows nothing about
images or detections: it maps named input arrays to a list of output arrays, so
``Detector`` works the same on ONNX Runtime, TensorRT or anything added later.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpenOptions:
    """What a caller asks of whichever backend opens a model; each backend's ``config_for`` takes what it uses
    (threads for ONNX Runtime; precision, input size and batch for a TensorRT engine's profile)."""

    threads: int | None = None
    precision: str | None = None  # the bundle's: "int8" builds an INT8 TensorRT engine, anything else FP16
    size_hw: tuple[int, int] | None = None
    max_batch: int = 1


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape (None for a dynamic axis) and numpy dtype of one model input/output."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype

    @property
    def dynamic_batch(self) -> bool:
        return len(self.shape) > 0 and self.shape[0] is None


class Backend(abc.ABC):
    """Base class: subclasses fill ``inputs``/``outputs`` and implement ``_run``.

    ``thread_safe``: may several threads call ``run`` on one instance at once? A backend that shares one
    execution context, stream and buffers between calls (TensorRT) says False, and ``detect_stream`` then runs one
    inference worker on it."""

    name: str = "base"
    thread_safe: bool = False  # a subclass that is, says so

    def __init__(self) -> None:
        self.inputs: list[TensorInfo] = []
        self.outputs: list[TensorInfo] = []
        self.providers: list[str] = []
        self._closed = False

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one inference; ``feeds`` maps input names to arrays."""
        self._check_open()
        return self._run(feeds)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.name} backend used after close()")

    @abc.abstractmethod
    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...

    def warmup(self, runs: int = 1, shape_hint: dict[str, tuple[int, ...]] | None = None) -> None:
        """Run zero-filled inputs so first-call allocation and kernel selection happen now."""
        feeds = {}
        for info in self.inputs:
            shape = (shape_hint or {}).get(info.name) or tuple(d if d is not None else 1 for d in info.shape)
            feeds[info.name] = np.zeros(shape, dtype=info.dtype)
        for _ in range(runs):
            self.run(feeds)
        log.debug("backend warmed up", extra={"backend": self.name, "runs": runs})

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

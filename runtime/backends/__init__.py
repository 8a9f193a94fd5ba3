"""Backends run a model file: ``open_backend(path, device=...)`` picks the implementation.

ONNX Runtime is always available (CPU, and CUDA/TensorRT execution providers
when the GPU build is installed).  A native TensorRT backend plugs in here
behind the ``[tensorrt]`` extra without changing callers.
"""

from __future__ import annotations

from pathlib import Path

from bastion.runtime.backends.base import Backend, TensorInfo
from bastion.runtime.backends.onnxrt import OrtBackend, available_providers

__all__ = ["Backend", "TensorInfo", "OrtBackend", "open_backend", "available_providers"]


def open_backend(path: str | Path, device: str = "auto", threads: int | None = None) -> Backend:
    """Open ``path`` on the best backend for ``device`` ('auto', 'cpu', 'cuda', 'tensorrt')."""
    return OrtBackend(path, device=device, threads=threads)

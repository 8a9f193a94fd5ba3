"""Backends run a model file: ``open_backend(path, device=...)`` picks the implementation.

ONNX Runtime is always available (CPU, and CUDA/TensorRT execution providers when the GPU build is installed).
The native TensorRT backend (``[tensorrt]`` extra) is used for ``device="trt"``, and first by
``device="auto"`` when TensorRT and cuda-python are installed — falling back to ONNX Runtime, with a logged
reason, if it cannot start.
"""

from __future__ import annotations

from pathlib import Path

import logging

from bastion.errors import BastionError, ModelLoadError
from bastion.runtime.backends.base import Backend, TensorInfo
from bastion.runtime.backends.onnxrt import OrtBackend, available_providers
from bastion.runtime.backends.tensorrt import tensorrt_available

__all__ = ["Backend", "TensorInfo", "OrtBackend", "open_backend", "available_providers", "tensorrt_available"]
log = logging.getLogger(__name__)


def open_backend(
    model: str | Path | bytes,
    device: str = "auto",
    threads: int | None = None,
    precision: str | None = None,
    size_hw: tuple[int, int] | None = None,
    max_batch: int = 1,
    label: str | None = None,
) -> Backend:
    """Open ``model`` on the best backend for ``device``: 'auto', 'trt' (native TensorRT), or ONNX Runtime's
    'cpu', 'cuda', 'tensorrt' (execution provider). ``precision`` (the bundle's) and ``size_hw`` (its input
    size) and ``max_batch`` shape a TensorRT engine: an INT8 (QDQ) bundle builds an INT8 engine, anything else
    FP16.

    ``model`` is a bundle's verified bytes (``Bundle.model_bytes()``; ``label`` names it in messages) or the path
    of a bare ONNX file. Either way it is read once and every session or engine is built from those bytes."""
    from bastion.runtime.backends.onnxrt import read_model

    data, read_label = read_model(model)  # once, for whichever backend starts (and its fallback)
    label = label or read_label
    if device == "trt" or (device == "auto" and tensorrt_available()):
        from bastion.runtime.backends.tensorrt import TensorRTBackend

        try:
            return TensorRTBackend(
                data,
                precision="int8" if precision == "int8" else "fp16",
                opt_hw=size_hw,
                max_batch=max_batch,
                label=label,
            )
        except BastionError:
            if device == "trt":
                raise
            log.warning("native TensorRT could not start; using ONNX Runtime", exc_info=True)
        except Exception as exc:
            if device == "trt":
                raise ModelLoadError(
                    f"TensorRT failed: {str(exc).splitlines()[0] if str(exc) else exc!r}",
                    "try --device cuda (ONNX Runtime), or 'bastion engine clear'",
                ) from None
            log.warning("native TensorRT failed (%s); using ONNX Runtime", exc)
    return OrtBackend(data, device=device, threads=threads, label=label)

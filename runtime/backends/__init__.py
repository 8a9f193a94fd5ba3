"""Backends run a model: ``open_backend(model_bytes, device=...)`` picks one from the registry.

The registry (``registry.py``) holds one ``BackendSpec`` per name of ``bastion.hardware.backend_names``:
``ort-cpu``, ``ort-cuda``, ``ort-trt`` (``onnxrt.py``: ONNX Runtime with its CPU, CUDA or TensorRT execution
provider) and ``trt`` (``tensorrt.py``: native TensorRT, the ``[tensorrt]`` extra). Each module has a loader (bytes
→ session or engine) and a runner (``Backend``). ``device="auto"`` takes the first available of trt > ort-trt >
ort-cuda > ort-cpu. Names are resolved lazily (PEP 562) so ``import bastion.runtime.backends.base`` stays light.
"""

from __future__ import annotations

import importlib

from bastion.runtime.backends.base import Backend, OpenOptions, TensorInfo

__all__ = [
    "Backend",
    "OpenOptions",
    "TensorInfo",
    "OrtBackend",
    "open_backend",
    "resolve_device",
    "available_providers",
    "tensorrt_available",
    "backend_specs",
    "get_backend",
    "register_backend",
    "parse_backend_config",
]
_LAZY = {
    "OrtBackend": "bastion.runtime.backends.onnxrt",
    "available_providers": "bastion.runtime.backends.onnxrt",
    "tensorrt_available": "bastion.runtime.backends.tensorrt",
    "open_backend": "bastion.runtime.backends.select",
    "resolve_device": "bastion.runtime.backends.select",
    "backend_specs": "bastion.runtime.backends.registry",
    "get_backend": "bastion.runtime.backends.registry",
    "register_backend": "bastion.runtime.backends.registry",
    "parse_backend_config": "bastion.runtime.backends.registry",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

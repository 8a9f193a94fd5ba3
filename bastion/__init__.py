"""bastion — sovereign edge-AI deployment kit.

The SDK names integrators use: ``from bastion import Detector, Client, Bundle``.
Importing ``bastion`` never imports torch, ultralytics or transformers, and the SDK names are
resolved lazily (PEP 562): ``import bastion.errors`` — the base layer every card imports — loads
neither onnxruntime, OpenCV nor pyzmq until a name that needs them is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# First, and eager: it must run before anything imports onnxruntime (see its docstring).
import bastion.ort_telemetry  # noqa: F401

__version__ = "0.1.0"

# name -> module that defines it (`__getattr__` and `dir()` read it; tests/test_imports.py holds `__all__` to it).
_SDK = {
    "BastionError": "bastion.errors",
    "Bundle": "bastion.models.bundle",
    "Client": "bastion.edge.client",
    "DetectionEvent": "bastion.edge.protocol",
    "Detector": "bastion.runtime",
    "DetectOptions": "bastion.runtime",
    "Detections": "bastion.runtime",
}
__all__ = [
    "__version__",
    "BastionError",
    "Bundle",
    "Client",
    "DetectionEvent",
    "Detector",
    "DetectOptions",
    "Detections",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names come from __getattr__
    from bastion.edge.client import Client
    from bastion.edge.protocol import DetectionEvent
    from bastion.errors import BastionError
    from bastion.models.bundle import Bundle
    from bastion.runtime import DetectOptions, Detections, Detector


def __getattr__(name: str) -> Any:
    module = _SDK.get(name)
    if module is None:
        raise AttributeError(f"module 'bastion' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SDK})

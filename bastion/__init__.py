"""bastion — sovereign edge-AI deployment kit.

The SDK names integrators use: ``from bastion import Detector, Client, Bundle``.
Importing ``bastion`` never imports torch, ultralytics or transformers.
"""

from __future__ import annotations

__version__ = "0.1.0"

import bastion.ort_telemetry  # noqa: F401  (first, and eager even in a lazy facade: see its docstring)

from bastion.edge.client import Client
from bastion.edge.protocol import DetectionEvent
from bastion.errors import BastionError
from bastion.models.bundle import Bundle
from bastion.runtime import DetectOptions, Detections, Detector

__all__ = ["__version__", "BastionError", "Bundle", "Client", "DetectionEvent", "Detector", "DetectOptions",
           "Detections"]

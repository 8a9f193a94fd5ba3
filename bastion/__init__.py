"""bastion — sovereign edge-AI deployment kit.

The SDK names integrators use: ``from bastion import Detector, Detections``.
Importing ``bastion`` never imports torch, ultralytics or transformers.
"""

from __future__ import annotations

__version__ = "0.1.0"

from bastion.errors import BastionError
from bastion.runtime import DetectOptions, Detections, Detector

__all__ = ["__version__", "BastionError", "Detector", "DetectOptions", "Detections"]

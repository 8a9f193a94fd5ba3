"""Where the vendored sample media lives (``bastion/samples``, CC BY 4.0 clips and images).

A base-layer module: the cards (``node init``'s example config, tests) may import it, unlike ``bastion.demo``.
"""

from __future__ import annotations

from pathlib import Path

SAMPLES = Path(__file__).resolve().parent / "samples"
SAMPLE_IMAGES = SAMPLES / "images"
DEFAULT_VIDEO = SAMPLES / "one-by-one-person-detection.mp4"

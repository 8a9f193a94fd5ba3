"""The one-camera node that test_metrics.py and test_sinks.py run for real: yolov5n on the looping sample clip.

Both tests start a real Node and only differ in what they attach to it (a metrics endpoint, a sink).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bastion.edge.config import load_config
from conftest import SAMPLES


def one_camera_node_config(tmp_path: Path, **extra: Any):
    """A loopback-only node config (ephemeral ports, storage under ``tmp_path``) with ``extra`` keys on top."""
    return load_config(
        None,
        {
            "id": "n1",
            "model": "yolov5n",
            "imgsz": 320,
            "threads": 1,
            "sources": [{"name": "cam1", "uri": str(SAMPLES / "one-by-one-person-detection.mp4"), "loop": True}],
            "endpoints": {"events": "tcp://127.0.0.1:*", "control": "tcp://127.0.0.1:*"},
            "storage": {"dir": str(tmp_path / "data")},
            **extra,
        },
    )

"""``bastion hw plan BUNDLE --profile NAME``: will it fit, how to run it, how fast.

Memory = weights (the model file) + activations (measured: resident memory of a fresh process after one
inference at the planned batch and size, minus the same process just before it) + the backend's workspace.  Speed comes from a
measurement when the profile describes this machine (CPU profiles), from the profile's published reference
otherwise, and is left blank — with the command to measure it — when neither exists.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any

from bastion.hardware.profiles import Profile
from bastion.models.bundle import Bundle

# Resident memory after the session is built, then after one inference: ORT's arena keeps what the
# activations needed, so the difference is what this batch and size cost (a high-water mark would be
# dominated by graph optimisation at session creation).
_PEAK = r"""
import json, re, sys
import numpy as np, onnxruntime as ort
def rss_kb():
    return int(re.search(r"VmRSS:\s*(\d+)", open("/proc/self/status").read()).group(1))
path, b, h, w = sys.argv[1], *map(int, sys.argv[2:5])
o = ort.SessionOptions(); o.intra_op_num_threads = 1
s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
x = np.zeros((b, 3, h, w), np.float32)
base = rss_kb()
s.run(None, {s.get_inputs()[0].name: x})
print(json.dumps({"idle_kb": base, "peak_kb": rss_kb()}))
"""


@dataclass
class Plan:
    bundle: str
    profile: str
    fits: bool
    backend: str
    precision: str
    batch: int
    imgsz: int
    weights_mb: float
    activations_mb: float
    workspace_mb: float
    total_mb: float
    budget_mb: int
    expected_fps: float | None
    fps_source: str
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_activations_mb(model_path: str, batch: int, h: int, w: int) -> float:
    proc = subprocess.run([sys.executable, "-c", _PEAK, model_path, str(batch), str(h), str(w)],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "measurement failed")
    data = json.loads(proc.stdout)
    return max(0.0, (data["peak_kb"] - data["idle_kb"]) / 1024)


def plan(bundle: Bundle, profile: Profile, batch: int | None = None, imgsz: int | None = None,
         measure_speed: bool = True) -> Plan:
    spec = bundle.manifest.input
    notes: list[str] = []
    size = imgsz or (min(spec.size[0], profile.max_imgsz) if spec.dynamic_hw else spec.size[0])
    if not spec.dynamic_hw and size != spec.size[0]:
        notes.append(f"the bundle's input is fixed at {spec.size[0]}; planned at that size")
        size = spec.size[0]
    dynamic_batch = spec.shape and spec.shape[0] is None
    b = min(batch or profile.max_batch, profile.max_batch) if dynamic_batch else 1
    if not dynamic_batch and (batch or 1) > 1:
        notes.append("the bundle has a fixed batch of 1")
    precision = profile.precision
    if bundle.manifest.precision == "int8":
        precision = "int8"
    elif precision == "int8":
        precision = "fp16" if profile.kind != "cpu" else "fp32"
        notes.append("INT8 needs a gated INT8 bundle (bastion quantize); planned without it")
    weights = bundle.model_path.stat().st_size / 2**20
    if precision == "fp16":
        weights /= 2
    activations = measure_activations_mb(str(bundle.model_path), b, size, size)
    if profile.kind != "cpu":
        notes.append("activations measured on this CPU at FP32; GPU engines usually need less")
    total = weights + activations + profile.workspace_mb
    fits = total <= profile.memory_mb
    if not fits:
        notes.append(f"needs {total:.0f} MB of {profile.memory_mb} MB: lower the batch or the input size")
    fps, source = None, "unknown: run `bastion bench detect` on the device"
    if profile.kind == "cpu" and measure_speed:
        fps, source = _measure_fps(bundle, size), "measured here (1 image at a time, all cores)"
    elif profile.reference is not None:
        r = profile.reference
        fps, source = round(1000 / r.latency_ms, 1), f"profile reference ({r.model} @ {r.imgsz}: {r.source})"
    return Plan(bundle.manifest.name, profile.name, fits, profile.preferred_backend, precision, b, size,
                round(weights, 1), round(activations, 1), float(profile.workspace_mb), round(total, 1),
                profile.memory_mb, fps, source, notes)


def _measure_fps(bundle: Bundle, size: int) -> float:
    import time

    import numpy as np

    from bastion.runtime.detect import Detector

    det = Detector.load(bundle.root, imgsz=size if bundle.manifest.input.dynamic_hw else None)
    image = np.full((size, size, 3), 114, np.uint8)
    det.detect(image)
    t = time.perf_counter()
    for _ in range(10):
        det.detect(image)
    det.close()
    return round(10 / (time.perf_counter() - t), 1)

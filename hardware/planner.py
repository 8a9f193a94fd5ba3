"""``bastion hw plan BUNDLE --profile NAME``: will it fit, how to run it, how fast.

One planner per task (``PLANNERS``). A detector: memory = weights (the model file) + activations (measured:
resident memory of a fresh process after one inference at the planned batch and size, minus the same process just
before it) + the backend's workspace.  Speed comes from a measurement when the profile describes this machine (CPU
profiles), from the profile's published reference otherwise, and is left blank — with the command to measure it — when neither exists.

A language model (``task: lm``) runs on ONNX Runtime's CPU provider (``bastion.runtime.lm``): memory = weights +
the KV cache for the whole context (computed from the manifest's decoder params: 2 × layers × context × KV heads ×
head dim × 4 bytes) + activations (measured: one prefill chunk in a fresh process); speed is greedy tokens/s
measured here for a CPU profile.

The measuring subprocess gets the model's verified bytes on stdin, never its path.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any

from bastion.errors import ConfigError
from bastion.hardware.profiles import Profile
from bastion.models.bundle import Bundle

# Resident memory after the session is built, then after one inference: ORT's arena keeps what the
# activations needed, so the difference is what this batch and size cost (a high-water mark would be
# dominated by graph optimisation at session creation).
_SESSION = r"""
import json, re, sys
import numpy as np, onnxruntime as ort
def rss_kb():
    return int(re.search(r"VmRSS:\s*(\d+)", open("/proc/self/status").read()).group(1))
o = ort.SessionOptions(); o.intra_op_num_threads = 1
s = ort.InferenceSession(sys.stdin.buffer.read(), o, providers=["CPUExecutionProvider"])
"""
_RUN_ONCE = r"""
base = rss_kb()
s.run(None, feeds)
print(json.dumps({"idle_kb": base, "peak_kb": rss_kb()}))
"""
_PEAK = (
    _SESSION
    + r"""
b, h, w = map(int, sys.argv[1:4])
feeds = {s.get_inputs()[0].name: np.zeros((b, 3, h, w), np.float32)}
"""
    + _RUN_ONCE
)
# The same for a language model: one prefill chunk of T tokens over a T-slot cache (what Generator binds first).
_LM_PEAK = (
    _SESSION
    + r"""
layers, width, t = map(int, sys.argv[1:4])
feeds = {"input_ids": np.ones((1, t), np.int64), "attention_mask": np.ones((1, t), np.int64),
         "position_ids": np.arange(t, dtype=np.int64)[None]}
feeds.update({f"past.{i}.{kv}": np.zeros((1, t, width), np.float32) for i in range(layers) for kv in ("key", "value")})
"""
    + _RUN_ONCE
)


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
    expected_fps: float | None  # frames/s for a detector, tokens/s for a language model (``speed_unit``)
    fps_source: str
    notes: list[str]
    task: str = "detect"
    kv_cache_mb: float = 0.0  # language models: the cache for the whole context
    context: int | None = None  # language models: tokens
    speed_unit: str = "frames/s"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _measure(script: str, model: bytes, *args: int) -> float:
    """Resident-memory growth (MB) of one inference in a fresh process fed ``model`` on stdin."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], input=model, capture_output=True, timeout=300
    )
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        raise ConfigError(f"measuring the model's memory failed: {err.splitlines()[-1] if err else 'no output'}")
    data = json.loads(proc.stdout)
    return max(0.0, (data["peak_kb"] - data["idle_kb"]) / 1024)


def measure_activations_mb(model: bytes, batch: int, h: int, w: int) -> float:
    return _measure(_PEAK, model, batch, h, w)


def plan(
    bundle: Bundle, profile: Profile, batch: int | None = None, imgsz: int | None = None, measure_speed: bool = True
) -> Plan:
    """The plan for ``bundle`` on ``profile`` by the planner of the bundle's task."""
    planner = PLANNERS.get(bundle.manifest.task)
    if planner is None:
        raise ConfigError(
            f"bastion hw plan cannot plan a {bundle.manifest.task!r} bundle", f"it plans: {', '.join(PLANNERS)}"
        )
    return planner(bundle, profile, batch, imgsz, measure_speed)


def _plan_detect(bundle: Bundle, profile: Profile, batch: int | None, imgsz: int | None, measure_speed: bool) -> Plan:
    spec = bundle.manifest.input
    if spec is None:
        raise ConfigError(
            f"{bundle.manifest.name} is a detection bundle without an input spec",
            "its manifest is incomplete: make the bundle again",
        )
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
        from bastion.runtime.int8_check import plan_note

        notes.append(plan_note(bundle.manifest, profile.name, profile.isa, profile.preferred_backend))
    elif precision == "int8":
        precision = "fp16" if profile.kind != "cpu" else "fp32"
        notes.append("INT8 needs a gated INT8 bundle (bastion quantize); planned without it")
    model = bundle.model_bytes()
    weights = len(model) / 2**20
    if precision == "fp16":
        weights /= 2
    activations = measure_activations_mb(model, b, size, size)
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
    return Plan(
        bundle.manifest.name,
        profile.name,
        fits,
        profile.preferred_backend,
        precision,
        b,
        size,
        round(weights, 1),
        round(activations, 1),
        float(profile.workspace_mb),
        round(total, 1),
        profile.memory_mb,
        fps,
        source,
        notes,
    )


def _measure_fps(bundle: Bundle, size: int) -> float:
    import time

    import numpy as np

    from bastion.runtime.detect import Detector

    det = Detector.from_bundle(bundle, device="ort-cpu", imgsz=size if bundle.manifest.input.dynamic_hw else None)
    image = np.full((size, size, 3), 114, np.uint8)
    det.detect(image)
    t = time.perf_counter()
    for _ in range(10):
        det.detect(image)
    det.close()
    return round(10 / (time.perf_counter() - t), 1)


def _plan_lm(bundle: Bundle, profile: Profile, batch: int | None, imgsz: int | None, measure_speed: bool) -> Plan:
    from bastion.runtime.lm import PREFILL_CHUNK, lm_params

    m = bundle.manifest
    p = lm_params(m)
    notes = ["language models run on ONNX Runtime's CPU provider, one prompt at a time"]
    if (batch or 1) > 1 or imgsz:
        notes.append("--batch and --imgsz do not apply to a language model")
    if profile.kind != "cpu":
        notes.append(f"the {profile.preferred_backend} backend of this profile is not used for language models")
    model = bundle.model_bytes()
    weights = len(model) / 2**20
    width = p.n_kv_heads * p.head_dim
    kv_cache = 2 * p.n_layers * p.max_seq_len * width * 4 / 2**20  # float32 key + value slots, whole context
    chunk = min(PREFILL_CHUNK, p.max_seq_len - 1)
    activations = _measure(_LM_PEAK, model, p.n_layers, width, chunk)
    total = weights + kv_cache + activations
    fits = total <= profile.memory_mb
    if not fits:
        notes.append(f"needs {total:.0f} MB of {profile.memory_mb} MB: use a smaller (distilled) model")
    speed, source = None, "unknown: run `bastion bench lm` on the device"
    if profile.kind == "cpu" and measure_speed:
        speed, source = _measure_tokens_per_s(bundle), "measured here (greedy, 1 thread, 32 tokens)"
    return Plan(
        m.name,
        profile.name,
        fits,
        "ort-cpu",
        m.precision,
        1,
        0,
        round(weights, 1),
        round(activations, 1),
        0.0,
        round(total, 1),
        profile.memory_mb,
        speed,
        source,
        notes,
        task="lm",
        kv_cache_mb=round(kv_cache, 1),
        context=p.max_seq_len,
        speed_unit="tokens/s",
    )


def _measure_tokens_per_s(bundle: Bundle, tokens: int = 32) -> float:
    import time

    from bastion.runtime.lm import Generator

    generator = Generator(bundle, threads=1)
    try:
        ids = generator.encode("Once upon a time")[: generator.context // 2] or [1]
        steps = max(1, min(tokens, generator.context - len(ids) - 1))
        list(generator.generate_ids(ids, steps, temperature=0.0, stop=()))  # warm
        t = time.perf_counter()
        produced = len(list(generator.generate_ids(ids, steps, temperature=0.0, stop=())))
        return round(produced / (time.perf_counter() - t), 1)
    finally:
        generator.close()


PLANNERS = {"detect": _plan_detect, "lm": _plan_lm}

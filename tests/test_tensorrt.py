"""Native TensorRT: everything that needs no GPU is tested here on CPU; the GPU part is marked and skipped."""

import json

import numpy as np
import pytest

from bastion.errors import ConfigError
from bastion.hardware.engine_cache import EngineCache, EngineKey
from bastion.runtime.backends import tensorrt_available
from bastion.runtime.backends.tensorrt import _profile
from conftest import PERSON_IMAGE, run_cli


def test_shape_profiles_cover_dynamic_batch_and_size():
    dyn = _profile([("images", ["batch", 3, "height", "width"])], (384, 640), 4)
    assert dyn == (("images", (1, 3, 32, 32), (1, 3, 384, 640), (4, 3, 384, 640)),)
    fixed = _profile([("images", [1, 3, 320, 320])], (640, 640), 8)
    assert fixed == (("images", (1, 3, 320, 320), (1, 3, 320, 320), (1, 3, 320, 320)),)
    with pytest.raises(ConfigError, match="axis 1 is dynamic"):
        _profile([("tokens", [1, "seq"])], None, 1)


def test_engine_list_and_clear_on_a_real_cache():
    assert json.loads(run_cli("engine", "list", "--json").stdout) == {"engines": []}
    key = EngineKey(
        gpu="NVIDIA GeForce RTX 4060",
        compute_capability="8.9",
        tensorrt="10.7.0",
        bundle_sha256="ab" * 32,
        precision="fp16",
        shapes=(("images", (1, 3, 32, 32), (1, 3, 640, 640), (1, 3, 640, 640)),),
    )
    EngineCache().store(key, b"not really a plan")
    listed = json.loads(run_cli("engine", "list", "--json").stdout)["engines"]
    assert len(listed) == 1 and listed[0]["gpu"] == "NVIDIA GeForce RTX 4060" and listed[0]["id"] == key.digest()
    table = run_cli("engine", "list")
    assert table.returncode == 0 and "4060" in table.stdout and key.digest()[:8] in table.stdout
    assert json.loads(run_cli("engine", "clear", "--json").stdout) == {"removed": 1}
    assert json.loads(run_cli("engine", "list", "--json").stdout) == {"engines": []}


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed here")
def test_without_tensorrt_the_commands_say_what_to_install():
    proc = run_cli("engine", "build", "yolov5n")
    assert proc.returncode == 1 and "TensorRT" in proc.stderr and "JetPack" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli("detect", str(PERSON_IMAGE), "--device", "trt", "--json")
    assert proc.returncode == 1 and "native TensorRT backend" in proc.stderr
    bench = run_cli(
        "bench", "detect", "--images", str(PERSON_IMAGE.parent), "--backends", "ort-cpu,trt", "--limit", "1", "--json"
    )
    rows = json.loads(bench.stdout)["backends"]
    assert rows["ort-cpu"]["available"] and not rows["trt"]["available"] and "JetPack" in rows["trt"]["reason"]
    auto = run_cli("detect", str(PERSON_IMAGE), "--json")  # auto: ONNX Runtime, silently
    assert auto.returncode == 0 and "person" in auto.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not tensorrt_available(), reason="needs TensorRT and cuda-python on an NVIDIA GPU")
def test_tensorrt_engine_matches_onnx_runtime_and_is_cached():
    from bastion.models import Bundle
    from bastion.runtime.backends.tensorrt import TensorRTBackend, load_or_build
    from bastion.runtime.detect import Detector
    from bastion.runtime.media import read_image

    image = read_image(PERSON_IMAGE)
    reference = Detector.load("yolov5n", device="ort-cpu").detect(image)
    gpu = Detector.load("yolov5n", device="trt")
    assert isinstance(gpu.backend, TensorRTBackend)
    assert gpu.thread_safe is False  # one context, stream and buffer set: detect_stream gives it one worker
    found = gpu.detect(image)
    assert len(gpu.detect([image] * 3)) == 3  # a batch within the engine's profile
    assert found.names == reference.names and len(found) == len(reference)
    assert np.abs(found.xyxy - reference.xyxy).max() < 2.0 and np.abs(found.conf - reference.conf).max() < 0.02
    bundle = Bundle.open("yolov5n")
    _, key, built = load_or_build(bundle.model_path, "fp16", tuple(bundle.manifest.input.size), 8)  # Detector's max
    assert not built and key == gpu.backend.key  # the engine Detector.load built is found, not rebuilt


def test_the_tensorrt_runner_serialises_calls_on_its_one_context():
    """One context, stream and buffer set per engine: besides declaring ``thread_safe = False`` (detect_stream then
    runs one worker), the runner never lets two callers interleave on it. Driven without a GPU: the runner's
    locked step is replaced by a probe that counts callers inside it."""
    import threading
    import time

    from bastion.runtime.backends.base import Backend
    from bastion.runtime.backends.tensorrt import TensorRTBackend

    assert TensorRTBackend.thread_safe is False
    backend = TensorRTBackend.__new__(TensorRTBackend)  # no engine: only the call path is exercised
    Backend.__init__(backend)
    backend._lock = threading.Lock()
    inside, seen = [0], []

    def probe(feeds):
        inside[0] += 1
        seen.append(inside[0])
        time.sleep(0.02)  # widens the window in which a second caller would get in
        inside[0] -= 1
        return []

    backend._run_locked = probe
    callers = [threading.Thread(target=backend.run, args=({},)) for _ in range(4)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(30)
    assert len(seen) == 4 and max(seen) == 1

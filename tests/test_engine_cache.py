"""Engine cache keys: a cached engine loads only for exactly the GPU, TensorRT, bundle, precision and shapes."""

import dataclasses

from bastion.hardware.engine_cache import EngineCache, EngineKey

KEY = EngineKey(
    gpu="NVIDIA GeForce RTX 4060",
    compute_capability="8.9",
    tensorrt="10.7.0",
    bundle_sha256="ab" * 32,
    precision="fp16",
    shapes=(("images", (1, 3, 320, 320), (4, 3, 640, 640), (8, 3, 640, 640)),),
)


def test_round_trip_and_exact_match(tmp_path):
    cache = EngineCache(tmp_path)
    assert cache.load(KEY) is None
    cache.store(KEY, b"plan-bytes")
    assert cache.load(KEY) == b"plan-bytes"
    assert [e["gpu"] for e in cache.entries()] == ["NVIDIA GeForce RTX 4060"]


def test_any_other_key_is_a_miss(tmp_path):
    cache = EngineCache(tmp_path)
    cache.store(KEY, b"plan-bytes")
    for change in (
        {"gpu": "Orin"},
        {"compute_capability": "8.7"},
        {"tensorrt": "10.8.0"},
        {"bundle_sha256": "cd" * 32},
        {"precision": "int8"},
        {"shapes": (("images", (1, 3, 320, 320), (4, 3, 640, 640), (16, 3, 640, 640)),)},
    ):
        assert cache.load(dataclasses.replace(KEY, **change)) is None, change


def test_foreign_and_damaged_entries_are_never_loaded(tmp_path):
    cache = EngineCache(tmp_path)
    path = cache.store(KEY, b"plan-bytes")
    path.write_bytes(b"plan-bytez")  # damaged
    assert cache.load(KEY) is None
    cache.store(KEY, b"plan-bytes")
    other = dataclasses.replace(KEY, gpu="Jetson AGX Orin")
    # an engine built elsewhere copied under this key's name: key.json names the other GPU
    import json

    meta = path.parent / "key.json"
    data = json.loads(meta.read_text())
    data["key"]["gpu"] = other.gpu
    meta.write_text(json.dumps(data))
    assert cache.load(KEY) is None
    (path.parent / "key.json").write_text("{garbage")
    assert cache.load(KEY) is None
    assert cache.clear() == 1 and cache.entries() == []


def test_timing_cache_is_per_gpu_and_tensorrt(tmp_path):
    cache = EngineCache(tmp_path)
    a = cache.timing_cache_path(KEY)
    assert a == cache.timing_cache_path(dataclasses.replace(KEY, bundle_sha256="ef" * 32, precision="int8"))
    assert a != cache.timing_cache_path(dataclasses.replace(KEY, tensorrt="10.8.0"))

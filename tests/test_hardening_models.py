"""Issue #15: what runs is exactly the bytes that were verified, and hostile manifests/inputs are refused in one line.

Every test here uses real bundles (copies of the vendored zoo), real ONNX Runtime sessions and real files on disk:
the attack is a file rewritten *after* verification, and the check is what the running model computes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import PERSON_IMAGE, SAMPLE_IMAGES, run_cli

from bastion.errors import ManifestError, ModelLoadError
from bastion.models import Bundle, zoo_path
from bastion.models.manifest import read_manifest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _copy(tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(zoo_path(name), dst)
    return dst


def _zeroed(model_file: Path) -> bytes:
    """The same graph with every float weight set to zero: it loads and runs, and finds nothing."""
    model = onnx.load(str(model_file))
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(init)), init.name))
    return model.SerializeToString()


# -- item 1: a model swapped after verification ----------------------------------------------------------------
def test_a_model_swapped_on_disk_after_load_never_reaches_a_pinned_session(tmp_path):
    """The attack of #15: load a signed bundle, rewrite its .onnx, then feed a new input shape a few times so the
    backend builds a pinned session. That session must be built from the verified bytes, not the file."""
    from bastion import Detector
    from bastion.runtime.backends import OrtBackend
    from bastion.runtime.media import read_image

    bundle = _copy(tmp_path, "yolov5n")
    detector = Detector.load(bundle, device="cpu", threads=1)
    image = read_image(PERSON_IMAGE)
    before = detector.detect(image)
    assert before.counts().get("person")
    model = bundle / "yolov5n-dynamic.onnx"
    model.write_bytes(_zeroed(model))  # the swap: a loadable model that computes something else
    for _ in range(OrtBackend.SPECIALIZE_AFTER + 1):
        detector.detect(image)
    detector.backend.wait_pinned(60)
    assert detector.backend._specialized, "the re-pin path was not exercised"
    after = detector.detect(image)  # now served by the pinned session
    np.testing.assert_allclose(after.xyxy, before.xyxy, atol=1e-2)
    np.testing.assert_allclose(after.conf, before.conf, atol=1e-4)
    detector.close()


def test_a_payload_swapped_between_verification_and_loading_is_refused(tmp_path):
    """Bundle.open hashes the files; a rewrite before the backend reads them (TOCTOU) must not run."""
    from bastion import Detector

    bundle_dir = _copy(tmp_path, "yolov5n")
    bundle = Bundle.open(bundle_dir)
    model = bundle_dir / "yolov5n-dynamic.onnx"
    model.write_bytes(_zeroed(model)[: model.stat().st_size].ljust(model.stat().st_size, b"\0"))
    with pytest.raises(ModelLoadError, match="does not match its sha256"):
        Detector.from_bundle(bundle, device="cpu", threads=1, warmup=False)


def test_an_lm_payload_swapped_after_verification_is_refused(tmp_path):
    """The LM generator and its tokenizer are built from verified bytes too."""
    from bastion.runtime.lm import Generator

    bundle_dir = _copy(tmp_path, "stories260K")
    bundle = Bundle.open(bundle_dir)
    tok = bundle_dir / "tokenizer.json"
    tok.write_bytes(tok.read_bytes().replace(b'"<unk>"', b'"<UNK>"'))
    with pytest.raises(ModelLoadError, match="tokenizer.json does not match its sha256"):
        Generator(bundle)
    shutil.copy2(zoo_path("stories260K") / "tokenizer.json", tok)
    model = bundle_dir / "model.onnx"
    model.write_bytes(_zeroed(model))
    with pytest.raises(ModelLoadError, match="model.onnx"):
        Generator(bundle)
    shutil.copy2(zoo_path("stories260K") / "model.onnx", model)
    generator = Generator(bundle)
    assert list(generator.generate("Once upon a time", max_new_tokens=4))
    generator.close()


def _external_data_model(folder: Path, nested: bool) -> Path:
    """A tiny real model whose weight lives in ``model.onnx.data`` (optionally inside an If branch's Constant)."""
    weight = numpy_helper.from_array(np.full((1, 4), 3.0, np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    if nested:
        const = helper.make_node("Constant", [], ["c"], value=weight)
        branch = helper.make_graph([const], "b", [], [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 4])])
        cond = numpy_helper.from_array(np.array(True), "cond")
        nodes = [
            helper.make_node("If", ["cond"], ["w"], then_branch=branch, else_branch=branch),
            helper.make_node("Mul", ["x", "w"], ["y"]),
        ]
        graph = helper.make_graph(nodes, "g", [x], [y], initializer=[cond])
    else:
        graph = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["y"])], "g", [x], [y], initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "model.onnx"
    onnx.save(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0,
        convert_attribute=True,
    )
    assert (folder / "model.onnx.data").is_file()
    return path


@pytest.mark.parametrize("nested", [False, True])
def test_onnx_external_data_is_refused(tmp_path, nested):
    """An unlisted ``model.onnx.data`` beside the model would be loaded unhashed: bastion refuses external data."""
    from bastion.runtime.backends import OrtBackend

    path = _external_data_model(tmp_path, nested)
    with pytest.raises(ModelLoadError, match="external data"):
        OrtBackend(path, device="cpu", threads=1)
    with pytest.raises(ModelLoadError, match="external data"):
        OrtBackend(path.read_bytes(), device="cpu", threads=1)


def test_a_self_contained_model_still_loads_from_bytes(tmp_path):
    from bastion.runtime.backends import OrtBackend

    model = tmp_path / "model.onnx"
    _external_data_model(tmp_path, nested=False)
    onnx.save(onnx.load(str(model)), str(tmp_path / "inline.onnx"))  # loads the data, saves it inline
    backend = OrtBackend((tmp_path / "inline.onnx").read_bytes(), device="cpu", threads=1)
    out = backend.run({"x": np.ones((2, 4), np.float32)})[0]
    np.testing.assert_allclose(out, np.full((2, 4), 3.0))
    backend.close()


# -- Low: manifest bounds ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field,value,match",
    [
        ("size", [40000, 40000], "size"),
        ("stride", 0, "stride"),
        ("stride", -32, "stride"),
        ("size", [0, 640], "size"),
    ],
)
def test_manifest_input_size_and_stride_are_bounded(tmp_path, field, value, match):
    bundle = _copy(tmp_path, "yolov5n")
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    data["input"][field] = value
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=match):
        read_manifest(path)


def test_a_huge_imgsz_is_refused_in_one_line():
    from bastion import Detector
    from bastion.errors import ConfigError

    with pytest.raises(ConfigError, match="imgsz"):
        Detector.load("yolov5n", imgsz=40000, warmup=False)


# -- Low: hw plan on an LM bundle -------------------------------------------------------------------------------
def test_hw_plan_plans_an_lm_bundle():
    result = run_cli("hw", "plan", "stories260K", "--profile", "x86-cpu", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    m = read_manifest(zoo_path("stories260K") / "manifest.json")
    p = m.decoder.params.model_dump()
    kv_mb = 2 * p["n_layers"] * p["max_seq_len"] * p["n_kv_heads"] * p["head_dim"] * 4 / 2**20
    assert plan["kv_cache_mb"] == pytest.approx(kv_mb, abs=0.05)
    assert plan["weights_mb"] == pytest.approx(m.model_file().size / 2**20, abs=0.05)
    assert plan["task"] == "lm" and plan["context"] == p["max_seq_len"] and plan["fits"] is True
    assert plan["total_mb"] >= plan["weights_mb"] + plan["kv_cache_mb"]


# -- Low: one huge file in a directory --------------------------------------------------------------------------
def test_detect_dir_skips_a_huge_file_with_a_warning(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    shutil.copy2(PERSON_IMAGE, folder / "a.jpg")
    with open(folder / "huge.jpg", "wb") as fh:  # sparse: 10 GB declared, nothing written
        fh.truncate(10 * 2**30)
    result = run_cli("detect", str(folder), "--json", "--threads", "1", "--workers", "1")
    assert result.returncode == 0, result.stderr
    frames = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [Path(f["source"]).name for f in frames] == ["a.jpg"]
    assert "huge.jpg" in result.stderr and "Traceback" not in result.stderr


def test_a_single_huge_image_is_one_line_exit_1(tmp_path):
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as fh:
        fh.truncate(10 * 2**30)
    result = run_cli("detect", str(huge), "--threads", "1")
    assert result.returncode == 1, result.stderr
    assert "huge.jpg" in result.stderr and "Traceback" not in result.stderr
    assert SAMPLE_IMAGES.is_dir()


def test_a_payload_replaced_by_a_fifo_is_refused_not_waited_on(tmp_path):
    """A payload path swapped for a FIFO after verification would block ``open`` forever: refused in one line."""
    import os

    from bastion import Detector

    bundle_dir = _copy(tmp_path, "yolox_nano")
    bundle = Bundle.open(bundle_dir)
    model = bundle_dir / "yolox_nano.onnx"
    model.unlink()
    os.mkfifo(model)
    with pytest.raises(ModelLoadError, match="not a regular file"):
        Detector.from_bundle(bundle, device="cpu", threads=1, warmup=False)
    with pytest.raises(ModelLoadError, match="is missing"):  # verification itself never waits on it either
        Bundle.open(bundle_dir)


def test_bundle_create_refuses_an_onnx_with_external_data(tmp_path):
    """Through the CLI (which opens the model first) and through ``create_bundle`` (what pipelines call)."""
    from bastion.runtime.bundle_create import create_bundle

    model = _external_data_model(tmp_path, nested=False)
    out = tmp_path / "bundle"
    result = run_cli(
        "bundle", "create", "--onnx", str(model), "--task", "lm", "--weights-license", "MIT", "--out", str(out)
    )
    assert result.returncode == 1, result.stderr
    assert "external data" in result.stderr and "Traceback" not in result.stderr
    fields = {
        "name": "ext",
        "version": "1.0",
        "task": "lm",
        "license": {"weights": "MIT"},
        "provenance": {"source": "test"},
    }
    with pytest.raises(ModelLoadError, match="external data"):
        create_bundle(model, out, fields, [])
    assert not out.exists()


def test_tensorrt_builds_and_keys_its_engine_from_the_verified_bytes(tmp_path, monkeypatch):
    """TensorRT cannot run here; its build path is driven with a stand-in for the ``tensorrt`` module to show the
    parser gets the bytes the bundle verified (not a path re-read after a swap) and the cache key hashes them."""
    import hashlib
    from types import SimpleNamespace

    from bastion.hardware.engine_cache import EngineCache
    from bastion.runtime.backends import tensorrt as trt_backend

    parsed: list[bytes] = []

    class Parser:
        num_errors = 0

        def __init__(self, *_):
            pass

        def parse(self, data, *rest):
            assert not rest, "no path may be given: external data would be read from it"
            parsed.append(bytes(data))
            return True

    config = SimpleNamespace(
        set_memory_pool_limit=lambda *a: None,
        set_flag=lambda *a: None,
        add_optimization_profile=lambda *a: None,
        create_timing_cache=lambda b: b,
        set_timing_cache=lambda *a: None,
        get_timing_cache=lambda: SimpleNamespace(serialize=lambda: b"timing"),
    )
    builder = SimpleNamespace(
        create_network=lambda flags: "network",
        create_builder_config=lambda: config,
        create_optimization_profile=lambda: SimpleNamespace(set_shape=lambda *a: None),
        build_serialized_network=lambda network, cfg: b"PLAN",
    )

    class Logger:
        WARNING = 0

        def __init__(self, level):
            pass

    fake = SimpleNamespace(
        __version__="10.0.0",
        Logger=Logger,
        NetworkDefinitionCreationFlag=SimpleNamespace(),
        OnnxParser=Parser,
        Builder=lambda logger: builder,
        MemoryPoolType=SimpleNamespace(WORKSPACE=0),
        BuilderFlag=SimpleNamespace(FP16=1, INT8=2),
    )
    monkeypatch.setattr(trt_backend, "_modules", lambda: (fake, None))
    monkeypatch.setattr(trt_backend, "device_identity", lambda: ("Fake GPU", "8.7"))

    bundle_dir = _copy(tmp_path, "yolov5n")
    bundle = Bundle.open(bundle_dir)
    verified = bundle.model_bytes()
    (bundle_dir / "yolov5n-dynamic.onnx").write_bytes(_zeroed(bundle_dir / "yolov5n-dynamic.onnx"))  # swapped
    plan, key, built = trt_backend.load_or_build(verified, "fp16", (640, 640), 1, EngineCache(tmp_path / "engines"))
    assert built and plan == b"PLAN" and parsed == [verified]
    assert key.bundle_sha256 == hashlib.sha256(verified).hexdigest() == bundle.manifest.model_file().sha256


@pytest.mark.parametrize("target", ["manifest.json", "signature"])
def test_a_deeply_nested_or_huge_manifest_or_signature_is_one_line(tmp_path, target):
    """json.loads of 100k nested brackets raises RecursionError, and a sparse 4 GB file would be read whole: both
    are refused as a damaged bundle (ModelLoadError), never an internal error."""
    bundle = _copy(tmp_path, "yolox_nano")
    (bundle / target).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelLoadError):
        Bundle.open(bundle)
    with open(bundle / target, "wb") as fh:
        fh.truncate(4 * 2**30)
    with pytest.raises(ModelLoadError, match="larger than|damaged"):
        Bundle.open(bundle)


@pytest.mark.parametrize("target", ["trust/revoked.json", "trust/audit.jsonl", "registry/index.json"])
def test_a_deeply_nested_state_file_is_damage_in_one_line(bastion_home, target):
    """Adversarial pass: a trust list, trust journal or registry index holding deeply nested JSON made every
    `keys`/`models` command die with `internal error: RecursionError` (exit 2) instead of naming the damage."""
    assert run_cli("keys", "list").returncode == 0  # creates the trust store
    path = bastion_home / target
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a" if target.endswith(".jsonl") else "w") as fh:  # a journal gains a line, a file is replaced
        fh.write("[" * 100000 + "]" * 100000 + "\n")
    proc = run_cli("models" if target.startswith("registry") else "keys", "list")
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    if target == "trust/audit.jsonl":  # an unreadable journal line is skipped, as a non-JSON one always was
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode == 1 and "damaged" in proc.stderr, proc.stderr


def test_a_manifest_file_path_is_bounded_in_depth(tmp_path):
    """Adversarial pass: a payload path 1,500 folders deep passed the manifest schema; copying such a bundle into
    the registry recursed once per folder (pathlib's mkdir(parents=True)) into a RecursionError."""
    bundle = tmp_path / "b"
    shutil.copytree(zoo_path("yolov5n"), bundle)
    data = json.loads((bundle / "manifest.json").read_text())
    data["files"][0]["path"] = "/".join(["d"] * 1500) + "/" + data["files"][0]["path"]
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="folders deep"):
        read_manifest(bundle / "manifest.json")

"""The one backend registry: names and aliases, per-backend configs, availability, thread safety, loader/runner.

Real ONNX Runtime sessions on the zoo's yolov5n; the GPU backends are checked for what this machine can say about
them (available or not, and why), never faked into running.
"""

import hashlib
import json
import logging
import shutil

import numpy as np
import onnxruntime
import pytest

from bastion.errors import ConfigError, ModelLoadError
from bastion.hardware.backend_names import ALIASES, AUTO_ORDER, BACKEND_NAMES, backend_name, device_name
from bastion.models import Bundle
from bastion.runtime.backends import open_backend, resolve_device
from bastion.runtime.backends.onnxrt import OrtBackend, OrtSessionLoader
from bastion.runtime.backends.registry import backend_specs, get_backend, parse_backend_config
from bastion.runtime.backends.tensorrt import TensorRTBackend, tensorrt_available
from conftest import PERSON_IMAGE, run_cli

HAS_CUDA_EP = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
HAS_TRT_EP = "TensorrtExecutionProvider" in onnxruntime.get_available_providers()


def _model_file(tmp_path):
    path = tmp_path / "model.onnx"
    shutil.copy(Bundle.open("yolov5n").model_path, path)
    return path


def one_line_user_error(proc, *fragments):
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


# -- names ---------------------------------------------------------------------------------------------------------
def test_the_registry_holds_exactly_the_one_set_of_names():
    specs = backend_specs()
    assert tuple(specs) == BACKEND_NAMES == ("ort-cpu", "ort-cuda", "ort-trt", "trt")
    assert set(AUTO_ORDER) == set(BACKEND_NAMES)
    for name, spec in specs.items():
        assert spec.name == name and spec.config().type == name  # Frigate's key + Literal default
        assert get_backend(name) is spec


def test_old_spellings_are_aliases_from_one_table_and_anything_else_is_one_line():
    assert ALIASES == {"cpu": "ort-cpu", "cuda": "ort-cuda", "tensorrt": "ort-trt"}
    for old, new in ALIASES.items():
        assert backend_name(old) == device_name(old.upper()) == new and get_backend(old) is get_backend(new)
    assert device_name("auto") == "auto"
    with pytest.raises(ConfigError) as info:
        backend_name("auto")  # a device choice, not a backend
    for bad in ("gpu", "tensorrt-9", ""):
        with pytest.raises(ConfigError) as info:
            device_name(bad)
        assert "\n" not in str(info.value) and all(name in str(info.value) for name in BACKEND_NAMES)


# -- configs ------------------------------------------------------------------------------------------------------
def test_each_backend_validates_its_own_config_discriminated_on_type():
    assert parse_backend_config("cpu").type == "ort-cpu"
    assert parse_backend_config({"type": "ort-cuda", "threads": 2}).threads == 2
    trt = parse_backend_config({"type": "trt", "precision": "int8", "opt_hw": [384, 640], "max_batch": 4})
    assert (trt.type, trt.precision, trt.opt_hw, trt.max_batch) == ("trt", "int8", (384, 640), 4)
    with pytest.raises(ConfigError, match="unknown backend 'openvino'") as info:
        parse_backend_config({"type": "openvino"})
    assert "ort-cpu, ort-cuda, ort-trt, trt" in str(info.value)
    with pytest.raises(ConfigError, match="precision"):  # only trt has a precision …
        parse_backend_config({"type": "trt", "precision": "int4"})
    with pytest.raises(ConfigError, match="precision"):  # … and ORT's configs refuse it
        parse_backend_config({"type": "ort-cpu", "precision": "fp16"})
    with pytest.raises(ConfigError, match="threads"):
        parse_backend_config({"type": "ort-cpu", "threads": 0})
    with pytest.raises(ConfigError, match="needs a 'type'"):
        parse_backend_config({"threads": 1})


# -- availability and versions -------------------------------------------------------------------------------------
def test_available_and_version_say_what_this_machine_has():
    specs = backend_specs()
    assert specs["ort-cpu"].available() and specs["ort-cpu"].version() == onnxruntime.__version__
    assert specs["ort-cuda"].available() == HAS_CUDA_EP and specs["ort-trt"].available() == HAS_TRT_EP
    assert specs["trt"].available() == tensorrt_available()
    for spec in specs.values():
        why = spec.why_unavailable()
        assert (why is None) == spec.available()
        if why is not None:
            assert "install" in why and "\n" not in why
    if not tensorrt_available():
        assert specs["trt"].version() is None
    assert resolve_device("auto") == next(name for name in AUTO_ORDER if specs[name].available())


@pytest.mark.skipif(HAS_CUDA_EP, reason="this onnxruntime has the CUDA provider")
def test_an_unavailable_backend_asked_for_by_name_is_one_line_naming_what_to_install():
    with pytest.raises(ConfigError, match="onnxruntime-gpu"):
        open_backend(Bundle.open("yolov5n").model_bytes(), device="cuda")


# -- thread safety -------------------------------------------------------------------------------------------------
def test_backends_declare_thread_safety_and_the_detector_exposes_it():
    from bastion.runtime.detect import Detector

    specs = backend_specs()
    assert specs["ort-cpu"].thread_safe and specs["ort-cuda"].thread_safe and specs["ort-trt"].thread_safe
    assert not specs["trt"].thread_safe and not TensorRTBackend.thread_safe  # one context, stream, buffer set
    detector = Detector.load("yolov5n", device="ort-cpu", threads=1, warmup=False)
    assert detector.thread_safe is True
    detector.backend.thread_safe = False  # what a TensorRT backend says: the detector passes it on
    assert detector.thread_safe is False
    detector.close()


# -- loader / runner -----------------------------------------------------------------------------------------------
def test_the_loader_builds_every_session_from_the_bytes_read_once(tmp_path):
    path = _model_file(tmp_path)
    original = path.read_bytes()
    loader = OrtSessionLoader.from_model(path, device="ort-cpu", threads=1)
    backend = OrtBackend(loader)
    x = np.random.default_rng(0).random((1, 3, 320, 320), dtype=np.float32)
    before = backend.run({"images": x})[0]
    path.write_bytes(b"not a model any more")  # swapped on disk after load
    assert hashlib.sha256(loader.data).digest() == hashlib.sha256(original).digest()
    again = OrtBackend(loader)  # a second runner (and any pinned session) from the same loader: the verified bytes
    np.testing.assert_allclose(again.run({"images": x})[0], before, rtol=1e-5, atol=1e-4)
    pinned = loader({"batch": 1, "height": 320, "width": 320})
    assert pinned.get_inputs()[0].shape == [1, 3, 320, 320]
    backend.close(), again.close()
    with pytest.raises(ModelLoadError, match="not a loadable ONNX model"):  # the path itself is now garbage
        OrtBackend(path, device="ort-cpu")


def test_bastion_threads_sizes_the_sessions_nothing_else_sized_and_a_bad_value_is_one_line(tmp_path, monkeypatch):
    path = _model_file(tmp_path)
    monkeypatch.setenv("BASTION_THREADS", "3")
    loader = OrtSessionLoader.from_model(path, device="ort-cpu")
    assert loader().get_session_options().intra_op_num_threads == 3
    sized = OrtSessionLoader.from_model(path, device="ort-cpu", threads=2)  # a caller's own size wins
    assert sized().get_session_options().intra_op_num_threads == 2
    for bad in ("many", "\u00b2", "-1", "99999"):  # "²" is a digit to str.isdigit, not to int()
        monkeypatch.setenv("BASTION_THREADS", bad)
        with pytest.raises(ConfigError, match=f"BASTION_THREADS={bad!r} is not a number of threads"):
            loader()
    proc = run_cli("detect", str(PERSON_IMAGE), "--json", env={"BASTION_THREADS": "0"})
    one_line_user_error(proc, "BASTION_THREADS='0' is not a number of threads")


def test_the_lm_decoding_loop_uses_the_backend_api_not_its_session():
    from bastion.runtime.lm import Generator

    generator = Generator.load("stories260K")
    ids = generator.encode("Once upon a time")
    greedy = list(generator.generate_ids(ids, 8, temperature=0.0, stop=()))
    session = generator.backend.session
    generator.backend.session = None  # nothing but the backend's own methods may reach it
    generator.backend.io_binding = session.io_binding
    generator.backend.run_bound = session.run_with_iobinding
    assert list(generator.generate_ids(ids, 8, temperature=0.0, stop=())) == greedy
    generator.close()


def test_auto_falls_back_when_native_tensorrt_cannot_start(monkeypatch, caplog):
    trt = get_backend("trt")

    def broken(model, config, label):
        raise ModelLoadError("TensorRT could not build an engine (stand-in)")

    monkeypatch.setattr(trt, "why_unavailable", classmethod(lambda cls: None))
    monkeypatch.setattr(trt, "load", staticmethod(broken))
    data = Bundle.open("yolov5n").model_bytes()
    with caplog.at_level(logging.WARNING):
        backend = open_backend(data, device="auto", threads=1)
    assert isinstance(backend, OrtBackend) and "trt could not start" in caplog.text
    backend.close()
    with pytest.raises(ModelLoadError, match="stand-in"):  # asked for by name: the reason, no fallback
        open_backend(data, device="trt")


# -- every surface speaks the same names ----------------------------------------------------------------------------
def test_profiles_node_config_doctor_and_hw_plan_use_the_same_names(tmp_path):
    from bastion.edge.config import NodeConfig
    from bastion.hardware.profiles import load_profile, profile_names

    assert {load_profile(n).preferred_backend for n in profile_names()} <= set(BACKEND_NAMES)
    assert load_profile("jetson-orin-nano-8gb").preferred_backend == "trt"
    text = (load_profile.__globals__["PROFILES_DIR"] / "rtx-4060-8gb.yaml").read_text()
    (tmp_path / "old.yaml").write_text(text.replace("preferred_backend: trt", "preferred_backend: cuda"))
    assert load_profile(str(tmp_path / "old.yaml")).preferred_backend == "ort-cuda"  # an alias, mapped
    (tmp_path / "bad.yaml").write_text(text.replace("preferred_backend: trt", "preferred_backend: gpu"))
    with pytest.raises(ConfigError, match="unknown backend 'gpu'"):
        load_profile(str(tmp_path / "bad.yaml"))

    source = [{"name": "cam", "uri": str(PERSON_IMAGE.parent)}]
    assert NodeConfig(sources=source, device="tensorrt").device == "ort-trt"
    assert NodeConfig(sources=source, device="trt").device == "trt"
    with pytest.raises(Exception, match="unknown device 'gpu'"):
        NodeConfig(sources=source, device="gpu")

    plan = json.loads(run_cli("hw", "plan", "yolov5n", "--profile", "rtx-4060-8gb", "--json").stdout)
    assert plan["backend"] == "trt"
    checks = {c["name"]: c for c in json.loads(run_cli("doctor", "--json").stdout)["checks"]}
    detail = checks["inference backend"]["detail"]
    assert all(f"{name}: " in detail for name in BACKEND_NAMES)
    assert f"device=auto uses {resolve_device('auto')}" in detail


def test_a_bad_device_or_backend_on_the_command_line_is_one_line():
    one_line_user_error(run_cli("detect", str(PERSON_IMAGE), "--device", "gpu"), "unknown device 'gpu'", "ort-cpu")
    one_line_user_error(
        run_cli("bench", "detect", "--images", str(PERSON_IMAGE.parent), "--backends", "ort-cpu,gpu"),
        "unknown backend 'gpu'",
    )
    alias = run_cli("detect", str(PERSON_IMAGE), "--device", "cpu", "--json")  # an old spelling still works
    assert alias.returncode == 0 and "person" in alias.stdout

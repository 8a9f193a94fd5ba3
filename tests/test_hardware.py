"""The hardware probe on this machine and on fixture files from a Jetson."""

import json
from pathlib import Path

from bastion.hardware.probe import probe
from conftest import run_cli

JETSON = Path(__file__).parent / "fixtures" / "jetson_orin_nano"


def test_probe_this_machine():
    report = probe()
    assert report.cpu_model and report.memory_mb and report.memory_mb > 256
    assert "CPUExecutionProvider" in report.ort_providers and report.software["onnxruntime"]
    if report.machine in ("x86_64", "aarch64"):
        assert report.instruction_sets  # every x86-64/arm64 cpuinfo lists SIMD flags we recognise


def test_probe_jetson_fixture():
    report = probe(root=JETSON, with_gpus=False)
    assert report.jetson_model == "NVIDIA Jetson Orin Nano Developer Kit"
    assert report.l4t_release == "36.3.0"
    assert {"NEON", "NEON-DOTPROD", "FP16"} <= set(report.instruction_sets)
    assert report.memory_mb == 7619 and report.cpu_model.startswith("NVIDIA Jetson")


def test_probe_empty_root_degrades_gracefully(tmp_path):
    report = probe(root=tmp_path, with_gpus=False)
    assert report.cpu_model is None and report.memory_mb is None and report.instruction_sets == []
    assert report.jetson_model is None and not report.container


def test_hw_probe_cli_json():
    proc = run_cli("hw", "probe", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["cores_logical"] >= 1 and isinstance(data["gpus"], list)


def test_every_shipped_profile_loads_and_bad_ones_are_named(tmp_path):
    import pytest

    from bastion.errors import ConfigError
    from bastion.hardware.profiles import load_profile, profile_names

    names = profile_names()
    assert {"x86-cpu", "arm-cpu", "jetson-orin-nano-8gb", "rtx-4090-24gb"} <= set(names)
    for name in names:
        p = load_profile(name)
        assert p.memory_mb > 0 and (p.reference is None or p.reference.source)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndescription: y\nkind: phone\n")
    with pytest.raises(ConfigError, match="kind"):
        load_profile(str(bad))
    with pytest.raises(ConfigError, match="unknown device profile"):
        load_profile("toaster")


def test_planner_arithmetic_fits_and_does_not_fit(tmp_path):
    from bastion.hardware.profiles import Profile
    from bastion.models import Bundle
    from bastion.hardware.planner import plan

    bundle = Bundle.open("yolov5n")
    base = dict(
        name="t",
        description="test",
        kind="jetson",
        preferred_backend="trt",
        precision="fp16",
        max_batch=2,
        max_imgsz=320,
        workspace_mb=100,
    )
    roomy = plan(bundle, Profile(memory_mb=4000, **base))
    assert roomy.fits and roomy.batch == 2 and roomy.imgsz == 320 and roomy.precision == "fp16"
    assert roomy.weights_mb == round(bundle.model_path.stat().st_size / 2**20 / 2, 1)  # fp16 halves weights
    assert roomy.total_mb == round(roomy.weights_mb + roomy.activations_mb + 100, 1) and roomy.activations_mb > 0
    tight = plan(bundle, Profile(memory_mb=50, **base))
    assert not tight.fits and any("lower the batch" in n for n in tight.notes)
    assert tight.expected_fps is None and "bench" in tight.fps_source
    fixed = plan(Bundle.open("yolox_nano"), Profile(memory_mb=4000, **{**base, "max_batch": 8}), batch=4)
    assert fixed.batch == 1 and fixed.imgsz == 416 and any("fixed batch" in n for n in fixed.notes)


def test_hw_plan_cli():
    proc = run_cli("hw", "plan", "yolov5n", "--profile", "x86-cpu", "--imgsz", "320", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["fits"] and data["expected_fps"] > 0 and data["fps_source"].startswith("measured")

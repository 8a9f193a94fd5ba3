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

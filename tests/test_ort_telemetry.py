"""onnxruntime's telemetry client must never start under bastion (a native uploader the Python egress guard cannot see)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import SAMPLES, run_cli

# The variables onnxruntime reads to stay silent on CI; stripped so the test sees what a field unit sees.
CI_VARS = (
    "CI",
    "TF_BUILD",
    "GITHUB_ACTIONS",
    "GITLAB_CI",
    "CIRCLECI",
    "TRAVIS",
    "JENKINS_URL",
    "CODEBUILD_BUILD_ID",
    "BUILDKITE",
    "TEAMCITY_VERSION",
    "APPVEYOR",
    "BITBUCKET_BUILD_NUMBER",
    "ORT_DISABLE_TELEMETRY",
)
RUN_A_MODEL = f"""
import bastion
from bastion import Detector
import cv2
Detector.load("yolov5n").detect(cv2.imread({str(SAMPLES / "images" / "one-by-one-person-detection-0100.jpg")!r}))
"""


def _field_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CI_VARS}
    env["HOME"] = str(home)
    return env


def test_running_a_model_leaves_no_onnxruntime_device_id_or_event_queue(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    subprocess.run([sys.executable, "-c", RUN_A_MODEL], env=_field_env(home), check=True, timeout=120)
    written = sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file())
    assert not [p for p in written if "Microsoft" in p or "onnxruntime" in p], written


def test_importing_bastion_sets_the_switch_for_its_children(monkeypatch) -> None:
    import bastion.ort_telemetry as guard

    monkeypatch.delenv(guard.ENV, raising=False)
    guard.keep_onnxruntime_quiet()
    assert os.environ[guard.ENV] == "1"
    monkeypatch.setenv(guard.ENV, "0")  # an operator's explicit choice is kept (and doctor flags it)
    guard.keep_onnxruntime_quiet()
    quiet, line = guard.status()
    assert os.environ[guard.ENV] == "0" and not quiet and "may start" in line


def test_the_check_is_able_to_fail(tmp_path: Path) -> None:
    """Without bastion's guard, the same onnxruntime writes its device id: the test above can fail."""
    home = tmp_path / "home"
    home.mkdir()
    code = f"import onnxruntime as ort; ort.InferenceSession({str(SAMPLES.parent.parent / 'models' / 'zoo' / 'yolov5n' / 'yolov5n-dynamic.onnx')!r})"
    subprocess.run([sys.executable, "-c", code], env=_field_env(home), check=True, timeout=120)
    written = [p for p in home.rglob("*") if p.is_file()]
    if not written:  # a future onnxruntime without the client: nothing to guard against
        import pytest

        pytest.skip("this onnxruntime writes no telemetry state")
    assert any("deviceid" in p.name for p in written)


def test_doctor_reports_the_telemetry_switch() -> None:
    out = run_cli("doctor")
    assert "onnxruntime telemetry" in out.stdout and "ORT_DISABLE_TELEMETRY=1" in out.stdout, out.stdout

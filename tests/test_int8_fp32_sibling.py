"""An INT8 bundle carries its FP32 parent, signed, and ``int8_policy: strict`` runs it where the INT8 verdict does not
hold: verified like the model (listed, hashed, read once), packed into archives, refused when tampered with."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from test_int8_target import _int8_bundle, _key_stem, int8_model, warns_afresh  # noqa: F401  (fixtures)

from bastion import Detector
from bastion.errors import ModelLoadError
from bastion.hardware.isa import ENV_OVERRIDE
from bastion.models import Bundle
from bastion.models.manifest import Manifest
from conftest import SAMPLE_IMAGES, run_cli

IMAGE = SAMPLE_IMAGES / "one-by-one-person-detection-0100.jpg"
VNNI = "x86-avx512-vnni"


@pytest.fixture
def fp32_model(tmp_path) -> Path:
    """The zoo's FP32 yolov5n, the INT8 model's parent, as a plain file (its verified bytes)."""
    bundle = Bundle.open("yolov5n")
    path = tmp_path / "parent" / Path(bundle.manifest.model_file().path).name
    path.parent.mkdir()
    path.write_bytes(bundle.model_bytes())
    return path


@pytest.fixture
def with_sibling(int8_model, fp32_model, tmp_path) -> Path:  # noqa: F811
    return _int8_bundle(int8_model, tmp_path / "vnni", _key_stem(tmp_path), VNNI, False, fp32_sibling=fp32_model)


def _fp32_reference(bundle: Bundle):
    """The FP32 parent run under the INT8 bundle's manifest (fixed 160 input): what the fallback must give."""
    from bastion.runtime.backends import open_backend

    parent = Bundle.open("yolov5n")
    det = Detector(open_backend(parent.model_bytes(), threads=1), bundle.manifest)
    try:
        return det.detect(str(IMAGE))
    finally:
        det.close()


def _same(a, b) -> bool:
    return a.xyxy.shape == b.xyxy.shape and np.allclose(a.xyxy, b.xyxy) and np.allclose(a.conf, b.conf)


def test_strict_runs_the_signed_fp32_sibling_where_the_int8_verdict_does_not_hold(with_sibling, monkeypatch, caplog):
    bundle = Bundle.open(with_sibling)  # signed: the sibling's name, sha256 and size are in the signed manifest
    sibling = bundle.manifest.fp32_sibling_file()
    assert sibling is not None and sibling.sha256 == Bundle.open("yolov5n").manifest.model_file().sha256
    reference = _fp32_reference(bundle)
    monkeypatch.setenv(ENV_OVERRIDE, "x86-avx2")  # an AVX2 CPU through the probe: the VNNI verdict does not hold
    with caplog.at_level(logging.WARNING, logger="bastion.runtime.int8_check"):
        strict = Detector.load(with_sibling, warmup=False, threads=1, int8_policy="strict")
    try:
        assert strict.int8_check.fell_back and strict.int8_check.audit_kind == "int8_fallback_fp32"
        status = strict.precision_status
        assert status["bundle"] == "int8" and status["running"] == "fp32" and "FP32 sibling" in status["why"]
        assert _same(strict.detect(str(IMAGE)), reference)  # it is the FP32 parent that runs
    finally:
        strict.close()
    assert any("running the FP32 sibling" in r.getMessage() for r in caplog.records)
    warn = Detector.load(with_sibling, warmup=False, threads=1)  # warn: INT8 runs, flagged
    try:
        assert not warn.int8_check.fell_back and not warn.int8_check.holds
        assert warn.precision_status["running"] == "int8" and "WARNING" in warn.precision_status["why"]
        assert not _same(warn.detect(str(IMAGE)), reference)  # INT8 numbers, not the parent's
    finally:
        warn.close()
    monkeypatch.setenv(ENV_OVERRIDE, VNNI)  # where the verdict was measured, strict runs the INT8 model
    here = Detector.load(with_sibling, warmup=False, threads=1, int8_policy="strict")
    assert here.int8_check.same and here.precision_status["running"] == "int8"
    here.close()


def test_a_tampered_sibling_is_refused_at_open_and_when_swapped_after_it(with_sibling, monkeypatch):
    monkeypatch.setenv(ENV_OVERRIDE, "x86-avx2")
    bundle = Bundle.open(with_sibling)
    path = with_sibling / bundle.manifest.fp32_sibling_file().path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))  # swapped after Bundle.open verified it: the fallback reads and hashes again
    with pytest.raises(ModelLoadError, match="does not match its sha256"):
        Detector.from_bundle(bundle, warmup=False, threads=1, int8_policy="strict")
    with pytest.raises(ModelLoadError, match="does not match its sha256"):
        Detector.load(with_sibling, warmup=False, int8_policy="warn")  # opening checks every listed file


def test_an_unlisted_fp32_file_is_no_sibling(int8_model, fp32_model, tmp_path, monkeypatch):  # noqa: F811
    path = _int8_bundle(int8_model, tmp_path / "bare", _key_stem(tmp_path), VNNI, False)
    (path / fp32_model.name).write_bytes(fp32_model.read_bytes())  # dropped in beside it, not in the manifest
    monkeypatch.setenv(ENV_OVERRIDE, "x86-avx2")
    with pytest.raises(ModelLoadError, match="carries no FP32 sibling"):
        Detector.load(path, warmup=False, int8_policy="strict")


def test_the_sibling_travels_in_the_archive_and_inspect_says_what_runs(with_sibling, tmp_path, monkeypatch):
    from bastion.models.archive import pack

    archive = pack(with_sibling, tmp_path / "carry.bastion")
    monkeypatch.setenv(ENV_OVERRIDE, "x86-avx2")
    det = Detector.load(archive, warmup=False, threads=1, int8_policy="strict")
    assert det.int8_check.fell_back
    det.close()
    proc = run_cli("bundle", "inspect", str(archive), "--json")
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(proc.stdout)["runs"]
    assert "strict runs the FP32 sibling yolov5n-dynamic.onnx" in runs and VNNI in runs


def test_node_under_strict_starts_on_the_sibling_and_audits_it(with_sibling, tmp_path, monkeypatch):
    import yaml

    from bastion.edge.config import load_config
    from bastion.edge.node import Node

    monkeypatch.setenv(ENV_OVERRIDE, "x86-avx2")
    storage = tmp_path / "data"
    cfg = {
        "id": "n1",
        "model": str(with_sibling),
        "threads": 1,
        "int8_policy": "strict",
        "storage": {"dir": str(storage)},
        "sources": [{"name": "cam1", "uri": str(SAMPLE_IMAGES)}],
        "endpoints": {"events": "tcp://127.0.0.1:*", "control": "tcp://127.0.0.1:*"},
    }
    (tmp_path / "node.yaml").write_text(yaml.safe_dump(cfg))
    node = Node(load_config(tmp_path / "node.yaml"))  # refused before the bundle carried its FP32 parent
    node.start()
    node.close()
    records = [json.loads(x) for x in (storage / "audit.log").read_text().splitlines()]
    flagged = [r for r in records if r["kind"] in ("int8_cpu_mismatch", "int8_fallback_fp32")]
    assert [r["kind"] for r in flagged] == ["int8_fallback_fp32"], records
    assert flagged[0]["fields"]["runs"] == "fp32-sibling" and flagged[0]["fields"]["running_on"] == "x86-avx2"


def test_manifest_allows_one_sibling_and_only_beside_an_int8_model():
    fields = json.loads(Bundle.open("yolov5n").manifest.canonical_bytes())
    model = fields["files"][0]
    sibling = {**model, "path": "parent.onnx", "role": "fp32-sibling"}
    with pytest.raises(ValueError, match="belongs to an int8 bundle, this one is fp32"):
        Manifest.model_validate({**fields, "files": [model, sibling]})
    twice = [model, sibling, {**sibling, "path": "other.onnx"}]
    with pytest.raises(ValueError, match="2 files with role 'fp32-sibling'"):
        Manifest.model_validate({**fields, "precision": "int8", "files": twice})
    one = Manifest.model_validate({**fields, "precision": "int8", "files": [model, sibling]})
    assert one.fp32_sibling_file().path == "parent.onnx" and one.model_file().path == model["path"]


def test_bundle_create_fp32_sibling_flag(int8_model, fp32_model, tmp_path):  # noqa: F811
    meta = tmp_path / "meta.yaml"
    meta.write_text("precision: int8\n")
    out = tmp_path / "made-1.0"
    proc = run_cli(
        "bundle", "create", "--onnx", str(int8_model), "--fp32-sibling", str(fp32_model), "--meta", str(meta),
        "--weights-license", "AGPL-3.0", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    manifest = Bundle.open_fresh(out).manifest
    assert manifest.fp32_sibling_file().path == fp32_model.name and manifest.int8_verdict is None
    det = Detector.load(out, warmup=False, threads=1, allow_unsigned=True, int8_policy="strict")
    assert det.int8_check.fell_back  # no verdict recorded: strict trusts only the FP32 parent
    det.close()
    proc = run_cli("bundle", "create", "--onnx", str(fp32_model), "--fp32-sibling", str(fp32_model),
                   "--weights-license", "x", "--out", str(tmp_path / "fp32-1.0"))  # fmt: skip
    assert proc.returncode == 1 and "belongs to an int8 bundle" in proc.stderr and "Traceback" not in proc.stderr


def test_hw_plan_says_a_strict_unit_runs_the_sibling(with_sibling):
    from bastion.hardware.planner import plan
    from bastion.hardware.profiles import load_profile

    notes = plan(Bundle.open(with_sibling), load_profile("x86-cpu"), measure_speed=False).notes
    assert any("does NOT hold on x86-avx2" in n and "strict runs its FP32 sibling" in n for n in notes), notes

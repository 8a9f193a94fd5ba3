"""Vendored zoo manifests and the payload checks that refuse damaged copies."""

import json
import shutil

import pytest

from bastion import Detector
from bastion.errors import InputNotFoundError, ManifestError, ModelLoadError
from bastion.models import Bundle, zoo_names, zoo_path
from bastion.models.manifest import SCHEMA_VERSION, read_manifest


def test_zoo_bundles_are_complete_and_verified():
    assert {"yolov5n", "yolox_nano"} <= set(zoo_names())
    for name in ("yolov5n", "yolox_nano"):
        bundle = Bundle.open(name)
        m = bundle.manifest
        assert m.task == "detect" and len(m.classes) == 80 and m.license.weights
        assert m.provenance.source and m.input.size and m.decoder.type in ("yolov5", "yolox")
        assert bundle.model_path.is_file()


def test_canonical_bytes_are_stable_and_order_independent():
    m = Bundle.open("yolov5n").manifest
    again = type(m).model_validate(json.loads(json.dumps(m.model_dump(mode="json"))))
    assert m.canonical_bytes() == again.canonical_bytes() and len(m.sha256()) == 64


@pytest.fixture
def copy(tmp_path):
    dst = tmp_path / "yolox_nano"
    shutil.copytree(zoo_path("yolox_nano"), dst)
    return dst


def test_flipped_payload_byte_is_refused(copy):
    model = copy / "yolox_nano.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="does not match its sha256"):
        Detector.load(copy)


def test_truncated_or_missing_payload_is_refused(copy):
    model = copy / "yolox_nano.onnx"
    model.write_bytes(model.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="truncated or replaced"):
        Bundle.open(copy)
    model.unlink()
    with pytest.raises(ModelLoadError, match="is missing"):
        Bundle.open(copy)


def test_garbage_and_future_manifests_are_refused(copy):
    path = copy / "manifest.json"
    original = json.loads(path.read_text())
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(path)
    path.write_text(json.dumps({**original, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(ManifestError, match="newer than this bastion"):
        read_manifest(path)
    path.write_text(json.dumps({**original, "files": [{"path": "../x", "sha256": "0" * 64, "size": 1}]}))
    with pytest.raises(ManifestError, match="inside the bundle"):
        read_manifest(path)


def test_unknown_model_name():
    with pytest.raises(InputNotFoundError, match="model not found"):
        Bundle.open("no-such-model")


def test_a_run_reads_back_its_own_unsigned_bundle_quietly_but_checked(copy, capfd):
    """A pipeline re-opening what it just wrote needs no signature and prints no --allow-unsigned warning (the
    user gave no such flag); the payload is still checked."""
    (copy / "signature").unlink()
    with pytest.raises(ModelLoadError):
        Bundle.open(copy)  # a stranger's unsigned bundle stays refused
    fresh = Bundle.open_fresh(copy)
    assert not fresh.verification.signed and "written by this run" in fresh.verification.summary
    detector = Detector.from_bundle(fresh, warmup=False)
    assert detector.manifest.name == "yolox_nano" and detector.verified_by is None
    assert "allow-unsigned" not in capfd.readouterr().err
    Bundle.open(copy, allow_unsigned=True)
    assert "allow-unsigned" in capfd.readouterr().err  # the development override stays loud
    model = copy / "yolox_nano.onnx"
    model.write_bytes(model.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="truncated or replaced"):
        Bundle.open_fresh(copy)

"""The model-team and operator flows through the CLI: keys → create → sign → verify → add → detect."""

import json

from bastion.models import zoo_path
from conftest import PERSON_IMAGE, run_cli

ONNX = zoo_path("yolov5n") / "yolov5n-dynamic.onnx"
LICENSE = zoo_path("yolov5n") / "LICENSE"


def ok(proc):
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    return proc


def test_full_operator_flow(tmp_path):
    keys = tmp_path / "keys"
    gen = json.loads(ok(run_cli("keys", "generate", "--out", str(keys / "team"), "--json")).stdout)
    bundle = tmp_path / "bundles" / "people"
    created = json.loads(ok(run_cli(
        "bundle", "create", "--onnx", str(ONNX), "--name", "people", "--version", "1.0",
        "--weights-license", "GPL-3.0", "--source", "yolov5n teacher", "--license-file", str(LICENSE),
        "--sign", gen["private"], "--out", str(bundle), "--json")).stdout)
    assert created["signed"] and created["manifest"]["decoder"]["type"] == "yolov5"  # inferred from the ONNX
    assert created["manifest"]["provenance"]["command"].startswith("bastion bundle create")
    # signed by a key this unit does not trust yet
    refused = run_cli("detect", str(PERSON_IMAGE), "--model", str(bundle))
    assert refused.returncode == 1 and "does not trust" in refused.stderr and "bastion keys trust" in refused.stderr
    ok(run_cli("keys", "trust", gen["public"]))
    listed = json.loads(ok(run_cli("keys", "list", "--json")).stdout)["keys"]
    assert {k["source"] for k in listed} == {"built-in", "local"}
    verified = json.loads(ok(run_cli("bundle", "verify", str(bundle), "--json")).stdout)
    assert verified["key_id"] == gen["key_id"]
    archive = tmp_path / "usb"
    ok(run_cli("bundle", "pack", str(bundle), "--out", str(archive)))
    added = json.loads(ok(run_cli("models", "add", str(archive / "people-1.0.bastion"), "--json")).stdout)
    assert added["sha256"] == created["sha256"]
    assert ok(run_cli("models", "path", "people:1.0")).stdout.strip() == added["path"]
    det = ok(run_cli("detect", str(PERSON_IMAGE), "--model", "people", "--json"))
    assert json.loads(det.stdout)["model"] == created["sha256"]
    inspected = json.loads(ok(run_cli("bundle", "inspect", "people", "--json")).stdout)
    assert inspected["verified"] and inspected["signer_key_id"] == gen["key_id"]
    assert inspected["manifest"]["license"]["weights"] == "GPL-3.0"
    ok(run_cli("keys", "revoke", gen["key_id"]))
    assert "revoked" in run_cli("detect", str(PERSON_IMAGE), "--model", "people").stderr
    ok(run_cli("models", "remove", "people"))
    assert "people" not in ok(run_cli("models", "list")).stdout


def test_inspect_zoo_shows_verified_signature_and_provenance():
    proc = ok(run_cli("bundle", "inspect", "yolov5n"))
    text = " ".join(proc.stdout.split())
    assert "signature OK" in text and "built-in" in text and "GPL-3.0" in text and "ultralytics/yolov5" in text


def test_bundle_create_refuses_bad_metadata(tmp_path):
    base = ["bundle", "create", "--onnx", str(ONNX), "--out"]
    proc = run_cli(*base, str(tmp_path / "a"))
    assert proc.returncode == 1 and "license of the weights is required" in proc.stderr
    proc = run_cli(*base, str(tmp_path / "b"), "--weights-license", "MIT", "--decoder", "yolox")
    assert proc.returncode == 1 and "yolox" in proc.stderr and not (tmp_path / "b").exists()
    proc = run_cli(*base, str(tmp_path / "c"), "--weights-license", "MIT", "--classes", "a,b")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and not (tmp_path / "c").exists()
    meta = tmp_path / "bundle.yaml"
    meta.write_text("input: [not, a, mapping\n")
    proc = run_cli(*base, str(tmp_path / "d"), "--weights-license", "MIT", "--meta", str(meta))
    assert proc.returncode == 1 and "not valid YAML" in proc.stderr
    assert not list(tmp_path.glob(".*"))  # no staging directories left behind


def test_key_errors_are_one_line(tmp_path):
    gen = json.loads(ok(run_cli("keys", "generate", "--out", str(tmp_path / "k"), "--json"),).stdout)
    again = run_cli("keys", "generate", "--out", str(tmp_path / "k"))
    assert again.returncode == 1 and "already exists" in again.stderr
    enc = json.loads(ok(run_cli("keys", "generate", "--out", str(tmp_path / "e"), "--json",
                                env={"BASTION_KEY_PASSPHRASE": "s3cret"})).stdout)
    bundle = tmp_path / "copy"
    import shutil

    shutil.copytree(zoo_path("yolox_nano"), bundle)
    wrong = run_cli("bundle", "sign", str(bundle), "--key", enc["private"], env={"BASTION_KEY_PASSPHRASE": "nope"})
    assert wrong.returncode == 1 and "wrong passphrase" in wrong.stderr
    import os

    os.chmod(gen["private"], 0o640)
    loose = run_cli("bundle", "sign", str(bundle), "--key", gen["private"])
    assert loose.returncode == 1 and "chmod 600" in " ".join(loose.stderr.split())
    assert run_cli("keys", "revoke", "ffffffffff").returncode == 1


def test_doctor_reports_readiness_and_fails_without_trust():
    report = json.loads(ok(run_cli("doctor", "--json")).stdout)
    names = {c["name"]: c["status"] for c in report["checks"]}
    assert report["ok"] and names["trust store"] == "ok" and names["vendored models"] == "ok"
    anchor = json.loads(run_cli("keys", "list", "--json").stdout)["keys"][0]["key_id"]
    ok(run_cli("keys", "revoke", anchor))
    proc = run_cli("doctor", "--json")
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert {c["name"]: c["status"] for c in report["checks"]}["trust store"] == "fail"

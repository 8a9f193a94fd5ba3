"""Issue #19 item 5: bundles sealed to units — real X25519 unit keys, real signed bundles, the real CLI; only a
recipient runs it (same outputs as the clear model), and its model bytes are never written in clear."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from bastion import Detector
from bastion.errors import ConfigError, KeyFileError, ModelLoadError, SignatureError
from bastion.models import Bundle
from bastion.models.manifest import MANIFEST_NAME, FileEntry, read_manifest, sha256_file, write_manifest
from bastion.models.unit_key import home_key_path
from conftest import PERSON_IMAGE, run_cli

CLEAR = "yolox_nano"


def ok(proc):
    assert proc.returncode == 0, proc.stderr
    return proc


def one_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    return lines[0]


def unit(home: Path, name: str, env: dict | None = None, *extra: str) -> Path:
    """A unit with its own BASTION_HOME and unit key; returns its exported ``NAME.pub``."""
    env = {"BASTION_HOME": str(home), **(env or {})}
    ok(run_cli("keys", "unit-init", *extra, env=env))
    pub = home.parent / f"{name}.pub"
    ok(run_cli("keys", "unit-export", "--out", str(pub), env=env))
    return pub


@pytest.fixture
def team(tmp_path):
    """The model team's signing key, trusted on this unit (keys generate trusts it here)."""
    ok(run_cli("keys", "generate", "--out", str(tmp_path / "keys" / "team")))
    return tmp_path / "keys" / "team.key"


def seal(source: str | Path, out: Path, team_key: Path, *pubs: Path) -> Path:
    args = [a for p in pubs for a in ("--to", str(p))]
    ok(run_cli("bundle", "seal", str(source), *args, "--out", str(out), "--sign", str(team_key)))
    return out


def clear_model_bytes() -> bytes:
    return Bundle.open(CLEAR).model_bytes()


def test_sealed_bundle_runs_on_its_unit_with_the_clear_models_outputs(tmp_path, team, bastion_home):
    pub = unit(bastion_home, "alpha")
    sealed = seal(CLEAR, tmp_path / "sealed", team, pub)
    manifest = read_manifest(sealed / MANIFEST_NAME)
    assert manifest.sealed is not None and manifest.model_file().path.endswith(".sealed")
    assert not any(p.suffix == ".onnx" for p in sealed.iterdir())  # no clear model file in the bundle
    clear, opened = Detector.load(CLEAR, threads=1), Detector.load(sealed, threads=1)
    try:
        a, b = clear.detect(str(PERSON_IMAGE)), opened.detect(str(PERSON_IMAGE))
    finally:
        clear.close()
        opened.close()
    assert len(a.xyxy) > 0 and np.array_equal(a.xyxy, b.xyxy) and np.array_equal(a.conf, b.conf)
    report = json.loads(ok(run_cli("bundle", "inspect", str(sealed), "--json")).stdout)
    assert report["verified"] and report["sealed"]["this_unit_is_recipient"]
    assert [r["name"] for r in report["sealed"]["recipients"]] == ["alpha"]


def test_another_unit_or_no_unit_key_is_refused_in_one_line(tmp_path, team, bastion_home):
    pub = unit(tmp_path / "alpha-home", "alpha")
    sealed = seal(CLEAR, tmp_path / "sealed", team, pub)
    no_key = one_line(run_cli("detect", str(PERSON_IMAGE), "--model", str(sealed)))
    assert "sealed to units alpha (" in no_key and "this unit has no unit key" in no_key
    unit(bastion_home, "bravo")
    bravo_id = json.loads(ok(run_cli("bundle", "inspect", str(sealed), "--json")).stdout)["sealed"]["this_unit"]
    refused = one_line(run_cli("detect", str(PERSON_IMAGE), "--model", str(sealed)))
    assert "sealed to units alpha (" in refused and f"this unit is {bravo_id}" in refused
    # a partner verifies (and inspects) it without any unit key: signatures cover the sealed bytes
    report = json.loads(ok(run_cli("bundle", "inspect", str(sealed), "--json")).stdout)
    assert report["verified"] and not report["sealed"]["this_unit_is_recipient"]
    partner = tmp_path / "keys" / "partner"
    ok(run_cli("keys", "generate", "--out", str(partner)))
    ok(run_cli("bundle", "countersign", str(sealed), "--sign", str(partner) + ".key"))  # no unit key needed
    ok(run_cli("models", "add", str(sealed)))  # a relay that is no recipient stores and passes it on, as it is
    again = one_line(run_cli("bundle", "seal", str(sealed), "--to", str(pub), "--out", str(tmp_path / "twice")))
    assert "already sealed" in again


def test_two_recipients_both_open_it_a_third_does_not(tmp_path, team, bastion_home, monkeypatch):
    homes = {n: tmp_path / f"{n}-home" for n in ("alpha", "bravo", "charlie")}
    pubs = {n: unit(h, n) for n, h in homes.items()}
    sealed = seal(CLEAR, tmp_path / "sealed", team, pubs["alpha"], pubs["bravo"])
    clear = clear_model_bytes()
    trust_home = bastion_home
    for name in ("alpha", "bravo", "charlie"):
        shutil.copytree(trust_home / "trust", homes[name] / "trust", dirs_exist_ok=True)  # the team key, trusted
        monkeypatch.setenv("BASTION_HOME", str(homes[name]))
        bundle = Bundle.open(sealed)
        if name == "charlie":
            with pytest.raises(ModelLoadError, match="sealed to units alpha .*, bravo .*; this unit is"):
                bundle.model_bytes()
        else:
            assert bundle.model_bytes() == clear


def _windows(data: bytes, count: int = 24, size: int = 64) -> list[bytes]:
    step = max(1, (len(data) - size) // count)
    return [data[i : i + size] for i in range(0, len(data) - size, step)][:count]


def _clear_copies(roots: list[Path], clear: bytes) -> list[str]:
    """Files under ``roots`` that are the clear model or hold any of its sampled 64-byte windows."""
    digest, windows, found = hashlib.sha256(clear).hexdigest(), _windows(clear), []
    for root in roots:
        for path in [root] if root.is_file() else root.rglob("*"):
            if not path.is_file() or path.is_symlink():
                continue
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() == digest or any(w in data for w in windows):
                found.append(str(path))
    return found


def test_sealed_payload_is_never_written_in_clear(tmp_path, team, bastion_home):
    private_tmp = tmp_path / "tmpdir"
    private_tmp.mkdir()
    env = {"TMPDIR": str(private_tmp)}
    sealed = seal(CLEAR, tmp_path / "sealed", team, unit(bastion_home, "alpha"))
    clear = clear_model_bytes()
    assert _clear_copies([Bundle.open(CLEAR).root], clear)  # the scan does find a clear model where there is one
    ok(run_cli("detect", str(PERSON_IMAGE), "--model", str(sealed), "--threads", "1", env=env))
    ok(run_cli("models", "add", str(sealed), env=env))
    usb = tmp_path / "usb"
    ok(run_cli("bundle", "pack", str(sealed), "--out", str(usb), env=env))
    archive = next(usb.glob("*.bastion"))
    ok(run_cli("models", "add", str(archive), env=env))
    ok(run_cli("detect", str(PERSON_IMAGE), "--model", str(archive), "--threads", "1", env=env))
    name = read_manifest(sealed / MANIFEST_NAME).name
    ok(run_cli("detect", str(PERSON_IMAGE), "--model", name, "--threads", "1", env=env))  # from the registry
    assert (bastion_home / "cache" / "archives").is_dir() and (bastion_home / "registry" / "bundles").is_dir()
    assert _clear_copies([bastion_home, private_tmp, usb, sealed], clear) == []


def test_a_tampered_sealed_payload_or_wrapped_key_is_refused_at_verify(tmp_path, team, bastion_home):
    sealed = seal(CLEAR, tmp_path / "sealed", team, unit(bastion_home, "alpha"))
    payload = sealed / read_manifest(sealed / MANIFEST_NAME).model_file().path
    good = payload.read_bytes()
    payload.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(ModelLoadError, match="does not match its sha256"):
        Bundle.open(sealed)
    payload.write_bytes(good)
    manifest = read_manifest(sealed / MANIFEST_NAME)
    recipient = manifest.sealed.recipients[0]
    flipped = ("B" if recipient.wrapped_key[0] == "A" else "A") + recipient.wrapped_key[1:]
    bad = manifest.sealed.model_copy(update={"recipients": [recipient.model_copy(update={"wrapped_key": flipped})]})
    write_manifest(manifest.model_copy(update={"sealed": bad}), sealed / MANIFEST_NAME)
    with pytest.raises(SignatureError, match="changed after signing"):
        Bundle.open(sealed)
    # even where the signature is waived (development), a forged wrap never opens: AES-GCM refuses it
    bundle = Bundle.open(sealed, allow_unsigned=True)
    with pytest.raises(ModelLoadError, match="does not open with its key"):
        bundle.model_bytes()
    # the wrap is bound to the bundle that was sealed: the right key under another bundle's hash does not open
    other = manifest.sealed.model_copy(update={"clear_manifest_sha256": "0" * 64})
    write_manifest(manifest.model_copy(update={"sealed": other}), sealed / MANIFEST_NAME)
    with pytest.raises(ModelLoadError, match="does not open with its key"):
        Bundle.open(sealed, allow_unsigned=True).model_bytes()
    write_manifest(manifest, sealed / MANIFEST_NAME)
    assert Bundle.open(sealed).model_bytes() == clear_model_bytes()  # restored: verifies and opens again


def test_an_int8_bundles_fp32_sibling_is_sealed_too(tmp_path, team, bastion_home):
    """Both model files of an INT8 bundle are ciphertext in the sealed bundle, and both open on the unit."""
    source = tmp_path / "int8"
    shutil.copytree(Bundle.open(CLEAR).root, source)
    parent = Bundle.open("yolov5n")
    sibling_path = source / "parent-fp32.onnx"
    sibling_path.write_bytes(parent.model_bytes())
    manifest = read_manifest(source / MANIFEST_NAME)
    sibling = FileEntry(
        path=sibling_path.name, sha256=sha256_file(sibling_path), size=sibling_path.stat().st_size, role="fp32-sibling"
    )
    write_manifest(
        manifest.model_copy(update={"precision": "int8", "files": [*manifest.files, sibling]}), source / MANIFEST_NAME
    )
    (source / "signature").unlink()
    ok(run_cli("bundle", "sign", str(source), "--key", str(team)))
    sealed = seal(source, tmp_path / "sealed", team, unit(bastion_home, "alpha"))
    m = read_manifest(sealed / MANIFEST_NAME)
    assert sorted(m.sealed.files) == sorted([m.model_file().path, m.fp32_sibling_file().path])
    assert not (sealed / "parent-fp32.onnx").exists()
    bundle = Bundle.open(sealed)
    assert bundle.fp32_sibling_bytes() == parent.model_bytes() and bundle.model_bytes() == clear_model_bytes()


def test_a_passphrase_protected_or_systemd_credential_unit_key(tmp_path, team, bastion_home, monkeypatch):
    secret = tmp_path / "pass"
    secret.write_text("correct horse\n")
    pub = unit(bastion_home, "alpha", None, "--passphrase-file", str(secret))
    key = home_key_path()
    assert oct(key.stat().st_mode & 0o777) == "0o600" and b"ENCRYPTED" in key.read_bytes()
    sealed = seal(CLEAR, tmp_path / "sealed", team, pub)
    locked = one_line(run_cli("detect", str(PERSON_IMAGE), "--model", str(sealed)))
    assert "is encrypted and no passphrase was given" in locked
    monkeypatch.setenv("BASTION_UNIT_PASSPHRASE_FILE", str(secret))
    assert Bundle.open(sealed).model_bytes() == clear_model_bytes()
    wrong = tmp_path / "wrong"
    wrong.write_text("battery staple")
    monkeypatch.setenv("BASTION_UNIT_PASSPHRASE_FILE", str(wrong))
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        Bundle.open(sealed).model_bytes()
    # under systemd: the key as a credential (LoadCredentialEncrypted=bastion-unit.key), its passphrase beside it
    creds = tmp_path / "credentials"
    creds.mkdir()
    shutil.move(key, creds / "bastion-unit.key")
    shutil.copy(secret, creds / "bastion-unit-passphrase")
    monkeypatch.delenv("BASTION_UNIT_PASSPHRASE_FILE")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert Bundle.open(sealed).model_bytes() == clear_model_bytes()
    os.chmod(creds / "bastion-unit.key", 0o644)
    with pytest.raises(KeyFileError, match="accessible by other users"):
        Bundle.open(sealed).model_bytes()


def test_seal_refuses_a_signing_key_as_recipient_and_a_second_unit_key(tmp_path, team, bastion_home):
    refused = one_line(
        run_cli("bundle", "seal", CLEAR, "--to", str(team.with_suffix(".pub")), "--out", str(tmp_path / "s"))
    )
    assert "not a unit key (X25519)" in refused and not (tmp_path / "s").exists()
    unit(bastion_home, "alpha")
    again = one_line(run_cli("keys", "unit-init"))
    assert "already has a unit key" in again


def _fake_system(tmp_path: Path) -> tuple[Path, Path, Path]:
    """/proc/mounts, /sys/block and /dev of a unit with: LUKS at /secure, LVM on LUKS at /stacked, a plain
    partition at /plain, and an overlay at /overlay."""
    sys_block, dev = tmp_path / "sys" / "block", tmp_path / "dev"
    for name, uuid in (("dm-0", "CRYPT-LUKS2-abc-cryptdata"), ("dm-1", "LVM-xyz"), ("dm-2", "CRYPT-LUKS2-def-x")):
        (sys_block / name / "dm").mkdir(parents=True)
        (sys_block / name / "dm" / "uuid").write_text(uuid + "\n")
    (sys_block / "dm-1" / "slaves" / "dm-2").mkdir(parents=True)  # the logical volume sits on a LUKS device
    (sys_block / "sda" / "sda2").mkdir(parents=True)
    (dev / "mapper").mkdir(parents=True)
    for link, target in (("cryptdata", "dm-0"), ("vg-data", "dm-1")):
        (dev / "mapper" / link).symlink_to(f"../{target}")
    for name in ("dm-0", "dm-1", "dm-2", "sda2"):
        (dev / name).touch()
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/sda2 / ext4 rw 0 0\n/dev/mapper/cryptdata /secure ext4 rw 0 0\n"
        "/dev/mapper/vg-data /stacked xfs rw 0 0\noverlay /overlay overlay rw 0 0\n"
    )
    return mounts, sys_block, dev


def test_storage_encryption_is_told_from_mounts_and_dm_uuids(tmp_path):
    from bastion.storage_crypt import storage_crypt

    mounts, sys_block, dev = _fake_system(tmp_path)

    def state(path: str) -> str:
        return storage_crypt(Path(path), mounts, sys_block, dev).state

    assert state("/secure/bastion") == "encrypted"
    assert state("/stacked/var/lib/bastion") == "encrypted"  # LVM on LUKS
    assert state("/plain/bastion") == "clear"  # on / (a plain partition)
    assert state("/overlay/bastion") == "unknown"
    checks = {c["name"]: c for c in json.loads(ok(run_cli("doctor", "--json")).stdout)["checks"]}
    assert checks["encrypted storage"]["status"] in ("ok", "warn")


def test_a_sealed_bundle_never_goes_to_the_tensorrt_engine_cache(tmp_path, team, bastion_home):
    """Native TensorRT writes its compiled engine (the model, in clear) to disk: refused before anything is read."""
    sealed = seal(CLEAR, tmp_path / "sealed", team, unit(bastion_home, "alpha"))
    with pytest.raises(ConfigError, match="sealed: native TensorRT would cache its engine"):
        Detector.load(sealed, device="trt")
    assert "sealed: no TensorRT engine is built" in one_line(run_cli("engine", "build", str(sealed)))
    auto = Detector.load(sealed, device="auto", threads=1, warmup=False)  # auto picks an ONNX Runtime backend
    auto.close()


def test_the_node_loads_a_sealed_bundle_on_its_unit_and_audits_a_refusal_elsewhere(tmp_path, team, bastion_home):
    from bastion.edge.audit import AuditLog
    from bastion.edge.config import NodeConfig
    from bastion.edge.node_models import load_detector

    sealed = seal(CLEAR, tmp_path / "sealed", team, unit(tmp_path / "alpha-home", "alpha"))
    config = NodeConfig(model=str(sealed), sources=[{"name": "cam", "uri": str(tmp_path)}], threads=1)
    audit = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(ModelLoadError, match="sealed to units alpha"):
        load_detector(config, audit, str(sealed))  # this unit has no unit key
    unit(bastion_home, "bravo")
    with pytest.raises(ModelLoadError, match="this unit is"):
        load_detector(config, audit, str(sealed))
    refused = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert sum("bundle_refused" in json.dumps(r) and "sealed to units" in json.dumps(r) for r in refused) == 2
    shutil.rmtree(bastion_home / "unit")
    shutil.copytree(tmp_path / "alpha-home" / "unit", bastion_home / "unit")  # now this unit is alpha
    detector = load_detector(config, audit, str(sealed))
    try:
        assert len(detector.detect(str(PERSON_IMAGE)).xyxy) > 0
    finally:
        detector.close()
    assert "bundle_loaded" in (tmp_path / "audit.jsonl").read_text()


def test_a_sealed_lm_bundle_generates_the_same_text_on_its_unit(tmp_path, team, bastion_home):
    from bastion.runtime.lm import Generator

    sealed = seal("stories260K", tmp_path / "sealed-lm", team, unit(bastion_home, "alpha"))
    assert read_manifest(sealed / MANIFEST_NAME).model_file().path.endswith(".sealed")
    clear, opened = Generator.load("stories260K"), Generator.load(str(sealed))
    try:
        text = "".join(opened.generate("Once upon a time", 20))
        assert text and text == "".join(clear.generate("Once upon a time", 20))
    finally:
        clear.close()
        opened.close()


def test_unit_init_encrypts_with_the_passphrase_the_unit_is_set_to_read_and_warns_when_in_clear(tmp_path):
    """A soldier who set BASTION_UNIT_PASSPHRASE and ran ``unit-init`` got a key in clear, silently."""
    home = tmp_path / "alpha"
    made = ok(run_cli("keys", "unit-init", env={"BASTION_HOME": str(home), "BASTION_UNIT_PASSPHRASE": "pw"}))
    assert "passphrase-protected" in made.stdout and "warning" not in made.stderr
    assert b"ENCRYPTED" in (home / "unit" / "unit.key").read_bytes()
    clear = ok(run_cli("keys", "unit-init", env={"BASTION_HOME": str(tmp_path / "bravo")}))
    assert "not passphrase-protected" in clear.stderr
    assert b"ENCRYPTED" not in (tmp_path / "bravo" / "unit" / "unit.key").read_bytes()

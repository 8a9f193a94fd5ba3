"""Keys, signatures and the trust store: every way a bundle can be wrong is refused by name."""

import json
import os
import shutil
import stat

import pytest

from bastion import Detector
from bastion.errors import KeyFileError, ModelLoadError, SignatureError
from bastion.models import Bundle, zoo_path
from bastion.models.keys import generate_keypair, load_private_key
from bastion.models.manifest import MANIFEST_NAME, read_manifest, write_manifest
from bastion.models.signing import SIGNATURE_NAME, sign_manifest
from bastion.models.trust import TrustStore
from conftest import PERSON_IMAGE, run_cli


@pytest.fixture
def team_key(tmp_path):
    pair = generate_keypair(tmp_path / "keys" / "team")
    TrustStore().trust(pair.public_path)
    return pair


def copy_zoo(tmp_path, name="yolox_nano"):
    dst = tmp_path / name
    shutil.copytree(zoo_path(name), dst)
    return dst


def resign(root, pair, **changes):
    manifest = read_manifest(root / MANIFEST_NAME)
    if changes:
        manifest = manifest.model_copy(update=changes)
        write_manifest(manifest, root / MANIFEST_NAME)
    sign_manifest(root, manifest, load_private_key(pair.private_path))
    return manifest


def test_zoo_is_signed_by_the_builtin_anchor():
    for name in ("yolov5n", "yolox_nano"):
        v = Bundle.open(name).verification
        assert v.signed and v.key_source == "built-in"


def test_key_generation_modes_and_no_overwrite(tmp_path):
    pair = generate_keypair(tmp_path / "k")
    assert stat.S_IMODE(pair.private_path.stat().st_mode) == 0o600
    assert pair.public_path.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    with pytest.raises(KeyFileError, match="already exists"):
        generate_keypair(tmp_path / "k")


def test_private_key_permissions_and_passphrase(tmp_path):
    pair = generate_keypair(tmp_path / "secret", passphrase=b"correct horse")
    assert load_private_key(pair.private_path, b"correct horse")
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        load_private_key(pair.private_path, b"wrong")
    with pytest.raises(KeyFileError, match="is encrypted"):
        load_private_key(pair.private_path)
    os.chmod(pair.private_path, 0o644)
    with pytest.raises(KeyFileError, match="accessible by other users"):
        load_private_key(pair.private_path, b"correct horse")


def test_a_public_key_or_curve_certificate_given_to_sign_says_which_file_signs(tmp_path):
    """``--sign can.pub`` said "accessible by other users — run: chmod 600 can.pub", which fixes nothing."""
    from bastion.edge.curve import generate_certificate

    pair = generate_keypair(tmp_path / "can")
    with pytest.raises(KeyFileError, match=r"can.pub is a public key: it verifies, it cannot sign .* \(can.key"):
        load_private_key(pair.public_path)
    generate_certificate(tmp_path, "ops")
    with pytest.raises(KeyFileError, match="is a CurveZMQ certificate"):
        load_private_key(tmp_path / "ops.key")
    proc = run_cli("bundle", "sign", str(copy_zoo(tmp_path)), "--key", str(pair.public_path))
    assert proc.returncode == 1 and "chmod" not in proc.stderr and "cannot sign" in proc.stderr


def test_locally_signed_bundle_verifies(tmp_path, team_key):
    root = copy_zoo(tmp_path)
    resign(root, team_key, version="2.0")
    b = Bundle.open(root)
    assert b.verification.key_id == team_key.key_id and b.verification.key_source == "local"


def test_unsigned_is_refused_and_the_override_warns(tmp_path, capfd):
    root = copy_zoo(tmp_path)
    (root / SIGNATURE_NAME).unlink()
    with pytest.raises(SignatureError, match="is not signed"):
        Detector.load(root)
    for _ in range(2):
        Detector.load(root, allow_unsigned=True, warmup=False).close()
    assert capfd.readouterr().err.count("WARNING: --allow-unsigned") == 2


def test_untrusted_signer(tmp_path):
    root = copy_zoo(tmp_path)
    stranger = generate_keypair(tmp_path / "stranger")
    resign(root, stranger)
    with pytest.raises(SignatureError, match=f"key {stranger.key_id}, which this unit does not trust"):
        Bundle.open(root)


def test_tampered_manifest_is_refused(tmp_path):
    root = copy_zoo(tmp_path)
    data = json.loads((root / MANIFEST_NAME).read_text())
    data["thresholds"]["conf"] = 0.99  # a quiet change: payload hashes still match
    (root / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(SignatureError, match="manifest was changed after signing"):
        Bundle.open(root)


def test_swapped_signature_is_refused(tmp_path):
    root = copy_zoo(tmp_path)
    shutil.copy(zoo_path("yolov5n") / SIGNATURE_NAME, root / SIGNATURE_NAME)  # valid, but for another bundle
    with pytest.raises(SignatureError, match="signature belongs to another bundle"):
        Bundle.open(root)


def test_forged_signature_bytes(tmp_path):
    root = copy_zoo(tmp_path)
    record = json.loads((root / SIGNATURE_NAME).read_text())
    import base64

    sig = bytearray(base64.b64decode(record["signature"]))
    sig[0] ^= 1
    record["signature"] = base64.b64encode(bytes(sig)).decode()
    (root / SIGNATURE_NAME).write_text(json.dumps(record))
    with pytest.raises(SignatureError, match="does not verify"):
        Bundle.open(root)
    record["signature"] = base64.b64encode(bytes(sig[:40])).decode()
    (root / SIGNATURE_NAME).write_text(json.dumps(record))
    with pytest.raises(SignatureError, match="signature is 40 bytes"):
        Bundle.open(root)
    (root / SIGNATURE_NAME).write_text("garbage")
    with pytest.raises(SignatureError, match="damaged"):
        Bundle.open(root)


def test_revoked_key_including_the_builtin_anchor(tmp_path, team_key):
    root = copy_zoo(tmp_path)
    resign(root, team_key)
    store = TrustStore()
    store.revoke(team_key.key_id[:8], "lost laptop")
    with pytest.raises(SignatureError, match="revoked on this unit"):
        Bundle.open(root)
    anchor = Bundle.open("yolov5n").verification.key_id
    store.revoke(anchor, "national key replaces the project's")
    with pytest.raises(SignatureError, match="revoked"):
        Detector.load("yolov5n")
    with pytest.raises(KeyFileError, match="was revoked"):
        store.trust(team_key.public_path)


@pytest.mark.parametrize(
    "victim", ["manifest.json", "signature", "yolox_nano.onnx", "LICENSE-YOLOX-upstream", "SOURCE.md"]
)
def test_flipping_one_byte_of_any_file_is_refused(tmp_path, victim):
    root = copy_zoo(tmp_path)
    path = root / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError):
        Detector.load(root, warmup=False)
    proc = run_cli("detect", str(PERSON_IMAGE), "--model", str(root))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and proc.stderr.strip(), proc.stderr

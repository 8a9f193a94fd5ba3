"""Issue #19 item 1: countersigned bundles — more signatures over the same manifest bytes, carried by archives,
and a hostile signature list refused in one line."""

import base64
import hashlib
import json

import pytest

from bastion.errors import SignatureError
from bastion.models import Bundle
from bastion.models.archive import pack
from bastion.models.manifest import MANIFEST_NAME, read_manifest
from bastion.models.signing import COUNTERSIGNATURES_NAME, SIGNATURE_NAME, read_signatures
from bastion.models.trust import TrustStore
from coalition_kit import add_countersignature, keys, make_bundle, one_line
from conftest import run_cli


def digests(root):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir() if p.is_file()}


@pytest.fixture
def k(tmp_path):
    return keys(tmp_path, "can", "gbr", "fra", "usa")


def test_countersign_adds_a_signature_and_changes_nothing_else(tmp_path, k):
    root = make_bundle(tmp_path, "coalition-vehicles", k["can"])
    before = digests(root)
    proc = run_cli("bundle", "countersign", str(root), "--sign", str(k["gbr"].private_path), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["signatures"] == 2
    after = digests(root)
    assert after.pop(COUNTERSIGNATURES_NAME) and after == before  # manifest, payload and first signature untouched
    assert [r.key_id for r in read_signatures(root, "x")] == [k["can"].key_id, k["gbr"].key_id]
    again = run_cli("bundle", "countersign", str(root), "--sign", str(k["gbr"].private_path))
    assert f"already signed by key {k['gbr'].key_id}" in one_line(again)
    first = run_cli("bundle", "countersign", str(root), "--sign", str(k["can"].private_path))
    assert "already signed" in one_line(first)


def test_no_policy_one_trusted_signature_among_several_is_enough(tmp_path, k):
    root = make_bundle(tmp_path, "coalition-vehicles", k["can"])
    add_countersignature(root, k["gbr"])
    with pytest.raises(SignatureError, match="none of its 2 signatures is by a key this unit trusts"):
        Bundle.open(root)
    TrustStore().trust(k["gbr"].public_path)
    v = Bundle.open(root).verification
    assert v.signed and v.signers == (k["gbr"].key_id,)
    TrustStore().revoke(k["gbr"].key_id)
    with pytest.raises(SignatureError, match=f"{k['gbr'].key_id} revoked"):
        Bundle.open(root)


def test_a_countersignature_over_a_different_manifest_is_refused(tmp_path, k):
    for pair in k.values():
        TrustStore().trust(pair.public_path)
    root = make_bundle(tmp_path, "coalition-vehicles", k["can"])
    other = make_bundle(tmp_path, "coalition-vehicles", k["can"], version="2.0")
    add_countersignature(other, k["gbr"])
    (root / COUNTERSIGNATURES_NAME).write_bytes((other / COUNTERSIGNATURES_NAME).read_bytes())
    with pytest.raises(SignatureError, match=f"signature by key {k['gbr'].key_id} covers another manifest"):
        Bundle.open(root)
    refused = run_cli("bundle", "countersign", str(root), "--sign", str(k["fra"].private_path))
    assert "covers another manifest" in one_line(refused)
    # the hash in the record edited to match, the signature still over the other manifest: forged
    body = json.loads((root / COUNTERSIGNATURES_NAME).read_text())
    body["signatures"][0]["manifest_sha256"] = read_manifest(root / MANIFEST_NAME).sha256()
    (root / COUNTERSIGNATURES_NAME).write_text(json.dumps(body))
    with pytest.raises(SignatureError, match="does not verify with key"):
        Bundle.open(root)


def test_countersign_refuses_a_bundle_whose_own_signature_does_not_verify(tmp_path, k):
    TrustStore().trust(k["can"].public_path)
    root = make_bundle(tmp_path, "coalition-vehicles", k["can"])
    record = json.loads((root / SIGNATURE_NAME).read_text())
    sig = bytearray(base64.b64decode(record["signature"]))
    sig[0] ^= 1
    record["signature"] = base64.b64encode(bytes(sig)).decode()
    (root / SIGNATURE_NAME).write_text(json.dumps(record))
    line = one_line(run_cli("bundle", "countersign", str(root), "--sign", str(k["gbr"].private_path)))
    assert f"does not verify with key {k['can'].key_id}" in line
    assert not (root / COUNTERSIGNATURES_NAME).exists()
    zoo = run_cli("bundle", "countersign", "yolov5n", "--sign", str(k["gbr"].private_path))
    assert "yolov5n is not a bundle directory" in one_line(zoo)  # never the package's zoo or the registry
    unsigned = make_bundle(tmp_path, "plain", None)
    assert "not signed yet" in one_line(
        run_cli("bundle", "countersign", str(unsigned), "--sign", str(k["gbr"].private_path))
    )


def test_a_bastion_archive_with_three_signatures_round_trips(tmp_path, k):
    for pair in k.values():
        TrustStore().trust(pair.public_path)
    root = make_bundle(tmp_path, "coalition-vehicles", k["can"])
    add_countersignature(root, k["gbr"])
    add_countersignature(root, k["fra"])
    archive = pack(root, tmp_path / "out")
    opened = Bundle.open(archive)
    assert opened.root != root
    assert set(opened.verification.signers) == {k["can"].key_id, k["gbr"].key_id, k["fra"].key_id}
    assert (opened.root / COUNTERSIGNATURES_NAME).read_bytes() == (root / COUNTERSIGNATURES_NAME).read_bytes()
    listed = json.loads(run_cli("bundle", "inspect", str(archive), "--json").stdout)["signers"]
    assert [s["key_id"] for s in listed] == [k["can"].key_id, k["gbr"].key_id, k["fra"].key_id]


def test_the_registry_keeps_every_signature(tmp_path, k):
    from coalition_kit import NATIONS_RULE, policy, signed

    from bastion.models.policy_store import PolicyStore
    from bastion.models.registry import Registry

    nations = [{"pair": k["can"], "role": "nation:CAN"}, {"pair": k["gbr"], "role": "nation:GBR"}]
    s = signed(policy(1, [k["usa"]], nations, [NATIONS_RULE]), k["usa"])
    PolicyStore().apply(s, first_root=s.policy.root.fingerprint())
    root = make_bundle(tmp_path, "coalition-vehicles", k["can"])
    add_countersignature(root, k["gbr"])
    added = run_cli("models", "add", str(pack(root, tmp_path / "usb")), "--json")
    assert added.returncode == 0, added.stderr
    entry = Registry().resolve("coalition-vehicles")
    assert (entry.path / COUNTERSIGNATURES_NAME).is_file() and Bundle.open("coalition-vehicles").verification.signed


def _hostile(root, kind):
    body = json.loads((root / COUNTERSIGNATURES_NAME).read_text())
    if kind == "too-many":
        body["signatures"] = body["signatures"] * 40
        (root / COUNTERSIGNATURES_NAME).write_text(json.dumps(body))
    elif kind == "too-big":
        body["padding"] = "x" * 100_000
        (root / COUNTERSIGNATURES_NAME).write_text(json.dumps(body))
    elif kind == "malformed":
        body["signatures"][0]["signature"] = "not base64!"
        (root / COUNTERSIGNATURES_NAME).write_text(json.dumps(body))
    elif kind == "nested":
        (root / COUNTERSIGNATURES_NAME).write_text("[" * 20_000)
    elif kind == "duplicate":
        (root / COUNTERSIGNATURES_NAME).write_text(json.dumps({**body, "signatures": body["signatures"] * 2}))
    elif kind == "fifo":
        import os

        (root / COUNTERSIGNATURES_NAME).unlink()
        os.mkfifo(root / COUNTERSIGNATURES_NAME)


@pytest.mark.parametrize("kind", ["too-many", "too-big", "malformed", "nested", "duplicate", "fifo"])
def test_a_hostile_signatures_file_is_one_line(tmp_path, k, kind):
    TrustStore().trust(k["can"].public_path)
    root = make_bundle(tmp_path, "coalition-vehicles", k["can"])
    add_countersignature(root, k["gbr"])
    _hostile(root, kind)
    line = one_line(run_cli("bundle", "verify", str(root)))
    assert "countersignatures file is damaged" in line or "same key signed it twice" in line

"""Issue #19: `bastion bundle sign` on a countersigned bundle (models/resign.py) never drops or voids a partner's
signature silently: a key already there is re-signed in place, a new key is sent to `countersign`, and
countersignatures over an earlier manifest are removed only with --drop-countersignatures, counted."""

import hashlib
import json

import pytest

from bastion.models import Bundle
from bastion.models.manifest import MANIFEST_NAME, read_manifest, write_manifest
from bastion.models.signing import COUNTERSIGNATURES_NAME, SIGNATURE_NAME, read_signatures
from bastion.models.trust import TrustStore
from coalition_kit import add_countersignature, keys, make_bundle, one_line
from conftest import run_cli


def digests(root):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir() if p.is_file()}


def sign(root, pair, *extra):
    return run_cli("bundle", "sign", str(root), "--key", str(pair.private_path), *extra)


@pytest.fixture
def countersigned(tmp_path):
    k = keys(tmp_path, "can", "gbr", "fra")
    for pair in k.values():
        TrustStore().trust(pair.public_path)
    root = make_bundle(tmp_path, "coalition-vehicles", k["can"])
    add_countersignature(root, k["gbr"])
    return k, root


def test_re_signing_with_a_key_already_there_keeps_every_other_signature(countersigned):
    k, root = countersigned
    for pair in (k["gbr"], k["can"]):  # the countersigner, then the first signer
        proc = sign(root, pair, "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) | {"key_id": None} == {
            "name": "coalition-vehicles", "version": "1.0", "key_id": None, "signatures": 2, "dropped": 0
        }  # fmt: skip
        assert [r.key_id for r in read_signatures(root, "x")] == [k["can"].key_id, k["gbr"].key_id]
        assert Bundle.open(root).verification.signers == (k["can"].key_id, k["gbr"].key_id)


def test_a_new_key_on_a_countersigned_bundle_is_sent_to_countersign_and_nothing_changes(countersigned):
    k, root = countersigned
    before = digests(root)
    line = one_line(sign(root, k["fra"]))
    assert f"already signed by key {k['can'].key_id} and countersigned" in line and "bundle countersign" in line
    assert digests(root) == before


def test_a_changed_manifest_is_refused_naming_the_void_countersignatures_unless_dropped(countersigned):
    k, root = countersigned
    manifest = read_manifest(root / MANIFEST_NAME)
    write_manifest(manifest.model_copy(update={"version": "1.1"}), root / MANIFEST_NAME)
    before = digests(root)
    line = one_line(sign(root, k["can"]))
    assert f"1 of its 2 signatures sign an earlier manifest (keys {k['gbr'].key_id})" in line, line
    assert "--drop-countersignatures to remove those 1" in line
    assert digests(root) == before  # nothing half-written
    done = sign(root, k["can"], "--drop-countersignatures")
    assert done.returncode == 0, done.stderr
    assert "(1 signature(s); dropped 1 signature(s) over an earlier manifest)" in " ".join(done.stdout.split())
    assert not (root / COUNTERSIGNATURES_NAME).exists()
    assert Bundle.open(root).verification.signers == (k["can"].key_id,)
    # the partner countersigns the new manifest; the old first signer, re-signing again, keeps it
    add_countersignature(root, k["gbr"])
    assert json.loads(sign(root, k["can"], "--json").stdout)["signatures"] == 2


def test_a_new_signer_over_a_changed_manifest_keeps_the_countersignatures_that_still_cover_it(countersigned):
    """The first signature alone is stale (a re-sign after the manifest changed): with the flag it goes, and
    a countersigner that already signed the new manifest keeps its signature beside the new first one."""
    k, root = countersigned
    manifest = read_manifest(root / MANIFEST_NAME)
    write_manifest(manifest.model_copy(update={"version": "1.1"}), root / MANIFEST_NAME)
    (root / COUNTERSIGNATURES_NAME).unlink()
    assert sign(root, k["gbr"]).returncode == 0  # no countersignatures: replaced, as always
    add_countersignature(root, k["fra"])
    assert sign(root, k["can"], "--drop-countersignatures").returncode != 0  # gbr's first is still good
    (root / SIGNATURE_NAME).write_bytes(
        (root / SIGNATURE_NAME).read_bytes().replace(b'"manifest_sha256": "', b'"manifest_sha256": "0')
    )
    ok = sign(root, k["can"], "--drop-countersignatures", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["dropped"] == 1
    assert [r.key_id for r in read_signatures(root, "x")] == [k["can"].key_id, k["fra"].key_id]


def test_an_unreadable_countersignatures_file_is_refused_then_dropped_whole(countersigned):
    k, root = countersigned
    (root / COUNTERSIGNATURES_NAME).write_bytes(b"{" * 50_000)
    line = one_line(sign(root, k["can"]))
    assert "countersignatures file is damaged" in line and "--drop-countersignatures" in line
    assert sign(root, k["can"], "--drop-countersignatures").returncode == 0
    assert Bundle.open(root).verification.signers == (k["can"].key_id,)

"""A running node holds its bundles to the trust in force now (edge/trust_recheck.py): a key revoked while it runs
stops it, audited, within ``trust_recheck_s``; trust that did not change never does. Real node, real trust store,
the revocation made by the CLI in another process, as an operator with a USB stick would."""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from pathlib import Path

import pytest
from test_hardening_node import running_node

from bastion.models import Bundle
from bastion.models.keys import generate_keypair, load_private_key
from bastion.models.manifest import MANIFEST_NAME, read_manifest
from bastion.models.signing import sign_manifest
from bastion.models.trust import TrustStore
from conftest import run_cli


def resigned_copy(name: str, tmp_path, stem: str) -> tuple[str, str]:
    """The zoo bundle ``name`` copied and signed by a fresh key this unit trusts: (bundle dir, key id)."""
    root = tmp_path / f"{name}-copy"
    shutil.copytree(Bundle.open(name).root, root)
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)
    pair = generate_keypair(tmp_path / stem)
    kid = TrustStore().trust(pair.public_path)
    sign_manifest(root, read_manifest(root / MANIFEST_NAME), load_private_key(pair.private_path))
    assert Bundle.open(root).verification.key_id == kid
    return str(root), kid


def audit_records(node) -> list[dict]:
    node.audit.flush()
    return [json.loads(line) for line in (node.storage / "audit.log").read_text().splitlines() if line.strip()]


def test_a_key_revoked_while_the_node_runs_stops_it_audited_and_unchanged_trust_never_does(tmp_path):
    model, kid = resigned_copy("yolov5n", tmp_path, "team")
    with running_node(tmp_path, model=model, lm="stories260K", trust_recheck_s=1) as node:
        time.sleep(2.5)  # two re-checks under the trust it started with
        assert node.failure is None and node.recheck_trust() is None
        revoked = run_cli("keys", "revoke", kid, "--reason", "lost with unit 7")
        assert revoked.returncode == 0, revoked.stderr
        deadline = time.monotonic() + 30
        while node.failure is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert node.failure and node.failure.startswith(f"model yolov5n:{node.detector.manifest.version} is no")
        assert kid[:8] in node.failure and node.stop_event.is_set()  # the line names the key that went
        assert node.status_dict()["state"] == "failed"
        found = [r for r in audit_records(node) if r["kind"] == "model_untrusted"]
        assert len(found) == 1 and found[0]["fields"]["sha256"] == node.detector.bundle_sha256
        assert found[0]["fields"]["role"] == "model" and "revoked" in found[0]["fields"]["reason"]
    # its next start refuses the bundle as any load would, audited
    with pytest.raises(Exception, match="revoked"), running_node(tmp_path, model=model):
        pass


def test_the_language_model_is_held_to_the_same_trust(tmp_path):
    lm, kid = resigned_copy("stories260K", tmp_path, "lm-team")
    with running_node(tmp_path, lm=lm, trust_recheck_s=3600) as node:  # asked here, not by its own thread
        TrustStore().revoke(kid, "withdrawn")
        assert node.recheck_trust() is not None  # at once, not only on the maintenance thread's next turn
        assert node.failure.startswith("lm stories260K:") and "no longer trusted" in node.failure


def test_a_trust_store_that_cannot_be_read_stops_the_node_closed_not_its_maintenance_thread(tmp_path):
    model, _ = resigned_copy("yolov5n", tmp_path, "team")
    with running_node(tmp_path, model=model, trust_recheck_s=3600) as node:  # asked here, not by its own thread
        trust = Path(os.environ["BASTION_HOME"]) / "trust"
        trust.rename(trust.with_name("trust.bak"))
        trust.write_text("a file where the trust store was\n")
        why = node.recheck_trust()
        assert why and "is no longer trusted" in why and node.stop_event.is_set()
        assert "re-signed" in node.failure_hint and "traceback" not in node.failure_hint
        assert node.supervisor.check() is None and not [r for r in audit_records(node) if r["kind"] == "thread_died"]
        assert [r["kind"] for r in audit_records(node)].count("model_untrusted") == 1


def test_a_node_under_allow_unsigned_is_not_rechecked_as_its_next_start_would_load_the_bundle_anyway(tmp_path):
    model, kid = resigned_copy("yolov5n", tmp_path, "team")
    with running_node(tmp_path, model=model, security={"allow_unsigned": True}, trust_recheck_s=1) as node:
        TrustStore().revoke(kid, "withdrawn")
        assert node.running_bundles() == [] and node.recheck_trust() is None and node.failure is None

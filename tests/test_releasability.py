"""Issue #19 item 3: signed markings (classification, REL TO) and a unit of one nation refusing a model not
releasable to it — through the CLI, the SDK and the node's audited load."""

import json
import shutil

import pytest

from bastion import Detector
from bastion.edge.client import Client
from bastion.edge.audit import AuditLog
from bastion.edge.config import NodeConfig
from bastion.models import Bundle, zoo_path
from bastion.models.keys import load_private_key
from bastion.models.manifest import MANIFEST_NAME, Markings, read_manifest, write_manifest
from bastion.models.releasability import ReleasabilityError
from bastion.models.signing import SIGNATURE_NAME, sign_manifest
from bastion.models.trust import TrustStore
from coalition_kit import keys, make_bundle, one_line
from conftest import run_cli


@pytest.fixture
def team(tmp_path):
    pair = keys(tmp_path, "team")["team"]
    TrustStore().trust(pair.public_path)
    return pair


def marked_bundle(tmp_path, team, name="coalition-vehicles"):
    root = make_bundle(tmp_path, name, None)
    mark = run_cli(
        "bundle", "mark", str(root), "--classification", "SECRET", "--releasable-to", "can",
        "--releasable-to", "GBR", "--marking", "REL TO CAN, GBR",
    )  # fmt: skip
    assert mark.returncode == 0, mark.stderr
    assert run_cli("bundle", "sign", str(root), "--key", str(team.private_path)).returncode == 0
    return root


def test_a_unit_refuses_a_bundle_not_releasable_to_its_nation(tmp_path, team):
    root = marked_bundle(tmp_path, team)
    line = one_line(run_cli("bundle", "verify", str(root), env={"BASTION_NATION": "FRA"}))
    assert "is marked SECRET // REL TO: CAN, GBR (REL TO CAN, GBR): not releasable to FRA" in line
    for nation in ("CAN", "gbr", ""):
        ok = run_cli("bundle", "verify", str(root), env={"BASTION_NATION": nation})
        assert ok.returncode == 0, ok.stderr
    shown = json.loads(run_cli("bundle", "inspect", str(root), "--json").stdout)
    assert shown["markings"] == {
        "classification": "SECRET",
        "releasable_to": ["CAN", "GBR"],
        "marking": "REL TO CAN, GBR",
    }
    assert "SECRET // REL TO: CAN, GBR" in run_cli("bundle", "inspect", str(root)).stdout


def test_markings_are_signed(tmp_path, team):
    root = marked_bundle(tmp_path, team)
    manifest = read_manifest(root / MANIFEST_NAME)
    widened = manifest.markings.model_copy(update={"releasable_to": ["CAN", "GBR", "FRA"]})
    write_manifest(manifest.model_copy(update={"markings": widened}), root / MANIFEST_NAME)
    line = one_line(run_cli("bundle", "verify", str(root), env={"BASTION_NATION": "FRA"}))
    assert "manifest was changed after signing" in line
    refused = run_cli("bundle", "mark", str(root), "--classification", "UNCLASSIFIED")
    assert "is signed; new markings would void its signatures" in one_line(refused)
    assert (root / SIGNATURE_NAME).exists()
    bad = run_cli("bundle", "mark", str(root), "--classification", "X", "--releasable-to", "C A N", "--drop-signatures")
    assert "bad markings" in one_line(bad) and (root / SIGNATURE_NAME).exists()


def test_the_sdk_refuses_and_allows_by_nation_even_when_unsigned_is_allowed(tmp_path, team, monkeypatch):
    root = tmp_path / "yolox"
    shutil.copytree(zoo_path("yolox_nano"), root)
    markings = Markings(classification="NATO RESTRICTED", releasable_to=["NATO"])
    manifest = read_manifest(root / MANIFEST_NAME).model_copy(update={"markings": markings})
    write_manifest(manifest, root / MANIFEST_NAME)
    sign_manifest(root, manifest, load_private_key(team.private_path))
    with pytest.raises(ReleasabilityError, match="not releasable to CAN"):
        Detector.load(root, nation="CAN", warmup=False)
    assert Detector.load(root, nation="NATO", warmup=False).manifest.markings.releasable_to == ["NATO"]
    (root / SIGNATURE_NAME).unlink()
    monkeypatch.setenv("BASTION_NATION", "CAN")
    with pytest.raises(ReleasabilityError):
        Bundle.open(root, allow_unsigned=True)


def test_the_node_audits_a_refusal_by_nation(tmp_path, team, monkeypatch):
    from bastion.edge.node_models import load_detector

    root = marked_bundle(tmp_path, team)
    config = NodeConfig(model=str(root), sources=[{"name": "cam", "uri": str(tmp_path)}], nation="FRA")
    assert config.nation == "FRA"
    with pytest.raises(ValueError):
        NodeConfig(sources=[{"name": "cam", "uri": str(tmp_path)}], nation="france")
    monkeypatch.delenv("BASTION_NATION", raising=False)  # the node's own config says its nation
    audit = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(ReleasabilityError):
        load_detector(config, audit, str(root))
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    refused = [r for r in records if "bundle_refused" in json.dumps(r)]
    assert refused and "not releasable to FRA" in json.dumps(refused[-1])


def test_the_node_holds_its_lm_to_the_nation_in_its_config(tmp_path, team, monkeypatch):
    """The node's ``nation:`` applies to its ``ask`` model too, not only BASTION_NATION (status shows the nation,
    so the operator is told the check is on)."""
    from bastion.edge.node_models import load_lm

    root = marked_bundle(tmp_path, team)  # an LM bundle, REL TO CAN, GBR
    monkeypatch.delenv("BASTION_NATION", raising=False)
    audit = AuditLog(tmp_path / "audit.jsonl")
    fra = NodeConfig(model=str(root), sources=[{"name": "cam", "uri": str(tmp_path)}], nation="FRA")
    with pytest.raises(ReleasabilityError, match="not releasable to FRA"):
        load_lm(fra, audit, str(root))
    gbr = NodeConfig(model=str(root), sources=[{"name": "cam", "uri": str(tmp_path)}], nation="GBR")
    assert load_lm(gbr, audit, str(root)).bundle.manifest.markings.releasable_to == ["CAN", "GBR"]
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert kinds[-2:] == ["bundle_refused", "bundle_loaded"]


def test_unmarked_bundles_keep_their_signed_bytes():
    for name in ("yolov5n", "yolox_nano", "stories260K"):
        manifest = read_manifest(zoo_path(name) / MANIFEST_NAME)
        assert manifest.markings is None and "markings" not in manifest.canonical_bytes().decode()
        assert Bundle.open(name, nation="CAN").verification.signed


def test_node_status_shows_the_markings_it_runs_under_and_its_nation(tmp_path, team, monkeypatch):
    """Issue #19 item 3 asks for markings in ``status``: an operator must see SECRET // REL TO without a shell."""
    from test_node import running_node

    monkeypatch.delenv("BASTION_NATION", raising=False)
    root = tmp_path / "coalition-vehicles-1.0"
    shutil.copytree(zoo_path("yolov5n"), root)
    (root / SIGNATURE_NAME).unlink()
    mark = run_cli("bundle", "mark", str(root), "--classification", "SECRET", "--releasable-to", "CAN")
    assert mark.returncode == 0, mark.stderr
    assert run_cli("bundle", "sign", str(root), "--key", str(team.private_path)).returncode == 0
    with running_node(tmp_path, model=str(root), nation="CAN") as node:
        with Client(node.server.control_endpoint, timeout_s=10) as client:
            status = client.status()
        shown = run_cli("node", "status", "--storage", str(tmp_path / "data"))
    assert shown.returncode == 0, shown.stderr
    assert "markings: SECRET // REL TO: CAN; sealed: no; this unit's nation: CAN" in shown.stdout
    assert status["model"]["markings"] == "SECRET // REL TO: CAN"
    assert status["model"]["sealed"] is False and status["nation"] == "CAN"
    assert len(status["model"]["signers"]) == 1 and status["model"]["trust_policy"] is None  # 1-of-1, no policy


@pytest.mark.parametrize("raw", ["not a code", "C", "ABCDEFGHIJK", "ca-n"])
def test_a_nation_that_is_no_code_is_refused_naming_both_kinds_of_code(raw):
    """A nation is an alpha-3 code or a group code (NATO): the refusal says both, as the pattern allows both."""
    from bastion.errors import ConfigError
    from bastion.models.releasability import unit_nation

    with pytest.raises(ConfigError) as err:
        unit_nation(raw)
    assert "not a country code" in str(err.value) and "NATO" in err.value.hint and "CAN" in err.value.hint
    assert unit_nation(" can ") == "CAN" and unit_nation("NATO") == "NATO"

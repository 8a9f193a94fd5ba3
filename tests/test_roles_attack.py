"""Attacking the node's roles (#19 item 6) as the holder of an observer key, over real CurveZMQ on 127.0.0.1: every
op beyond its role refused in one line (clip and ask included), a flood of refused ops leaves a bounded number of
audit records whatever its size, and a pin.json swapped on disk never makes the node run an unverified bundle."""

import json
import shutil
import time

import pytest
import zmq

from bastion.edge.audit import AuditLog
from bastion.edge.client import NodeRequestError
from bastion.edge.config import NodeConfig
from bastion.edge.curve import apply_client, load_public
from bastion.edge.node_models import load_detector
from bastion.edge.pin import Pin, load_start_model, write_pin
from bastion.edge.protocol import MAX_SEQ, OPS
from bastion.edge.roles import allows, needs
from bastion.models import zoo_path
from bastion.models.keys import generate_keypair, load_private_key
from bastion.models.manifest import MANIFEST_NAME, read_manifest
from bastion.models.signing import SIGNATURE_NAME, sign_manifest
from bastion.runtime.detect import Detector
from test_node import running_node
from test_roles import _audit, _client, _curve_node

FORBIDDEN = {  # every op an observer may not run, with a request that is valid but for the role
    "snapshot": {"seq": 1},
    "clip": {"seq": 1},
    "ask": {"prompt": "hi"},
    "reload": {"bundle": "yolox_nano", "persist": True},
}


def test_an_observer_is_refused_every_op_beyond_its_role_in_one_line_and_a_flood_is_audited_coalesced(tmp_path, caplog):
    assert {op for op in OPS if not allows("observer", op)} == set(FORBIDDEN)  # a new op must join this attack
    keys, secrets, security = _curve_node(tmp_path)
    flood = 400
    with running_node(tmp_path, security=security) as node:
        with _client(node, keys, secrets["watcher"]) as watcher:
            for op, fields in FORBIDDEN.items():
                with pytest.raises(NodeRequestError, match=f"{op} refused: this client key has role observer"):
                    watcher.request(op, **fields)
            with pytest.raises(NodeRequestError, match="unknown op|op"):  # not an op: one line, no role consulted
                watcher.request("shutdown")
            page = watcher.request("replay", since=0, limit=5000)  # the widest replay an observer may ask
            assert len(json.dumps(page)) <= 4 * 2**20 + 4096
            assert watcher.request("replay", since=MAX_SEQ, limit=5000)["events"] == []

        # the flood: a raw DEALER with the observer's key, as fast as it can write, never waiting for an answer
        ctx = zmq.Context()
        dealer = ctx.socket(zmq.DEALER)
        dealer.linger = 0
        apply_client(dealer, load_public(keys / "node.key"), secrets["watcher"])
        dealer.connect(node.server.control_endpoint)
        ops = list(FORBIDDEN.items())
        for i in range(flood):
            op, fields = ops[i % len(ops)]
            dealer.send(json.dumps({"op": op, "id": i, **fields}).encode())
        answers, quiet_since = [], time.monotonic()
        while time.monotonic() - quiet_since < 2.0:  # read what comes until the node has nothing more to say
            if dealer.poll(100):
                answers.append(json.loads(dealer.recv()))
                quiet_since = time.monotonic()
        dealer.close(linger=0)
        ctx.term()
        assert answers and all(a["ok"] is False for a in answers)
        assert all(a.get("refused") or a.get("rate_limited") for a in answers)
        assert node.status_dict()["model"]["name"] == "yolov5n"  # nothing reloaded, nothing pinned
        live = [r for r in _audit(tmp_path) if r["kind"] in ("op_refused", "client_rate_limited")]
        assert len(live) <= 2  # the first of each kind, written at once
    records = [r for r in _audit(tmp_path) if r["kind"] in ("op_refused", "client_rate_limited")]
    assert len(records) <= 4, records  # closing flushed one coalesced record per kind
    total = sum(r["fields"].get("count", 1) for r in records)
    assert total == flood + len(FORBIDDEN), records  # every refusal counted, none written on its own
    # the coalesced record says how many of each op were refused, not the last op for them all
    repeats = next(r["fields"] for r in records if r["kind"] == "op_refused" and "count" in r["fields"])
    assert repeats["role"] == "observer" and "op" not in repeats
    by_op = {v["op"]: v["count"] for v in repeats["variants"]}
    assert set(by_op) == set(FORBIDDEN) and sum(by_op.values()) == repeats["count"]
    assert {v["op"]: v["needs"] for v in repeats["variants"]} == {op: needs(op) for op in FORBIDDEN}
    warnings = [r.getMessage() for r in caplog.records if "refused for" in r.getMessage()]
    assert len(warnings) == 1, warnings  # the node's log: one line, not one per refusal
    assert not (tmp_path / "data" / "pin.json").exists()


def _copy(tmp_path, name):
    root = tmp_path / name
    shutil.copytree(zoo_path("yolox_nano"), root)
    return root


@pytest.mark.parametrize("swap", ["unsigned", "untrusted-signer", "payload-swapped"])
def test_a_pin_swapped_on_disk_never_runs_an_unverified_bundle(tmp_path, swap):
    """Whoever writes the storage dir writes pin.json by hand, with the sha256 the bundle it names really has:
    the pinned bundle is verified like any load, refused, and the config's model runs."""
    real = Detector.load("yolox_nano")
    sha, real_manifest = real.bundle_sha256, real.manifest
    real.close()
    evil = _copy(tmp_path, "evil")
    if swap == "unsigned":
        (evil / SIGNATURE_NAME).unlink()
    elif swap == "untrusted-signer":
        pair = generate_keypair(tmp_path / "keys" / "mallory")
        sign_manifest(evil, read_manifest(evil / MANIFEST_NAME), load_private_key(pair.private_path))
    else:  # the manifest and signature kept, the weights replaced by another model's
        model = evil / real_manifest.model_file().path
        model.write_bytes(
            (zoo_path("yolov5n") / read_manifest(zoo_path("yolov5n") / MANIFEST_NAME).model_file().path).read_bytes()
        )
    storage = tmp_path / "data"
    write_pin(storage, Pin(bundle=str(evil), sha256=sha, name="yolox_nano", version="1", by="nobody", at=1.0))
    config = NodeConfig(model="yolov5n", sources=[{"name": "cam", "uri": str(tmp_path)}], threads=1)
    audit = AuditLog(tmp_path / "audit.log")
    detector, state = load_start_model(storage, "yolov5n", audit, lambda m: load_detector(config, audit, m))
    try:
        assert detector.manifest.name == "yolov5n" and state["state"] == "refused"
    finally:
        detector.close()
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert kinds == ["bundle_refused", "pin_refused", "bundle_loaded"] and "allow_unsigned_used" not in kinds


def test_a_coalesced_record_tells_repeats_apart_within_a_bound_and_counts_the_rest():
    """An admin's reloads of 40 made-up long paths in a minute, then 30 short ops: one record at once, then one that
    tells variants apart while they fit (16 at most, ~1.2 KB of them) and counts the others together — every
    record under 2 KB whatever the client sends."""
    from bastion.edge.limits import MAX_VARIANTS, RefusalCoalescer

    written = []
    coalescer = RefusalCoalescer(lambda kind, **f: written.append((kind, f)), clock=lambda: 0.0)
    for i in range(40):
        coalescer.refuse("bundle_refused", "k1", model=f"/x/{i}" + "y" * 5000, op="reload")
    for i in range(30):
        coalescer.refuse("op_refused", "k2", op=f"op{i}", role="observer")
    for _ in range(3):
        coalescer.refuse("bundle_refused", "k3", model="/same", op="reload")
    coalescer.flush(force=True)
    coalesced = {f["client"]: f for _, f in written if "count" in f}
    long, short = coalesced["k1"], coalesced["k2"]
    assert long["count"] == 39 and long["op"] == "reload" and 1 <= len(long["variants"]) < MAX_VARIANTS
    assert long["other_variants"] == 39 - len(long["variants"]) and all(v["count"] == 1 for v in long["variants"])
    assert short["count"] == 29 and len(short["variants"]) == MAX_VARIANTS and short["other_variants"] == 13
    assert short["role"] == "observer" and [v["op"] for v in short["variants"]] == [f"op{i}" for i in range(1, 17)]
    assert max(len(json.dumps(f)) for _, f in written) < 2000
    assert coalesced["k3"] == {"client": "k3", "model": "/same", "op": "reload", "count": 2, "repeated_within_s": 60.0}


def test_an_allow_list_entry_that_is_not_a_curve_key_is_one_line_never_a_silent_grant(tmp_path):
    """A mistyped z85 key (40 characters, not z85) used to be filed as admin and listed as allowed — a key no
    client can ever match, shown as access granted."""
    from bastion.edge.curve import generate_certificate
    from bastion.edge.curve_allow import client_roles
    from bastion.errors import KeyFileError
    from coalition_kit import one_line
    from conftest import run_cli

    clients = tmp_path / "clients"
    bad = 'abcdefghij"klmnopqrstuvwxyz0123456789ABC'
    line = one_line(run_cli("node", "allow", bad, "--role", "admin", "--clients", str(clients), "--name", "eve"))
    assert "is not a CurveZMQ public key" in line and not clients.exists()
    good = generate_certificate(tmp_path / "own", "alice")[0]
    assert run_cli("node", "allow", str(good), "--role", "operator", "--clients", str(clients)).returncode == 0
    text = (clients / "operator" / "alice.key").read_text()
    (clients / "admin").mkdir()
    (clients / "admin" / "eve.key").write_text(text.replace(text.split('"')[1], "~" * 40))  # edited by hand
    with pytest.raises(KeyFileError, match=r"admin/eve.key: '~+' is not a CurveZMQ public key"):
        client_roles([clients])
    assert "is not a CurveZMQ public key" in one_line(run_cli("node", "clients", "--clients", str(clients)))


def test_a_routing_id_set_to_an_admins_public_key_never_borrows_its_role(tmp_path):
    """The role is looked up by the ZAP User-Id. Without a ZAP handler (its thread gone: libzmq then lets every
    CURVE client in, with no User-Id), the server must not fall back to the routing id — which the client
    chooses, and an admin's public key is public. An observer sets its routing id to the admin's key and
    reloads while the handler is down."""
    keys, secrets, security = _curve_node(tmp_path)
    admin_public = load_public(tmp_path / "clients-own" / "boss.key")
    with running_node(tmp_path, security=security) as node:
        # the window between a ZAP thread's death and the node's exit, held open: the supervisor is told this
        # death is expected (it would stop the node first on a loaded machine, and the test would see no answer)
        node.supervisor.watch("node-zap", node.server.auth.thread, lambda: False)
        node.server.auth.stop()
        ctx = zmq.Context()
        dealer = ctx.socket(zmq.DEALER)
        dealer.linger = 0
        dealer.routing_id = admin_public
        apply_client(dealer, load_public(keys / "node.key"), secrets["watcher"])
        dealer.connect(node.server.control_endpoint)
        try:
            dealer.send(json.dumps({"op": "reload", "id": 1, "bundle": "yolox_nano"}).encode())
            assert dealer.poll(20_000), "no answer"  # libzmq let it in unnamed: the node must refuse it by role
            answer = json.loads(dealer.recv())
        finally:
            dealer.close(linger=0)
            ctx.term()
        assert answer["ok"] is False and answer.get("refused"), answer
        assert "reload refused: this client key has no role" in answer["error"]
        assert node.status_dict()["model"]["name"] == "yolov5n"

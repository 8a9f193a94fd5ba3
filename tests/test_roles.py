"""Roles on the node's control socket (#19 item 6): a real node on 127.0.0.1 behind CurveZMQ, real client keys filed
by role, every op asked over the real socket; a persisted reload pinned across a restart of the node."""

import json
import os
import subprocess
import sys
import time

import pytest

from bastion.edge.client import Client, NodeRequestError
from bastion.edge.control_ops import HANDLERS
from bastion.edge.curve import generate_certificate, key_id, load_public
from bastion.edge.curve_allow import client_roles
from bastion.edge.node import RUNTIME_FILE
from bastion.edge.pin import PIN_FILE
from bastion.edge.protocol import OPS
from bastion.edge.roles import OP_ROLES, ROLES, allows
from bastion.edge.snapshots import generate_key_file
from bastion.errors import ConfigError
from coalition_kit import one_line
from conftest import REPO, run_cli
from test_node import running_node, take, write_config

REFUSED = "{op} refused: this client key has role {role}; {op} needs {needs}"


def _audit(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "data" / "audit.log").read_text().splitlines()]


def _curve_node(tmp_path):
    """The node's key pair, three client keys filed as a node's admin would, and the node's security section.

    ``watcher`` sits straight in the allow-list folder, as every key did before roles (an observer); ``op`` and
    ``boss`` are filed in role folders by ``bastion node allow`` (the operator through the real CLI)."""
    keys = tmp_path / "keys"
    generate_certificate(keys, "node")
    mine = tmp_path / "clients-own"  # where each client made its pair: only the public half reaches the node
    secrets = {name: generate_certificate(mine, name)[1] for name in ("watcher", "op", "boss")}
    (keys / "clients").mkdir()
    (keys / "clients" / "watcher.key").write_bytes((mine / "watcher.key").read_bytes())
    proc = run_cli("node", "allow", str(mine / "op.key"), "--role", "operator", "--clients", str(keys / "clients"))
    assert proc.returncode == 0 and "as operator" in proc.stdout, proc.stderr
    from bastion.edge.cli_access import node_allow

    node_allow(str(mine / "boss.key"), role="admin", clients=keys / "clients", name=None, json_out=True)
    security = {
        "curve": True,
        "server_secret_key": str(keys / "node.key_secret"),
        "allowed_clients": [str(keys / "clients")],
    }
    return keys, secrets, security


def _node_process(config):
    """``bastion node run`` in a process of its own (to be killed), once it has written its node.json."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    code = "import egress_guard; egress_guard.install(); from bastion.cli import run; run()"
    cmd = [sys.executable, "-c", code, "node", "run", "--config", str(config)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    runtime = config.parent / "data" / RUNTIME_FILE
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if runtime.is_file() and json.loads(runtime.read_text())["pid"] == proc.pid:
            return proc, json.loads(runtime.read_text())
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(proc.stderr.read().decode())


def _client(node, keys, secret, **kw):
    return Client(node.server.control_endpoint, server_key=str(keys / "node.key"), client_key=secret, timeout_s=5, **kw)


def test_every_op_names_its_role_and_an_unnamed_op_is_admin_only():
    assert set(OPS) <= set(OP_ROLES) and set(HANDLERS) <= set(OP_ROLES)
    assert [op for op in OP_ROLES if allows("observer", op)] == ["ping", "status", "replay"]
    assert {op for op in OP_ROLES if allows("operator", op)} == {"ping", "status", "replay", "snapshot", "clip", "ask"}
    assert all(allows("admin", op) for op in OP_ROLES)
    assert not allows("operator", "some-new-op") and allows("admin", "some-new-op")
    assert not any(allows(role, "status") for role in (None, "root", ""))  # a key the list does not know: nothing


def test_each_role_runs_its_ops_over_curve_and_a_refusal_is_one_line_audited_once_a_minute(tmp_path):
    keys, secrets, security = _curve_node(tmp_path)
    generate_key_file(tmp_path / "snap.key")
    storage = {"dir": str(tmp_path / "data"), "snapshots": True, "snapshot_key": str(tmp_path / "snap.key")}
    observer_refusals = 0
    with running_node(tmp_path, security=security, storage=storage) as node:
        with _client(node, keys, secrets["watcher"]) as watcher:
            assert watcher.status()["node"] == "test-node"
            seq = take(watcher.events(since=0), 2)[-1].seq  # replay, then the events socket
            for op, call in (
                ("snapshot", lambda: watcher.snapshot(seq)),
                ("ask", lambda: watcher.ask("hi")),
                ("reload", lambda: watcher.reload("yolox_nano", persist=True)),
                ("snapshot", lambda: watcher.snapshot(seq)),
                ("reload", lambda: watcher.reload("yolox_nano")),
            ):
                with pytest.raises(NodeRequestError) as refused:
                    call()
                needs = {"snapshot": "operator", "ask": "operator", "reload": "admin"}[op]
                assert REFUSED.format(op=op, role="observer", needs=needs) in str(refused.value)
                assert "\n" not in str(refused.value)
                observer_refusals += 1
            live = [r for r in _audit(tmp_path) if r["kind"] == "op_refused"]
            assert len(live) == 1 and live[0]["fields"]["op"] == "snapshot"  # the first at once, repeats counted
            assert watcher.status()["node"] == "test-node"  # still served
        server_key, endpoint = str(keys / "node.key"), node.server.control_endpoint
        proc = run_cli(
            "ask", "hi", "--node", endpoint, "--server-key", server_key, "--client-key", str(secrets["watcher"])
        )
        assert REFUSED.format(op="ask", role="observer", needs="operator") in one_line(proc)  # its keys got it in
        observer_refusals += 1
        with _client(node, keys, secrets["op"]) as operator:
            assert operator.snapshot(seq)[:2] == b"\xff\xd8"  # a real JPEG, decrypted by the node
            with pytest.raises(NodeRequestError, match="no language model loaded"):  # past the role check
                operator.ask("hi")
            with pytest.raises(NodeRequestError, match=REFUSED.format(op="reload", role="operator", needs="admin")):
                operator.reload("yolox_nano", persist=True)
        assert node.status_dict()["model"]["name"] == "yolov5n" and not (tmp_path / "data" / PIN_FILE).exists()
    records = _audit(tmp_path)
    accepted = {r["fields"]["key_id"]: r["fields"]["role"] for r in records if r["kind"] == "client_accepted"}
    ids = {name: key_id(load_public(tmp_path / "clients-own" / f"{name}.key")) for name in ("watcher", "op")}
    assert accepted == {ids["watcher"]: "observer", ids["op"]: "operator"}
    refused = [r["fields"] for r in records if r["kind"] == "op_refused"]
    by_watcher = [f for f in refused if f["client"] == ids["watcher"]]
    assert len(by_watcher) == 2 and by_watcher[1]["count"] == observer_refusals - 1  # one window: 2 records
    assert [(f["op"], f["role"], f["needs"]) for f in refused if f["client"] == ids["op"]] == [
        ("reload", "operator", "admin")
    ]


def test_an_admin_reload_with_persist_survives_a_restart_audited_and_a_pin_that_no_longer_verifies_falls_back(
    tmp_path,
):
    keys, secrets, security = _curve_node(tmp_path)
    proc, info = _node_process(write_config(tmp_path, security=security, imgsz=None))
    try:
        with Client(info["control"], server_key=str(keys / "node.key"), client_key=secrets["boss"], timeout_s=30) as c:
            answer = c.reload("yolox_nano", persist=True)
            assert answer["pinned"] is True and c.status()["pin"]["state"] == "running"
    finally:
        proc.kill()  # SIGKILL: no clean stop, the pin must already be on disk
        proc.wait()
    pinned_sha = answer["model"]["sha256"]
    pin = json.loads((tmp_path / "data" / PIN_FILE).read_text())
    assert pin["sha256"] == pinned_sha and pin["by"] == key_id(load_public(tmp_path / "clients-own" / "boss.key"))
    with (
        running_node(tmp_path, security=security, imgsz=None) as node,
        _client(node, keys, secrets["watcher"]) as watcher,
    ):
        status = watcher.status()  # the restarted node runs the pinned model, not its config's yolov5n
        assert status["model"]["sha256"] == pinned_sha and status["model"]["name"] != "yolov5n"
        assert status["pin"]["state"] == "running" and status["pin"]["bundle"] == "yolox_nano"
        with _client(node, keys, secrets["boss"]) as admin:  # a reload without persist: for this run only
            admin.reload("yolov5n", allow_downgrade=True)
            assert admin.status()["pin"]["state"] == "after_restart"
        shown = run_cli("node", "status", "--storage", str(tmp_path / "data"), "--client-key", str(secrets["watcher"]))
        text = " ".join(shown.stdout.split())  # rich wraps lines at the terminal's width
        assert "pinned: yolox_nano" in text and "runs again at the next start" in text, shown.stderr
    kinds = [(r["kind"], r["fields"]) for r in _audit(tmp_path)]
    boss = key_id(load_public(tmp_path / "clients-own" / "boss.key"))
    reloads = [f for k, f in kinds if k == "reload"]  # every reload names the key that asked, pinned or not
    assert [(f.get("pinned"), f["client"]) for f in reloads] == [("yolox_nano", boss), (None, boss)]
    assert any(k == "pin_loaded" and f["sha256"] == pinned_sha for k, f in kinds)

    pin["sha256"] = "0" * 64  # the pin now names a bundle the node cannot find: the config's model runs
    (tmp_path / "data" / PIN_FILE).write_text(json.dumps(pin))
    with running_node(tmp_path, security=security, imgsz=None) as node:
        status = node.status_dict()
        assert status["model"]["name"] == "yolov5n" and status["pin"]["state"] == "refused"
        assert "not the 000000000000 pinned" in status["pin"]["reason"]
    assert [r["fields"]["running"] for r in _audit(tmp_path) if r["kind"] == "pin_refused"] == ["yolov5n"]
    shown = run_cli("node", "pin", "--storage", str(tmp_path / "data"), "--clear")
    assert shown.returncode == 0 and "cleared pin" in shown.stdout, shown.stderr
    assert not (tmp_path / "data" / PIN_FILE).exists()


def test_an_allow_list_with_a_folder_that_is_not_a_role_or_a_key_under_two_roles_is_one_config_line(tmp_path):
    keys = tmp_path / "keys"
    generate_certificate(keys, "node")
    generate_certificate(keys / "clients" / "superuser", "eve")
    with pytest.raises(ConfigError, match="'superuser' is not a role"):
        client_roles([keys / "clients"])
    line = one_line(run_cli("node", "clients", "--clients", str(keys / "clients")))
    assert "superuser" in line and "observer, operator, admin" in line
    security = {
        "curve": True,
        "server_secret_key": str(keys / "node.key_secret"),
        "allowed_clients": [str(keys / "clients")],
    }
    with pytest.raises(ConfigError, match="not a role"), running_node(tmp_path, security=security):
        pass  # refused before the model is loaded

    (keys / "clients" / "superuser" / "eve.key").rename(keys / "clients" / "eve.key")
    (keys / "clients" / "admin").mkdir()
    (keys / "clients" / "admin" / "eve2.key").write_bytes((keys / "clients" / "eve.key").read_bytes())
    with pytest.raises(ConfigError, match=r"is observer \(.*\) and admin"):
        client_roles([keys / "clients"])
    proc = run_cli("node", "allow", str(keys / "clients" / "eve.key"), "--role", "root", "--clients", str(keys))
    assert "'root' is not a role" in one_line(proc)


def test_an_allow_list_from_before_roles_still_loads_every_key_as_observer_and_allow_moves_a_key(tmp_path):
    from bastion.edge.cli_access import node_allow

    old = tmp_path / "clients"
    pairs = {name: generate_certificate(old, name) for name in ("a", "b")}
    single = generate_certificate(tmp_path / "elsewhere", "c")[0]
    roles = client_roles([old, single])  # a folder and a single file, as allowed_clients listed them
    assert sorted(roles.values()) == ["observer"] * 3 and set(roles) == {
        load_public(p) for p in (pairs["a"][0], pairs["b"][0], single)
    }
    assert set(ROLES) == {"observer", "operator", "admin"}
    a = load_public(pairs["a"][0])
    node_allow(str(pairs["a"][0]), role="admin", clients=old, name=None, json_out=True)  # a moves to admin/
    assert client_roles([old])[a] == "admin" and not pairs["a"][0].exists()
    listed = run_cli("node", "clients", "--clients", str(old), "--json")
    assert sorted(row["role"] for row in json.loads(listed.stdout)) == ["admin", "observer"], listed.stderr


def test_a_pin_that_no_longer_fits_the_config_or_is_damaged_runs_the_config_model_in_one_line(tmp_path, caplog):
    """The two other ways a pin fails at start, on real bundle loads: the config changed since the pin (a rule names
    a class the pinned model lacks — both zoo models know COCO, so ``fits`` stands in for that check), and a
    pin.json that is not one."""
    from bastion.edge.audit import AuditLog
    from bastion.edge.pin import Pin, load_start_model, write_pin
    from bastion.runtime.detect import Detector

    audit = AuditLog(tmp_path / "audit.log")
    loaded: list[str] = []

    def load(model: str) -> Detector:
        loaded.append(model)
        return Detector.load(model)

    pinned = Detector.load("yolox_nano")
    write_pin(
        tmp_path, Pin(bundle="yolox_nano", sha256=pinned.bundle_sha256, name="yolox_nano", version="1", by="k", at=1.0)
    )
    pinned.close()

    def fits(detector: Detector) -> None:
        if detector.manifest.name == "yolox_nano":
            raise ConfigError("zone 'door' names class 'forklift', which yolox_nano does not know")

    detector, state = load_start_model(tmp_path, "yolov5n", audit, load, fits)
    assert detector.manifest.name == "yolov5n" and loaded == ["yolox_nano", "yolov5n"]
    assert state["state"] == "refused" and "does not fit this node's config: zone 'door'" in state["reason"]
    detector.close()
    detector, state = load_start_model(tmp_path, "yolov5n", audit, load)  # the same pin, nothing against it
    assert detector.manifest.name == "yolox_nano" and state["state"] == "running"
    detector.close()

    (tmp_path / PIN_FILE).write_text('{"bundle": "yolox_nano", "sha256": "x"}')  # damaged: not a pin the node wrote
    caplog.clear()
    detector, state = load_start_model(tmp_path, "yolov5n", audit, load)
    assert detector.manifest.name == "yolov5n" and state["state"] == "refused" and "is damaged" in state["reason"]
    detector.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "bastion.edge.pin"]
    assert len(lines) == 1 and "running the config's model yolov5n" in lines[0]
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert kinds == ["pin_refused", "pin_loaded", "pin_refused"]

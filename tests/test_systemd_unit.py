"""The shipped systemd unit restarts the node on what a restart can cure, and only on that.

A refusal (bad config, a bundle that fails verification) exits 1: restarting it every few seconds only floods the
journal, so the unit lists 1 in RestartPreventExitStatus. A dead worker thread exits 2 (NodeFailed): that one must
restart. The test runs the real CLI for the refusal, so a change to either exit code breaks it.
"""

import configparser

from bastion.edge.node import NodeFailed
from conftest import REPO, run_cli

UNIT = REPO / "edge" / "systemd" / "bastion-node.service"


def _service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser["Service"]


def test_a_refused_start_is_not_restarted_in_a_loop(tmp_path, bastion_home):
    bad = tmp_path / "node.yaml"
    bad.write_text("sources: 7\n")  # not a list of sources: refused at load
    proc = run_cli("node", "run", "--config", str(bad), timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    service = _service()
    assert service["Restart"] == "on-failure"
    assert str(proc.returncode) in service.get("RestartPreventExitStatus", "").split()


def test_a_dead_worker_thread_is_restarted():
    service = _service()
    assert str(NodeFailed.exit_code) not in service.get("RestartPreventExitStatus", "").split()
    assert int(service["WatchdogSec"]) > 0 and service["Type"] == "notify"


def test_the_node_cannot_write_what_decides_which_models_run(monkeypatch):
    """The node's state dir is writable, but its trust store, policy and unit key are not: code running as the
    node must not be able to trust a key of its own (#19: found attacking pin.json)."""
    from bastion.models.policy_store import PolicyStore
    from bastion.models.trust import TrustStore
    from bastion.models.unit_key import home_key_path

    service = _service()
    home = next(
        line.split("=", 2)[2] for line in UNIT.read_text().splitlines() if line.startswith("Environment=BASTION_HOME=")
    )
    assert home in service["ReadWritePaths"].split()
    read_only = [p.lstrip("-") for p in service["ReadOnlyPaths"].split()]
    monkeypatch.setenv("BASTION_HOME", home)  # where the real code puts each file under the unit's BASTION_HOME
    must = {TrustStore().root, PolicyStore().path.parent, home_key_path().parent}
    assert all(any(str(path) == p or str(path).startswith(p + "/") for p in read_only) for path in must), must

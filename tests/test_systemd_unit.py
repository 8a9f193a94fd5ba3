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

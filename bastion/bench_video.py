"""``bastion bench detect --video``: frames/s over a video file — the floor, bastion's overlapped pipeline
(``detect_stream``) and Ultralytics' ``predict(stream=True)``, measured in one run on the same frames."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bastion.bench_common import (
    DetectBenchRequest,
    compare_detections,
    environment,
    stats,
    ticker,
    ultralytics_for,
    versus_ultralytics,
)
from bastion.errors import InputNotFoundError
from bastion.runtime.detect import Detector
from bastion.runtime.detections import Detections
from bastion.runtime.media import iter_video
from bastion.runtime.preprocess import batch_inputs
from bastion.runtime.stream import default_workers, detect_stream


def bench_video(
    video: Path, request: DetectBenchRequest, batch: int, workers: int | None = None, progress: Any = None
) -> dict[str, Any]:
    """Frames/s over a video file: floor vs bastion's overlapped pipeline vs Ultralytics' stream."""
    if not Path(video).is_file():
        raise InputNotFoundError(f"video not found: {video}")
    workers = workers or default_workers()
    detector = request.load()
    notes: list[str] = []
    frames = [f.image for f in iter_video(video, request.limit)]
    if not frames:
        raise InputNotFoundError(f"no frames decoded from {video}")
    tick = ticker(progress, "bench video", len(frames) * 4)
    name = detector.backend.inputs[0].name
    blobs = [batch_inputs([detector.prepare(f)[0]]) for f in frames]
    lat = []
    t_all = time.perf_counter()
    for blob in blobs:
        t = time.perf_counter()
        detector.backend.run({name: blob})
        lat.append(time.perf_counter() - t)
        tick()
    contestants = {"floor": stats(lat, time.perf_counter() - t_all)}

    def run_stream(det: Detector, b: int, w: int) -> tuple[dict[str, float], list[Detections]]:
        dets = []
        t0 = time.perf_counter()
        for _, d in detect_stream(det, iter_video(video, len(frames)), batch=b, workers=w):
            dets.append(d)
            tick()
        return stats([], time.perf_counter() - t0, len(dets)), dets

    # The same pipeline as `bastion detect` on a video: single-threaded session, one inference per core.
    effective = batch if detector.dynamic_batch else 1
    contestants["bastion_serial"], dets_serial = run_stream(detector, 1, 1)
    detector.close()
    streamer = request.load(threads=1)
    contestants["bastion"], dets = run_stream(streamer, effective, workers)
    summary: dict[str, Any] = {
        "batch": effective,
        "workers": workers,
        "bastion_vs_floor": round(contestants["bastion"]["per_s"] / contestants["floor"]["per_s"], 3),
        "pipeline_agreement": compare_detections(dets, dets_serial),
    }
    ultra = ultralytics_for(detector, request, notes)
    theirs: list[Detections] = []
    if ultra is not None:
        ultra.predict(frames[0])  # warm-up
        t0 = time.perf_counter()
        for res in ultra.predict(str(video), stream=True):
            theirs.append(ultra.to_detections(res, detector.names))
            tick()
            if len(theirs) >= len(frames):
                break
        contestants["ultralytics"] = stats([], time.perf_counter() - t0, len(theirs))
    versus_ultralytics(summary, contestants, "per_s", dets, theirs, ultra, notes)
    return {
        "mode": "video",
        "model": detector.manifest.name,
        "model_sha256": detector.bundle_sha256,
        "video": str(video),
        "count": len(frames),
        "conf": request.conf,
        "iou": request.iou,
        "contestants": contestants,
        "summary": summary,
        "notes": notes,
        "environment": environment(detector, request.threads),
    }

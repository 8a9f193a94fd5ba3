"""``bastion bench detect --images``: single-image speed of the floor, bastion and Ultralytics, best of N rounds.

Contestants, all on the same files and thresholds:
  (a) ``floor``       — ONNX Runtime ``session.run`` on tensors prepared beforehand;
  (b) ``bastion``     — ``Detector`` end to end (read file → Detections);
  (c) ``ultralytics`` — ``YOLO(model.onnx).predict`` when the model is in Ultralytics layout and the ``[distill]``
      extra is installed (otherwise the output says it was skipped, and why).

How the ratio stays steady on a shared machine: first every contestant makes untimed warm-up passes (first-call
allocation, kernel choice, and the shape-pinned sessions ONNX Runtime builds in the background after a few runs of
one shape all happen before the clock starts). Then ``repeat`` rounds: in each, the floor and bastion take turns
image by image (they share one session), and Ultralytics (its own session) times one whole pass in turn with them;
the order reverses every round, so a slow spell of the machine hits each of them. A
contestant's headline speed (``best_per_s``) counts each image at its best time over the rounds, and the ratios
are taken between those; the percentiles cover every timed call. One 3-image pass timed once gave ``bastion_vs_floor`` 0.60 and then 1.95: the
first pass paid the warm-up and the background pinning.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bastion.bench_common import (
    DetectBenchRequest,
    environment,
    stats,
    ticker,
    ultralytics_for,
    versus_ultralytics,
)
from bastion.errors import InputNotFoundError
from bastion.runtime.detections import Detections
from bastion.runtime.media import list_images, read_image
from bastion.runtime.preprocess import batch_inputs

WARMUP_PASSES = 2  # floor and bastion share one session: 4 runs of each shape, past SPECIALIZE_AFTER (3)
SETTLE_S = 0.2  # between passes: the previous session's worker threads stop spinning


def timed_rounds(passes: list[Callable[[bool], dict[str, list[float]]]], rounds: int) -> dict[str, list[list[float]]]:
    """Each contestant's per-call latencies, one list per round. A pass times one or more contestants over every
    image (``pass(reverse)``); within a round the passes take turns, and the order reverses every round."""
    timings: dict[str, list[list[float]]] = {}
    for r in range(rounds):
        for run_pass in passes if r % 2 == 0 else passes[::-1]:
            for key, latencies in run_pass(r % 2 == 1).items():
                timings.setdefault(key, []).append(latencies)
            time.sleep(SETTLE_S)
    return timings


def round_stats(per_round: list[list[float]]) -> dict[str, Any]:
    """``stats`` over every timed call, plus ``best_per_s``: images per second when each image takes its best
    time over the rounds (the number ratios are taken from). Best per image rather than best whole round: on a
    loaded 2-core machine hardly any whole pass escapes a slow spell, while each image's fastest run does."""
    flat = [t for r in per_round for t in r]
    best = float(np.sum(np.min(np.asarray(per_round), axis=0)))
    return {**stats(flat), "best_per_s": len(per_round[0]) / best if best > 0 else 0.0, "rounds": len(per_round)}


def bench_images(images: Path, request: DetectBenchRequest, progress: Any = None) -> dict[str, Any]:
    """Single-image latency/throughput of the contestants on the same files, best of ``request.repeat`` rounds."""
    if not Path(images).is_dir():
        raise InputNotFoundError(f"not a directory: {images}")
    files = list_images(Path(images))[: request.limit]
    if not files:
        raise InputNotFoundError(f"no images in {images}")
    rounds = max(1, request.repeat)
    detector = request.load()
    notes: list[str] = []
    arrays = [read_image(f) for f in files]
    prepared = [detector.prepare(a) for a in arrays]
    blobs = [batch_inputs([p[0]]) for p in prepared]
    name = detector.backend.inputs[0].name
    ultra = ultralytics_for(detector, request, notes)
    contestants_n = 3 if ultra is not None else 2
    tick = ticker(progress, "bench", len(files) * (rounds + WARMUP_PASSES) * contestants_n)
    pre, infer, post = [], [], []
    bastion_dets: list[Detections] = []
    theirs: list[Detections] = []

    def run_floor_and_bastion(reverse: bool) -> dict[str, list[float]]:
        """The floor and bastion take turns image by image: they share one session, so neither's idle threads
        slow the other, and a slow spell of the machine lands on both (the order flips with ``reverse``)."""
        floor, e2e = [], []
        bastion_dets.clear()
        for blob, f in zip(blobs, files):
            for step in (1, 0) if reverse else (0, 1):
                t = time.perf_counter()
                if step == 0:
                    detector.backend.run({name: blob})
                    floor.append(time.perf_counter() - t)
                else:
                    bastion_dets.append(detector.detect(f))
                    e2e.append(time.perf_counter() - t)
                tick()
        for image in arrays:  # the same work in memory, split into its three steps (not in the pass's time)
            t0 = time.perf_counter()
            tensor, placement = detector.prepare(image)
            blob = batch_inputs([tensor])
            t1 = time.perf_counter()
            outputs = detector.backend.run({name: blob})
            t2 = time.perf_counter()
            detector.postprocess(outputs, [placement])
            t3 = time.perf_counter()
            pre.append(t1 - t0), infer.append(t2 - t1), post.append(t3 - t2)
        return {"floor": floor, "bastion": e2e}

    def run_ultralytics(reverse: bool) -> dict[str, list[float]]:
        """A whole pass on its own: Ultralytics has its own session, and two sessions interleaved image by image
        slow each other down (each one's idle threads spin)."""
        lat = []
        theirs.clear()
        for f in files:
            t = time.perf_counter()
            res = ultra.predict(str(f))[0]
            lat.append(time.perf_counter() - t)
            theirs.append(ultra.to_detections(res, detector.names))
            tick()
        return {"ultralytics": lat}

    passes = [run_floor_and_bastion] + ([run_ultralytics] if ultra is not None else [])
    for _ in range(WARMUP_PASSES):  # untimed
        for run_pass in passes:
            run_pass(False)
    if hasattr(detector.backend, "wait_pinned"):
        detector.backend.wait_pinned()  # the shape-pinned sessions are built before the clock starts
    pre.clear(), infer.clear(), post.clear()
    timings = timed_rounds(passes, rounds)

    contestants = {key: round_stats(per_round) for key, per_round in timings.items()}
    floor_ms = contestants["floor"]["p50_ms"]
    summary: dict[str, Any] = {
        "pre_ms_p50": round(float(np.median(pre)) * 1000, 3),
        "post_ms_p50": round(float(np.median(post)) * 1000, 3),
        "infer_ms_p50": round(float(np.median(infer)) * 1000, 3),
        "pre_post_overhead_pct_of_floor": round(
            (float(np.median(pre)) + float(np.median(post))) * 1000 / floor_ms * 100, 2
        ),
        "bastion_vs_floor": round(contestants["bastion"]["best_per_s"] / contestants["floor"]["best_per_s"], 3),
    }
    versus_ultralytics(summary, contestants, "best_per_s", bastion_dets, theirs, ultra, notes)
    if ultra is not None:
        summary["bastion_vs_ultralytics_p50"] = round(
            contestants["ultralytics"]["p50_ms"] / contestants["bastion"]["p50_ms"], 3
        )
    env = environment(detector, request.threads)
    detector.close()
    return {
        "mode": "images",
        "model": detector.manifest.name,
        "model_sha256": detector.bundle_sha256,
        "input_hw": list(prepared[0][1].input_hw),
        "count": len(files),
        "repeat": request.repeat,
        "timing": f"each image best of {rounds} rounds after {WARMUP_PASSES} warm-up passes; contestants take turns",
        "conf": request.conf,
        "iou": request.iou,
        "contestants": contestants,
        "summary": summary,
        "notes": notes,
        "environment": env,
    }

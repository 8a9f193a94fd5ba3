"""``bastion bench detect --backends ort-cpu,ort-cuda,ort-trt,trt``: one bundle and the same images on each backend
of the registry, in one run; a backend this machine cannot run says what to install instead of a number."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bastion.bench_common import DetectBenchRequest, compare_detections
from bastion.bench_images import round_stats, timed_rounds
from bastion.errors import BastionError, InputNotFoundError
from bastion.hardware.backend_names import backend_name
from bastion.runtime.detect import Detector
from bastion.runtime.detections import Detections
from bastion.runtime.media import list_images, read_image


def bench_backends(images: Path, backends: list[str], request: DetectBenchRequest) -> dict[str, Any]:
    """The same bundle and images on each backend (names or aliases; an unknown one is one ConfigError line),
    timed like the images mode: best of ``repeat`` rounds per image, the backends taking turns."""
    from bastion.runtime.backends.registry import get_backend

    names = list(dict.fromkeys(backend_name(b) for b in backends))  # all checked before anything is timed
    files = list_images(Path(images))[: request.limit]
    if not files:
        raise InputNotFoundError(f"no images in {images}")
    arrays = [read_image(f) for f in files]
    results: dict[str, Any] = {}
    detectors: dict[str, Detector] = {}
    for name in names:
        try:
            detectors[name] = request.load(device=name)
        except BastionError as exc:
            results[name] = {"available": False, "reason": str(exc)}
    found: dict[str, list[Detections]] = {}

    def timed_pass(name: str, det: Detector):
        def run(reverse: bool) -> dict[str, list[float]]:
            lat, found[name] = [], []
            for image in arrays:
                t = time.perf_counter()
                found[name].append(det.detect(image))
                lat.append(time.perf_counter() - t)
            return {name: lat}

        return run

    try:  # the same method as the images mode: a warm-up pass, then rounds in which the backends take turns
        passes = [timed_pass(name, det) for name, det in detectors.items()]
        for run_pass in passes:
            run_pass(False)
        timings = timed_rounds(passes, max(1, request.repeat))
    finally:
        for det in detectors.values():
            det.close()
    reference: list[Detections] | None = None
    for name, det in detectors.items():
        results[name] = {
            "available": True,
            "providers": det.backend.providers,
            "version": get_backend(name).version(),
            "thread_safe": det.thread_safe,
            **round_stats(timings[name]),
        }
        if reference is None:
            reference = found[name]
        else:
            results[name]["agreement_with_first"] = compare_detections(found[name], reference)
    ordered = {name: results[name] for name in names}  # in the order asked
    return {
        "mode": "backends",
        "model": request.model,
        "count": len(files),
        "repeat": request.repeat,
        "backends": ordered,
    }

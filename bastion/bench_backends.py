"""``bastion bench detect --backends ort-cpu,ort-cuda,ort-trt,trt``: one bundle and the same images on each backend
of the registry, in one run; a backend this machine cannot run says what to install instead of a number."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bastion.bench_common import compare_detections, stats
from bastion.errors import BastionError, InputNotFoundError
from bastion.hardware.backend_names import backend_name
from bastion.runtime.detect import Detector
from bastion.runtime.detections import Detections
from bastion.runtime.media import list_images, read_image


def bench_backends(
    images: Path,
    model: str,
    backends: list[str],
    limit: int,
    repeat: int,
    imgsz: int | None,
    conf: float,
    iou: float,
    threads: int | None,
    allow_unsigned: bool = False,
) -> dict[str, Any]:
    """The same bundle and images on each backend (names or aliases; an unknown one is one ConfigError line)."""
    from bastion.runtime.backends.registry import get_backend

    names = [backend_name(b) for b in backends]  # every name checked before anything is timed
    files = list_images(Path(images))[:limit]
    if not files:
        raise InputNotFoundError(f"no images in {images}")
    arrays = [read_image(f) for f in files]
    results: dict[str, Any] = {}
    reference: list[Detections] | None = None
    for name in names:
        spec = get_backend(name)
        try:
            det = Detector.load(
                model, device=name, threads=threads, conf=conf, iou=iou, imgsz=imgsz, allow_unsigned=allow_unsigned
            )
        except BastionError as exc:
            results[name] = {"available": False, "reason": str(exc)}
            continue
        lat, dets = [], []
        for _ in range(max(1, repeat)):
            dets = []
            for image in arrays:
                t = time.perf_counter()
                dets.append(det.detect(image))
                lat.append(time.perf_counter() - t)
        results[name] = {
            "available": True,
            "providers": det.backend.providers,
            "version": spec.version(),
            "thread_safe": det.thread_safe,
            **stats(lat),
        }
        if reference is None:
            reference = dets
        else:
            results[name]["agreement_with_first"] = compare_detections(dets, reference)
        det.close()
    return {"mode": "backends", "model": model, "count": len(files), "repeat": repeat, "backends": results}

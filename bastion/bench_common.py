"""What every ``bastion bench detect`` mode shares: the request (``DetectBenchRequest``), timing statistics, the
run's environment, detection agreement, the Ultralytics reference (and the plain reason when it is skipped), and a
progress ticker."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bastion import __version__
from bastion.runtime.detect import Detector
from bastion.runtime.detections import Detections


@dataclass(frozen=True)
class DetectBenchRequest:
    """What ``bastion bench detect`` was asked, built once from its options and read by every mode (images, video,
    backends): one typed object, so a new threshold or flag is added in one place instead of in three copied
    parameter lists that drift apart. The defaults are the command line's."""

    model: str
    limit: int = 64
    repeat: int = 5
    imgsz: int | None = None
    conf: float = 0.25
    iou: float = 0.45
    threads: int | None = None
    with_ultralytics: bool = True
    allow_unsigned: bool = False

    def load(self, device: str = "auto", threads: int | None = None) -> Detector:
        """The asked bundle on ``device`` with the asked thresholds; ``threads`` overrides the asked count (the
        video pipeline runs single-threaded sessions, one inference per core)."""
        return Detector.load(
            self.model,
            device=device,
            threads=self.threads if threads is None else threads,
            conf=self.conf,
            iou=self.iou,
            imgsz=self.imgsz,
            allow_unsigned=self.allow_unsigned,
        )


def stats(latencies_s: list[float], wall_s: float | None = None, count: int | None = None) -> dict[str, float]:
    """Throughput (``count / wall_s``) and latency percentiles of one contestant's timed calls."""
    ms = np.asarray(latencies_s) * 1000
    n = count if count is not None else len(latencies_s)
    wall = wall_s if wall_s is not None else float(np.sum(latencies_s))
    result = {"per_s": n / wall if wall > 0 else 0.0, "wall_s": wall, "count": n}
    if len(ms):
        result.update(
            p50_ms=float(np.percentile(ms, 50)), p99_ms=float(np.percentile(ms, 99)), mean_ms=float(ms.mean())
        )
    return result


def environment(detector: Detector, threads: int | None) -> dict[str, Any]:
    import onnxruntime

    return {
        "bastion": __version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": threads,
        "providers": detector.backend.providers,
    }


def compare_detections(ours: list[Detections], theirs: list[Detections], iou_min: float = 0.9) -> dict[str, Any]:
    """How far two contestants' detections agree: count parity and box/score differences of matched pairs."""
    same_count = 0
    matched = total = 0
    max_box, max_conf = 0.0, 0.0
    for a, b in zip(ours, theirs):
        same_count += len(a) == len(b)
        total += max(len(a), len(b))
        for i in range(len(a)):
            same = np.nonzero(b.cls == a.cls[i])[0]
            if not len(same):
                continue
            diff = np.abs(b.xyxy[same] - a.xyxy[i]).max(axis=1)
            j = same[int(np.argmin(diff))]
            if diff.min() < 2.0:
                matched += 1
                max_box = max(max_box, float(diff.min()))
                max_conf = max(max_conf, float(abs(b.conf[j] - a.conf[i])))
    return {
        "images": len(ours),
        "same_count_images": same_count,
        "matched": matched,
        "total": total,
        "max_box_diff_px": round(max_box, 3),
        "max_conf_diff": round(max_conf, 5),
    }


class UltralyticsContestant:
    """YOLO(model.onnx) from Ultralytics, configured offline by bastion.distill.ultra."""

    def __init__(self, model_path: Path, imgsz: int, conf: float, iou: float) -> None:
        from bastion.distill.ultra import load_ultralytics

        ultralytics = load_ultralytics()
        self.version = ultralytics.__version__
        self.model = ultralytics.YOLO(str(model_path), task="detect")
        self.kwargs = dict(imgsz=imgsz, conf=conf, iou=iou, verbose=False, device="cpu")

    def predict(self, source: Any, **extra: Any) -> Any:
        return self.model.predict(source, **self.kwargs, **extra)

    @staticmethod
    def to_detections(result: Any, names: list[str]) -> Detections:
        boxes = result.boxes
        return Detections(
            boxes.xyxy.numpy().astype(np.float32),
            boxes.conf.numpy().astype(np.float32),
            boxes.cls.numpy().astype(np.int64),
            names,
        )


def why_no_ultralytics(detector: Detector, model: str, enabled: bool) -> str | None:
    """None when Ultralytics can be the reference for ``model``, else the plain reason it is skipped."""
    if not enabled:
        return "Ultralytics reference skipped: --no-ultralytics"
    if not (model.endswith(".onnx") and detector.manifest.decoder.type == "yolov8"):
        return (
            f"Ultralytics reference skipped: {detector.manifest.name} is in {detector.manifest.decoder.type} layout "
            "and Ultralytics' YOLO() runs only Ultralytics-layout (yolov8/yolo11 head) .onnx files — bastion is "
            "timed against its floor only; for the comparison pass such a file with --model FILE.onnx "
            "--allow-unsigned (scripts/yolov5_as_ultralytics_onnx.py converts yolov5n)"
        )
    from bastion.distill.ultra import ultralytics_available

    if not ultralytics_available():
        return "Ultralytics reference skipped: it is not installed (pip install 'bastion[distill]' to compare)"
    return None


def ultralytics_for(detector: Detector, request: DetectBenchRequest, notes: list[str]) -> UltralyticsContestant | None:
    """The Ultralytics contestant on the request's file and thresholds (at the detector's input size), or None with
    the reason appended to ``notes``."""
    reason = why_no_ultralytics(detector, request.model, request.with_ultralytics)
    if reason is not None:
        notes.append(reason)
        return None
    return UltralyticsContestant(Path(request.model), max(detector.size), request.conf, request.iou)


def versus_ultralytics(
    summary: dict[str, Any],
    contestants: dict[str, dict[str, float]],
    rate: str,
    ours: list[Detections],
    theirs: list[Detections],
    ultra: UltralyticsContestant | None,
    notes: list[str],
) -> None:
    """The Ultralytics lines of a bench summary, the same in every mode: speed ratio on ``rate`` (each mode's
    own throughput key), detection agreement and version — or, when it was skipped, why."""
    if ultra is None:
        summary["ultralytics"] = notes[-1]  # skipped, and why
        return
    summary["bastion_vs_ultralytics"] = round(contestants["bastion"][rate] / contestants["ultralytics"][rate], 3)
    summary["agreement"] = compare_detections(ours, theirs)
    summary["ultralytics_version"] = ultra.version


def ticker(progress: Any, label: str, total: int) -> Callable[[], None]:
    if progress is None:
        return lambda: None
    task = progress.add_task(label, total=total)
    return lambda: progress.advance(task)

"""The candidates of a detector distillation: how each is measured, timed and which one ships.

Every candidate — the full teacher, the teacher at the target size, the sliced teacher, the trained student, INT8
of those the gate passed — is scored with the same evaluation settings on the same held-out images, then timed
together: best-of-N rounds that *take turns* between candidates (A, B, C, A, B, C, …), so a busy moment on the
machine slows all of them alike instead of the one that happened to be running.

What ships (``choose``) must not flip on timing noise: latencies within ``LATENCY_TIE`` (10 %) of the fastest count
as equal, and among equals the more accurate candidate wins (mAP50 to 3 decimals, then the smaller file, then the
name). A real difference in speed still decides.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bastion.distill.evaluate import REPORT_BOOTSTRAP, EvalReport, EvalSettings, evaluate_detector
from bastion.models.bundle import Bundle
from bastion.runtime.detect import Detector

# How every candidate is scored: low threshold for mAP, NMS IoU 0.6, multi-label, no up-scaling, square inputs.
# One place, so the detector options, the evaluation and the settings a shipped manifest records cannot drift.
EVAL_CONF = 0.001
EVAL_IOU = 0.6
LATENCY_TIE = 0.10  # latencies within 10 % of the fastest are a tie: the more accurate candidate ships
TIMING_ROUNDS = 5  # best-of-N: each round times every candidate on the same images, in turn
TIMING_IMAGES = 8  # held-out images per round (5 × 8 detections each: the demo pays this on every candidate)


def eval_settings(imgsz: int) -> EvalSettings:
    """The evaluation every candidate gets (with the bootstrap interval on mAP50)."""
    return EvalSettings(imgsz=imgsz, conf=EVAL_CONF, iou=EVAL_IOU, rect=False, bootstrap=REPORT_BOOTSTRAP)


def manifest_settings(imgsz: int) -> dict[str, Any]:
    """What a shipped bundle's ``evaluation`` entries record about how they were measured."""
    return {"imgsz": imgsz, "conf": EVAL_CONF, "iou": EVAL_IOU, "rect": False, "held_out": True}


def open_for_eval(bundle: Bundle, imgsz: int) -> Detector:
    """On the CPU with one thread (a fair, repeatable comparison, as the field node serves), the evaluation
    options, no warm-up of its own; built from the model's bytes as hashed now (``Detector.from_bundle``)."""
    return Detector.from_bundle(
        bundle,
        device="ort-cpu",
        threads=1,
        warmup=False,
        conf=EVAL_CONF,
        iou=EVAL_IOU,
        multi_label=True,
        scaleup=False,
        imgsz=imgsz,
        rect=False,
    )


@dataclass
class Candidate:
    """One model the run could ship, as measured in this run (``latency_ms`` is filled by ``time_candidates``)."""

    name: str  # e.g. "sliced@320", "student-int8@320"
    kind: str  # "teacher" (the reference, never shipped), "sliced teacher (no training)", "student, INT8", …
    imgsz: int
    map50: float
    map50_95: float
    per_class: dict[str, dict[str, float]]
    bundle: str  # "baselines/<dir>" for a bundle this run made, else the teacher reference as given
    size_mb: float
    map50_interval: dict[str, Any] | None = None
    latency_ms: float = 0.0  # best of the timing rounds, ms per image, 1 thread
    latency_rounds: list[float] = field(default_factory=list)

    @property
    def is_teacher(self) -> bool:
        return self.kind == "teacher"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Candidate":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_report(cls, name: str, kind: str, imgsz: int, report: EvalReport, bundle: str, model: Path):
        return cls(
            name=name,
            kind=kind,
            imgsz=imgsz,
            map50=report.map50,
            map50_95=report.map50_95,
            per_class=report.per_class,
            bundle=bundle,
            size_mb=model_mb(model),
            map50_interval=report.to_dict()["map50_interval"],
        )


def model_mb(model_file: Path) -> float:
    return round(Path(model_file).stat().st_size / 1e6, 2)


def measure_candidate(
    bundle: Bundle, imgsz: int, dataset, name: str, kind: str, ref: str, class_map: dict[int, int] | None = None
) -> Candidate:
    """Open, evaluate on the held-out set (bootstrap interval included), close: one candidate's accuracy."""
    det = open_for_eval(bundle, imgsz)
    try:
        report = evaluate_detector(det, dataset, eval_settings(imgsz), class_map=class_map)
    finally:
        det.close()
    return Candidate.from_report(name, kind, imgsz, report, ref, bundle.model_path)


def interleaved_rounds(
    runners: dict[str, Callable[[np.ndarray], Any]],
    images: list[np.ndarray],
    rounds: int = TIMING_ROUNDS,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Median ms per image of each runner in each round; rounds take turns between runners (A, B, C, A, B, C…)."""
    for run in runners.values():  # warm-up: first-call allocations are not what the field node pays
        run(images[0])
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            per_image = []
            for image in images:
                start = clock()
                run(image)
                per_image.append(clock() - start)
            times[name].append(statistics.median(per_image) * 1000)
    return times


def time_candidates(
    candidates: list[Candidate], bundles: dict[str, Bundle], images: list[np.ndarray], rounds: int = TIMING_ROUNDS
) -> None:
    """Time every candidate together (``bundles``: name → its bundle), best of ``rounds`` rounds taken in turn;
    sets ``latency_ms`` and ``latency_rounds`` on each."""
    detectors = {c.name: open_for_eval(bundles[c.name], c.imgsz) for c in candidates}
    try:
        times = interleaved_rounds({name: det.detect for name, det in detectors.items()}, images, rounds)
    finally:
        for det in detectors.values():
            det.close()
    for c in candidates:
        c.latency_rounds = [round(t, 2) for t in times[c.name]]
        c.latency_ms = min(c.latency_rounds)


def choose(
    candidates: list[Candidate],
    min_map50: float,
    max_latency_ms: float | None,
    max_map50_drop: float | None,
    tie: float = LATENCY_TIE,
) -> Candidate | None:
    """What ships: among the non-teacher candidates meeting the constraints, the most accurate; with
    ``max_map50_drop``, the fastest within that many points of the most accurate candidate *of all* (the full
    teacher included: it is the reference, never the product of a distillation run). Either way latencies within
    ``tie`` of the fastest are equal, and among equals the more accurate wins (then the smaller file, the name)."""
    ok = [c for c in candidates if c.map50 >= min_map50 and (max_latency_ms is None or c.latency_ms <= max_latency_ms)]
    pool = [c for c in ok if not c.is_teacher]
    if pool and max_map50_drop is not None:
        best = max(c.map50 for c in ok)
        pool = [c for c in pool if round(c.map50 - (best - max_map50_drop / 100), 9) >= 0]
        pool = _as_fast_as_the_fastest(pool, tie)
    if not pool:
        return None
    top = max(round(c.map50, 3) for c in pool)
    return min(
        _as_fast_as_the_fastest([c for c in pool if round(c.map50, 3) == top], tie), key=lambda c: (c.size_mb, c.name)
    )


def _as_fast_as_the_fastest(pool: list[Candidate], tie: float) -> list[Candidate]:
    if not pool:
        return pool
    fastest = min(c.latency_ms for c in pool)
    return [c for c in pool if c.latency_ms <= fastest * (1 + tie)]


CHOICE_RULE = (
    f"latencies within {LATENCY_TIE:.0%} of the fastest count as a tie, and among tied candidates the higher mAP50 "
    "ships (then the smaller file); timing is the best of "
    f"{TIMING_ROUNDS} rounds taken in turn over {TIMING_IMAGES} held-out images"
)

"""``bastion distill detect``: teachers → pseudo-labels → candidates measured in one run → report → bundle.

It builds the labelled dataset (``labels/data.yaml`` + ``labels/soft/``), measures every candidate a user can
get without training (the teacher at full and at the target size, the teacher with its head sliced to the
mission's classes, and INT8 of each where the gate passes it) beside the students it trains (Ultralytics, warm
started), ships the best one that meets the constraints (``candidates.choose``: a near-tie in latency never flips
the choice), and says so plainly in the report — including what the ground truth was.

``run_distill`` is the stage list; each stage is a function over the run's ``DetectRunDir`` (``detect_stages`` for
teachers, labels and student; here the candidates and the report).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from bastion.distill.candidates import (
    CHOICE_RULE,
    TIMING_IMAGES,
    Candidate,
    choose,
    measure_candidate,
    model_mb,
    time_candidates,
)
from bastion.distill.classmap import ClassMap
from bastion.distill.datasets import YoloDataset, load_data_yaml
from bastion.distill.detect_bundles import ship_bundle, sliced_bundle, student_bundle
from bastion.distill.detect_report import ap50_cell, figures, ground_truth, report_md
from bastion.distill.detect_stages import STAGE_COUNT, class_maps, make_labels, open_teachers, train
from bastion.distill.evaluate import REPORT_BOOTSTRAP
from bastion.distill.progress import RunProgress, Tick
from bastion.distill.run import DetectRunDir
from bastion.distill.spec import DistillSpec
from bastion.models.bundle import Bundle
from bastion.runtime.media import read_image

__all__ = ["STAGES", "DistillSpec", "run_distill", "choose", "ap50_cell", "Candidate"]
log = logging.getLogger(__name__)
STAGES = DetectRunDir.STAGES


def run_distill(spec: DistillSpec, sign_key=None, progress: Tick | None = None) -> dict[str, Any]:
    """Run (or resume) every stage; returns the report (``RUN/report/report.json``) plus ``shipped_bundle``."""
    run = DetectRunDir(spec.out, spec.force)
    run.record("spec", spec.model_dump(mode="json"))
    shown = RunProgress(progress)
    teachers = open_teachers(spec, run, shown)
    maps = class_maps(spec, teachers)
    make_labels(spec, run, teachers, maps, shown)
    dataset = load_data_yaml(run.data_yaml, "val")
    train(spec, run, shown)
    measure_candidates(spec, run, teachers, maps, dataset, shown)
    chosen = write_report(spec, run, maps, dataset, shown)
    if chosen is not None and not chosen.is_teacher:
        ship_bundle(run.root / chosen.bundle, run.bundle, sign_key, chosen, dataset, run.dataset_json, spec.markings)
        run.state["stages"]["report"]["result"]["shipped_bundle"] = str(run.bundle)
        run.record("stages", run.state["stages"])
        shown.line(f"distill: shipped {chosen.name} → {run.bundle}" + ("" if sign_key else " (unsigned)"))
    return run.result("report")


def measure_candidates(
    spec: DistillSpec,
    run: DetectRunDir,
    teachers: list[Bundle],
    maps: list[ClassMap],
    dataset: YoloDataset,
    progress: RunProgress,
) -> None:
    """Stage 4: every candidate scored on the held-out set, INT8 through the gate, then all timed together."""
    if run.done("baselines"):
        progress.stage(4, STAGE_COUNT, "candidates", "cached")
        return
    teacher = teachers[0]
    sizes = sorted({int(teacher.manifest.input.size[0]), spec.imgsz}, reverse=True)
    progress.stage(
        4, STAGE_COUNT, "candidates", f"scoring every candidate on {len(dataset.images)} held-out images, then timing"
    )
    step = progress.bar("measure candidates", len(sizes) + 3)
    with run.stage("baselines") as (stage, result):
        candidates, bundles = [], {}
        for size in sizes:
            c = measure_candidate(
                teacher, size, dataset, f"teacher@{size}", "teacher", spec.teachers[0], maps[0].to_student
            )
            candidates.append(c)
            bundles[c.name] = teacher
            step()
        sliced = sliced_bundle(teacher, maps[0], spec, stage / f"sliced-{spec.imgsz}")
        c = measure_candidate(
            sliced, spec.imgsz, dataset, f"sliced@{spec.imgsz}", "sliced teacher (no training)", _ref(sliced)
        )
        candidates.append(c)
        bundles[c.name] = sliced
        int8_from = [("sliced", sliced)]
        if run.done("student"):
            trained = run.result("student")
            student = student_bundle(
                run.student / trained["onnx"], spec, teachers, stage / f"student-{spec.imgsz}", trained
            )
            what = f"trained student ({spec.train.student})" if spec.train else "trained student"
            c = measure_candidate(student, spec.imgsz, dataset, f"student@{spec.imgsz}", what, _ref(student))
            candidates.append(c)
            bundles[c.name] = student
            int8_from.append(("student", student))
        step()
        if spec.int8:
            result["int8_gate"] = _int8_candidates(progress, spec, run, stage, int8_from, dataset, candidates, bundles)
        step()
        sample = [read_image(p) for p in dataset.images[:TIMING_IMAGES]]
        time_candidates(candidates, bundles, sample)
        step()
        result["candidates"] = [c.to_dict() for c in candidates]


def _int8_candidates(
    progress: RunProgress,
    spec: DistillSpec,
    run: DetectRunDir,
    stage: Path,
    sources: list[tuple[str, Bundle]],
    dataset: YoloDataset,
    candidates: list[Candidate],
    bundles: dict[str, Bundle],
) -> dict[str, Any]:
    """INT8 of each FP32 source through the accuracy gate; each accepted one joins the candidates."""
    from bastion.distill.int8_gate import quantize_and_gate

    calibration = sorted(run.train_images.iterdir())[:32]  # training images only: the held-out set stays unseen
    gates = {}
    for label, source in sources:
        name = f"{label}-int8-{spec.imgsz}"
        gate = quantize_and_gate(
            source,
            calibration,
            dataset,
            spec.imgsz,
            spec.max_int8_drop,
            stage / name,
            bootstrap=REPORT_BOOTSTRAP,
            target=spec.int8_target,
            tick=progress.bar(f"INT8 gate ({label}: quantize, score, time)", 2),
        )
        gates[label] = gate.to_dict()
        if gate.accepted:
            # the gate's INT8 bundle carries its FP32 parent as a sibling (int8_gate's fp32_sibling), so copying
            # it to RUN/bundle when it ships keeps the fallback the field node needs
            int8 = Bundle.open_fresh(stage / name)
            c = Candidate(
                name=f"{label}-int8@{spec.imgsz}",
                kind=f"{label}, INT8",
                imgsz=spec.imgsz,
                map50=gate.int8["map50"],
                map50_95=gate.int8["map50_95"],
                per_class=gate.int8["per_class"],
                bundle=f"baselines/{name}",
                size_mb=model_mb(int8.model_path),
                map50_interval=gate.int8.get("map50_interval"),
            )
            candidates.append(c)
            bundles[c.name] = int8
    return gates


def _ref(bundle: Bundle) -> str:
    """Where a bundle made in the baselines stage will live once the stage is renamed into place."""
    return f"baselines/{bundle.root.name}"


def write_report(
    spec: DistillSpec, run: DetectRunDir, maps: list[ClassMap], dataset: YoloDataset, progress: RunProgress
) -> Candidate | None:
    """Stage 5: choose what ships, write report.md/report.json and the figures. Always re-run (it is cheap)."""
    progress.stage(5, STAGE_COUNT, "report", "choosing what ships and writing the report")
    candidates = [Candidate.from_dict(c) for c in run.result("baselines")["candidates"]]
    chosen = choose(candidates, spec.min_map50, spec.max_latency_ms, spec.max_map50_drop)
    labels = run.result("labels")
    with run.stage("report") as (stage, result):
        trained = run.result("student") if run.done("student") else None
        result.update(
            candidates=[c.to_dict() for c in candidates],
            chosen=chosen.name if chosen else None,
            choice_rule=CHOICE_RULE,
            labels=labels,
            ground_truth=ground_truth(spec, run, labels["val"]),
            int8_gate=run.result("baselines").get("int8_gate"),
            student=_student_line(spec, candidates, trained),
            training=trained,
        )
        result["figures"] = figures(stage, spec, candidates, dataset, chosen, run, sorted(maps[0].to_student))
        (stage / "report.md").write_text(report_md(spec, result, candidates))
        (stage / "report.json").write_text(json.dumps(result, indent=2, default=str))
    return chosen


def _student_line(spec: DistillSpec, candidates: list[Candidate], trained: dict | None) -> str:
    """How the student was trained, and whether a no-training candidate beat it outright."""
    if not trained:
        return "not trained (training was not requested)"
    line = (
        f"{trained['student']}, {trained['epochs']} epochs, warm start "
        f"{trained.get('warm_start_copied', 0)}/{trained.get('student_tensors', '?')} tensors"
    )
    student = next((c for c in candidates if c.name == f"student@{spec.imgsz}"), None)
    if student is not None:
        better = [
            c.name
            for c in candidates
            if not c.is_teacher
            and not c.name.startswith("student")
            and c.map50 >= student.map50
            and c.latency_ms <= student.latency_ms
        ]
        if better:
            line += f". A no-training baseline beats the trained student: {', '.join(better)}"
    return line

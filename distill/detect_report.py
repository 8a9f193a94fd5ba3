"""What a detector distillation run reports: report.md, its figures, and the ground truth it was scored on."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from bastion.distill.candidates import Candidate
from bastion.distill.run import DetectRunDir
from bastion.distill.spec import DistillSpec
from bastion.models.bundle import Bundle
from bastion.models.manifest import files_sha256
from bastion.runtime.detect import Detector
from bastion.runtime.media import read_image

log = logging.getLogger(__name__)


def ground_truth(spec: DistillSpec, run: DetectRunDir, held_out: int) -> dict[str, Any]:
    """What the held-out set is: a separate labelled set (--val-images/--val-labels), the labelled share of
    --images (--labels), or pseudo-labels; its label files' path and sha256 (the files as given, in name order)
    and image count. Labels a person gave are reported as hand-labelled, the teachers' as pseudo-labelled."""
    stems = sorted(p.stem for p in run.held_out_images.iterdir()) if run.held_out_images.is_dir() else []
    if spec.val_images is not None:
        labels_dir, source = spec.val_labels, f"a separate held-out set, {spec.val_images}"
    elif spec.labels is not None:
        labels_dir, source = spec.labels, f"the held-out share of the labelled images in {spec.images}"
    else:
        labels_dir, source = None, f"the held-out share of {spec.images}"
    files = [labels_dir / f"{stem}.txt" for stem in stems] if labels_dir else []
    files = [f for f in files if f.is_file()]
    return {
        "kind": "hand-labelled" if labels_dir is not None else "pseudo-labelled",
        "source": source,
        "images": held_out,
        "images_path": str(spec.val_images or spec.images),
        "labels_path": str(labels_dir) if labels_dir else None,
        "label_files": len(files),
        "labels_sha256": files_sha256(files) if files else None,
    }


def per_class_series(candidates: list[Candidate], classes: list[str]) -> dict[str, list[float | None]]:
    """AP50 per class for each scored candidate; None where the held-out set has no labels of that class (the
    evaluator leaves it out), so the chart says "no labels" instead of drawing a 0.00 bar that claims a score."""
    return {c.name: [c.per_class.get(k, {}).get("ap50") for k in classes] for c in candidates if c.per_class}


def figures(
    stage: Path,
    spec: DistillSpec,
    candidates: list[Candidate],
    dataset,
    chosen: Candidate | None,
    run: DetectRunDir,
    teacher_ids: list[int],
) -> dict[str, str]:
    """scatter.png, per_class.png, training.png (if a student trained), detections.jpg (the chosen model)."""
    import csv

    from bastion.distill import charts
    from bastion.runtime.outputs import contact_sheet, save_image

    figures = {
        "scatter": charts.scatter(
            [c.to_dict() for c in candidates], stage / "scatter.png", "speed vs accuracy (held-out)"
        ).name
    }
    series = per_class_series(candidates, spec.classes)
    if series:
        figures["per_class"] = charts.bars(spec.classes, series, stage / "per_class.png", "AP50 per class").name
    results = run.student / "train" / "results.csv" if run.done("student") else None
    if results is not None and results.is_file():
        rows = [{k.strip(): v for k, v in r.items()} for r in csv.DictReader(results.open())]
        epochs = [float(r["epoch"]) for r in rows]
        curves = {
            k: [float(r[k]) for r in rows]
            for k in ("train/box_loss", "train/cls_loss", "val/box_loss")
            if rows and k in rows[0]
        }
        if curves:
            figures["training"] = charts.lines(
                epochs, curves, stage / "training.png", "student training", "epoch", "loss"
            ).name
    if chosen is not None:
        bundle = chosen.bundle
        try:  # every candidate but the teacher itself is a bundle this run wrote, under baselines/
            det = (
                Detector.from_bundle(Bundle.open_fresh(run.root / bundle), warmup=False)
                if bundle.startswith("baselines/")
                else Detector.load(bundle, allow_unsigned=spec.allow_unsigned, warmup=False)
            )
        except Exception as exc:  # a figure must never fail the run
            log.warning("no detection grid: %s", exc)
            return figures
        keep = teacher_ids if chosen.is_teacher else None  # a full teacher: show the mission's classes
        tiles, empty = [], []
        for p in dataset.images[:32]:  # prefer held-out images where the model finds something
            image = read_image(p)
            found = det.detect(image).filter(classes=keep)
            (tiles if len(found) else empty).append(found.draw(image))
            if len(tiles) == 8:
                break
        tiles = (tiles + empty)[:8]
        det.close()
        if tiles:
            save_image(stage / "detections.jpg", contact_sheet(tiles, columns=4, tile_width=320))
            figures["detections"] = "detections.jpg"
    return figures


def interval_text(candidate: Candidate) -> str:
    """' (0.41–0.52)': the 90 % bootstrap interval of mAP50 over the held-out images, where measured."""
    ci = candidate.map50_interval
    return f" ({ci['low']:.2f}–{ci['high']:.2f})" if ci else ""


def ap50_cell(candidate: dict[str, Any] | Candidate, name: str) -> str:
    """AP50 of one class as a table cell; '—' where the held-out set has no box of that class."""
    per_class = candidate.per_class if isinstance(candidate, Candidate) else candidate.get("per_class", {})
    row = per_class.get(name) or {}
    value = row.get("ap50")
    return "—" if value is None or value != value or not row.get("instances", 1) else f"{value:.3f}"


def int8_speed_note(label: str, candidates: list[Candidate], imgsz: int) -> str:
    """The INT8 speed-up as the table shows it: both latencies from the same interleaved timing rounds. The gate's
    reason carries its own figure, timed alone on its own images; a reader comparing it with the table would see
    two numbers for one fact, so the table's is stated beside it and is the one to believe."""
    by_name = {c.name: c for c in candidates}
    int8, fp32 = by_name.get(f"{label}-int8@{imgsz}"), by_name.get(f"{label}@{imgsz}")
    if int8 is None or fp32 is None or int8.latency_ms <= 0 or fp32.latency_ms <= 0:
        return ""
    return (
        f" In the table's timing (same rounds): INT8 {int8.latency_ms:.1f} ms vs FP32 {fp32.latency_ms:.1f} ms, "
        f"{fp32.latency_ms / int8.latency_ms:.2f}× (the gate's own figure was timed alone)."
    )


def report_md(spec: DistillSpec, result: dict[str, Any], candidates: list[Candidate]) -> str:
    """report.md: what was measured on what, every candidate in one table, what ships and by which rule."""
    from bastion.models.manifest import report_line

    labels, truth = result["labels"], result["ground_truth"]
    lines = [
        f"# Distillation report: {', '.join(spec.classes)}",
        "",
        f"Teachers: {', '.join(spec.teachers)}. Images: {labels['images']} ({labels['ground_truth']} with ground "
        f"truth, {labels['pseudo']} pseudo-labelled, {len(labels['corrupt'])} unreadable skipped).",
        "",
        f"Ground truth: {ground_truth_line(truth)}",
        "",
        "| candidate | input | mAP50 | mAP50-95 | latency ms (1 thread) | vs full teacher: speed, mAP50 kept | MB | "
        + " | ".join(f"AP50 {k}" for k in spec.classes)
        + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(spec.classes),
    ]
    full = max((c for c in candidates if c.is_teacher), key=lambda c: c.imgsz, default=None)
    ships = any(c.name == result["chosen"] and not c.is_teacher for c in candidates)  # what run_distill ships
    for c in sorted(candidates, key=lambda c: c.latency_ms):
        mark = " **← ships**" if c.name == result["chosen"] else ""
        per_class = " | ".join(ap50_cell(c, k) for k in spec.classes)
        versus = (
            f"{full.latency_ms / c.latency_ms:.1f}×, {100 * c.map50 / full.map50:.0f} %"
            if full and full.map50 > 0 and c.latency_ms > 0
            else "–"
        )
        lines.append(
            f"| {c.name}{mark} | {c.imgsz} | {c.map50:.3f}{interval_text(c)} | {c.map50_95:.3f} | "
            f"{c.latency_ms:.1f} | {versus} | {c.size_mb:.1f} | {per_class} |"
        )
    absent = [k for k in spec.classes if not labels["boxes_per_class"].get(k)]
    if absent:
        lines += [
            "",
            f"No labelled boxes of {', '.join(absent)} at all, so no AP for it (—): the teachers found none "
            "above the threshold. Imagery unlike the teachers' training data (e.g. cars seen from "
            "directly above) needs some ground truth or a better teacher.",
        ]
    gates = result.get("int8_gate") or {}
    lines += [""]
    for k, g in gates.items():
        lines.append(
            f"INT8 gate ({k}): {g['reason']}"
            + (f" INT8 for {g['target']}: {g['note']}." if g.get("note") else "")
            + int8_speed_note(k, candidates, spec.imgsz)
        )
        lines += verdict_lines(k, g)
    lines += [
        "",
        f"Student: {result['student']}.",
        f"Chosen: {result['chosen'] or 'none meets the constraints'} ({result['choice_rule']}).",
        "",
        report_line(spec.markings) if ships else "Markings: nothing ships from this run (no student beat the rule).",
        "",
    ]
    titles = {
        "scatter": "Speed vs accuracy",
        "per_class": "AP50 per class",
        "training": "Training curves",
        "detections": "The chosen model on held-out images",
    }
    for key, name in result.get("figures", {}).items():
        lines += [f"![{titles.get(key, key)}]({name})", ""]
    return "\n".join(lines) + "\n"


def verdict_lines(label: str, gate: dict[str, Any]) -> list[str]:
    """The INT8 verdict signed into the gate's bundle (``Int8Verdict.summary``: recipe, where it was measured, the
    target, where it holds, provider, ONNX Runtime, the sets' hashes, drop and speed-up) as a Markdown list; none
    for a refused gate (no bundle, no verdict)."""
    from bastion.models.manifest import Int8Verdict

    if not gate.get("int8_verdict"):
        return []
    summary = Int8Verdict.model_validate(gate["int8_verdict"]).summary()
    return ["", f"Signed INT8 verdict ({label}):", ""] + [f"- {line}" for line in summary.splitlines()] + [""]


def ground_truth_line(truth: dict[str, Any]) -> str:
    """One sentence: what the candidates were scored on, and what that means for the numbers."""
    if truth["kind"] == "pseudo-labelled":
        return (
            f"{truth['images']} held-out images, **pseudo-labelled** by the teachers (no ground truth given: scores "
            "measure agreement with the teachers, not correctness; give --val-images/--val-labels)."
        )
    labels = f"; labels {truth['labels_path']}" if truth["labels_path"] else ""
    digest = f" (sha256 {truth['labels_sha256'][:12]}…)" if truth["labels_sha256"] else ""
    return f"{truth['images']} held-out images, {truth['kind']}: {truth['source']}{labels}{digest}; never trained on."

"""The demo's ``report.html`` and ``report.md``: what this run did, every number once.

One page, images inline, nothing fetched. The rule that keeps it from contradicting itself: every number a chart
shows is the number the text or the table beside it prints, taken from the same field of the run's summary (the
latency marks, the per-class AP, the INT8 timing); no chart or sentence computes a statistic of its own.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f5f6f8;color:#1d2330}
header{background:#1d2330;color:#fff;padding:24px 40px}header h1{margin:0;font-size:26px}
header p{margin:6px 0 0;color:#b8c0cc}main{max-width:1100px;margin:0 auto;padding:24px 40px}
section{background:#fff;border-radius:8px;padding:20px 24px;margin:0 0 20px;box-shadow:0 1px 3px #0001}
h2{margin:0 0 12px;font-size:19px}table{border-collapse:collapse;width:100%;font-size:14px;margin:8px 0}
th,td{padding:6px 10px;border-bottom:1px solid #e3e6eb;text-align:left}th{background:#f0f2f5}
td.num{text-align:right;font-variant-numeric:tabular-nums}.ship{background:#e7f5ea;font-weight:600}
.ok{color:#1b7f3b;font-weight:600}.bad{color:#b42318;font-weight:600}img,video{max-width:100%;border-radius:4px}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:12px}.muted{color:#6b7380;font-size:13px}
code{background:#f0f2f5;padding:1px 5px;border-radius:3px}
"""
STEPS = "distill → sign → detect → serve → subscribe → verify"
STEPS_SKIPPED = "detect → serve → subscribe → verify"


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return ""
    mime = "image/png" if path.suffix == ".png" else "image/jpeg"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:{mime};base64,{data}">'


def _status(ok: bool, yes: str, no: str) -> str:
    return f'<span class="ok">{yes}</span>' if ok else f'<span class="bad">{no}</span>'


def ap50(candidate: dict, name: str) -> float | None:
    """AP50 of one class, or None where the held-out set has no box of it (no score exists, not a zero)."""
    row = (candidate.get("per_class") or {}).get(name) or {}
    value = row.get("ap50")
    if value is None or not math.isfinite(value) or not row.get("instances", 1):
        return None
    return float(value)


def _ap50_cell(candidate: dict, name: str) -> str:
    value = ap50(candidate, name)
    return "<span class=muted>no labels</span>" if value is None else f"{value:.3f}"


def _interval(c: dict) -> str:
    ci = c.get("map50_interval")
    return f" <span class=muted>({ci['low']:.2f}–{ci['high']:.2f})</span>" if ci else ""


def ratio_text(fp32_ms: float, int8_ms: float) -> str:
    """'1.36× faster' / '1.12× slower': INT8 against FP32, from the two latencies the table shows."""
    if fp32_ms <= 0 or int8_ms <= 0:
        return "not timed"
    r = fp32_ms / int8_ms
    return f"{r:.2f}× faster" if r >= 1 else f"{1 / r:.2f}× slower"


def int8_lines(report: dict) -> list[str]:
    """One line per INT8 gate. A kept INT8 model is a row of the table: its speed is told from the table's two
    latencies (the gate's own quick timing can disagree with them, and a report must not print both). A refused
    one is not in the table: the gate's numbers are all there is, and the line says whose they are."""
    by_name = {c["name"]: c for c in report.get("candidates", [])}
    lines = []
    for label, g in (report.get("int8_gate") or {}).items():
        size = g.get("imgsz")
        fp32, int8 = by_name.get(f"{label}@{size}"), by_name.get(f"{label}-int8@{size}")
        drop = g.get("map50_drop_points")
        accuracy = f"mAP50 {g['int8']['map50']:.3f} vs {g['fp32']['map50']:.3f} FP32" if g.get("int8") else ""
        if g.get("accepted") and fp32 and int8:
            lines.append(
                f"INT8 of {label}: kept as {int8['name']} — {accuracy} ({drop:.1f} points lost); in the table "
                f"{int8['latency_ms']:.1f} vs {fp32['latency_ms']:.1f} ms, "
                f"{ratio_text(fp32['latency_ms'], int8['latency_ms'])} than FP32"
            )
        else:
            lines.append(
                f"INT8 of {label}: refused by the gate — {accuracy}"
                + (f" ({drop:.1f} points lost)" if drop is not None else "")
                + (f", {g['speedup']:.2f}× FP32's speed in the gate's own timing" if g.get("speedup") else "")
                + "; not a candidate, so not in the table"
            )
        if g.get("int8_verdict"):  # what the kept INT8 bundle's signed manifest says of where it was measured
            from bastion.models.manifest import Int8Verdict

            summary = Int8Verdict.model_validate(g["int8_verdict"]).summary()
            lines.append(f"INT8 verdict of {label}, signed in its bundle: " + "; ".join(summary.splitlines()))
    return lines


def truth_line(d: dict) -> str:
    """What the candidates were scored on, in one sentence (hand labels or the teacher's own)."""
    report, gt = d["report"], d.get("ground_truth")
    held = report["labels"]["val"]
    if gt and (report.get("ground_truth") or {}).get("kind", "hand-labelled") == "hand-labelled":
        boxes = ", ".join(f"{n} {k}" for k, n in sorted(gt["boxes"].items())) or "no boxes"
        return (
            f"Scored on <b>{held} hand-labelled frames</b> of the same clips (<code>{html.escape(gt['path'])}</code>: "
            f"{boxes}; {gt['empty']} frames with nothing in them), held out from training: no training frame is "
            f"within {gt['gap'] - 1} frames of a scored one."
        )
    return (
        f"Scored on {held} held-out frames <b>pseudo-labelled by the teacher</b>: mAP here measures agreement "
        "with the teacher, not correctness."
    )


def per_class_chart(report: dict, path: Path) -> Path | None:
    """AP50 per class from the table's own cells: a class with no labels gets no bar ('no labels')."""
    from bastion.distill.charts import bars

    classes = list(report["labels"]["boxes_per_class"])
    series = {c["name"]: [ap50(c, k) for k in classes] for c in report.get("candidates", [])}
    return bars(classes, series, path, "AP50 per class (held-out frames)") if series else None


def _distill_section(d: dict, run: Path) -> str:
    report = d["report"]
    classes = list(report["labels"]["boxes_per_class"])
    rows = "".join(
        f"<tr class='{'ship' if c['name'] == report['chosen'] else ''}'><td>{html.escape(c['name'])}"
        f"{' ← ships' if c['name'] == report['chosen'] else ''}</td><td>{html.escape(c['kind'])}</td>"
        f"<td class=num>{c['imgsz']}</td><td class=num>{c['map50']:.3f}{_interval(c)}</td>"
        f"<td class=num>{c['map50_95']:.3f}</td><td class=num>{c['latency_ms']:.1f}</td>"
        f"<td class=num>{c.get('size_mb', 0):.1f}</td>"
        + "".join(f"<td class=num>{_ap50_cell(c, k)}</td>" for k in classes)
        + "</tr>"
        for c in sorted(report["candidates"], key=lambda c: c["latency_ms"])
    )
    figs = Path(d["served"]).parent / "report" if Path(d["served"]).is_dir() else run / "distill" / "report"
    chart = per_class_chart(report, run / "per_class.png")
    notes = "".join(f"<li>{html.escape(line)}</li>" for line in int8_lines(report))
    if report.get("choice_rule"):
        notes += f"<li>What ships: {html.escape(report['choice_rule'])}</li>"
    return (
        "<section><h2>1 · Distill: person + vehicle from the COCO teacher</h2>"
        f"<p>{d['frames']} frames of the vendored clips, pseudo-labelled by the teacher, are the training set. "
        f"{truth_line(d)} Shipped bundle signed with demo key <code>{d['key_id']}</code>, trusted only in this "
        "run's <code>BASTION_HOME</code>.</p>"
        "<table><tr><th>candidate</th><th>what</th><th>input</th><th>mAP50 (90 % interval)</th><th>mAP50-95</th>"
        "<th>ms / image (1 thread)</th><th>MB</th>"
        + "".join(f"<th>AP50 {html.escape(k)}</th>" for k in classes)
        + f"</tr>{rows}</table><ul>{notes}<li>Student: {html.escape(report['student'])}</li></ul>"
        f"<div class=grid>{_img(figs / 'scatter.png', 'speed vs accuracy')}"
        f"{_img(chart, 'AP50 per class') if chart else ''}"
        f"{_img(figs / 'training.png', 'training curves')}"
        f"{_img(figs / 'detections.jpg', 'shipped model on held-out frames')}</div></section>"
    )


def truth_counts(op: dict | None) -> str:
    """The served model at its own threshold on the hand-labelled frames, in one plain sentence."""
    if not op:
        return ""
    objects = op["true_positives"] + op["missed"]
    empty = op["empty_frames_with_detections"]
    return (
        f"On the {op['frames']} hand-labelled frames, at its own threshold (conf {op['conf']:g}): "
        f"{op['true_positives']} of {objects} people and vehicles found, {op['false_positives']} false "
        f"detection{'s' if op['false_positives'] != 1 else ''}, {len(empty)} of the {op['empty_frames']} empty "
        "frames with a detection" + (f" ({'; '.join(empty[:3])})" if empty else "") + "."
    )


def on_ground_truth(op: dict | None) -> str:
    return f"<p>{html.escape(truth_counts(op))}</p>" if op else ""


def _video(det: dict) -> str:
    """The annotated clip as the browser copy (``<video>`` or animated ``<img>``), or a plain link."""
    copy = det.get("browser_video")
    if not copy:
        return (
            "<p class=muted>No browser-playable encoder in this OpenCV build: open "
            "<a href='annotated.mp4'>annotated.mp4</a> (MPEG-4 Part 2) in a video player.</p>"
        )
    name = html.escape(Path(copy["path"]).name)
    element = (
        f"<video id=annotated src='{name}' controls muted loop autoplay playsinline></video>"
        if copy["element"] == "video"
        else f"<img id=annotated alt='annotated clip' src='{name}'>"
    )
    return (
        f"{element}<p class=muted>{html.escape(copy['format'])} copy for the browser; full size: "
        "<a href='annotated.mp4'>annotated.mp4</a> (MPEG-4 Part 2, for video players).</p>"
    )


def render(summary: dict[str, Any]) -> str:
    run = Path(summary["run_dir"])
    skipped = "distill" not in summary
    title = "bastion demo — distillation skipped" if skipped else "bastion demo"
    steps = STEPS_SKIPPED if skipped else STEPS
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{CSS}</style>"
        f"</head><body><header><h1>{title}</h1>"
        f"<p>{steps}, offline · {html.escape(run.name)}</p></header><main>"
    ]
    det = summary["detect"]
    if skipped:
        parts.append(
            "<section><h2>1 · Distill: skipped</h2><p>This run was started with <code>--skip-distill</code>: no "
            f"model was distilled, measured or signed; <b>{html.escape(det['model'])}</b> was served as it is. "
            "Run <code>bastion demo</code> without it for the whole loop.</p></section>"
        )
    else:
        parts.append(_distill_section(summary["distill"], run))
    counts = "".join(
        f"<tr><td>{html.escape(k)}</td><td class=num>{v}</td></tr>"
        for k, v in sorted(det["detections"].items(), key=lambda kv: -kv[1])
    )
    parts.append(
        "<section><h2>2 · Detect</h2>"
        f"<p><b>{html.escape(det['model'])}</b> <span class=muted>sha256 {det['model_sha256'][:16]}… · signer "
        f"{html.escape(str(det['signer']))}</span> on {html.escape(Path(det['video']).name)}: {det['frames']} frames, "
        f"{det['frames_with_detections']} with detections, {det['fps']} frames/s.</p>"
        f"{on_ground_truth(det.get('on_ground_truth'))}{_video(det)}<table><tr><th>class</th><th>detections</th></tr>{counts}</table>"
        f"{_img(Path(det['contact_sheet']), 'contact sheet')}</section>"
    )
    if "node" in summary:
        parts.append(_serve_section(summary["node"]))
    prov = summary.get("provenance")
    if prov:
        rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in prov.items())
        parts.append(f"<section><h2>4 · What was served, and where it came from</h2><table>{rows}</table></section>")
    parts.append(
        "<p class=muted>Generated by <code>bastion demo</code>; every number above was measured in this "
        "run on this machine.</p></main></body></html>"
    )
    return "".join(parts)


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f} ms"


def _serve_section(n: dict) -> str:
    lat = n.get("latency_ms") or {}
    return (
        "<section><h2>3 · Serve and subscribe</h2>"
        f"<p>A field node served the clip; the SDK <code>Client</code> received {n['events_received']} events "
        f"across a node restart — {_status(n['gap_free'], 'no gaps, no duplicates', 'GAPS')}. "
        f"Audit log: {_status(n['audit_intact'], 'hash chain intact', 'BROKEN')} ({n['audit_records']} "
        f"records). Live event latency (frame read → client, {lat.get('live_events', 0)} events): "
        f"p50 {_ms(lat.get('p50'))}, p99 {_ms(lat.get('p99'))}.</p>"
        f"{_img(Path(n.get('latency_histogram', '')), 'event latency histogram')}"
        + (
            f"<p><b>ask</b> (the node's language model, streamed over the control socket): "
            f"<i>{html.escape(n['ask']['answer'])}</i></p>"
            if n.get("ask")
            else ""
        )
        + "</section>"
    )


def report_md(summary: dict) -> str:
    """report.md: the same run in Markdown (the distillation's own report.md inlined)."""
    skipped = "distill" not in summary
    lines = [
        "# bastion demo" + (" — distillation skipped" if skipped else ""),
        "",
        f"{STEPS_SKIPPED if skipped else STEPS}. Run directory: `{summary['run_dir']}`",
        "",
    ]
    det = summary["detect"]
    if skipped:
        lines += ["## 1. Distill: skipped", "", f"`--skip-distill`: `{det['model']}` was served as it is.", ""]
    else:
        d = summary["distill"]
        served = Path(d["served"])
        lines += [
            "## 1. Distill",
            "",
            f"{d['frames']} frames of the vendored clips, pseudo-labelled by the teacher, are the training set; "
            f"shipped: `{d['served']}`, signed with demo key {d['key_id']}.",
            "",
            served.parent.joinpath("report", "report.md").read_text() if served.is_dir() else "",
            "",
        ]
    lines += [
        "## 2. Detect",
        "",
        f"{det['model']} ({det['model_sha256'][:16]}, signer {det['signer']}) on "
        f"{Path(det['video']).name}: {det['frames']} frames, {det['frames_with_detections']} with detections, "
        f"{det['fps']} frames/s.",
        "",
        "| class | detections |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in sorted(det["detections"].items(), key=lambda kv: -kv[1])]
    lines += ["", "![contact sheet](contact_sheet.jpg)", ""]
    if "node" in summary:
        n = summary["node"]
        lat = n.get("latency_ms") or {}
        lines += [
            "## 3. Serve",
            "",
            f"A Client received {n['events_received']} events across a node restart: "
            f"{'no gaps, no duplicates' if n['gap_free'] else 'GAPS'}. Audit log "
            f"{'intact' if n['audit_intact'] else 'BROKEN'} ({n['audit_records']} records). Live event latency: "
            f"p50 {_ms(lat.get('p50'))}, p99 {_ms(lat.get('p99'))}.",
            "",
        ]
    return "\n".join(lines) + "\n"

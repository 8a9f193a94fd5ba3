"""The demo's ``report.html``: one self-contained page (images inline, no external assets, nothing fetched)."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from bastion.distill.detect_pipeline import ap50_cell

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f5f6f8;color:#1d2330}
header{background:#1d2330;color:#fff;padding:24px 40px}header h1{margin:0;font-size:26px}
header p{margin:6px 0 0;color:#b8c0cc}main{max-width:1100px;margin:0 auto;padding:24px 40px}
section{background:#fff;border-radius:8px;padding:20px 24px;margin:0 0 20px;box-shadow:0 1px 3px #0001}
h2{margin:0 0 12px;font-size:19px}table{border-collapse:collapse;width:100%;font-size:14px;margin:8px 0}
th,td{padding:6px 10px;border-bottom:1px solid #e3e6eb;text-align:left}th{background:#f0f2f5}
td.num{text-align:right;font-variant-numeric:tabular-nums}.ship{background:#e7f5ea;font-weight:600}
.ok{color:#1b7f3b;font-weight:600}.bad{color:#b42318;font-weight:600}img{max-width:100%;border-radius:4px}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:12px}.muted{color:#6b7380;font-size:13px}
code{background:#f0f2f5;padding:1px 5px;border-radius:3px}
"""


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return ""
    mime = "image/png" if path.suffix == ".png" else "image/jpeg"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:{mime};base64,{data}">'


def _status(ok: bool, yes: str, no: str) -> str:
    return f'<span class="ok">{yes}</span>' if ok else f'<span class="bad">{no}</span>'


def render(summary: dict[str, Any]) -> str:
    run = Path(summary["run_dir"])
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>bastion demo</title><style>{CSS}</style>"
        "</head><body><header><h1>bastion demo</h1>"
        f"<p>distill → sign → detect → serve → subscribe → verify, offline · {html.escape(run.name)}</p>"
        "</header><main>"
    ]
    if "distill" in summary:
        d = summary["distill"]
        report = d["report"]
        classes = list(report["labels"]["boxes_per_class"])  # every student class, in order
        absent = [k for k, n in report["labels"]["boxes_per_class"].items() if not n]
        rows = "".join(
            f"<tr class='{'ship' if c['name'] == report['chosen'] else ''}'><td>{html.escape(c['name'])}"
            f"{' ← ships' if c['name'] == report['chosen'] else ''}</td><td>{html.escape(c['kind'])}</td>"
            f"<td class=num>{c['imgsz']}</td><td class=num>{c['map50']:.3f}</td><td class=num>{c['map50_95']:.3f}"
            f"</td><td class=num>{c['latency_ms']:.1f}</td><td class=num>{c.get('size_mb', 0):.1f}</td>"
            + "".join(f"<td class=num>{ap50_cell(c, k)}</td>" for k in classes)
            + "</tr>"
            for c in sorted(report["candidates"], key=lambda c: c["latency_ms"])
        )
        labels = report["labels"]
        figs = Path(d["served"]).parent / "report" if Path(d["served"]).is_dir() else run / "distill" / "report"
        gates = "".join(
            f"<li>INT8 ({html.escape(k)}): {html.escape(g['reason'])}</li>"
            for k, g in (report.get("int8_gate") or {}).items()
        )
        parts.append(
            "<section><h2>1 · Distill: person + vehicle from the COCO teacher</h2>"
            f"<p>{d['frames']} frames of the vendored clips, pseudo-labelled by the teacher ({labels['val']} held "
            f"out; {'ground truth' if labels['val_is_ground_truth'] else 'pseudo-labelled, so mAP measures agreement with the teacher'}). "
            f"Shipped bundle signed with demo key <code>{d['key_id']}</code>, trusted only in this run's "
            "<code>BASTION_HOME</code>.</p>"
            "<table><tr><th>candidate</th><th>what</th><th>input</th><th>mAP50</th><th>mAP50-95</th>"
            "<th>ms / image (1 thread)</th><th>MB</th>"
            + "".join(f"<th>AP50 {html.escape(k)}</th>" for k in classes)
            + f"</tr>{rows}</table><ul>{gates}<li>Student: {html.escape(report['student'])}</li>"
            + (
                f"<li>No {html.escape(', '.join(absent))} at all in the teacher's labels (—): the COCO teacher "
                "hardly sees cars from directly above, so this imagery would need some ground truth or a better "
                "teacher.</li>"
                if absent
                else ""
            )
            + "</ul>"
            f"<div class=grid>{_img(figs / 'scatter.png', 'speed vs accuracy')}"
            f"{_img(figs / 'per_class.png', 'AP50 per class')}"
            f"{_img(figs / 'training.png', 'training curves')}"
            f"{_img(figs / 'detections.jpg', 'shipped model on held-out frames')}</div></section>"
        )
    det = summary["detect"]
    counts = "".join(
        f"<tr><td>{html.escape(k)}</td><td class=num>{v}</td></tr>"
        for k, v in sorted(det["detections"].items(), key=lambda kv: -kv[1])
    )
    parts.append(
        "<section><h2>2 · Detect</h2>"
        f"<p><b>{html.escape(det['model'])}</b> <span class=muted>sha256 {det['model_sha256'][:16]}… · signer "
        f"{html.escape(str(det['signer']))}</span> on {html.escape(Path(det['video']).name)}: {det['frames']} frames, "
        f"{det['frames_with_detections']} with detections, {det['fps']} frames/s "
        "(<a href='annotated.mp4'>annotated video</a>).</p>"
        f"<table><tr><th>class</th><th>detections</th></tr>{counts}</table>"
        f"{_img(Path(det['contact_sheet']), 'contact sheet')}</section>"
    )
    if "node" in summary:
        n = summary["node"]
        lat = n.get("latency_ms") or {}
        parts.append(
            "<section><h2>3 · Serve and subscribe</h2>"
            f"<p>A field node served the clip; the SDK <code>Client</code> received {n['events_received']} events "
            f"across a node restart — {_status(n['gap_free'], 'no gaps, no duplicates', 'GAPS')}. "
            f"Audit log: {_status(n['audit_intact'], 'hash chain intact', 'BROKEN')} ({n['audit_records']} "
            f"records). Live event latency (frame read → client): p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms."
            f"</p>{_img(Path(n.get('latency_histogram', '')), 'event latency histogram')}"
            + (
                f"<p><b>ask</b> (the node's language model, streamed over the control socket): "
                f"<i>{html.escape(n['ask']['answer'])}</i></p>"
                if n.get("ask")
                else ""
            )
            + "</section>"
        )
    prov = summary.get("provenance")
    if prov:
        rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in prov.items())
        parts.append(f"<section><h2>4 · What was served, and where it came from</h2><table>{rows}</table></section>")
    parts.append(
        "<p class=muted>Generated by <code>bastion demo</code>; every number above was measured in this "
        "run on this machine.</p></main></body></html>"
    )
    return "".join(parts)

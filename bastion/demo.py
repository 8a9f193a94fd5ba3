"""``bastion demo``: the whole loop on the vendored samples — distill → sign → serve → subscribe → verify.

1. distill: frames sampled from the vendored clips are pseudo-labelled by the vendored teacher, narrowed to
   person/vehicle; every no-training candidate (and a quick student with ``--train``) is scored on the
   hand-labelled frames of ``bastion/samples/groundtruth`` (held out: no training frame near one), the fastest
   within a few mAP50 points of the best ships, signed with a demo key that this run's own ``BASTION_HOME``
   trusts;
2. detect: that bundle over a sample clip → annotated video + contact sheet;
3. serve: a field node on the clip, a ``Client`` following it, a node restart, a gap-free resume, and the
   audit log verified.
Everything lands in ``runs/demo/<timestamp>/``; ``--skip-distill`` serves the vendored default right away.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import typer

from bastion.console import out, print_counts, print_json, progress, stage_bars, warn
from bastion.demo_frames import GROUND_TRUTH, ground_truth_summary, operating_point, sample_frames
from bastion.models.cli import ALLOW_UNSIGNED_HELP
from bastion.models.zoo import DEFAULT_DETECTOR
from bastion.sample_paths import DEFAULT_VIDEO, SAMPLES

CLASSES = ["person", "vehicle"]
CLASS_MAP = {"car": "vehicle", "truck": "vehicle", "bus": "vehicle", "motorcycle": "vehicle"}


def demo_command(
    video: Path = typer.Option(DEFAULT_VIDEO, help="Video to run on (default: a vendored CC BY 4.0 sample)."),
    model: str = typer.Option(
        DEFAULT_DETECTOR, "--model", "-m", help="Teacher bundle (or, with --skip-distill, the bundle to serve)."
    ),
    out_dir: Path = typer.Option(Path("runs/demo"), "--out", help="Artefacts land in OUT/<timestamp>/."),
    skip_distill: bool = typer.Option(False, "--skip-distill", help="Serve --model right away (under a minute)."),
    train: Optional[bool] = typer.Option(
        None,
        "--train/--no-train",
        help="Train a quick student too (default: when the [distill] extra is installed, as make demo does).",
    ),
    max_frames: int = typer.Option(0, help="Detection part: stop after this many frames (0: the whole clip)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for inference."),
    node_seconds: float = typer.Option(10.0, help="How long the field-node part runs (0 skips it)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help=ALLOW_UNSIGNED_HELP),
) -> None:
    """The whole loop on the vendored samples: distill → sign → detect → serve → subscribe → verify.

    Example: bastion demo --skip-distill --max-frames 100 --node-seconds 5
    """
    run_dir = (out_dir / datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ["BASTION_HOME"] = str(run_dir / "home")  # a fresh trust store and registry for this run
    summary: dict[str, Any] = {"run_dir": str(run_dir)}
    serve = model
    if not skip_distill:
        summary["distill"] = run_distill_demo(model, run_dir / "distill", train, quiet=json_out)
        serve = summary["distill"]["served"]
    summary["detect"] = run_detect_demo(serve, video, run_dir, max_frames, threads, allow_unsigned, json_out)
    # the served model at its own threshold on the hand-labelled frames (what mAP at conf 0.001 can forgive)
    summary["detect"]["on_ground_truth"] = operating_point(serve, CLASSES, CLASS_MAP, allow_unsigned=allow_unsigned)
    if node_seconds > 0:
        summary["node"] = run_node_demo(serve, video, run_dir / "node", node_seconds, allow_unsigned, quiet=json_out)
    summary["provenance"] = provenance_chain(serve, allow_unsigned)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    from bastion.demo_report import render, report_md

    (run_dir / "report.md").write_text(report_md(summary))

    (run_dir / "report.html").write_text(render(summary))
    if json_out:
        print_json(summary)
    else:
        out.print(f"\nreport: {run_dir / 'report.html'} (and report.md)")


def provenance_chain(model: str, allow_unsigned: bool) -> dict[str, str]:
    """The served bundle and, through ``provenance.teachers``, every bundle it was made from that this unit
    holds (the zoo, the registry, and the candidates of the distillation run that produced it)."""
    from bastion.models.bundle import Bundle
    from bastion.models.manifest import MANIFEST_NAME, read_manifest
    from bastion.models.registry import Registry
    from bastion.models.zoo import zoo_path, zoo_names

    bundle = Bundle.open(model, allow_unsigned=allow_unsigned)
    known: dict[str, tuple[str, object]] = {}
    places = [zoo_path(n) for n in zoo_names()] + [e.path for e in Registry().entries()]
    places += list(bundle.root.parent.glob("baselines/*"))  # a distillation run's other candidates
    for root in places:
        if (root / MANIFEST_NAME).is_file():
            m = read_manifest(root / MANIFEST_NAME)
            known[m.sha256()] = (str(root), m)
    m = bundle.manifest
    chain = {
        "served": f"{m.name}:{m.version} (sha256 {bundle.sha256[:16]}…, {m.precision})",
        "signed by": bundle.verification.summary,
        "source": m.provenance.source,
        "weights license": m.license.weights,
        "data license": m.license.data or "-",
        "made by": f"bastion {m.provenance.bastion_version or '?'} at {m.provenance.created or '?'}",
    }
    level, parents = 1, list(m.provenance.teachers)
    while parents and level <= 4:
        sha = parents.pop(0)
        if sha not in known:
            chain[f"made from ({level})"] = f"sha256 {sha[:16]}… (not on this unit)"
        else:
            _, pm = known[sha]
            chain[f"made from ({level})"] = (
                f"{pm.name}:{pm.version} — {pm.provenance.source} — weights license {pm.license.weights}"
            )
            for d in pm.provenance.datasets:
                chain[f"made from ({level}) data"] = f"{d.name} ({d.license or 'license ?'})"
            parents += pm.provenance.teachers
        level += 1
    return chain


WARM_START = SAMPLES / "weights" / "yolov5n.state_dict.fp16.safetensors"


def run_distill_demo(teacher: str, run: Path, train: bool | None, quiet: bool = False) -> dict[str, Any]:
    from bastion.distill.detect_pipeline import DistillSpec, run_distill
    from bastion.models.keys import generate_keypair, load_private_key
    from bastion.models.trust import TrustStore

    frames = run / "frames"
    images = sorted(frames.glob("*.jpg")) or sample_frames(sorted(SAMPLES.glob("*.mp4")), frames)
    pair = generate_keypair(run.parent / "keys" / "demo")
    TrustStore().trust(pair.public_path)
    from bastion.distill.ultra import ultralytics_available

    train_spec = None
    if train is None:
        train = ultralytics_available()
        if not train and not quiet:
            warn(
                "no student is trained: the [distill] extra (torch, Ultralytics) is not installed; "
                "make demo installs it, or pip install -e '.[distill]'"
            )
    if train:
        from bastion.distill.train import TrainSpec
        from bastion.errors import MissingExtraError

        if not ultralytics_available():
            raise MissingExtraError("bastion demo --train", "distill", "ultralytics-opencv-headless")
        # the quick CPU schedule: the teacher's own backbone+neck (vendored fp16 tensors), frozen; only the new
        # head trains (../shared/NOTES.md: the best use of a few CPU minutes)
        train_spec = TrainSpec(student="yolov5n.yaml", warm_start=WARM_START, epochs=3, batch=16, freeze=24)
    if not quiet:
        out.print(
            f"[bold]distill[/] {teacher} → {', '.join(CLASSES)} on {len(images)} frames of the sample clips "
            f"(demo key {pair.key_id}, trusted in this run's BASTION_HOME)"
        )
    truth = GROUND_TRUTH if (GROUND_TRUTH / "labels").is_dir() else None  # absent from a wheel install
    if truth is None and not quiet:
        warn(f"no ground truth at {GROUND_TRUTH}: candidates are scored on pseudo-labelled frames")
    spec = DistillSpec(
        teachers=[teacher],
        images=frames,
        labels=None,
        val_images=truth / "images" if truth else None,
        val_labels=truth / "labels" if truth else None,
        classes=CLASSES,
        class_map=CLASS_MAP,
        conf={"*": 0.3},
        imgsz=320,
        out=run,
        max_map50_drop=10.0,
        train=train_spec,
    )
    with progress(disable=quiet) as bar:
        report = run_distill(spec, load_private_key(pair.private_path), stage_bars(bar))
    if not quiet:
        out.print((run / "report" / "report.md").read_text())
    served = report.get("shipped_bundle") or teacher
    return {
        "report": report,
        "served": served,
        "key_id": pair.key_id,
        "frames": len(images),
        "ground_truth": ground_truth_summary() if truth else None,
    }


def run_detect_demo(
    model: str, video: Path, run_dir: Path, max_frames: int, threads: int | None, allow_unsigned: bool, quiet: bool
) -> dict[str, Any]:
    """The served model over ``video``: annotated video (+ a copy a browser plays), contact sheet, counts, fps."""
    from bastion.browser_video import browser_copy
    from bastion.runtime.detect import Detector
    from bastion.runtime.media import iter_video, video_info
    from bastion.runtime.outputs import AtomicVideoWriter, contact_sheet, save_image
    from bastion.runtime.stream import default_workers, detect_stream

    workers = default_workers()
    detector = Detector.load(model, threads=threads or (1 if workers > 1 else None), allow_unsigned=allow_unsigned)
    info = video_info(video)
    limit = max_frames or None
    total = min(int(info["frames"]) or 0, limit) if limit else int(info["frames"])
    counts: Counter[str] = Counter()
    frames_with = 0
    keyframes = []
    sample_every = max(1, total // 24)  # candidates for the contact sheet: frames with detections
    size = (int(info["width"]), int(info["height"]))
    t0 = time.perf_counter()
    with (
        AtomicVideoWriter(run_dir / "annotated.mp4", info["fps"], size) as vw,
        progress(disable=quiet) as bar,
    ):
        task = bar.add_task(f"{detector.manifest.name} on {video.name}", total=total or None)
        for frame, det in detect_stream(detector, iter_video(video, limit), workers=workers):
            counts.update(det.counts())
            frames_with += bool(len(det))
            annotated = det.draw(frame.image)
            vw.write(annotated)
            if frame.index % sample_every == 0 and len(det) and len(keyframes) < 8:
                keyframes.append(annotated)
            bar.advance(task)
        frames = vw.frames
    elapsed = time.perf_counter() - t0
    browser = browser_copy(run_dir / "annotated.mp4", run_dir / "annotated-browser")  # after the timing
    sheet = run_dir / "contact_sheet.jpg"
    if keyframes:
        save_image(sheet, contact_sheet(keyframes))
    summary = {
        "model": detector.manifest.name,
        "model_sha256": detector.bundle_sha256,
        "signer": detector.verified_by,
        "video": str(video),
        "frames": frames,
        "frames_with_detections": frames_with,
        "detections": dict(counts),
        "fps": round(frames / elapsed, 2) if elapsed else 0.0,
        "annotated_video": str(run_dir / "annotated.mp4"),
        "browser_video": browser,
        "contact_sheet": str(sheet),
    }
    if not quiet:
        print_counts(f"detect — {detector.manifest.name} on {video.name}", counts)
        out.print(f"{frames} frames ({frames_with} with detections) at {summary['fps']} frames/s")
        out.print(f"annotated video: {summary['annotated_video']}\ncontact sheet:   {summary['contact_sheet']}")
    detector.close()
    return summary


def run_node_demo(
    model: str, video: Path, storage: Path, seconds: float, allow_unsigned: bool, quiet: bool = False
) -> dict:
    """A node on ``video`` in this process, a Client following it, a node restart, a gap-free resume."""
    from bastion.edge.audit import verify_audit_log
    from bastion.edge.config import NodeConfig
    from bastion.edge.node import Node

    from bastion.models.zoo import zoo_path

    lm = "stories260K" if zoo_path("stories260K") else None
    config = NodeConfig.model_validate(
        {
            "id": "demo-node",
            "model": model,
            "threads": 1,
            "lm": lm,
            "lm_max_new_tokens": 60,
            "sources": [{"name": "cam1", "uri": str(video), "loop": True, "realtime": True, "fps": 30}],
            "endpoints": {"events": "tcp://127.0.0.1:*", "control": "tcp://127.0.0.1:*"},
            "storage": {"dir": str(storage)},
            "security": {"allow_unsigned": allow_unsigned},
        }
    )
    counts: Counter[str] = Counter()
    seqs: list[int] = []
    latencies: list[float] = []
    answer = ""
    stats = {}
    for run in (1, 2):  # the second run is a restart on the same store: the client resumes after its last seq
        node = Node(config)
        node.start()
        if not quiet:
            out.print(
                f"\n[bold]field node[/] {config.id} ({'restarted' if run == 2 else 'started'}): events on "
                f"{node.server.events_endpoint}, control on {node.server.control_endpoint}"
            )
        stats[f"run{run}"] = _follow(node, seqs, counts, seconds / 2, quiet, latencies)
        if run == 2 and lm:
            answer = _ask(node, "Once upon a time", quiet)
        node.close()
    audit = verify_audit_log(storage / "audit.log")
    marks = latency_marks(latencies)
    result = {
        "ask": {"prompt": "Once upon a time", "answer": answer} if lm else None,
        "events_received": len(seqs),
        "gap_free": seqs == list(range(1, len(seqs) + 1)),
        "latency_ms": {**marks, "live_events": len(latencies)},
        "detections": dict(counts),
        "source_stats": stats,
        "storage": str(storage),
        "audit_records": audit.records,
        "audit_intact": audit.ok,
    }
    if latencies:
        from bastion.distill.charts import histogram

        histogram(
            [x * 1000 for x in latencies],
            storage / "latency.png",
            "event latency: frame read → received by the client",
            "ms",
            marks=marks,  # the same numbers the report's text gives
        )
        result["latency_histogram"] = str(storage / "latency.png")
    if not quiet:
        print_counts(
            f"client received {len(seqs)} events across a node restart (seq 1..{seqs[-1] if seqs else 0}, "
            f"{'no gaps, no duplicates' if result['gap_free'] else 'GAPS'})",
            dict(counts),
        )
        out.print(
            f"audit log {'intact' if audit.ok else 'BROKEN'} ({audit.records} records): "
            f"bastion audit verify {storage / 'audit.log'}"
        )
    return result


def latency_marks(latencies_s: list[float]) -> dict[str, float | None]:
    """p50 and p99 in ms, rounded to 0.1 ms: computed once, shown by both the histogram and the report text."""
    import numpy as np

    if not latencies_s:
        return {"p50": None, "p99": None}
    ms = np.asarray(latencies_s, dtype=np.float64) * 1000
    return {f"p{q}": round(float(np.percentile(ms, q)), 1) for q in (50, 99)}


def whole_words(text: str) -> str:
    """A generation cut by its token budget, ended at its last full sentence (else its last whole word) + '…'.

    The model stops after ``lm_max_new_tokens`` tokens wherever that falls, often inside a word; what a person
    reads should not end in half a word."""
    stripped = text.rstrip()
    if not stripped or stripped[-1] in ".!?\"'" or " " not in stripped:
        return stripped
    ends = [stripped.rfind(c) for c in ".!?"]
    cut = max(ends)
    if cut > len(stripped) // 2:
        return stripped[: cut + 1]
    space = stripped.rfind(" ")
    return (stripped[:space] if space > 0 else stripped).rstrip(",;: ") + "…"


def _ask(node, prompt: str, quiet: bool) -> str:
    """One question to the node's language model, streamed back over the control socket; shown a whole word at a
    time (a word the token budget cuts off is never printed), and returned ended as :func:`whole_words` ends it."""
    from bastion.edge.client import Client

    if not quiet:
        out.print(f"\n[bold]ask[/] the node's language model: {prompt!r}\n  ", end="", markup=True)
    text = shown = ""
    with Client(node.server.control_endpoint, timeout_s=10) as client:
        for piece in client.ask_stream(prompt, 60):
            text += piece
            ready = text[: text.rfind(" ") + 1]  # up to the last space: whole words only
            if not quiet and len(ready) > len(shown):
                out.print(ready[len(shown) :], end="", markup=False, highlight=False)
                shown = ready
    answer = whole_words(prompt + text)
    if not quiet:
        out.print(answer[len(prompt) + len(shown) :], markup=False, highlight=False)
    return answer


def _follow(node, seqs: list[int], counts: Counter, seconds: float, quiet: bool, latencies: list[float]) -> dict:
    from bastion.edge.client import Client

    started = time.time()
    with Client(node.server.control_endpoint, timeout_s=5) as client:
        for event in client.events(since=seqs[-1] if seqs else 0, duration_s=seconds):
            if event.ts >= started:  # live events only: replayed ones were read before this client came
                latencies.append(time.time() - event.ts)
            seqs.append(event.seq)
            counts.update(d.name for d in event.detections)
            if not quiet and (len(seqs) <= 5 or len(seqs) % 50 == 0):
                what = ", ".join(f"{d.name} {d.conf:.2f}" for d in event.detections)
                out.print(f"  event seq {event.seq:>4}  {event.source} frame {event.frame:>5}: {what}")
        return client.status()["sources"]["cam1"]

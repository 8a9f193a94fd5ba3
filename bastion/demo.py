"""``bastion demo``: the default detector over a vendored sample video, with a summary and artefacts."""

from __future__ import annotations

import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer

from bastion.console import out, print_counts, print_json, progress
from bastion.models.cli import ALLOW_UNSIGNED_HELP
from bastion.models.zoo import DEFAULT_DETECTOR

SAMPLES = Path(__file__).resolve().parent / "samples"
DEFAULT_VIDEO = SAMPLES / "one-by-one-person-detection.mp4"


def demo_command(
    video: Path = typer.Option(DEFAULT_VIDEO, help="Video to run on (default: a vendored CC BY 4.0 sample)."),
    model: str = typer.Option(DEFAULT_DETECTOR, "--model", "-m", help="Bundle directory or zoo name."),
    out_dir: Path = typer.Option(Path("runs/demo"), "--out", help="Artefacts land in OUT/<timestamp>/."),
    max_frames: int = typer.Option(0, help="Stop after this many frames (0: the whole clip)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for inference."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help=ALLOW_UNSIGNED_HELP),
) -> None:
    """Run the default detector over a sample video: summary table, annotated video, contact sheet.

    Example: bastion demo --max-frames 100
    """
    from bastion.runtime.detect import Detector
    from bastion.runtime.media import iter_video, video_info
    from bastion.runtime.outputs import AtomicVideoWriter, contact_sheet, save_image
    from bastion.runtime.stream import default_workers, detect_stream

    run_dir = out_dir / datetime.now().strftime("%Y%m%d-%H%M%S")
    workers = default_workers()
    detector = Detector.load(model, threads=threads or (1 if workers > 1 else None), allow_unsigned=allow_unsigned)
    info = video_info(video)
    limit = max_frames or None
    total = min(int(info["frames"]) or 0, limit) if limit else int(info["frames"])
    counts: Counter[str] = Counter()
    frames_with = 0
    keyframes = []
    sample_every = max(1, total // 24)  # candidates for the contact sheet: frames with detections
    t0 = time.perf_counter()
    with AtomicVideoWriter(run_dir / "annotated.mp4", info["fps"], (int(info["width"]), int(info["height"]))) as vw, \
            progress(disable=json_out) as bar:
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
    sheet = run_dir / "contact_sheet.jpg"
    if keyframes:
        save_image(sheet, contact_sheet(keyframes))
    summary = {
        "model": detector.manifest.name, "model_sha256": detector.bundle_sha256, "video": str(video),
        "frames": frames, "frames_with_detections": frames_with, "detections": dict(counts),
        "fps": round(frames / elapsed, 2) if elapsed else 0.0, "run_dir": str(run_dir),
        "annotated_video": str(run_dir / "annotated.mp4"), "contact_sheet": str(sheet),
    }
    if json_out:
        print_json(summary)
        return
    print_counts(f"bastion demo — {detector.manifest.name} on {video.name}", counts)
    out.print(f"{frames} frames ({frames_with} with detections) at {summary['fps']} frames/s")
    out.print(f"annotated video: {summary['annotated_video']}\ncontact sheet:   {summary['contact_sheet']}")

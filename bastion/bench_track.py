"""``bastion bench track``: the command line. The set, the runs and the timing live in bastion/bench_track_set.py,
imported only when the command runs (it pulls in OpenCV, numpy and the node's object layer)."""

from __future__ import annotations

from typing import Optional

import typer

from bastion.console import err, out, print_json


def bench_track_command(
    seed: int = typer.Option(0, help="Seed of the synthetic set: the same seed, the same set."),
    sequences: int = typer.Option(6, min=1, max=1000, help="Sequences (backgrounds alternate mirrored)."),
    frames: int = typer.Option(300, min=10, max=100_000, help="Frames per sequence (30 fps)."),
    people: int = typer.Option(12, min=1, max=200, help="People per sequence (every fifth stands about)."),
    track_buffer: int = typer.Option(30, min=1, max=100_000, help="Frames a lost track waits (node: objects)."),
    detector: Optional[str] = typer.Option(
        None, "--detector", "-m", help="Run this detector bundle on the rendered frames instead of simulating one."
    ),
    volume: Optional[str] = typer.Option(
        None, help="Also count events per minute on the two sample clips with this detector: frame vs object level."
    ),
    imgsz: Optional[int] = typer.Option(None, help="Detector input size (with --detector or --volume)."),
    threads: Optional[int] = typer.Option(None, help="Inference threads (with --detector)."),
    cost_only: bool = typer.Option(
        False, "--cost-only", help="Only the per-frame cost of tracker + zones + lines (no quality set)."
    ),
    objects: int = typer.Option(20, min=1, max=1000, help="Objects in view for the per-frame cost."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Tracking quality (MOTA, IDF1, ID switches per 100 tracks) on a synthetic set with known truth, and the
    per-frame cost of tracker + zones + lines with 20 people.

    Example: bastion bench track --sequences 6 --json
    (with the real detector on the rendered frames: bastion bench track -m yolov5n --imgsz 640 --sequences 2;
    events per minute on the sample clips: bastion bench track --volume yolov5n --imgsz 320;
    the per-frame cost alone, wall and CPU time: bastion bench track --cost-only --json)
    """
    from bastion.bench_track_set import bench_track

    result = bench_track(
        seed,
        sequences,
        frames,
        people,
        track_buffer,
        detector,
        imgsz,
        threads,
        on_sequence=lambda i: err.print(f"sequence {i + 1}/{sequences} tracked"),
        volume_model=volume,
        cost_only=cost_only,
        objects=objects,
    )
    if json_out:
        print_json(result)
        return
    if cost_only:
        out.print(f"cost per frame, {result['cost']['objects']} objects: {result['cost']}")
        return
    for key, value in result["quality"].items():
        out.print(f"{key}: {value}")
    out.print(f"cost per frame, {result['cost']['objects']} objects: {result['cost']}")
    for clip, row in result.get("event_volume", {}).items():
        out.print(f"{clip}: {row}")

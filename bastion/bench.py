"""``bastion bench detect|node|lm``: speed measured against a reference in the same run (JSON output).

This module is only the command line; each mode has its own module: ``bench_images`` (single images, best of N
rounds taking turns), ``bench_video`` (a video through the stream pipeline), ``bench_backends`` (one bundle on each
backend), ``bench_node`` and ``bench_lm``; ``bench_common`` holds what they share. Ratios are only ever taken
between numbers measured in the same process run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from bastion.bench_sinks import bench_sinks_command
from bastion.bench_track import bench_track_command
from bastion.console import err, out, print_json, progress
from bastion.errors import ConfigError
from bastion.models.cli import ALLOW_UNSIGNED_HELP
from bastion.models.zoo import DEFAULT_DETECTOR

MODEL_HELP = "Bundle directory, zoo name or a YOLOv5/Ultralytics .onnx file."

bench_app = typer.Typer(
    help="Measure speed against a reference measured in the same run (JSON output).", no_args_is_help=True
)


@bench_app.command("detect")
def bench_detect_command(
    model: str = typer.Option(DEFAULT_DETECTOR, "--model", "-m", help=MODEL_HELP),
    images: Optional[Path] = typer.Option(None, help="Directory of images (single-image mode)."),
    video: Optional[Path] = typer.Option(None, help="Video file (stream mode)."),
    limit: int = typer.Option(64, help="At most this many images / frames."),
    repeat: int = typer.Option(
        5,
        min=1,
        help="Timed rounds (images mode): each contestant times one pass over the images per round, taking "
        "turns; the best round counts.",
    ),
    imgsz: Optional[int] = typer.Option(None, help="Network input size (long side)."),
    conf: float = typer.Option(0.25, help="Confidence threshold for all contestants."),
    iou: float = typer.Option(0.45, help="NMS IoU threshold for all contestants."),
    threads: Optional[int] = typer.Option(None, help="Inference threads (default: all cores)."),
    batch: int = typer.Option(1, help="Batch size of bastion's video pipeline (dynamic-batch models)."),
    workers: Optional[int] = typer.Option(
        None, help="Concurrent inferences in bastion's video pipeline (default: cores, max 4)."
    ),
    ultralytics: bool = typer.Option(True, help="Also time Ultralytics predict when it is installed."),
    backends: Optional[str] = typer.Option(
        None,
        help="Instead: compare backends on --images, e.g. ort-cpu,ort-cuda,ort-trt,trt (trt: native TensorRT; "
        "ort-trt: ONNX Runtime's TensorRT provider).",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help=ALLOW_UNSIGNED_HELP),
) -> None:
    """Time raw session.run (the floor), bastion's Detector and (optionally) Ultralytics, in one run.

    Example: bastion bench detect --model yolov5n --images bastion/samples/images --json
    """
    from bastion.bench_common import DetectBenchRequest

    request = DetectBenchRequest(
        model=model,
        limit=limit,
        repeat=repeat,
        imgsz=imgsz,
        conf=conf,
        iou=iou,
        threads=threads,
        with_ultralytics=ultralytics,
        allow_unsigned=allow_unsigned,
    )
    if backends is not None:
        if images is None:
            raise ConfigError("--backends compares backends on --images DIR")
        from bastion.bench_backends import bench_backends

        result = bench_backends(images, [b.strip() for b in backends.split(",") if b.strip()], request)
        if json_out:
            print_json(result)
        else:
            for name, row in result["backends"].items():
                out.print(f"{name}: {row}")
        return
    if (images is None) == (video is None):
        raise ConfigError("give exactly one of --images DIR or --video FILE")
    with progress(disable=json_out) as bar:
        if images is not None:
            from bastion.bench_images import bench_images

            result = bench_images(images, request, progress=bar)
        else:
            from bastion.bench_video import bench_video

            result = bench_video(video, request, batch=batch, workers=workers, progress=bar)
    for note in result.get("notes", []):  # on stderr, so --json's stdout stays one JSON object
        err.print(f"note: {note}", markup=False, highlight=False)
    if json_out:
        print_json(result)
        return
    out.print(f"bench detect: {result['model']} ({result['mode']}, {result['count']} inputs)", style="bold")
    table = Table(show_edge=False)
    for col in ("contestant", "items/s", "p50 ms", "p99 ms"):
        table.add_column(col, justify="right" if col != "contestant" else "left")
    for name, r in result["contestants"].items():
        per_s = r.get("best_per_s", r["per_s"])  # images: the best round; video: the whole run
        table.add_row(
            name, f"{per_s:.1f}", f"{r.get('p50_ms', float('nan')):.2f}", f"{r.get('p99_ms', float('nan')):.2f}"
        )
    out.print(table)
    if "timing" in result:
        out.print(f"timing: {result['timing']}")
    for key, value in result["summary"].items():
        if key != "ultralytics":  # the skip reason: printed as a note above
            out.print(f"{key}: {value}", markup=False, highlight=False)


@bench_app.command("node")
def bench_node_command(
    model: str = typer.Option(DEFAULT_DETECTOR, "--model", "-m", help=MODEL_HELP),
    video: Path = typer.Option(
        Path(__file__).resolve().parent / "samples" / "one-by-one-person-detection.mp4",
        help="File source, read in real time and looped.",
    ),
    fps: float = typer.Option(30.0, help="Pace the file source at this rate (a camera)."),
    seconds: float = typer.Option(20.0, help="Measurement window after a 2 s warm-up."),
    imgsz: Optional[int] = typer.Option(320, help="Network input size."),
    threads: Optional[int] = typer.Option(None, help="Inference threads (default: all cores)."),
    subscribers: int = typer.Option(1, help="ZeroMQ subscribers on loopback (each must get every event)."),
    objects: bool = typer.Option(False, "--objects", help="Track: events/min frame vs object level, tracker ms."),
    ask: bool = typer.Option(
        False, "--ask", help="Also serve stories260K: status/replay round trips idle vs while answers stream."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """A real node on a paced file: fps, drops and event latency (read → subscriber) vs the model's latency.

    Example: bastion bench node --fps 30 --imgsz 320 --subscribers 100 --json
    (events per minute with tracking: bastion bench node --objects --fps 10 --seconds 120 --json;
    control answers while an LM streams: bastion bench node --ask --fps 10 --seconds 20 --json)
    """
    from bastion.bench_node import bench_node

    for flag, value, low, high in (("--seconds", seconds, 1, 86400), ("--fps", fps, 0.1, 1000)):
        if not low <= value <= high:  # NaN too: every comparison with it is false
            raise ConfigError(f"{flag} {value}: give {low} to {high}")
    if subscribers < 1 or subscribers > 1000:
        raise ConfigError(f"--subscribers {subscribers}: give 1 to 1000")
    err.print(f"measuring a node for {seconds:.0f} s{' (then its control socket for as long)' if ask else ''} …")
    result = bench_node(model, video, fps, seconds, imgsz, threads, subscribers, objects, ask)
    if json_out:
        print_json(result)
        return
    for key, value in result.items():
        out.print(f"{key}: {value}")


@bench_app.command("lm")
def bench_lm_command(
    model: str = typer.Option("stories260K", "--model", "-m", help="A task: lm bundle."),
    reference: Optional[Path] = typer.Option(
        None,
        help="The same weights as a llama2.c checkpoint or Hugging Face "
        "directory, for bastion's torch module (needs the [distill] extra).",
    ),
    transformers_dir: Optional[Path] = typer.Option(
        None,
        "--transformers",
        help="A local Hugging Face directory of the same weights: also time transformers' generate.",
    ),
    against: Optional[str] = typer.Option(
        None,
        help="A second lm bundle (e.g. the teacher of a distilled "
        "student): both timed taking turns, the speed-up reported per prompt.",
    ),
    new_tokens: int = typer.Option(128, help="Tokens to generate per prompt."),
    prompt_lengths: str = typer.Option("16,128,384", help="Prompt lengths in tokens, comma-separated."),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help=ALLOW_UNSIGNED_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Tokens/s and time-to-first-token of ONNX Runtime generation, vs torch on the same weights, in one run.

    Example: bastion bench lm --reference ../shared/weights/stories260K/stories260K.bin
    --transformers ../shared/weights/stories260K/hf --json
    (a distilled student against its teacher: bastion bench lm -m runs/lm/s3/bundle --against stories260K)
    """
    from bastion.bench_lm import bench_lm

    lengths = [int(x) for x in prompt_lengths.split(",") if x.strip()]
    result = bench_lm(model, reference, new_tokens, lengths, allow_unsigned, transformers_dir, against)
    if json_out:
        print_json(result)
        return
    for length, row in result["lengths"].items():
        out.print(f"prompt {length}: {row}")


bench_app.command("sinks")(bench_sinks_command)  # bastion/bench_sinks.py: MQTT and NATS JetStream on loopback
bench_app.command("track")(bench_track_command)  # bastion/bench_track.py: MOT quality and cost

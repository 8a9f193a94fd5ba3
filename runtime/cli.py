"""CLI command of the runtime: ``bastion detect``."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import Optional

import typer

from bastion.console import err, out, print_counts, print_json, progress, split_csv, warn
from bastion.edge.cli_options import CLIENT_KEY_OPTION, SERVER_KEY_OPTION  # as `node status` takes them
from bastion.hardware.backend_names import DEVICE_HELP, device_name
from bastion.models.cli import ALLOW_UNSIGNED_HELP
from bastion.models.zoo import DEFAULT_DETECTOR
from bastion.runtime.stop_signals import StopSignals, signal_name

MODEL_HELP = "Bundle directory, zoo name (yolov5n, yolox_nano) or a YOLOv5/Ultralytics .onnx file."


def detect_command(
    source: str = typer.Argument(
        ...,
        help="Image file, directory of images, video file, rtsp://… (or http://…) stream, or USB camera (0, /dev/video0).",
    ),
    model: str = typer.Option(DEFAULT_DETECTOR, "--model", "-m", help=MODEL_HELP),
    conf: Optional[float] = typer.Option(None, help="Confidence threshold (default: the model's, 0.25)."),
    iou: Optional[float] = typer.Option(None, help="NMS IoU threshold (default: the model's, 0.45)."),
    classes: Optional[str] = typer.Option(None, help="Only these classes, comma-separated names or ids."),
    imgsz: Optional[int] = typer.Option(None, help="Network input size (long side), multiple of 32."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    threads: Optional[int] = typer.Option(None, help="CPU threads for inference (default: all cores)."),
    batch: int = typer.Option(
        1, help="Frames per inference batch for videos, directories, streams (dynamic-batch models)."
    ),
    workers: int = typer.Option(
        0, help="Concurrent inferences for videos, directories, streams (0: one per core, max 4)."
    ),
    max_frames: Optional[int] = typer.Option(None, help="Stop after this many frames."),
    save: Optional[Path] = typer.Option(None, help="Write annotated images / video into this directory."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object per frame on stdout."),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help=ALLOW_UNSIGNED_HELP),
) -> None:
    """Detect objects in an image, a directory of images or a video.

    Example: bastion detect bastion/samples/car-detection.mp4 --classes car,truck --save runs/detect

    Also a USB camera (0 or /dev/video0) or a stream (rtsp://…): it runs until Ctrl-C or SIGTERM (a clean stop
    with the summary, exit 0; a second one quits at once) or --max-frames;
    when the model falls behind it, the oldest frames are dropped (counted in the summary). A file's frames
    are never dropped.
    """
    # A Ctrl-C before the stream starts is an ordinary KeyboardInterrupt (no stream thread runs yet): one line, 130.
    try:
        try:  # a Ctrl-C while a native module initialises surfaces as its ImportError: still a Ctrl-C
            from bastion.runtime.detect import Detector
            from bastion.runtime.media import video_info
            from bastion.runtime.outputs import AtomicVideoWriter, save_image
            from bastion.runtime.reader import source_reader
            from bastion.runtime.sources import source_kind
            from bastion.runtime.stream import default_workers, detect_stream
        except ImportError as exc:
            if isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt):
                raise KeyboardInterrupt from None
            raise

        device = device_name(device)  # a bad --device is one line before any thread starts
        kind = source_kind(source)  # the node's opener registry decides what the source is
        if kind != "image" and workers == 0:
            workers = default_workers()
            # Several single-threaded inferences in flight beat one spread over all cores (docs/benchmarks.md).
            threads = threads or (1 if workers > 1 else None)
        detector = Detector.load(
            model,
            device=device,
            threads=threads,
            conf=conf,
            iou=iou,
            classes=split_csv(classes),
            imgsz=imgsz,
            allow_unsigned=allow_unsigned,
        )
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None
    counts: Counter[str] = Counter()
    frames = 0
    total = None
    if kind == "video" and Path(source).is_file():
        total = int(video_info(source)["frames"]) or None
    if max_frames:
        total = min(total or max_frames, max_frames)
    writer = None
    # Opened once the model is loaded, and always stopped and joined before returning: a reader thread still
    # inside OpenCV when the interpreter exits aborts the process.
    reader = source_reader(source)
    t0 = time.perf_counter()
    stopped = False
    stop = StopSignals(on_stop=lambda signum: _stopping(signum, reader.stop_event))
    try:
        with stop, progress(disable=json_out) as bar:
            task = bar.add_task(f"detect {_display_name(source, kind)}", total=total)
            results = detect_stream(detector, reader.frames(max_frames), batch=batch, workers=max(workers, 1))
            with closing(results):  # on a Ctrl-C, the pool finishes what it started and ends here, not at GC
                for frame, det in results:
                    if stop.received:
                        break
                    frames += 1
                    counts.update(det.counts())
                    if json_out:
                        print_json(
                            {
                                "source": frame.path or frame.source,
                                "frame": frame.index,
                                "model": detector.bundle_sha256,
                                "detections": det.to_dict(),
                            }
                        )
                    if save and kind in ("image", "dir"):
                        save_image(save / (Path(frame.path or frame.source).stem + ".jpg"), det.draw(frame.image))
                    elif save:
                        if writer is None:  # sized by the first frame; a camera's rate is known once it is open
                            h, w = frame.image.shape[:2]
                            writer = AtomicVideoWriter(
                                save / f"{_save_stem(source, kind)}.detections.mp4", reader.native_fps, (w, h)
                            )
                        writer.write(det.draw(frame.image))
                    bar.advance(task)
    except KeyboardInterrupt:  # only where StopSignals could not take SIGINT (see StopSignals.__enter__)
        if kind not in ("stream", "usb"):
            raise
        stopped = True
    finally:
        reader.close()
        if writer is not None:
            writer.close(keep=frames > 0)
    if stop.received and kind not in ("stream", "usb"):  # a file stopped half-way: "interrupted", 130 (143)
        err.print("interrupted")
        raise typer.Exit(128 + stop.received)
    # a camera runs until Ctrl-C (or SIGTERM): its normal end, and the summary follows
    stopped_by = signal_name(stop.received) if stop.received else "Ctrl-C" if stopped else None
    elapsed = time.perf_counter() - t0
    stats = reader.stats
    for path in reader.skipped:
        warn(f"skipped unreadable image {path}")
    if json_out:
        return
    print_counts(f"{detector.manifest.name} on {_display_name(source, kind)}", counts)
    fps = frames / elapsed if elapsed > 0 else 0.0
    out.print(
        f"{frames} frames, {sum(counts.values())} detections, {fps:.1f} frames/s"
        + (f", {stats.errors} unreadable skipped" if stats.errors and kind == "dir" else "")
        + (f", {stats.dropped} dropped (the source ran ahead of the model)" if stats.dropped else "")
        + (f", {stats.reconnects} reconnects" if stats.reconnects else "")
        + (f"; annotated output in {save}" if save else "")
        + (f"; stopped by {stopped_by}" if stopped_by else "")
    )


def _stopping(signum: int, stop_event: threading.Event) -> None:
    """The first SIGINT/SIGTERM, from StopSignals' watcher thread: say so once, and stop the reader (so even a wait
    for the next frame ends); the loop breaks at its next frame and the pool finishes what it started."""
    err.print(f"stopping ({signal_name(signum)} again to quit at once)")
    stop_event.set()


def _display_name(source: str, kind: str) -> str:
    """The source as a person reads it: a path as given, a camera's index, a stream without its password."""
    from bastion.runtime.sources import redacted, usb_index

    if kind == "usb":
        return f"USB camera {usb_index(source)}"
    return redacted(source) if kind == "stream" else source


def _save_stem(source: str, kind: str) -> str:
    """The annotated video's file name: the video's own stem, ``usb0``, or the stream's host and path."""
    if kind == "usb":
        from bastion.runtime.sources import usb_index

        return f"usb{usb_index(source)}"
    if kind == "stream":
        where = source.split("://", 1)[-1].rsplit("@", 1)[-1]  # never a password in a file name
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", where).strip("_.")[:100] or "stream"
    return Path(source).stem


def ask_command(
    prompt: str = typer.Argument(..., help="The question or the beginning of the text."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="A task: lm bundle to run here."),
    node: Optional[str] = typer.Option(None, "--node", help="Or: a node's control endpoint (its `lm` answers)."),
    server_key: Optional[str] = SERVER_KEY_OPTION,
    client_key: Optional[Path] = CLIENT_KEY_OPTION,
    max_new_tokens: Optional[int] = typer.Option(
        None, help="Longest answer, in tokens [default: the bundle's, else 128]."
    ),
    temperature: Optional[float] = typer.Option(
        None, help="0 is greedy; higher samples more freely [default: the bundle's, else 0]."
    ),
    top_k: Optional[int] = typer.Option(
        None, help="Sample only among the k likeliest tokens, 0: all [default: the bundle's]."
    ),
    top_p: Optional[float] = typer.Option(
        None, help="Sample only within this probability mass [default: the bundle's, else 1]."
    ),
    seed: Optional[int] = typer.Option(None, help="Random seed for sampling."),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help=ALLOW_UNSIGNED_HELP),
) -> None:
    """Stream a language model's answer, from a local bundle or from a field node.

    Example: bastion ask "Once upon a time" --model stories260K-1.0.bastion

    Example: bastion ask "Once upon a time" --node tcp://10.0.0.5:7701 --server-key node.key --client-key me.key_secret
    """
    import sys

    from bastion.errors import ConfigError

    if (model is None) == (node is None):
        raise ConfigError("give exactly one of --model BUNDLE or --node ENDPOINT")
    if max_new_tokens is not None:
        from bastion.lm_limits import check_max_new_tokens

        check_max_new_tokens(max_new_tokens)  # the same limit the node and the generator hold
    if node is not None:
        from bastion.edge.client import Client

        with Client(node, server_key=server_key, client_key=client_key, retries=0) as client:  # its bundle's defaults
            pieces = client.ask_stream(prompt, max_new_tokens or 128)
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
    else:
        from bastion.runtime.lm import Generator

        generator = Generator.load(model, allow_unsigned=allow_unsigned)
        pieces = generator.generate(
            prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
        )  # settings are checked before anything is printed
        sys.stdout.write(prompt)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")

"""CLI command of the runtime: ``bastion detect``."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import Callable, Optional

import typer

from bastion.console import err, out, print_counts, print_json, progress, split_csv, warn
from bastion.edge.cli_options import CLIENT_KEY_OPTION, SERVER_KEY_OPTION  # as `node status` takes them
from bastion.hardware.backend_names import DEVICE_HELP, device_name
from bastion.models.cli import ALLOW_UNSIGNED_HELP
from bastion.models.zoo import DEFAULT_DETECTOR

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

    Also a USB camera (0 or /dev/video0) or a stream (rtsp://…): it runs until Ctrl-C (a clean stop with the
    summary, exit 0; a second Ctrl-C quits at once) or --max-frames;
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
    ctrl_c = CtrlC(on_stop=reader.stop_event.set)
    try:
        with ctrl_c, progress(disable=json_out) as bar:
            task = bar.add_task(f"detect {_display_name(source, kind)}", total=total)
            results = detect_stream(detector, reader.frames(max_frames), batch=batch, workers=max(workers, 1))
            with closing(results):  # on a Ctrl-C, the pool finishes what it started and ends here, not at GC
                for frame, det in results:
                    if ctrl_c.pressed:
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
    except KeyboardInterrupt:  # only where CtrlC could not take SIGINT (see CtrlC.__enter__)
        if kind not in ("stream", "usb"):
            raise
        stopped = True
    finally:
        reader.close()
        if writer is not None:
            writer.close(keep=frames > 0)
    if ctrl_c.pressed and kind not in ("stream", "usb"):
        raise KeyboardInterrupt  # a file stopped half-way: "interrupted", exit 130, as before
    stopped = stopped or ctrl_c.pressed  # a camera runs until Ctrl-C: its normal end, and the summary follows
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
        + ("; stopped by Ctrl-C" if stopped else "")
    )


class CtrlC:
    """While the stream's threads run, Ctrl-C is a request to stop, never an exception.

    Why: Python raises KeyboardInterrupt in the main thread at whichever bytecode it is running. In the stream that
    can be the instant after ``threading.Condition.__enter__`` took its lock (a Future's in ``done()``/``result()``,
    the pool's idle semaphore's, an Event's in ``Thread.start``) and before the ``with`` block that would release it
    began: the main thread then holds that lock for ever, the inference worker that needs it blocks, and the pool's
    shutdown (then the interpreter's exit, which joins every non-daemon thread) waits on that worker for ever:
    ``bastion detect 0`` still running long after Ctrl-C. So the handler raises nothing and takes no lock (the main
    thread may hold it): it notes the press and writes one byte to a pipe; a watcher thread says so and calls
    ``on_stop`` (the reader stops, so even a wait for the next frame ends), and the loop ends at its next frame.
    The first Ctrl-C also hands SIGINT back to the system: a second one ends the process at once (exit status 130),
    whatever it is waiting on.
    """

    def __init__(self, on_stop: Callable[[], None]) -> None:
        self.pressed = False
        self._on_stop = on_stop
        self._previous: object = None
        self._pipe: tuple[int, int] | None = None
        self._watcher: threading.Thread | None = None

    def __enter__(self) -> "CtrlC":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers belong to the main thread: an embedding program's business
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return self  # a parent that made us ignore SIGINT, or a program with its own handler: left alone
        self._pipe = os.pipe()
        os.set_blocking(self._pipe[1], False)
        self._watcher = threading.Thread(target=self._watch, args=(self._pipe[0],), name="bastion-ctrl-c", daemon=True)
        self._watcher.start()  # before the handler: starting a thread takes locks a handler must not
        self._previous = signal.signal(signal.SIGINT, self._pressed)
        return self

    def _pressed(self, signum: int, frame: object) -> None:
        self.pressed = True
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # the next Ctrl-C is the kernel's: the process ends at once
        try:
            os.write(self._pipe[1], b"c")  # type: ignore[index]
        except OSError:  # the watcher is gone: the loop still sees `pressed`
            pass

    def _watch(self, fd: int) -> None:
        try:
            while data := os.read(fd, 16):
                if b"c" in data:
                    err.print("stopping (Ctrl-C again to quit at once)")
                    self._on_stop()
                if b"q" in data:
                    return
        finally:
            os.close(fd)

    def __exit__(self, *exc: object) -> None:
        if self._pipe is None:
            return
        if not self.pressed:
            signal.signal(signal.SIGINT, self._previous)  # type: ignore[arg-type]
        try:
            os.write(self._pipe[1], b"q")
        except OSError:
            pass
        if self._watcher is not None:
            self._watcher.join(5)  # bounded: it only prints a line and sets an event
        os.close(self._pipe[1])
        self._pipe = None


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

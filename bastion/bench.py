"""``bastion bench detect``: bastion vs its floor vs Ultralytics, measured in one run.

Contestants, all on the same files and thresholds:
  (a) ``floor``       — ONNX Runtime ``session.run`` on tensors prepared beforehand;
  (b) ``bastion``     — ``Detector`` end to end (read file → Detections);
  (c) ``ultralytics`` — ``YOLO(model.onnx).predict`` when the model is in Ultralytics
      layout and the ``[distill]`` extra is installed.
Ratios are only ever taken between numbers measured in the same process run.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

import typer
from rich.table import Table

from bastion import __version__
from bastion.console import err, out, print_json, progress
from bastion.models.cli import ALLOW_UNSIGNED_HELP
from bastion.models.zoo import DEFAULT_DETECTOR
from bastion.errors import InputNotFoundError
from bastion.runtime.detect import Detector
from bastion.runtime.detections import Detections
from bastion.runtime.media import iter_video, list_images, read_image
from bastion.runtime.preprocess import batch_inputs
from bastion.runtime.stream import default_workers, detect_stream

log = logging.getLogger(__name__)


def _stats(latencies_s: list[float], wall_s: float | None = None, count: int | None = None) -> dict[str, float]:
    ms = np.asarray(latencies_s) * 1000
    n = count if count is not None else len(latencies_s)
    wall = wall_s if wall_s is not None else float(np.sum(latencies_s))
    result = {"per_s": n / wall if wall > 0 else 0.0, "wall_s": wall, "count": n}
    if len(ms):
        result.update(
            p50_ms=float(np.percentile(ms, 50)), p99_ms=float(np.percentile(ms, 99)), mean_ms=float(ms.mean())
        )
    return result


def _environment(detector: Detector, threads: int | None) -> dict[str, Any]:
    import onnxruntime

    return {
        "bastion": __version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": threads,
        "providers": detector.backend.providers,
    }


def compare_detections(ours: list[Detections], theirs: list[Detections], iou_min: float = 0.9) -> dict[str, Any]:
    """How far two contestants' detections agree: count parity and box/score differences of matched pairs."""
    same_count = 0
    matched = total = 0
    max_box, max_conf = 0.0, 0.0
    for a, b in zip(ours, theirs):
        same_count += len(a) == len(b)
        total += max(len(a), len(b))
        for i in range(len(a)):
            same = np.nonzero(b.cls == a.cls[i])[0]
            if not len(same):
                continue
            diff = np.abs(b.xyxy[same] - a.xyxy[i]).max(axis=1)
            j = same[int(np.argmin(diff))]
            if diff.min() < 2.0:
                matched += 1
                max_box = max(max_box, float(diff.min()))
                max_conf = max(max_conf, float(abs(b.conf[j] - a.conf[i])))
    return {
        "images": len(ours),
        "same_count_images": same_count,
        "matched": matched,
        "total": total,
        "max_box_diff_px": round(max_box, 3),
        "max_conf_diff": round(max_conf, 5),
    }


class _UltralyticsContestant:
    """YOLO(model.onnx) from Ultralytics, configured offline by bastion.distill.ultra."""

    def __init__(self, model_path: Path, imgsz: int, conf: float, iou: float) -> None:
        from bastion.distill.ultra import load_ultralytics

        ultralytics = load_ultralytics()
        self.version = ultralytics.__version__
        self.model = ultralytics.YOLO(str(model_path), task="detect")
        self.kwargs = dict(imgsz=imgsz, conf=conf, iou=iou, verbose=False, device="cpu")

    def predict(self, source: Any, **extra: Any) -> Any:
        return self.model.predict(source, **self.kwargs, **extra)

    @staticmethod
    def to_detections(result: Any, names: list[str]) -> Detections:
        boxes = result.boxes
        return Detections(
            boxes.xyxy.numpy().astype(np.float32),
            boxes.conf.numpy().astype(np.float32),
            boxes.cls.numpy().astype(np.int64),
            names,
        )


def _ultralytics_for(
    detector: Detector, model: str, enabled: bool, notes: list[str], imgsz: int, conf: float, iou: float
) -> _UltralyticsContestant | None:
    if not enabled:
        return None
    if not (model.endswith(".onnx") and detector.manifest.decoder.type == "yolov8"):
        notes.append("ultralytics skipped: it runs only Ultralytics-layout (yolov8/yolo11) ONNX files")
        return None
    from bastion.distill.ultra import ultralytics_available

    if not ultralytics_available():
        notes.append("ultralytics skipped: install the [distill] extra to compare")
        return None
    return _UltralyticsContestant(Path(model), imgsz, conf, iou)


def bench_images(
    images: Path,
    model: str,
    limit: int,
    repeat: int,
    imgsz: int | None,
    conf: float,
    iou: float,
    threads: int | None,
    with_ultralytics: bool,
    progress: Any = None,
    allow_unsigned: bool = False,
) -> dict[str, Any]:
    """Single-image latency/throughput of the three contestants on the same files."""
    if not Path(images).is_dir():
        raise InputNotFoundError(f"not a directory: {images}")
    files = list_images(Path(images))[:limit]
    if not files:
        raise InputNotFoundError(f"no images in {images}")
    detector = Detector.load(model, threads=threads, conf=conf, iou=iou, imgsz=imgsz, allow_unsigned=allow_unsigned)
    notes: list[str] = []
    arrays = [read_image(f) for f in files]
    prepared = [detector.prepare(a) for a in arrays]
    blobs = [batch_inputs([p[0]]) for p in prepared]
    name = detector.backend.inputs[0].name
    tick = _ticker(progress, "bench", len(files) * repeat * (3 if with_ultralytics else 2))

    ultra = _ultralytics_for(detector, model, with_ultralytics, notes, max(detector.size), conf, iou)
    if ultra is not None:
        for f in files[:3]:
            ultra.predict(str(f))  # warm-up
    # Each contestant runs a whole pass on its own: two ONNX Runtime sessions interleaved image by
    # image slow each other down (each one's idle threads spin), which would measure that, not them.
    # The order alternates between repeats so drift in machine load is shared.
    floor, pre, infer, post, e2e, theirs_lat = [], [], [], [], [], []
    bastion_dets: list[Detections] = []
    theirs: list[Detections] = []

    def run_floor() -> None:
        for blob in blobs:
            t = time.perf_counter()
            detector.backend.run({name: blob})
            floor.append(time.perf_counter() - t)
            tick()

    def run_bastion() -> None:
        bastion_dets.clear()
        for f in files:
            t = time.perf_counter()
            bastion_dets.append(detector.detect(f))
            e2e.append(time.perf_counter() - t)
            tick()
        for image in arrays:  # the same work in memory, split into its three steps
            t0 = time.perf_counter()
            tensor, placement = detector.prepare(image)
            blob = batch_inputs([tensor])
            t1 = time.perf_counter()
            outputs = detector.backend.run({name: blob})
            t2 = time.perf_counter()
            detector.postprocess(outputs, [placement])
            t3 = time.perf_counter()
            pre.append(t1 - t0), infer.append(t2 - t1), post.append(t3 - t2)

    def run_ultralytics() -> None:
        theirs.clear()
        for f in files:
            t = time.perf_counter()
            res = ultra.predict(str(f))[0]
            theirs_lat.append(time.perf_counter() - t)
            theirs.append(ultra.to_detections(res, detector.names))
            tick()

    passes = [run_floor, run_bastion] + ([run_ultralytics] if ultra is not None else [])
    for r in range(repeat):
        for run_pass in passes if r % 2 == 0 else passes[::-1]:
            run_pass()
            time.sleep(0.2)  # let the previous session's worker threads go idle

    contestants = {"floor": _stats(floor), "bastion": _stats(e2e)}
    floor_ms = contestants["floor"]["p50_ms"]
    summary: dict[str, Any] = {
        "pre_ms_p50": round(float(np.median(pre)) * 1000, 3),
        "post_ms_p50": round(float(np.median(post)) * 1000, 3),
        "infer_ms_p50": round(float(np.median(infer)) * 1000, 3),
        "pre_post_overhead_pct_of_floor": round(
            (float(np.median(pre)) + float(np.median(post))) * 1000 / floor_ms * 100, 2
        ),
        "bastion_vs_floor": round(contestants["bastion"]["per_s"] / contestants["floor"]["per_s"], 3),
    }
    if ultra is not None:
        contestants["ultralytics"] = _stats(theirs_lat)
        summary["bastion_vs_ultralytics"] = round(
            contestants["bastion"]["per_s"] / contestants["ultralytics"]["per_s"], 3
        )
        summary["bastion_vs_ultralytics_p50"] = round(
            contestants["ultralytics"]["p50_ms"] / contestants["bastion"]["p50_ms"], 3
        )
        summary["agreement"] = compare_detections(bastion_dets, theirs)
        summary["ultralytics_version"] = ultra.version
    return {
        "mode": "images",
        "model": detector.manifest.name,
        "model_sha256": detector.bundle_sha256,
        "input_hw": list(prepared[0][1].input_hw),
        "count": len(files),
        "repeat": repeat,
        "conf": conf,
        "iou": iou,
        "contestants": contestants,
        "summary": summary,
        "notes": notes,
        "environment": _environment(detector, threads),
    }


def bench_video(
    video: Path,
    model: str,
    limit: int,
    imgsz: int | None,
    conf: float,
    iou: float,
    threads: int | None,
    batch: int,
    with_ultralytics: bool,
    workers: int | None = None,
    progress: Any = None,
    allow_unsigned: bool = False,
) -> dict[str, Any]:
    """Frames/s over a video file: floor vs bastion's overlapped pipeline vs Ultralytics' stream."""
    if not Path(video).is_file():
        raise InputNotFoundError(f"video not found: {video}")
    workers = workers or default_workers()
    detector = Detector.load(model, threads=threads, conf=conf, iou=iou, imgsz=imgsz, allow_unsigned=allow_unsigned)
    notes: list[str] = []
    frames = [f.image for f in iter_video(video, limit)]
    if not frames:
        raise InputNotFoundError(f"no frames decoded from {video}")
    tick = _ticker(progress, "bench video", len(frames) * 4)
    name = detector.backend.inputs[0].name
    blobs = [batch_inputs([detector.prepare(f)[0]]) for f in frames]
    lat = []
    t_all = time.perf_counter()
    for blob in blobs:
        t = time.perf_counter()
        detector.backend.run({name: blob})
        lat.append(time.perf_counter() - t)
        tick()
    contestants = {"floor": _stats(lat, time.perf_counter() - t_all)}

    def run_stream(det: Detector, b: int, w: int) -> tuple[dict[str, float], list[Detections]]:
        dets = []
        t0 = time.perf_counter()
        for _, d in detect_stream(det, iter_video(video, len(frames)), batch=b, workers=w):
            dets.append(d)
            tick()
        return _stats([], time.perf_counter() - t0, len(dets)), dets

    # The same pipeline as `bastion detect` on a video: single-threaded session, one inference per core.
    effective = batch if detector.dynamic_batch else 1
    contestants["bastion_serial"], dets_serial = run_stream(detector, 1, 1)
    detector.close()
    streamer = Detector.load(model, threads=1, conf=conf, iou=iou, imgsz=imgsz, allow_unsigned=allow_unsigned)
    contestants["bastion"], dets = run_stream(streamer, effective, workers)
    summary: dict[str, Any] = {
        "batch": effective,
        "workers": workers,
        "bastion_vs_floor": round(contestants["bastion"]["per_s"] / contestants["floor"]["per_s"], 3),
        "pipeline_agreement": compare_detections(dets, dets_serial),
    }
    ultra = _ultralytics_for(detector, model, with_ultralytics, notes, max(detector.size), conf, iou)
    if ultra is not None:
        ultra.predict(frames[0])  # warm-up
        theirs = []
        t0 = time.perf_counter()
        for res in ultra.predict(str(video), stream=True):
            theirs.append(ultra.to_detections(res, detector.names))
            tick()
            if len(theirs) >= len(frames):
                break
        contestants["ultralytics"] = _stats([], time.perf_counter() - t0, len(theirs))
        summary["bastion_vs_ultralytics"] = round(
            contestants["bastion"]["per_s"] / contestants["ultralytics"]["per_s"], 3
        )
        summary["agreement"] = compare_detections(dets, theirs)
        summary["ultralytics_version"] = ultra.version
    return {
        "mode": "video",
        "model": detector.manifest.name,
        "model_sha256": detector.bundle_sha256,
        "video": str(video),
        "count": len(frames),
        "conf": conf,
        "iou": iou,
        "contestants": contestants,
        "summary": summary,
        "notes": notes,
        "environment": _environment(detector, threads),
    }


BACKEND_DEVICES = {"ort-cpu": "cpu", "ort-cuda": "cuda", "ort-trt": "tensorrt", "trt": "trt"}


def bench_backends(
    images: Path,
    model: str,
    backends: list[str],
    limit: int,
    repeat: int,
    imgsz: int | None,
    conf: float,
    iou: float,
    threads: int | None,
    allow_unsigned: bool = False,
) -> dict[str, Any]:
    """The same bundle and images on each backend, in one run; unavailable backends say what to install."""
    from bastion.errors import BastionError, ConfigError

    unknown = [b for b in backends if b not in BACKEND_DEVICES]
    if unknown:
        raise ConfigError(
            f"unknown backend {unknown[0]!r}",
            f"choose from {', '.join(BACKEND_DEVICES)} (trt: "
            "native TensorRT; ort-trt: ONNX Runtime's TensorRT provider)",
        )
    files = list_images(Path(images))[:limit]
    if not files:
        raise InputNotFoundError(f"no images in {images}")
    arrays = [read_image(f) for f in files]
    results: dict[str, Any] = {}
    reference: list[Detections] | None = None
    for name in backends:
        try:
            det = Detector.load(
                model,
                device=BACKEND_DEVICES[name],
                threads=threads,
                conf=conf,
                iou=iou,
                imgsz=imgsz,
                allow_unsigned=allow_unsigned,
            )
        except BastionError as exc:
            results[name] = {"available": False, "reason": str(exc)}
            continue
        lat, dets = [], []
        for _ in range(repeat):
            dets = []
            for image in arrays:
                t = time.perf_counter()
                dets.append(det.detect(image))
                lat.append(time.perf_counter() - t)
        results[name] = {"available": True, "providers": det.backend.providers, **_stats(lat)}
        if reference is None:
            reference = dets
        else:
            results[name]["agreement_with_first"] = compare_detections(dets, reference)
        det.close()
    return {"mode": "backends", "model": model, "count": len(files), "repeat": repeat, "backends": results}


def _ticker(progress: Any, label: str, total: int) -> Callable[[], None]:
    if progress is None:
        return lambda: None
    task = progress.add_task(label, total=total)
    return lambda: progress.advance(task)


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
    repeat: int = typer.Option(1, help="Passes over the images (more = steadier numbers)."),
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
        None, help="Instead: compare backends on --images, e.g. ort-cpu,ort-cuda,ort-trt,trt (trt: native TensorRT)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help=ALLOW_UNSIGNED_HELP),
) -> None:
    """Time raw session.run (the floor), bastion's Detector and (optionally) Ultralytics, in one run.

    Example: bastion bench detect --model yolov5n --images bastion/samples/images --json
    """
    if backends is not None:
        if images is None:
            from bastion.errors import ConfigError

            raise ConfigError("--backends compares backends on --images DIR")
        result = bench_backends(
            images,
            model,
            [b.strip() for b in backends.split(",") if b.strip()],
            limit,
            repeat,
            imgsz,
            conf,
            iou,
            threads,
            allow_unsigned,
        )
        if json_out:
            print_json(result)
        else:
            for name, row in result["backends"].items():
                out.print(f"{name}: {row}")
        return
    if (images is None) == (video is None):
        from bastion.errors import ConfigError

        raise ConfigError("give exactly one of --images DIR or --video FILE")
    kwargs = dict(
        model=model,
        limit=limit,
        imgsz=imgsz,
        conf=conf,
        iou=iou,
        threads=threads,
        with_ultralytics=ultralytics,
        allow_unsigned=allow_unsigned,
    )
    with progress(disable=json_out) as bar:
        if images is not None:
            result = bench_images(images, repeat=repeat, progress=bar, **kwargs)
        else:
            result = bench_video(video, batch=batch, workers=workers, progress=bar, **kwargs)
    if json_out:
        print_json(result)
        return
    out.print(f"bench detect: {result['model']} ({result['mode']}, {result['count']} inputs)", style="bold")
    table = Table(show_edge=False)
    for col in ("contestant", "items/s", "p50 ms", "p99 ms"):
        table.add_column(col, justify="right" if col != "contestant" else "left")
    for name, r in result["contestants"].items():
        table.add_row(
            name, f"{r['per_s']:.1f}", f"{r.get('p50_ms', float('nan')):.2f}", f"{r.get('p99_ms', float('nan')):.2f}"
        )
    out.print(table)
    for key, value in result["summary"].items():
        out.print(f"{key}: {value}")
    if result.get("notes"):
        for note in result["notes"]:
            err.print(f"note: {note}")


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
    json_out: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """A real node on a paced file: fps, drops and event latency (read → subscriber) vs the model's latency.

    Example: bastion bench node --fps 30 --imgsz 320 --subscribers 100 --json
    """
    from bastion.bench_node import bench_node

    err.print(f"measuring a node for {seconds:.0f} s …")
    result = bench_node(model, video, fps, seconds, imgsz, threads, subscribers)
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

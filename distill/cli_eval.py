"""``bastion eval detect``: COCO metrics of a detector on a labelled set, in this process or on Ray (``--on ray``).

Light at import (``bastion eval --help``): the evaluation, the detector and Ray are imported by the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from bastion.console import out, print_json, progress, warn
from bastion.hardware.backend_names import DEVICE_HELP as BACKEND_DEVICE_HELP
from bastion.models.cli import ALLOW_UNSIGNED_HELP
from bastion.models.zoo import DEFAULT_DETECTOR

eval_app = typer.Typer(help="Measure model accuracy on a labelled dataset.", no_args_is_help=True)
ON_HELP = (
    "Where the model runs over the images: single (this process), ray (a local Ray cluster, one worker per core), "
    "ray:auto or ray:HOST:PORT (a running Ray cluster; needs the scale extra). Same metrics either way. "
    "See docs/scale.md."
)


@eval_app.command("detect")
def eval_detect_command(
    data: Path = typer.Option(..., "--data", help="Ultralytics-style data.yaml (YOLO labels)."),
    model: str = typer.Option(DEFAULT_DETECTOR, "--model", "-m", help="Bundle directory, zoo name or .onnx file."),
    split: str = typer.Option("val", help="Which split of data.yaml to score."),
    imgsz: int = typer.Option(640, help="Input size (long side)."),
    conf: float = typer.Option(0.001, help="Confidence threshold (keep low for mAP)."),
    iou: float = typer.Option(0.6, help="NMS IoU threshold."),
    max_det: int = typer.Option(300, help="Max detections per image."),
    rect: bool = typer.Option(True, help="YOLOv5-style rectangular batches (dynamic-shape models)."),
    limit: Optional[int] = typer.Option(None, help="Only the first N images (sorted by name)."),
    bootstrap: int = typer.Option(
        0,
        min=0,
        help="Resample the images N times for a 90 % interval on mAP50 "
        "(e.g. 200; tells whether a few points between two models are real).",
    ),
    threads: Optional[int] = typer.Option(
        None, help="CPU threads for inference (with --on ray: per worker, default 1)."
    ),
    device: str = typer.Option("auto", help=BACKEND_DEVICE_HELP),
    on: str = typer.Option("single", "--on", help=ON_HELP),
    workers: Optional[int] = typer.Option(
        None, "--workers", help="Ray workers with --on ray (default: one per CPU core, or per GPU, of the cluster)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help=ALLOW_UNSIGNED_HELP),
) -> None:
    """COCO mAP50-95, mAP50 and per-class AP of a detector on YOLO-format labels.

    Example: bastion eval detect --model yolov5n --data ../shared/data/coco128/coco128.yaml --bootstrap 200 --json
    (add --on ray to run the model on a local Ray cluster: docs/scale.md)
    """
    from contextlib import ExitStack

    from bastion.distill.datasets import load_data_yaml
    from bastion.distill.evaluate import EvalSettings, evaluate_detector
    from bastion.distill.labellers import EVAL_FLAGS, parse_labeller

    choice = parse_labeller(on, workers, EVAL_FLAGS)  # a bad --on / --workers: one line before any work
    if choice.kind == "ray":
        from bastion.distill.ray_session import require_ray

        require_ray(EVAL_FLAGS)  # without the [scale] extra: one line before any work
    dataset = load_data_yaml(data, split, limit)
    settings = EvalSettings(imgsz=imgsz, conf=conf, iou=iou, max_det=max_det, rect=rect, bootstrap=bootstrap)
    options = {"conf": conf, "iou": iou, "max_det": max_det, "imgsz": imgsz, "multi_label": True, "scaleup": False}
    with ExitStack() as stack:
        runner = None
        if choice.kind == "ray":
            from bastion.distill.ray_eval import RayEvalRunner, build_detector, open_session, open_source

            source = open_source(model, allow_unsigned)
            detector = build_detector(source, device, threads, allow_unsigned, options)
            stack.callback(detector.close)
            session = stack.enter_context(open_session(choice))  # shut down (or left) however the block ends
            runner = RayEvalRunner(session, source, detector, device, threads, options, imgsz)
        else:
            from bastion.runtime.detect import Detector

            detector = Detector.load(model, device=device, threads=threads, allow_unsigned=allow_unsigned, **options)
            stack.callback(detector.close)
        with progress(disable=json_out) as bar:
            task = bar.add_task(f"eval {detector.manifest.name}", total=len(dataset.images))
            resamples = bar.add_task("bootstrap", total=bootstrap, visible=bootstrap > 0)
            report = evaluate_detector(
                detector,
                dataset,
                settings,
                tick=lambda: bar.advance(task),
                bootstrap_tick=lambda: bar.advance(resamples),
                runner=runner,
            )
    for line in report.skipped:
        warn(f"skipped unreadable image {line}")
    if json_out:
        print_json(report.to_dict())
        return
    out.print(f"{report.model} on {data} ({report.images} images, {report.instances} boxes)", style="bold")
    table = Table(show_edge=False)
    for col in ("class", "instances", "AP50", "AP50-95"):
        table.add_column(col, justify="left" if col == "class" else "right")
    ci = report.map50_interval
    table.add_row(
        "all",
        str(report.instances),
        f"{report.map50:.3f}" + (f" ({ci.low:.3f}–{ci.high:.3f})" if ci else ""),
        f"{report.map50_95:.3f}",
        style="bold",
    )
    for name, row in report.per_class.items():
        table.add_row(name, str(row["instances"]), f"{row['ap50']:.3f}", f"{row['ap50_95']:.3f}")
    out.print(table)

"""CLI commands of the model team: ``bastion quantize`` and ``bastion distill`` (``bastion eval``: cli_eval.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from bastion.console import out, print_json, progress, stage_bars
from bastion.distill.labellers import LABELLER_HELP
from bastion.distill.torch_device import DEVICE_HELP, data_parallel_devices, launched_devices, training_device
from bastion.models.cli import ALLOW_UNSIGNED_HELP
from bastion.models.cli_options import CLASSIFICATION_HELP, MARKING_HELP, RELEASABLE_TO_HELP, markings_from

TARGET_HELP = (
    "Where the INT8 model will run: a device profile (hardware/profiles: x86-cpu, jetson-orin-nano-8gb, "
    "…) or a CPU class (x86-avx2, x86-avx512-vnni, x86-amx, arm64-dotprod, …); default: this machine. "
    "Picks the recipes that hold there (no full-range U8S8 on x86 without VNNI)."
)


def quantize_command(
    model: str = typer.Option(..., "--model", "-m", help="FP32 detection bundle (directory, registry or zoo name)."),
    calib: Path = typer.Option(..., "--calib", help="Directory of typical images for calibration."),
    calib_count: int = typer.Option(32, help="Use at most this many calibration images."),
    data: Path = typer.Option(..., "--data", help="Labelled data.yaml the gate measures mAP on."),
    split: str = typer.Option("val", help="Split of data.yaml."),
    imgsz: int = typer.Option(640, help="Fixed input size of the INT8 model."),
    max_drop: float = typer.Option(1.0, help="Largest mAP50 drop (points) the INT8 model may cost."),
    min_speedup: float = typer.Option(1.1, help="Smallest end-to-end speed-up over FP32 worth that cost."),
    limit: Optional[int] = typer.Option(None, help="Gate on the first N images only."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Write the INT8 bundle here if accepted."),
    target: Optional[str] = typer.Option(None, "--target", help=TARGET_HELP),
    recipe: Optional[str] = typer.Option(
        None,
        "--recipe",
        help="Try only this INT8 recipe (see "
        "docs/benchmarks.md), e.g. u8s8-7bit-symact; default: the target's "
        "candidates, best first.",
    ),
    sign: Optional[Path] = typer.Option(None, "--sign", help="Sign the INT8 bundle with this private key."),
    passphrase: bool = typer.Option(False, "--passphrase", help="Prompt for the key's passphrase."),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help=ALLOW_UNSIGNED_HELP),
    fp32_sibling: bool = typer.Option(
        True,
        "--fp32-sibling/--no-fp32-sibling",
        help="Ship the FP32 model beside the INT8 one (signed), run under int8_policy strict where the INT8 "
        "verdict does not hold; --no-fp32-sibling for size-constrained units.",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the gate result as JSON."),
) -> None:
    """INT8 (ONNX Runtime static QDQ) of a detection bundle, kept only if its measured mAP50 drop is small.

    Example: bastion quantize --model yolov5n --calib images/ --data data.yaml --imgsz 320 --target x86-cpu
    --out yolov5n-int8
    """
    from bastion.distill.datasets import load_data_yaml
    from bastion.distill.int8_gate import quantize_and_gate
    from bastion.errors import ConfigError, InputNotFoundError
    from bastion.models.bundle import Bundle
    from bastion.runtime.media import list_images

    from bastion.distill.int8_recipe import recipe_by_name
    from bastion.hardware.isa import resolve_target

    resolve_target(target)  # an unknown profile or class is one line before any work
    recipes = [recipe_by_name(recipe)] if recipe else None
    bundle = Bundle.open(model, allow_unsigned=allow_unsigned)
    if bundle.manifest.task != "detect":
        raise ConfigError(f"{model} is not a detection bundle")
    if not calib.is_dir():
        raise InputNotFoundError(f"calibration directory not found: {calib}")
    images = list_images(calib)[:calib_count]
    if not images:
        raise InputNotFoundError(f"no images in {calib}")
    if out_dir is not None and out_dir.exists():
        raise ConfigError(f"{out_dir} already exists", "choose a new --out directory")
    key = None
    if sign is not None:
        from bastion.models.keys import load_private_key, read_passphrase

        key = load_private_key(sign, read_passphrase(passphrase))
    dataset = load_data_yaml(data, split, limit)
    with progress(disable=json_out) as bar:
        task = bar.add_task("quantize + gate", total=2)
        result = quantize_and_gate(
            bundle,
            images,
            dataset,
            imgsz,
            max_drop,
            out_dir,
            key,
            tick=lambda: bar.advance(task),
            min_speedup=min_speedup,
            target=target,
            recipes=recipes,
            fp32_sibling=fp32_sibling,
        )
    if json_out:
        print_json(result.to_dict())
        return
    out.print(
        f"FP32 mAP50 {result.fp32['map50']:.3f} ({result.fp32['latency_ms']:.1f} ms) → INT8 mAP50 "
        f"{result.int8['map50']:.3f} ({result.int8['latency_ms']:.1f} ms) at {imgsz}: {result.reason}"
    )
    out.print(
        ("" if result.measured_on_target else "[bold yellow]WARNING[/]: ") + f"INT8 for {result.target}: {result.note}"
    )
    if result.bundle:
        out.print(f"INT8 bundle: {result.bundle}" + ("" if key else " (UNSIGNED: bastion bundle sign it)"))


distill_app = typer.Typer(help="Make a smaller model for a narrower mission.", no_args_is_help=True)


@distill_app.command("detect")
def distill_detect_command(
    teacher: list[str] = typer.Option(
        ...,
        "--teacher",
        help="Teacher: a detection bundle (zoo/registry name or "
        "directory), an Ultralytics .pt checkpoint, or a bare YOLO .onnx (with "
        "--allow-unsigned); repeat for an ensemble.",
    ),
    images: Path = typer.Option(..., "--images", help="Directory of images to learn from."),
    labels: Optional[Path] = typer.Option(
        None,
        "--labels",
        help="YOLO labels (teacher class ids) for some images;"
        " they win over pseudo-labels and provide the held-out validation.",
    ),
    val_images: Optional[Path] = typer.Option(
        None,
        "--val-images",
        help="Held-out images every candidate is scored on (default: a share of the labelled --images).",
    ),
    val_labels: Optional[Path] = typer.Option(
        None, "--val-labels", help="Ground truth of --val-images (teacher class ids)."
    ),
    classes: str = typer.Option(..., "--classes", help="The student's classes, e.g. person,vehicle."),
    class_map: Optional[str] = typer.Option(
        None, "--class-map", help="Teacher→student names, e.g. car=vehicle,truck=vehicle,bus=vehicle."
    ),
    conf: str = typer.Option(
        "0.25",
        "--conf",
        help="Pseudo-label threshold: one value, per class "
        "(person=0.3,vehicle=0.2), or auto (per class, best F1 against the labelled training "
        "images).",
    ),
    imgsz: int = typer.Option(320, help="Target input size."),
    min_map50: float = typer.Option(0.0, help="Ship only a candidate at least this accurate."),
    max_latency: Optional[float] = typer.Option(None, help="Ship only a candidate at most this slow (ms, 1 thread)."),
    max_map50_drop: Optional[float] = typer.Option(
        None, help="Ship the fastest candidate within this many mAP50 points of the most accurate one."
    ),
    int8: bool = typer.Option(True, help="Try INT8 of the sliced teacher and the student through the gate."),
    max_int8_drop: float = typer.Option(1.0, help="Refuse an INT8 model losing more than this many mAP50 points."),
    target: Optional[str] = typer.Option(None, "--target", help=TARGET_HELP),
    no_train: bool = typer.Option(False, "--no-train", help="Measure only the candidates that need no training."),
    student: str = typer.Option(
        "yolov5n.yaml",
        help="Student architecture: an Ultralytics model YAML (yolov5n, "
        "yolov8n, yolo11n or a path), or teacher-sliced (no training: the sliced teacher).",
    ),
    warm_start: Optional[Path] = typer.Option(None, help="Copy matching tensors from this .pt/.safetensors."),
    epochs: int = typer.Option(10, help="Training epochs."),
    batch: int = typer.Option(16, help="Training batch size."),
    freeze: int = typer.Option(0, help="Freeze the first N layers (10: yolov5n backbone, 24: backbone+neck)."),
    width: Optional[float] = typer.Option(None, help="Width multiple override (a narrower, cheaper student)."),
    depth: Optional[float] = typer.Option(None, help="Depth multiple override."),
    prune: Optional[float] = typer.Option(
        None,
        help="After the warm start, remove this share of channels "
        "(structured, smallest L2 norm first): cheaper than the teacher at the "
        "same size, still warm. Train with --freeze 0.",
    ),
    soft: bool = typer.Option(
        True,
        "--soft/--hard",
        help="Teachers' scores scale the classification target (docs/distillation.md); --hard trains on 0/1 labels.",
    ),
    feature_kd: float = typer.Option(
        6.0,
        "--feature-kd",
        help="Weight of Ultralytics' feature distillation when a teacher is an Ultralytics .pt (0: off).",
    ),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    nproc: str = typer.Option(
        "1",
        "--nproc",
        help="Train the student on N processes: N GPUs (Ultralytics' own DDP) or N gloo workers on CPU cores.",
    ),
    labeller: str = typer.Option("single", "--labeller", help=LABELLER_HELP),
    labeller_workers: Optional[int] = typer.Option(
        None, "--labeller-workers", help="Ray workers (default: one per CPU core, or per GPU, of the cluster)."
    ),
    out_dir: Path = typer.Option(..., "--out", help="Run directory (stages are cached; re-run resumes)."),
    force: list[str] = typer.Option([], "--force", help="Redo this stage and the ones after it."),
    sign: Optional[Path] = typer.Option(None, "--sign", help="Sign the shipped bundle with this private key."),
    classification: Optional[str] = typer.Option(None, "--classification", help=CLASSIFICATION_HELP),
    releasable_to: list[str] = typer.Option([], "--releasable-to", help=RELEASABLE_TO_HELP),
    marking: Optional[str] = typer.Option(None, "--marking", help=MARKING_HELP),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help=ALLOW_UNSIGNED_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Distill a narrow detector: pseudo-label with the teachers, measure every candidate, ship the best.

    Example: bastion distill detect --teacher yolov5n --images imgs/ --labels labels/ --classes person,vehicle
    --class-map car=vehicle,truck=vehicle,bus=vehicle --imgsz 320 --warm-start yolov5n.safetensors --freeze 24
    --out runs/distill/pv   (add --labeller ray to pseudo-label on a local Ray cluster: docs/scale.md)
    """
    from bastion.distill import ddp
    from bastion.distill.classmap import parse_class_map
    from bastion.distill.detect_pipeline import run_distill
    from bastion.distill.spec import DistillSpec, checked
    from bastion.distill.train import TrainSpec
    from bastion.distill.ultra import ultralytics_available
    from bastion.distill.ultra_ddp import follow, leading
    from bastion.errors import ConfigError, MissingExtraError

    workers = ddp.check_nproc(nproc)
    world = ddp.launched_world_for(workers)
    if world is not None and world.size > 1 and not world.is_main:  # under an external torchrun: rank 0 leads
        ddp.meeting(world)  # the launcher's store, reached before any work
        logging.getLogger("bastion").setLevel(logging.WARNING)
        follow(world)  # no stage here: the student's training when rank 0 posts it, then quiet
        return
    with leading(world):  # rank 0 of an external torchrun tells the waiting ranks how its command ended
        thresholds: dict[str, float] = {}
        try:
            for item in [] if conf == "auto" else conf.split(","):
                name, sep, value = item.partition("=")
                thresholds[name.strip() if sep else "*"] = float(value if sep else name)
        except ValueError:
            raise ConfigError(f"--conf {conf!r}: give a number or name=number pairs") from None
        train = None
        if not (no_train or student == "teacher-sliced"):
            if not ultralytics_available():
                raise MissingExtraError(
                    "student training",
                    "distill",
                    "ultralytics-opencv-headless",
                    "(or pass --no-train to measure only the no-training candidates)",
                )
            if not (Path(student).suffix or Path(student).exists()):
                student += ".yaml"  # yolov8n → yolov8n.yaml: Ultralytics' built-in architecture
            # GPUs: Ultralytics' own DDP over cuda:I,I+1,…; the CPU: `workers` gloo processes (distill/ultra_ddp.py);
            # under an external torchrun: the world's ranks, each on the CPU or on its node's GPU LOCAL_RANK
            trainer = training_device(device)
            on_cpu = trainer == "cpu"
            ranks = world.size if world is not None else workers
            if (on_cpu or world is not None) and batch % ranks:
                raise ConfigError(
                    f"--batch {batch} does not split over {ranks} processes",
                    f"give a multiple of {ranks}" if world is not None else "give a multiple of --nproc",
                )
            if on_cpu:
                placed = trainer
            elif world is not None and world.size > 1:
                placed = launched_devices(trainer)
            else:
                placed = data_parallel_devices(trainer, workers)
            train = checked(
                TrainSpec,
                student=student,
                warm_start=warm_start,
                epochs=epochs,
                batch=batch,
                freeze=freeze,
                width=width,
                depth=depth,
                soft=soft,
                feature_weight=feature_kd,
                prune=prune,
                device=placed,
                nproc=workers if on_cpu else 1,
            )
        spec = checked(
            DistillSpec,
            teachers=list(teacher),
            images=images,
            labels=labels,
            classes=[c.strip() for c in classes.split(",") if c.strip()],
            train=train,
            class_map=parse_class_map(class_map),
            conf=thresholds,
            imgsz=imgsz,
            out=out_dir,
            min_map50=min_map50,
            max_latency_ms=max_latency,
            max_map50_drop=max_map50_drop,
            int8=int8,
            max_int8_drop=max_int8_drop,
            int8_target=target,
            val_images=val_images,
            val_labels=val_labels,
            conf_auto=conf == "auto",
            allow_unsigned=allow_unsigned,
            force=set(force),
            labeller=labeller,
            labeller_workers=labeller_workers,
            markings=markings_from(classification, releasable_to, marking),
        )
        if spec.labeller != "single":  # without the [scale] extra: one line now, not after the teachers stage
            from bastion.distill.ray_labeller import require_ray

            require_ray()
        key = None
        if sign is not None:
            from bastion.models.keys import load_private_key, read_passphrase

            key = load_private_key(sign, read_passphrase(False))
        with progress(disable=json_out) as bar:
            report = run_distill(spec, key, stage_bars(bar))
        if json_out:
            print_json(report)
            return
        out.print((out_dir / "report" / "report.md").read_text())


# the language-model commands live in their own module; they join the same `bastion distill` group
from bastion.distill.cli_lm import distill_lm_command, distill_lm_export_command  # noqa: E402

distill_app.command("lm-export")(distill_lm_export_command)
distill_app.command("lm")(distill_lm_command)

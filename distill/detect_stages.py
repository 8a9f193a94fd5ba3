"""The first three stages of ``bastion distill detect``: teachers, labels, student.

Each is a function over the run's ``DetectRunDir``: it does its work only when the stage is not cached yet, inside
``run.stage(...)`` (staged, renamed into place when it succeeds, recorded in ``run.json``), and returns what the
next stage needs. ``detect_pipeline`` strings them together with the candidates and the report.
"""

from __future__ import annotations

from pathlib import Path

from bastion.distill.classmap import ClassMap
from bastion.distill.datasets import load_data_yaml
from bastion.distill.labellers import TEACHER_CONF, open_labeller, parse_labeller
from bastion.distill.progress import RunProgress
from bastion.distill.pseudo import build_dataset
from bastion.distill.run import DetectRunDir
from bastion.distill.spec import DistillSpec
from bastion.distill.teachers import check_unchanged, export_checkpoint_teacher, is_checkpoint, is_imported
from bastion.errors import ConfigError, InputNotFoundError
from bastion.models.bundle import Bundle
from bastion.runtime.detect import Detector
from bastion.runtime.media import list_images, read_image

STAGE_COUNT = len(DetectRunDir.STAGES)


def open_teachers(spec: DistillSpec, run: DetectRunDir, progress: RunProgress) -> list[Bundle]:
    """Stage 1: verified detection bundles (Ultralytics checkpoints are exported into the run first)."""
    progress.stage(1, STAGE_COUNT, "teachers", f"opening {len(spec.teachers)} teacher(s): {', '.join(spec.teachers)}")
    bare = [ref for ref in spec.teachers if Path(ref).suffix == ".onnx"]
    if bare and not spec.allow_unsigned:
        raise ConfigError(
            f"teacher {bare[0]} is a bare ONNX file: it has no manifest and no signature",
            "make a signed bundle (bastion bundle create … --sign KEY), or for development pass --allow-unsigned",
        )
    if not run.done("teachers"):
        with run.stage("teachers") as (stage, result):
            result["checkpoints"] = {
                ref: export_checkpoint_teacher(Path(ref), stage / f"teacher-{i}")
                for i, ref in enumerate(spec.teachers)
                if is_imported(ref)
            }
    exported = run.result("teachers").get("checkpoints", {})
    bundles = []
    for ref in spec.teachers:
        if is_imported(ref):
            if ref not in exported:
                raise ConfigError(
                    f"teacher {ref} is not part of this run's cached teachers",
                    "re-run with --force teachers, or use a new --out",
                )
            check_unchanged(exported[ref])
            bundles.append(Bundle.open_fresh(run.dir("teachers") / exported[ref]["bundle"]))
        else:
            bundles.append(Bundle.open(ref, allow_unsigned=spec.allow_unsigned))
    for ref, b in zip(spec.teachers, bundles):
        if b.manifest.task != "detect" or b.manifest.decoder is None:
            raise ConfigError(
                f"teacher {ref} is not a detector (task {b.manifest.task})", "give detection bundles as --teacher"
            )
    run.record(
        "teachers",
        [
            {
                "ref": ref,
                "name": b.manifest.name,
                "version": b.manifest.version,
                "sha256": b.sha256,
                "decoder": b.manifest.decoder.type,
                "signer": b.verification.key_id,
                "license": b.manifest.license.weights,
                **({"checkpoint_sha256": exported[ref]["checkpoint_sha256"]} if ref in exported else {}),
            }
            for ref, b in zip(spec.teachers, bundles)
        ],
    )
    return bundles


def class_maps(spec: DistillSpec, teachers: list[Bundle]) -> list[ClassMap]:
    """Each teacher's classes onto the student's (``--class-map`` merges, e.g. car/truck/bus → vehicle)."""
    maps = []
    for b in teachers:
        known = {k: v for k, v in spec.class_map.items() if k in b.manifest.classes}
        usable = [c for c in spec.classes if c in b.manifest.classes or c in known.values()]
        if not usable:
            raise ConfigError(
                f"teacher {b.manifest.name} knows none of {spec.classes}",
                f"its classes: {', '.join(b.manifest.classes[:20])}",
            )
        maps.append(ClassMap.build(b.manifest.classes, spec.classes, known))
    return maps


def make_labels(
    spec: DistillSpec, run: DetectRunDir, teachers: list[Bundle], maps: list[ClassMap], progress: RunProgress
) -> None:
    """Stage 2: the labelled dataset (labels/data.yaml, soft scores, dataset.json). The held-out set — a separate
    --val-images set, or a share of the labelled images — goes to the val split only: never trained on, never used
    to choose thresholds (``auto_thresholds`` reads training images only)."""
    if run.done("labels"):
        progress.stage(2, STAGE_COUNT, "labels", "cached")
        return
    images = list_images(spec.images) if spec.images.is_dir() else []
    if not images:
        raise InputNotFoundError(f"no images in {spec.images}")
    val_set = None
    if spec.val_images is not None:
        val_list = list_images(spec.val_images) if spec.val_images.is_dir() else []
        if not val_list:
            raise InputNotFoundError(f"no images in {spec.val_images}")
        val_set = (val_list, spec.val_labels)
    total = len(images) + len(val_set[0] if val_set else [])
    choice = parse_labeller(spec.labeller, spec.labeller_workers)
    who = "" if choice.kind == "single" else f" on Ray ({choice.address or 'a local cluster'})"
    progress.stage(2, STAGE_COUNT, "labels", f"labelling {total} images with {len(teachers)} teacher(s){who}")
    thresholds = [spec.conf.get(c, spec.conf.get("*", 0.25)) for c in spec.classes]
    chosen = None
    if spec.conf_auto:  # at most 64 labelled images: in this process, whichever labeller labels the rest
        detectors = [Detector.from_bundle(b, conf=TEACHER_CONF) for b in teachers]  # verified above
        try:
            thresholds, chosen = auto_thresholds(spec, images, detectors, maps, thresholds)
        finally:
            for d in detectors:
                d.close()
    with open_labeller(choice, teachers, maps) as labeller, run.stage("labels") as (stage, result):
        stats = build_dataset(
            images,
            spec.labels,
            labeller,
            maps,
            spec.classes,
            thresholds,
            stage,
            spec.val_fraction,
            tick=progress.bar("pseudo-labels", total),
            val_set=val_set,
        )
        result.update(
            stats.__dict__,
            thresholds=dict(zip(spec.classes, thresholds)),
            threshold_choice={spec.classes[c]: v for c, v in chosen.items()} if chosen else "given",
            val_is_ground_truth=spec.labels is not None or val_set is not None,
            labeller=labeller.describe(),
        )


def auto_thresholds(
    spec: DistillSpec, images: list[Path], teachers: list[Detector], maps, defaults: list[float], limit: int = 64
) -> tuple[list[float], dict]:
    """Per-class thresholds by F1 on labelled *training* images (never the held-out ones)."""
    from bastion.distill.pseudo import choose_thresholds, held_out, read_gt

    samples = []
    for path in images:
        gt_file = spec.labels / f"{path.stem}.txt" if spec.labels else None
        if (
            gt_file is None
            or not gt_file.is_file()
            or (spec.val_images is None and held_out(path.name, spec.val_fraction))
        ):
            continue
        try:
            samples.append((read_image(path), read_gt(gt_file, maps[0])))
        except Exception:  # an unreadable image is skipped here and reported by the labels stage
            continue
        if len(samples) == limit:
            break
    if not samples:
        raise ConfigError(
            "--conf auto needs ground-truth labels for some training images",
            "give --labels, or thresholds like --conf person=0.3,vehicle=0.2",
        )
    return choose_thresholds(samples, teachers, maps, len(spec.classes), fallback=defaults[0])


def train(spec: DistillSpec, run: DetectRunDir, progress: RunProgress) -> None:
    """Stage 3: the student (Ultralytics, the [distill] extra), when training was asked for."""
    if spec.train is None:
        progress.stage(3, STAGE_COUNT, "student", "not trained (training was not requested)")
        return
    if run.done("student"):
        progress.stage(3, STAGE_COUNT, "student", "cached")
        return
    from bastion.distill.train import train_student

    train_spec = spec.train
    checkpoints = [Path(ref) for ref in spec.teachers if is_checkpoint(ref)]
    if train_spec.feature_teacher is None and checkpoints and train_spec.feature_weight > 0:
        # an Ultralytics teacher: its features teach the student too (Ultralytics' own distill_model=)
        train_spec = train_spec.model_copy(update={"feature_teacher": checkpoints[0]})
    progress.stage(3, STAGE_COUNT, "student", f"training {train_spec.student} for {train_spec.epochs} epochs")
    with run.stage("student") as (stage, result):
        result.update(
            train_student(run.data_yaml, train_spec, spec.imgsz, stage, progress.training("train student")),
            dataset_sha256=load_data_yaml(run.data_yaml, "train").sha256(),
            student=train_spec.student,
            epochs=train_spec.epochs,
            freeze=train_spec.freeze,
            warm_start=str(train_spec.warm_start) if train_spec.warm_start else None,
        )

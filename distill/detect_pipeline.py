"""``bastion distill detect``: teachers → pseudo-labels → candidates measured in one run → report → bundle.

It builds the labelled dataset (``labels/data.yaml`` + ``labels/soft/``), measures every candidate a user can
get without training (the teacher at full and at the target size, the teacher with its head sliced to the
mission's classes, and INT8 of each where the gate passes it) beside the students it trains (Ultralytics, warm
started), ships the best one that meets the constraints, and says so plainly in the report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


from bastion.distill.classmap import ClassMap
from bastion.distill.datasets import load_data_yaml
from bastion.distill.evaluate import REPORT_BOOTSTRAP, EvalSettings, evaluate_detector, latency_ms
from bastion.distill.pseudo import DATASET_MANIFEST, build_dataset
from bastion.distill.run import RunDir
from bastion.distill.teachers import check_unchanged, export_checkpoint_teacher, is_checkpoint, is_imported
from bastion.distill.train import TrainSpec
from bastion.errors import ConfigError, InputNotFoundError
from bastion.models.bundle import Bundle
from bastion.models.provenance import stamp
from bastion.runtime.backends import open_backend
from bastion.runtime.detect import DetectOptions, Detector
from bastion.runtime.media import list_images, read_image

log = logging.getLogger(__name__)
STAGES = ["teachers", "labels", "student", "baselines", "report"]
EVAL_OPTS = dict(conf=0.001, iou=0.6, multi_label=True, scaleup=False)


@dataclass
class DistillSpec:
    teachers: list[str]
    images: Path
    labels: Path | None
    classes: list[str]
    class_map: dict[str, str]
    conf: dict[str, float]
    imgsz: int
    out: Path
    val_fraction: float = 0.25
    min_map50: float = 0.0
    max_latency_ms: float | None = None
    max_map50_drop: float | None = None  # points below the best candidate: then ship the fastest within it
    conf_auto: bool = False  # per-class thresholds chosen by F1 against the labelled training images
    int8: bool = True
    max_int8_drop: float = 1.0  # mAP50 points an INT8 model may lose against its FP32 source
    int8_target: str | None = None  # device profile or CPU class the INT8 recipe must hold on (None: this CPU)
    val_images: Path | None = None  # a separate labelled held-out set (else: a share of the labelled images)
    val_labels: Path | None = None
    allow_unsigned: bool = False
    force: set[str] = field(default_factory=set)
    train: "TrainSpec | None" = None  # None: no student is trained (only the no-training candidates)


def run_distill(
    spec: DistillSpec, sign_key=None, progress: Callable[[str, int], Callable[[], None]] | None = None
) -> dict[str, Any]:
    run = RunDir(spec.out, STAGES, spec.force)
    run.record("spec", {k: (sorted(v) if isinstance(v, set) else v) for k, v in spec.__dict__.items()})
    tick = progress or (lambda label, total: lambda: None)

    # 1. teachers: verified bundles (or Ultralytics checkpoints, exported into the run) whose classes cover
    # the mission's
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
    maps = []
    for b in bundles:
        known = {k: v for k, v in spec.class_map.items() if k in b.manifest.classes}
        usable = [c for c in spec.classes if c in b.manifest.classes or c in known.values()]
        if not usable:
            raise ConfigError(
                f"teacher {b.manifest.name} knows none of {spec.classes}",
                f"its classes: {', '.join(b.manifest.classes[:20])}",
            )
        maps.append(ClassMap.build(b.manifest.classes, spec.classes, known))

    # 2. labels
    if not run.done("labels"):
        images = list_images(spec.images) if spec.images.is_dir() else []
        if not images:
            raise InputNotFoundError(f"no images in {spec.images}")
        thresholds = [spec.conf.get(c, spec.conf.get("*", 0.25)) for c in spec.classes]
        teachers = [Detector.from_bundle(b, conf=0.05) for b in bundles]  # verified above
        chosen_thresholds = None
        if spec.conf_auto:
            thresholds, chosen_thresholds = _auto_thresholds(
                spec, images, teachers, maps, thresholds, tick("choose thresholds", 1)
            )
        with run.stage("labels") as (stage, result):
            val_set = None
            if spec.val_images is not None:
                val_list = list_images(spec.val_images) if spec.val_images.is_dir() else []
                if not val_list:
                    raise InputNotFoundError(f"no images in {spec.val_images}")
                val_set = (val_list, spec.val_labels)
            stats = build_dataset(
                images,
                spec.labels,
                teachers,
                maps,
                spec.classes,
                thresholds,
                stage,
                spec.val_fraction,
                tick=tick("pseudo-labels", len(images) + len(val_set[0] if val_set else [])),
                val_set=val_set,
            )
            result.update(
                stats.__dict__,
                thresholds=dict(zip(spec.classes, thresholds)),
                threshold_choice={spec.classes[c]: v for c, v in chosen_thresholds.items()}
                if chosen_thresholds
                else "given",
                val_is_ground_truth=spec.labels is not None or val_set is not None,
            )
        for t in teachers:
            t.close()
    dataset = load_data_yaml(run.dir("labels") / "data.yaml", "val")

    # 3. the student (Ultralytics, [distill] extra)
    if spec.train is not None and not run.done("student"):
        from bastion.distill.train import train_student

        train = spec.train
        checkpoints = [Path(ref) for ref in spec.teachers if is_checkpoint(ref)]
        if train.feature_teacher is None and checkpoints and train.feature_weight > 0:
            # an Ultralytics teacher: its features teach the student too (Ultralytics' own distill_model=)
            train = dataclasses.replace(train, feature_teacher=checkpoints[0])
        with run.stage("student") as (stage, result):
            step = tick("train student", 1)
            result.update(
                train_student(run.dir("labels") / "data.yaml", train, spec.imgsz, stage),
                dataset_sha256=load_data_yaml(run.dir("labels") / "data.yaml", "train").sha256(),
                student=spec.train.student,
                epochs=spec.train.epochs,
                freeze=spec.train.freeze,
                warm_start=str(spec.train.warm_start) if spec.train.warm_start else None,
            )
            step()

    # 4. every candidate, measured in the same run
    if not run.done("baselines"):
        teacher = bundles[0]
        sample = [read_image(p) for p in dataset.images[:12]]
        settings_for = lambda size: EvalSettings(imgsz=size, rect=False, bootstrap=REPORT_BOOTSTRAP)  # noqa: E731
        candidates = []
        with run.stage("baselines") as (stage, result):
            step = tick("baselines", 4)
            for size in sorted({int(teacher.manifest.input.size[0]), spec.imgsz}, reverse=True):
                det = Detector(
                    open_backend(teacher.model_path, threads=1),
                    teacher.manifest,
                    DetectOptions(**EVAL_OPTS, imgsz=size, rect=False),
                )
                report = evaluate_detector(det, dataset, settings_for(size), class_map=maps[0].to_student)
                candidates.append(
                    _candidate(
                        f"teacher@{size}",
                        "teacher",
                        size,
                        report,
                        round(latency_ms({"m": det}, sample, rounds=2)["m"], 2),
                        spec.teachers[0],
                        teacher.model_path,
                    )
                )
                det.close()
                step()
            sliced = _sliced_bundle(teacher, maps[0], spec, stage / f"sliced-{spec.imgsz}")
            det = Detector(
                open_backend(sliced.model_path, threads=1),
                sliced.manifest,
                DetectOptions(**EVAL_OPTS, imgsz=spec.imgsz, rect=False),
            )
            report = evaluate_detector(det, dataset, settings_for(spec.imgsz))
            candidates.append(
                _candidate(
                    f"sliced@{spec.imgsz}",
                    "sliced teacher (no training)",
                    spec.imgsz,
                    report,
                    round(latency_ms({"m": det}, sample, rounds=2)["m"], 2),
                    f"baselines/{sliced.root.name}",
                    sliced.model_path,
                )
            )
            det.close()
            step()
            int8_from = [("sliced", sliced)]
            if run.done("student"):
                student = _student_bundle(
                    run.dir("student") / run.result("student")["onnx"],
                    spec,
                    bundles,
                    stage / f"student-{spec.imgsz}",
                    run.result("student"),
                )
                det = Detector(
                    open_backend(student.model_path, threads=1),
                    student.manifest,
                    DetectOptions(**EVAL_OPTS, imgsz=spec.imgsz, rect=False),
                )
                report = evaluate_detector(det, dataset, settings_for(spec.imgsz))
                candidates.append(
                    _candidate(
                        f"student@{spec.imgsz}",
                        f"trained student ({spec.train.student})" if spec.train else "trained student",
                        spec.imgsz,
                        report,
                        round(latency_ms({"m": det}, sample, rounds=2)["m"], 2),
                        f"baselines/{student.root.name}",
                        student.model_path,
                    )
                )
                det.close()
                int8_from.append(("student", student))
            if spec.int8:
                from bastion.distill.int8_gate import quantize_and_gate

                calib = sorted((run.dir("labels") / "images" / "train").iterdir())[:32]
                result["int8_gate"] = {}
                for label, source in int8_from:
                    name = f"{label}-int8-{spec.imgsz}"
                    gate = quantize_and_gate(
                        source,
                        calib,
                        dataset,
                        spec.imgsz,
                        spec.max_int8_drop,
                        stage / name,
                        bootstrap=REPORT_BOOTSTRAP,
                        target=spec.int8_target,
                    )
                    result["int8_gate"][label] = gate.to_dict()
                    if gate.accepted:
                        candidates.append(
                            {
                                "name": f"{label}-int8@{spec.imgsz}",
                                "kind": f"{label}, INT8",
                                "imgsz": spec.imgsz,
                                "map50": gate.int8["map50"],
                                "map50_95": gate.int8["map50_95"],
                                "latency_ms": gate.int8["latency_ms"],
                                "per_class": gate.int8["per_class"],
                                "bundle": f"baselines/{name}",
                                "map50_interval": gate.int8.get("map50_interval"),
                                "size_mb": _mb(next((stage / name).glob("*.onnx"))),
                            }
                        )
            step()
            result["candidates"] = candidates

    # 4. report: pick what ships
    with run.stage("report") as (stage, result):
        candidates = run.result("baselines")["candidates"]
        chosen = choose(candidates, spec.min_map50, spec.max_latency_ms, spec.max_map50_drop)
        trained = run.result("student") if run.done("student") else None
        student_line = (
            f"{trained['student']}, {trained['epochs']} epochs, warm start "
            f"{trained.get('warm_start_copied', 0)}/{trained.get('student_tensors', '?')} tensors"
            if trained
            else "not trained (training was not requested)"
        )
        beaten = [c["name"] for c in candidates if c["kind"] != "teacher" and not c["name"].startswith("student")]
        student_c = next((c for c in candidates if c["name"] == f"student@{spec.imgsz}"), None)
        if student_c is not None:
            better = [
                c["name"]
                for c in candidates
                if c["name"] in beaten
                and c["map50"] >= student_c["map50"]
                and c["latency_ms"] <= student_c["latency_ms"]
            ]
            if better:
                student_line += f". A no-training baseline beats the trained student: {', '.join(better)}"
        result.update(
            candidates=candidates,
            chosen=chosen["name"] if chosen else None,
            labels=run.result("labels"),
            int8_gate=run.result("baselines").get("int8_gate"),
            student=student_line,
            training=trained,
        )
        result["figures"] = _figures(stage, spec, candidates, dataset, chosen, run, sorted(maps[0].to_student))
        (stage / "report.md").write_text(_report_md(spec, result))
        (stage / "report.json").write_text(json.dumps(result, indent=2, default=str))
    if chosen and chosen["kind"] != "teacher":
        _ship(
            run.root / chosen["bundle"],
            run.root / "bundle",
            sign_key,
            chosen,
            dataset,
            run.dir("labels") / DATASET_MANIFEST,
        )
        run.state["stages"]["report"]["result"]["shipped_bundle"] = str(run.root / "bundle")
        run.record("stages", run.state["stages"])
    return run.result("report")


def _auto_thresholds(
    spec: DistillSpec,
    images: list[Path],
    teachers,
    maps,
    defaults: list[float],
    done: Callable[[], None],
    limit: int = 64,
) -> tuple[list[float], dict]:
    """Per-class thresholds by F1 on labelled *training* images (never the held-out ones)."""
    from bastion.distill.pseudo import held_out, choose_thresholds, read_gt

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
    chosen, detail = choose_thresholds(samples, teachers, maps, len(spec.classes), fallback=defaults[0])
    done()
    return chosen, detail


def choose(
    candidates: list[dict], min_map50: float, max_latency_ms: float | None, max_map50_drop: float | None
) -> dict | None:
    """What ships: among the non-teacher candidates meeting the constraints, the most accurate (ties: fastest),
    or with ``max_map50_drop`` the fastest within that many points of the most accurate candidate *of all*
    (the full teacher included: it is the reference, never the product of a distillation run)."""
    ok = [
        c
        for c in candidates
        if c["map50"] >= min_map50 and (max_latency_ms is None or c["latency_ms"] <= max_latency_ms)
    ]
    shippable = [c for c in ok if c.get("kind") != "teacher"]
    if not shippable:
        return None
    if max_map50_drop is None:
        return max(shippable, key=lambda c: (round(c["map50"], 3), -c["latency_ms"]))
    best = max(ok, key=lambda c: c["map50"])
    near = [c for c in shippable if c["map50"] >= best["map50"] - max_map50_drop / 100]
    return min(near, key=lambda c: (c["latency_ms"], -c["map50"])) if near else None


def _ship(src: Path, dst: Path, sign_key, chosen: dict, dataset, dataset_json: Path | None = None) -> None:
    """Copy the chosen candidate's bundle to RUN/bundle (atomically), with the held-out metrics measured in this
    run in its manifest (an INT8 bundle already carries FP32 and INT8 ones), signed when a key is given."""
    import shutil

    from bastion.models.bundle import seal_bundle
    from bastion.models.manifest import MANIFEST_NAME, DatasetRef, EvalResult, FileEntry, read_manifest, sha256_file
    from bastion.models.signing import SIGNATURE_NAME

    manifest = read_manifest(src / MANIFEST_NAME)
    if not manifest.evaluation:
        settings = {"imgsz": chosen["imgsz"], "conf": 0.001, "iou": 0.6, "rect": False, "held_out": True}
        manifest = manifest.model_copy(
            update={
                "evaluation": [
                    EvalResult(
                        metric=m,
                        value=chosen[key],
                        dataset=dataset.root.name,
                        dataset_sha256=dataset.sha256(),
                        settings=settings,
                    )
                    for m, key in (("mAP50", "map50"), ("mAP50-95", "map50_95"))
                ]
            }
        )
    staging = dst.with_name(".bundle.partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(src, staging)
    (staging / SIGNATURE_NAME).unlink(missing_ok=True)  # the manifest may change: an old signature would not hold
    if dataset_json is not None and dataset_json.is_file():  # the data that made it, hash by hash, signed with it
        shutil.copy2(dataset_json, staging / DATASET_MANIFEST)
        entry = FileEntry(path=DATASET_MANIFEST, sha256=sha256_file(dataset_json), size=dataset_json.stat().st_size)
        manifest = manifest.model_copy(
            update={
                "files": [f for f in manifest.files if f.path != DATASET_MANIFEST] + [entry],
                "provenance": manifest.provenance.model_copy(
                    update={
                        "datasets": manifest.provenance.datasets
                        + [
                            DatasetRef(
                                name=f"images and labels of this distillation run ({DATASET_MANIFEST} in this bundle)",
                                sha256=entry.sha256,
                            )
                        ]
                    }
                ),
            }
        )
    shutil.rmtree(dst, ignore_errors=True)
    seal_bundle(staging, manifest, dst, sign_key)


def _figures(
    stage: Path,
    spec: DistillSpec,
    candidates: list[dict],
    dataset,
    chosen: dict | None,
    run: RunDir,
    teacher_ids: list[int],
) -> dict[str, str]:
    """scatter.png, per_class.png, training.png (if a student trained), detections.jpg (the chosen model)."""
    import csv

    from bastion.distill import charts
    from bastion.runtime.outputs import contact_sheet, save_image

    figures = {"scatter": charts.scatter(candidates, stage / "scatter.png", "speed vs accuracy (held-out)").name}
    series = {
        c["name"]: [c["per_class"].get(k, {}).get("ap50", 0.0) for k in spec.classes]
        for c in candidates
        if c["per_class"]
    }
    if series:
        figures["per_class"] = charts.bars(spec.classes, series, stage / "per_class.png", "AP50 per class").name
    results = run.dir("student") / "train" / "results.csv" if run.done("student") else None
    if results is not None and results.is_file():
        rows = [{k.strip(): v for k, v in r.items()} for r in csv.DictReader(results.open())]
        epochs = [float(r["epoch"]) for r in rows]
        curves = {
            k: [float(r[k]) for r in rows]
            for k in ("train/box_loss", "train/cls_loss", "val/box_loss")
            if rows and k in rows[0]
        }
        if curves:
            figures["training"] = charts.lines(
                epochs, curves, stage / "training.png", "student training", "epoch", "loss"
            ).name
    if chosen is not None:
        bundle = chosen["bundle"]
        try:  # every candidate but the teacher itself is a bundle this run wrote, under baselines/
            det = (
                Detector.from_bundle(Bundle.open_fresh(run.root / bundle), warmup=False)
                if bundle.startswith("baselines/")
                else Detector.load(bundle, allow_unsigned=spec.allow_unsigned, warmup=False)
            )
        except Exception as exc:  # a figure must never fail the run
            log.warning("no detection grid: %s", exc)
            return figures
        keep = teacher_ids if chosen["kind"] == "teacher" else None  # a full teacher: show the mission's classes
        tiles, empty = [], []
        for p in dataset.images[:32]:  # prefer held-out images where the model finds something
            image = read_image(p)
            found = det.detect(image).filter(classes=keep)
            (tiles if len(found) else empty).append(found.draw(image))
            if len(tiles) == 8:
                break
        tiles = (tiles + empty)[:8]
        det.close()
        if tiles:
            save_image(stage / "detections.jpg", contact_sheet(tiles, columns=4, tile_width=320))
            figures["detections"] = "detections.jpg"
    return figures


def _candidate(name, kind, size, report, latency, bundle_root, model_file: Path) -> dict[str, Any]:
    return {
        "name": name,
        "kind": kind,
        "imgsz": size,
        "map50": report.map50,
        "map50_95": report.map50_95,
        "latency_ms": latency,
        "per_class": report.per_class,
        "bundle": str(bundle_root),
        "size_mb": _mb(model_file),
        "map50_interval": report.to_dict()["map50_interval"],
    }


def _interval(candidate: dict) -> str:
    """' (0.41–0.52)': the 90 % bootstrap interval of mAP50 over the held-out images, where measured."""
    ci = candidate.get("map50_interval")
    return f" ({ci['low']:.2f}–{ci['high']:.2f})" if ci else ""


def ap50_cell(candidate: dict, name: str) -> str:
    """AP50 of one class as a table cell; '—' where the held-out set has no box of that class."""
    row = candidate.get("per_class", {}).get(name) or {}
    value = row.get("ap50")
    return "—" if value is None or value != value or not row.get("instances", 1) else f"{value:.3f}"


def _mb(model_file: Path) -> float:
    return round(Path(model_file).stat().st_size / 1e6, 2)


def _student_bundle(onnx: Path, spec: DistillSpec, teachers: list[Bundle], out: Path, training: dict) -> Bundle:
    """The exported student as an (unsigned, for now) bundle whose provenance names the teachers and the data."""
    from bastion import __version__
    from bastion.models.bundle import verify_files
    from bastion.models.manifest import MANIFEST_NAME, read_manifest
    from bastion.models.signing import Verification
    from bastion.runtime.bundle_create import create_bundle, infer_fields

    teacher = teachers[0]
    fields = infer_fields(onnx)
    if not fields:
        raise ConfigError(f"the exported student {onnx.name} has no Ultralytics metadata bastion understands")
    fields.update(
        name=f"student-{'-'.join(spec.classes)}",
        version=f"{spec.imgsz}",
        task="detect",
        classes=spec.classes,
        provenance={
            "source": f"distilled from {' + '.join(t.manifest.name for t in teachers)} by bastion ({training.get('student')}, "
            f"{training.get('epochs')} epochs, pseudo-labels)",
            "datasets": [
                {"name": f"pseudo-labelled training set ({spec.images.name})", "sha256": training.get("dataset_sha256")}
            ]
            + [d.model_dump(mode="json") for d in teacher.manifest.provenance.datasets],
            "teachers": [t.sha256 for t in teachers],
            **stamp(),
            "bastion_version": __version__,
        },
        license={
            "weights": "derived from "
            + "; ".join(f"{t.manifest.name} ({t.manifest.license.weights})" for t in teachers)
            + " via Ultralytics (AGPL-3.0)",
            "data": teacher.manifest.license.data,
            "notes": "a distilled student inherits the terms of its teacher and training code; check them",
        },
    )
    create_bundle(onnx, out, fields, [])
    manifest = read_manifest(out / MANIFEST_NAME)
    verify_files(out, manifest)
    return Bundle(out, manifest, Verification(False, note="made by this run; unsigned until signed"))


def _sliced_bundle(teacher: Bundle, class_map: ClassMap, spec: DistillSpec, out: Path) -> Bundle:
    """The teacher with its head sliced to the student classes, as an (unsigned) bundle at ``spec.imgsz``."""
    import tempfile

    from bastion import __version__
    from bastion.distill.slice import slice_head
    from bastion.runtime.bundle_create import create_bundle

    with tempfile.TemporaryDirectory() as tmp:
        onnx = slice_head(
            teacher.model_path,
            Path(tmp) / f"{teacher.manifest.name}-{len(spec.classes)}cls.onnx",
            teacher.manifest.decoder.type,
            class_map,
        )
        fields = teacher.manifest.model_dump(mode="json", exclude={"files", "evaluation"})
        spec_input = dict(fields["input"])
        if spec_input.get("dynamic_hw"):
            spec_input["size"] = [spec.imgsz, spec.imgsz]
        fields.update(
            name=f"{teacher.manifest.name}-{'-'.join(spec.classes)}",
            version=f"sliced-{spec.imgsz}",
            classes=spec.classes,
            input=spec_input,
            provenance={
                **fields["provenance"],
                "teachers": [teacher.sha256],
                "source": f"{teacher.manifest.name} with its class head sliced to "
                f"{spec.classes} (ONNX surgery, no training)",
                **stamp(),
                "bastion_version": __version__,
            },
        )
        licenses = [teacher.root / f.path for f in teacher.manifest.files if f.role == "license"]
        fields["license"] = {**fields["license"], "files": [p.name for p in licenses]}
        create_bundle(onnx, out, fields, licenses)
    from bastion.models.bundle import verify_files
    from bastion.models.manifest import MANIFEST_NAME, read_manifest
    from bastion.models.signing import Verification

    manifest = read_manifest(out / MANIFEST_NAME)
    verify_files(out, manifest)  # made by this run a moment ago: payload checked, signature comes with --sign
    return Bundle(out, manifest, Verification(False, note="made by this run; unsigned until signed"))


def _report_md(spec: DistillSpec, result: dict[str, Any]) -> str:
    labels = result["labels"]
    lines = [
        f"# Distillation report: {', '.join(spec.classes)}",
        "",
        f"Teachers: {', '.join(spec.teachers)}. Images: {labels['images']} ({labels['ground_truth']} with ground "
        f"truth, {labels['pseudo']} pseudo-labelled, {len(labels['corrupt'])} unreadable skipped). "
        f"Validation: {labels['val']} held-out images "
        + (
            "with ground truth."
            if labels["val_is_ground_truth"]
            else "**pseudo-labelled** (no ground truth given: scores measure agreement with the teachers)."
        ),
        "",
        "| candidate | input | mAP50 | mAP50-95 | latency ms (1 thread) | vs full teacher: speed, mAP50 kept | MB | "
        + " | ".join(f"AP50 {k}" for k in spec.classes)
        + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(spec.classes),
    ]
    full = max((c for c in result["candidates"] if c["kind"] == "teacher"), key=lambda c: c["imgsz"], default=None)
    for c in sorted(result["candidates"], key=lambda c: c["latency_ms"]):
        mark = " **← ships**" if c["name"] == result["chosen"] else ""
        per_class = " | ".join(ap50_cell(c, k) for k in spec.classes)
        versus = (
            f"{full['latency_ms'] / c['latency_ms']:.1f}×, {100 * c['map50'] / full['map50']:.0f} %"
            if full and full["map50"] > 0 and c["latency_ms"] > 0
            else "–"
        )
        lines.append(
            f"| {c['name']}{mark} | {c['imgsz']} | {c['map50']:.3f}{_interval(c)} | {c['map50_95']:.3f} | "
            f"{c['latency_ms']:.1f} | {versus} | {c.get('size_mb', 0):.1f} | {per_class} |"
        )
    absent = [k for k in spec.classes if not labels["boxes_per_class"].get(k)]
    if absent:
        lines += [
            "",
            f"No labelled boxes of {', '.join(absent)} at all, so no AP for it (—): the teachers found none "
            "above the threshold. Imagery unlike the teachers' training data (e.g. cars seen from "
            "directly above) needs some ground truth or a better teacher.",
        ]
    gates = result.get("int8_gate") or {}
    lines += (
        [""]
        + [
            f"INT8 gate ({k}): {g['reason']}" + (f" INT8 for {g['target']}: {g['note']}." if g.get("note") else "")
            for k, g in gates.items()
        ]
        + ["", f"Student: {result['student']}.", f"Chosen: {result['chosen'] or 'none meets the constraints'}.", ""]
    )
    titles = {
        "scatter": "Speed vs accuracy",
        "per_class": "AP50 per class",
        "training": "Training curves",
        "detections": "The chosen model on held-out images",
    }
    for key, name in result.get("figures", {}).items():
        lines += [f"![{titles.get(key, key)}]({name})", ""]
    return "\n".join(lines) + "\n"

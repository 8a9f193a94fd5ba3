"""The bundles a detector distillation makes: the trained student, the sliced teacher, and the shipped copy.

Each is made unsigned inside the run (``baselines/``) so it can be measured; only the one that ships is copied to
``RUN/bundle`` with this run's held-out numbers in its manifest and signed there.
"""

from __future__ import annotations

from pathlib import Path

from bastion.distill.candidates import Candidate, manifest_settings
from bastion.distill.classmap import ClassMap
from bastion.distill.pseudo import DATASET_MANIFEST
from bastion.distill.spec import DistillSpec
from bastion.errors import ConfigError
from bastion.models.bundle import Bundle
from bastion.models.provenance import stamp


def student_bundle(onnx: Path, spec: DistillSpec, teachers: list[Bundle], out: Path, training: dict) -> Bundle:
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


def sliced_bundle(teacher: Bundle, class_map: ClassMap, spec: DistillSpec, out: Path) -> Bundle:
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


def ship_bundle(
    src: Path, dst: Path, sign_key, chosen: Candidate, dataset, dataset_json: Path | None = None, markings=None
) -> None:
    """Copy the chosen candidate's bundle to RUN/bundle (atomically), with the held-out metrics measured in this
    run in its manifest (an INT8 bundle already carries FP32 and INT8 ones) and the run's ``markings``, signed
    when a key is given."""
    import shutil

    from bastion.models.bundle import seal_bundle
    from bastion.models.manifest import MANIFEST_NAME, DatasetRef, EvalResult, FileEntry, read_manifest, sha256_file
    from bastion.models.signing import SIGNATURE_NAME

    manifest = read_manifest(src / MANIFEST_NAME)
    if not manifest.evaluation:
        settings = manifest_settings(chosen.imgsz)
        manifest = manifest.model_copy(
            update={
                "evaluation": [
                    EvalResult(
                        metric=m,
                        value=getattr(chosen, key),
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
    if markings is not None:  # in the canonical manifest bytes: the signature below covers them
        manifest = manifest.model_copy(update={"markings": markings})
    shutil.rmtree(dst, ignore_errors=True)
    seal_bundle(staging, manifest, dst, sign_key)

"""Teachers given as Ultralytics ``.pt`` checkpoints: exported once into the run as ONNX bundles.

Pseudo-labelling runs every teacher through bastion's own runtime, so a
checkpoint is exported (Ultralytics export, dynamic shapes, simplified) into
``RUN/teachers/<stem>/`` as a bundle whose manifest records the checkpoint's
sha256.  The bundle is unsigned: it was made a moment ago, on this machine, from
a file the operator named, so the trust decision is the operator's choice of
that file, and the run records its hash.  The checkpoint itself also drives
Ultralytics' feature distillation (``distill_model=``) during training.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from bastion.errors import ConfigError, InputNotFoundError
from bastion.models.manifest import sha256_file

log = logging.getLogger(__name__)
CHECKPOINT_SUFFIXES = (".pt", ".pth")
IMPORTED_SUFFIXES = (*CHECKPOINT_SUFFIXES, ".onnx")  # files a run turns into a bundle of its own


def is_checkpoint(ref: str) -> bool:
    """An Ultralytics checkpoint: exported to ONNX, and its features can teach the student too."""
    return Path(ref).suffix in CHECKPOINT_SUFFIXES


def is_imported(ref: str) -> bool:
    """A teacher given as a model file rather than a bundle (checkpoint or bare ONNX)."""
    return Path(ref).suffix in IMPORTED_SUFFIXES


def _load_detector(ultralytics, path: Path, shown: Path):
    try:
        model = ultralytics.YOLO(str(path))
    except Exception as exc:  # torch/pickle errors of every kind: one line for the operator
        if isinstance(exc, ModuleNotFoundError) or "NOT forwards compatible" in str(exc):
            # original YOLOv5 pickles need YOLOv5's own 'models' package
            raise ConfigError(
                f"teacher {shown} is not an Ultralytics checkpoint (an original YOLOv5 or other repository's pickle)",
                "export it to ONNX with its own code (YOLOv5: export.py "
                "--include onnx --dynamic), then run 'bastion bundle create' and give that bundle",
            ) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"teacher {shown} could not be read as a model: {first}",
            "give an Ultralytics detection .pt or a detection bundle",
        ) from None
    if model.task != "detect":
        raise ConfigError(
            f"teacher {shown} is not a detector (Ultralytics task '{model.task}')",
            "give an Ultralytics detection .pt or a detection bundle",
        )
    return model


def export_checkpoint_teacher(path: Path, out_dir: Path) -> dict:
    """Export ``path`` to an ONNX bundle at ``out_dir``; returns what the run records about it."""
    from bastion.distill.ultra import load_ultralytics
    from bastion.runtime.bundle_create import create_bundle, infer_fields

    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"teacher checkpoint not found: {path}")
    digest = sha256_file(path)
    with tempfile.TemporaryDirectory(prefix="bastion-teacher-") as tmp:
        if path.suffix == ".onnx":  # already ONNX (YOLOv5/Ultralytics metadata tell the decoder)
            onnx, how = path, f"the ONNX file {path.name} (sha256 {digest}), given unsigned with --allow-unsigned"
        else:
            # a neutral name in a private dir: Ultralytics writes the .onnx next to the checkpoint, and it maps
            # official names (yolov5n.pt → yolov5nu.pt) to downloads
            local = Path(tmp) / "teacher.pt"
            shutil.copy2(path, local)
            model = _load_detector(load_ultralytics(), local, path)
            onnx = Path(model.export(format="onnx", dynamic=True, simplify=True, device="cpu", verbose=False))
            how = f"exported by bastion from the Ultralytics checkpoint {path.name} (sha256 {digest})"
        fields = infer_fields(onnx)
        if not fields:
            raise ConfigError(
                f"teacher {path}: bastion finds no detection head it can decode in its ONNX",
                "make a bundle naming the decoder: bastion bundle create --decoder …",
            )
        fields.update(
            name=path.stem.replace(" ", "_"),
            version="imported",
            task="detect",
            provenance={"source": how},
            license={
                "weights": f"as the file {path.name}: check its terms",
                "notes": "exported with Ultralytics (AGPL-3.0)" if path.suffix != ".onnx" else None,
            },
        )
        create_bundle(onnx, out_dir, fields, [])
    log.info("teacher checkpoint %s exported to %s", path, out_dir)
    return {"checkpoint": str(path.resolve()), "checkpoint_sha256": digest, "bundle": out_dir.name}


def check_unchanged(record: dict) -> None:
    """A cached export must still match its checkpoint; otherwise the run would silently mix teachers."""
    path = Path(record["checkpoint"])
    if not path.is_file() or sha256_file(path) != record["checkpoint_sha256"]:
        raise ConfigError(
            f"teacher checkpoint {path} changed or vanished since this run exported it",
            "re-run with --force teachers, or use a new --out",
        )

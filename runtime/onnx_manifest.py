"""A manifest for a bare ``.onnx`` file, read from its own metadata and output shapes.

Ultralytics exports record ``names``, ``imgsz`` and ``stride`` in the ONNX
metadata; the YOLOv5 repository's export records ``names`` and ``stride``.  With
those and the output layout we can tell the decoder family.  Anything else is
refused with a hint to make a bundle with a manifest.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

from pydantic import ValidationError

from bastion.errors import DecoderError
from bastion.models.manifest import (
    FileEntry,
    InputSpec,
    LicenseInfo,
    Manifest,
    Provenance,
    YoloDecoderSpec,
    sha256_file,
)
from bastion.runtime.backends.base import Backend


def _names(meta: dict[str, str]) -> list[str]:
    raw = meta.get("names")
    if not raw:
        return []
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return []
    if isinstance(value, dict):
        return [str(value[k]) for k in sorted(value)]
    return [str(v) for v in value]


def manifest_from_onnx(path: Path, backend: Backend, data: bytes | None = None) -> Manifest:
    """``data``: the bytes the backend was built from (hashed for the manifest instead of reading ``path`` again)."""
    try:
        return _manifest(path, backend, data)
    except (ValidationError, ValueError, SyntaxError) as exc:  # metadata that names an impossible input
        raise DecoderError(
            f"{path.name}: its metadata does not describe a usable input ({str(exc).splitlines()[0]})",
            "make a bundle with a manifest (bastion bundle create)",
        ) from None


def _manifest(path: Path, backend: Backend, data: bytes | None) -> Manifest:
    meta = getattr(backend, "metadata", {})
    names = _names(meta)
    inp = backend.inputs[0]
    out = backend.outputs[0].shape
    if len(inp.shape) != 4:
        raise DecoderError(f"{path.name}: input {inp.name} has shape {list(inp.shape)}, not an image batch")
    stride = int(meta.get("stride", 32))
    h, w = inp.shape[2], inp.shape[3]
    if h is None or w is None:
        imgsz = ast.literal_eval(meta["imgsz"]) if "imgsz" in meta else [640, 640]
        h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    decoder = None
    if meta.get("end2end", "False") == "True":
        raise DecoderError(
            f"{path.name} is an end-to-end (NMS inside) export, which bastion does not decode yet",
            "re-export it with end2end=False",
        )
    nc = len(names)
    ultralytics = meta.get("task") == "detect"  # Ultralytics exports record their task; YOLOv5's do not
    if len(out) == 3 and nc and (out[1] == 4 + nc or (out[1] is None and ultralytics)):
        decoder = "yolov8"  # Ultralytics YOLOv8/YOLO11 layout [B, 4+nc, N]
    elif len(out) == 3 and nc and (out[2] == 5 + nc or (out[2] is None and not ultralytics)):
        decoder = "yolov5"  # YOLOv5 repository layout [B, N, 5+nc]; shapes are checked again at decode
    if decoder is None:
        raise DecoderError(
            f"{path.name}: outputs {[list(o.shape) for o in backend.outputs]} match no known decoder",
            "make a bundle with a manifest naming its decoder (bastion bundle create)",
        )
    return Manifest(
        name=path.stem.replace(" ", "_"),
        version="0",
        task="detect",
        files=[
            FileEntry(
                path=path.name,
                sha256=hashlib.sha256(data).hexdigest() if data is not None else sha256_file(path),
                size=len(data) if data is not None else path.stat().st_size,
                role="model",
            )
        ],
        input=InputSpec(
            name=inp.name,
            shape=list(inp.shape),
            size=(int(h), int(w)),
            stride=stride,
            dynamic_hw=inp.shape[2] is None,
        ),
        decoder=YoloDecoderSpec(type=decoder),
        classes=names,
        provenance=Provenance(source=f"bare ONNX file {path.name} (no bundle manifest)"),
        license=LicenseInfo(weights="unknown"),
    )

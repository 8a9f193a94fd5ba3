"""``bastion bundle create``: an ONNX file + metadata (or a distillation run) → a bundle directory.

It lives in ``runtime`` rather than ``models`` because it opens the model to
infer what it can (inputs, Ultralytics/YOLOv5 metadata) and to prove the
decoder fits before the bundle ever reaches a field unit.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer
from pydantic import ValidationError

from bastion import __version__
from bastion.console import out, print_json
from bastion.errors import ConfigError, DecoderError, InputNotFoundError
from bastion.models.bundle import seal_bundle, staged_bundle
from bastion.models.manifest import FileEntry, Manifest, sha256_file
from bastion.models.onnx_refs import refuse_external_data
from bastion.models.provenance import stamp
from bastion.models.textfiles import first_error, read_yaml_mapping

RUN_MODEL = "model.onnx"
RUN_META = "bundle.yaml"
ARCHIVE_SUFFIX = ".bastion"
_NAME_VERSION = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*?)-(?P<version>\d[A-Za-z0-9_.+-]*)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def name_from_out(out: Path) -> tuple[str | None, str | None]:
    """``bundles/pv-1.0`` → ("pv", "1.0"); ``pv.bastion`` → ("pv", None); not a possible name → (None, None).

    Why: a maker writes ``--out bundles/pv-1.0`` and then types ``pv`` and ``pv:1.0`` everywhere after; naming the
    bundle after ``best.onnx`` made every later command answer "model not found".
    """
    stem = out.name[: -len(ARCHIVE_SUFFIX)] if out.name.endswith(ARCHIVE_SUFFIX) else out.name
    match = _NAME_VERSION.match(stem)
    if match:
        return match["name"], match["version"]
    return (stem, None) if _NAME.match(stem) else (None, None)


def _read_meta(path: Path | None) -> dict[str, Any]:
    return {} if path is None else read_yaml_mapping(path, "bundle metadata file")


def infer_fields(onnx: Path) -> dict[str, Any]:
    """What the ONNX file says about itself (empty where it says nothing we understand)."""
    from bastion.runtime.backends import open_backend
    from bastion.runtime.onnx_manifest import manifest_from_onnx

    backend = open_backend(onnx, device="ort-cpu", threads=1)
    try:
        m = manifest_from_onnx(onnx, backend).model_dump(mode="json")
        return {k: m[k] for k in ("input", "decoder", "classes")}
    except DecoderError:
        return {}  # callers (distill) take {} to mean "no detection head bastion can decode"
    finally:
        backend.close()


def infer_input(onnx: Path) -> dict[str, Any]:
    """With no metadata bastion reads, the image input still says its name and, when fixed, its size
    (what `bundle create --decoder …` needs from a plain YOLO export); {} when it is not an image batch."""
    from bastion.runtime.backends import open_backend

    backend = open_backend(onnx, device="ort-cpu", threads=1)
    try:
        inp = backend.inputs[0]
    finally:
        backend.close()
    if len(inp.shape) != 4:
        return {}
    h, w = inp.shape[2], inp.shape[3]
    spec: dict[str, Any] = {"name": inp.name, "shape": list(inp.shape), "dynamic_hw": h is None or w is None}
    if h is not None and w is not None:
        spec["size"] = [int(h), int(w)]
    return {"input": spec}


def _imgsz(value: str) -> list[int]:
    try:
        parts = [int(v) for v in value.replace("x", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise ConfigError(f"--imgsz {value!r} is not a size", "give one number (640) or H,W (384,640)")
    return parts


def create_bundle(
    onnx: Path,
    out_dir: Path,
    fields: dict[str, Any],
    license_files: list[Path],
    sign_key=None,
    fp32_sibling: Path | None = None,
) -> Manifest:
    """Assemble, check and (optionally) sign a bundle in a staging directory, then move it to ``out_dir``.

    ``fp32_sibling``: an INT8 model's FP32 parent, shipped beside it (role ``fp32-sibling``, hashed and signed like
    the model) so a unit whose CPU the INT8 verdict does not hold on can run it under ``int8_policy: strict``.
    """
    with staged_bundle(out_dir) as staging:
        model = _ship_model(onnx, staging, onnx.name)
        files = [FileEntry(path=onnx.name, sha256=hashlib.sha256(model).hexdigest(), size=len(model), role="model")]
        sibling = None
        if fp32_sibling is not None:
            taken = {onnx.name, *(lic.name for lic in license_files)}
            name = fp32_sibling.name if fp32_sibling.name not in taken else f"fp32-{fp32_sibling.name}"
            sibling = _ship_model(fp32_sibling, staging, name)
            files.append(
                FileEntry(path=name, sha256=hashlib.sha256(sibling).hexdigest(), size=len(sibling), role="fp32-sibling")
            )
        for lic in license_files:
            if not lic.is_file():
                raise InputNotFoundError(f"license file not found: {lic}")
            shipped = staging / lic.name
            shutil.copy2(lic, shipped)
            files.append(
                FileEntry(path=lic.name, sha256=sha256_file(shipped), size=shipped.stat().st_size, role="license")
            )
        fields = {**fields, "files": [f.model_dump() for f in files]}
        fields.setdefault("license", {}).setdefault("files", [lic.name for lic in license_files])
        try:
            manifest = Manifest.model_validate(fields)
        except ValidationError as exc:
            raise ConfigError(
                f"bundle metadata: {first_error(exc)}", "give it with a flag or in the --meta file"
            ) from None
        if manifest.task == "detect":
            _smoke_test(model, manifest)
            if sibling is not None:  # the fallback must run under this manifest too, or strict units have nothing
                _smoke_test(sibling, manifest)
        seal_bundle(staging, manifest, out_dir, sign_key)
        return manifest


def _ship_model(source: Path, staging: Path, name: str) -> bytes:
    """Copy a model into the bundle and read the copy that ships once: those bytes are checked, hashed and
    smoke-tested (the source may change meanwhile)."""
    if not source.is_file():
        raise InputNotFoundError(f"model file not found: {source}")
    shutil.copy2(source, staging / name)
    model = (staging / name).read_bytes()
    refuse_external_data(model, name)  # its weights must be in the file the manifest hashes
    return model


def _smoke_test(model: bytes, manifest: Manifest) -> None:
    """Run one grey frame through backend + decoder so a mismatch fails here, not in the field."""
    from bastion.runtime.backends import open_backend
    from bastion.runtime.detect import Detector

    if manifest.input is None or manifest.decoder is None:
        raise ConfigError(
            "a detection bundle needs input and decoder metadata",
            "give --decoder and --imgsz, or an input:/decoder: section in --meta",
        )
    detector = Detector(open_backend(model, device="ort-cpu", threads=1), manifest)
    try:
        h, w = manifest.input.size
        detector.detect(np.full((h, w, 3), 114, np.uint8))
    finally:
        detector.close()


def bundle_create_command(
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="The model file."),
    from_run: Optional[Path] = typer.Option(
        None, "--from-run", help=f"A distillation run: RUN/{RUN_MODEL} + RUN/{RUN_META}."
    ),
    meta: Optional[Path] = typer.Option(
        None,
        "--meta",
        help="YAML/JSON with manifest fields (input, decoder, "
        "classes, thresholds, provenance, license, evaluation, precision).",
    ),
    out_dir: Path = typer.Option(..., "--out", help="New bundle directory."),
    name: Optional[str] = typer.Option(
        None,
        help="Bundle name (default: the --out folder's name without a "
        "-VERSION suffix, e.g. pv for bundles/pv-1.0; else the ONNX file's stem).",
    ),
    version: Optional[str] = typer.Option(
        None, help="Bundle version (default: the --out folder's -VERSION suffix, else 1.0)."
    ),
    task: Optional[str] = typer.Option(None, help="detect or lm (default: detect)."),
    decoder: Optional[str] = typer.Option(None, help="Output decoder: yolov5, yolov8 or yolox."),
    classes: Optional[str] = typer.Option(None, help="Class names in output order, comma-separated."),
    imgsz: Optional[str] = typer.Option(
        None,
        help="Network input size, N or H,W (default: the ONNX file's own, from its metadata or a fixed input shape).",
    ),
    weights_license: Optional[str] = typer.Option(None, help="License of the weights (required)."),
    data_license: Optional[str] = typer.Option(None, help="License of the training data."),
    source: Optional[str] = typer.Option(None, help="Where the weights came from."),
    license_file: list[Path] = typer.Option([], help="License text to ship inside the bundle (repeatable)."),
    sign: Optional[Path] = typer.Option(None, "--sign", help="Sign with this private key."),
    passphrase: bool = typer.Option(False, "--passphrase", help="Prompt for the key's passphrase."),
    fp32_sibling: Optional[Path] = typer.Option(
        None,
        "--fp32-sibling",
        help="An INT8 model's FP32 parent, shipped and signed beside it: run instead under int8_policy strict "
        "where the INT8 verdict does not hold.",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Make a bundle from an ONNX file and its metadata, checked by running it once.

    Example: bastion bundle create --onnx best.onnx --classes person,vehicle --decoder yolov8
    --weights-license AGPL-3.0 --source "distilled from yolov5n" --out bundles/pv-1.0 --sign team.key
    """
    if from_run is not None:
        onnx = onnx or from_run / RUN_MODEL
        meta = meta or (from_run / RUN_META if (from_run / RUN_META).is_file() else None)
    if onnx is None:
        raise ConfigError("give --onnx FILE or --from-run DIR")
    if not onnx.is_file():
        raise InputNotFoundError(f"model file not found: {onnx}")
    inferred = infer_fields(onnx)
    if not inferred and (task or "detect") == "detect":
        inferred = infer_input(onnx)
    fields: dict[str, Any] = {**inferred, **_read_meta(meta)}
    out_name, out_version = name_from_out(out_dir)
    fields.setdefault("name", out_name or onnx.stem)
    fields.setdefault("version", out_version or "1.0")
    fields.setdefault("task", "detect")
    overrides = {"name": name, "version": version, "task": task}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    if decoder:
        fields["decoder"] = {**fields.get("decoder", {}), "type": decoder}
    if classes:
        fields["classes"] = [c.strip() for c in classes.split(",") if c.strip()]
    if imgsz:
        if "input" not in fields:
            raise ConfigError(f"{onnx.name} has no image input bastion can read", "describe it in --meta (input:)")
        fields["input"] = {**fields["input"], "size": _imgsz(imgsz)}
    lic = dict(fields.get("license", {}))
    if weights_license:
        lic["weights"] = weights_license
    if data_license:
        lic["data"] = data_license
    if "weights" not in lic:
        raise ConfigError("the license of the weights is required", "give --weights-license (e.g. Apache-2.0)")
    fields["license"] = lic
    if fields["task"] == "detect" and isinstance(fields.get("input"), dict) and "size" not in fields["input"]:
        raise ConfigError(
            f"{onnx.name} takes any input size and does not say which it was trained at", "give --imgsz (e.g. 640)"
        )
    prov = dict(fields.get("provenance", {}))
    prov.setdefault("source", source or f"ONNX file {onnx.name}")
    if source:
        prov["source"] = source
    prov.update(stamp(), bastion_version=__version__)
    fields["provenance"] = prov
    key = None
    if sign is not None:
        from bastion.models.keys import load_private_key, read_passphrase

        key = load_private_key(sign, read_passphrase(passphrase))
    manifest = create_bundle(onnx, out_dir, fields, list(license_file), key, fp32_sibling=fp32_sibling)
    if json_out:
        print_json(
            {
                "path": str(out_dir),
                "sha256": manifest.sha256(),
                "signed": key is not None,
                "manifest": manifest.model_dump(mode="json"),
            }
        )
        return
    out.print(
        f"created {manifest.name}:{manifest.version} in {out_dir} ({'signed' if key else 'UNSIGNED'}, "
        f"sha256 {manifest.sha256()[:16]})"
    )

"""``bastion quantize``: FP32 bundle → INT8 candidate → measured gate → INT8 bundle (or a reasoned refusal)."""

from __future__ import annotations

import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any


from bastion import __version__
from bastion.distill.datasets import YoloDataset
from bastion.distill.evaluate import EvalSettings, evaluate_detector, latency_ms
from bastion.distill.quantize import quantize_int8
from bastion.models.bundle import Bundle
from bastion.models.manifest import EvalResult, Manifest, files_sha256
from bastion.runtime.backends import open_backend
from bastion.runtime.detect import DetectOptions, Detector
from bastion.runtime.media import read_image


@dataclass
class GateResult:
    accepted: bool
    reason: str
    imgsz: int
    fp32: dict[str, Any]  # map50, map50_95, latency_ms, per_class
    int8: dict[str, Any]
    map50_drop_points: float
    speedup: float
    bundle: str | None = None
    calibration_images: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def static_manifest(manifest: Manifest, size: int) -> Manifest:
    """The same model description with its input fixed to size×size (what the INT8 graph takes)."""
    spec = manifest.input.model_copy(update={"shape": [1, 3, size, size], "size": (size, size), "dynamic_hw": False})
    return manifest.model_copy(update={"input": spec})


def quantize_and_gate(bundle: Bundle, calibration: list[Path], dataset: YoloDataset, imgsz: int,
                      max_drop_points: float, out_dir: Path | None, sign_key=None,  # noqa: ANN001
                      threads: int = 1, tick=None, min_speedup: float = 1.1,  # noqa: ANN001
                      bootstrap: int = 0) -> GateResult:
    """``bootstrap`` > 0: the INT8 model's mAP50 also gets a resampled interval (for a distillation report)."""
    manifest = static_manifest(bundle.manifest, imgsz)
    eval_opts = dict(conf=0.001, iou=0.6, multi_label=True, scaleup=False, imgsz=imgsz, rect=False)
    settings = EvalSettings(imgsz=imgsz, rect=False)
    with tempfile.TemporaryDirectory(prefix="bastion-quantize-") as tmp:
        base = Detector(open_backend(bundle.model_path, threads=threads), bundle.manifest, DetectOptions(**eval_opts))
        int8_path = Path(tmp) / f"{bundle.manifest.name}-int8-{imgsz}.onnx"
        quantize_int8(base, bundle.model_path, calibration, int8_path, size_hw=(imgsz, imgsz))
        if tick:
            tick()
        int8 = Detector(open_backend(int8_path, threads=threads), manifest, DetectOptions(**eval_opts))
        fp32_report = evaluate_detector(base, dataset, settings)
        int8_report = evaluate_detector(int8, dataset, replace(settings, bootstrap=bootstrap))
        if tick:
            tick()
        sample = [read_image(p) for p in dataset.images[:16]]
        latency = latency_ms({"fp32": base, "int8": int8}, sample)
        base.close()
        int8.close()
        drop = round((fp32_report.map50 - int8_report.map50) * 100, 2)
        speedup = round(latency["fp32"] / latency["int8"], 3)
        fp32 = {"map50": fp32_report.map50, "map50_95": fp32_report.map50_95, "latency_ms": round(latency["fp32"], 2),
                "per_class": fp32_report.per_class}
        q = {"map50": int8_report.map50, "map50_95": int8_report.map50_95, "latency_ms": round(latency["int8"], 2),
             "per_class": int8_report.per_class, "map50_interval": int8_report.to_dict()["map50_interval"]}
        if drop > max_drop_points:
            return GateResult(False, f"refused: mAP50 drops {drop:.2f} points (limit {max_drop_points}); "
                              "the model stays FP32", imgsz, fp32, q, drop, speedup,
                              calibration_images=len(calibration))
        if speedup < min_speedup:
            return GateResult(False, f"refused: only {speedup:.2f}× faster than FP32 (need {min_speedup}×) for a "
                              f"{drop:.2f}-point mAP50 cost; the model stays FP32", imgsz, fp32, q, drop, speedup,
                              calibration_images=len(calibration))
        result = GateResult(True, f"accepted: mAP50 drop {drop:.2f} points ≤ {max_drop_points}, {speedup:.2f}× "
                            "faster", imgsz, fp32, q, drop, speedup, calibration_images=len(calibration))
        if out_dir is not None:
            result.bundle = str(out_dir)
            _write_bundle(bundle, manifest, int8_path, out_dir, dataset, fp32_report, int8_report, imgsz,
                          sign_key, calibration)
        return result


def _write_bundle(bundle, manifest, int8_path, out_dir, dataset, fp32_report, int8_report, imgsz, sign_key,
                  calibration) -> None:  # noqa: ANN001
    from bastion.runtime.bundle_create import create_bundle

    sha = dataset.sha256()
    settings = {"imgsz": imgsz, "conf": 0.001, "iou": 0.6, "rect": False}
    evaluation = [
        EvalResult(metric=m, value=getattr(r, attr), dataset=dataset.root.name, dataset_sha256=sha,
                   settings={**settings, "precision": p})
        for p, r in (("fp32", fp32_report), ("int8", int8_report))
        for m, attr in (("mAP50", "map50"), ("mAP50-95", "map50_95"))
    ]
    fields = manifest.model_dump(mode="json", exclude={"files"})
    fields.update(
        name=f"{manifest.name}-int8", version=f"{manifest.version}-int8-{imgsz}", precision="int8",
        evaluation=[e.model_dump(mode="json") for e in evaluation],
        provenance={
            **fields["provenance"],
            "source": f"INT8 (ONNX Runtime static QDQ, per-channel U8S8, post-processing FP32, {len(calibration)} "
                      f"calibration images) of {manifest.name}:{manifest.version}",
            "datasets": fields["provenance"]["datasets"] + [
                {"name": f"INT8 calibration ({len(calibration)} images)", "sha256": files_sha256(sorted(calibration))},
                {"name": f"INT8 gate evaluation ({dataset.root.name})", "sha256": sha}],
            "teachers": [bundle.sha256], "command": shlex.join(["bastion", *sys.argv[1:]]),
            "bastion_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    licenses = [bundle.root / f.path for f in bundle.manifest.files if f.role == "license"]
    fields["license"] = {**fields["license"], "files": [p.name for p in licenses]}
    create_bundle(int8_path, out_dir, fields, licenses, sign_key)

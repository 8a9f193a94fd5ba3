"""``bastion quantize``: FP32 bundle → INT8 candidates for the target CPU → measured gate → INT8 bundle (or a
reasoned refusal).

The verdict is written into the bundle's signed manifest (``int8_verdict``) with the CPU class it was measured
on and the classes it holds on, so the unit that loads the bundle can check it (``runtime/int8_check.py``).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bastion import __version__
from bastion.distill.datasets import YoloDataset
from bastion.distill.evaluate import EvalSettings, evaluate_detector, latency_ms
from bastion.distill.int8_recipe import Recipe, candidates
from bastion.distill.quantize import quantize_int8
from bastion.hardware.isa import (
    CPU_EP,
    Int8Target,
    IsaClass,
    classes_holding,
    ep_class,
    probe_isa,
    resolve_target,
    same_integer_results,
)
from bastion.models.bundle import Bundle
from bastion.models.manifest import EvalResult, Int8Verdict, Manifest, files_sha256
from bastion.models.provenance import stamp
from bastion.runtime.backends import open_backend
from bastion.runtime.detect import DetectOptions, Detector
from bastion.runtime.media import read_image

log = logging.getLogger(__name__)


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
    recipe: str | None = None  # the recipe kept (or, refused, the one that came closest)
    isa: str | None = None  # class the INT8 model was measured on: this CPU's, or the EP's (cuda-sm87)
    execution_provider: str | None = None  # the provider the INT8 session ran on
    target: str | None = None
    target_isa: str | None = None
    measured_on_target: bool = True
    note: str = ""  # said plainly when the measurement does not hold on the target as is
    candidates: list[dict[str, Any]] = field(default_factory=list)
    int8_verdict: dict[str, Any] | None = None  # the verdict signed into the bundle written (accepted, with --out)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def static_manifest(manifest: Manifest, size: int) -> Manifest:
    """The same model description with its input fixed to size×size (what the INT8 graph takes)."""
    spec = manifest.input.model_copy(update={"shape": [1, 3, size, size], "size": (size, size), "dynamic_hw": False})
    return manifest.model_copy(update={"input": spec})


@dataclass
class _Trial:
    recipe: Recipe
    path: Path
    report: Any
    latency_ms: float
    fp32_ms: float
    drop: float
    speedup: float
    verdict: str  # "accepted" | "drop" | "speed"
    provider: str = CPU_EP  # the execution provider the INT8 session ran on
    measured_on: str = ""  # its class: this CPU's (x86-avx2) or the provider's (cuda-sm87)
    target_kernels: bool = True  # computed as the target's kernels compute it (same integers)

    def summary(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.name,
            "describe": self.recipe.describe(),
            "map50": self.report.map50,
            "map50_drop_points": self.drop,
            "speedup": self.speedup,
            "latency_ms": round(self.latency_ms, 2),
            "verdict": self.verdict,
            "execution_provider": self.provider,
            "measured_on": self.measured_on,
            "target_kernels": self.target_kernels,
        }


def quantize_and_gate(
    bundle: Bundle,
    calibration: list[Path],
    dataset: YoloDataset,
    imgsz: int,
    max_drop_points: float,
    out_dir: Path | None,
    sign_key=None,
    threads: int = 1,
    tick=None,
    min_speedup: float = 1.1,
    bootstrap: int = 0,
    target: str | None = None,
    recipes: list[Recipe] | None = None,
    fp32_sibling: bool = True,
    device: str = "ort-cpu",
) -> GateResult:
    """Quantize with each recipe the target allows (``int8_recipe.candidates``), best first, and keep the first
    whose measured mAP50 drop and speed-up pass.  ``target``: a device profile or CPU class (default: this CPU).

    ``fp32_sibling``: the bundle written also carries ``bundle``'s FP32 model (its verified bytes), which a unit
    runs under ``int8_policy: strict`` where the INT8 verdict does not hold; False for size-constrained units.

    ``bootstrap`` > 0: the INT8 model's mAP50 also gets a resampled interval (for a distillation report).

    ``device``: where both models run while measured; ONNX Runtime's CPU provider by default, because the target
    is a CPU class and only CPU kernels compute what a CPU target computes (``device="auto"`` would take TensorRT
    or CUDA on a GPU build machine).  The verdict records the provider the INT8 session actually ran on, and on
    another provider its class (``cuda-sm87``), never this CPU's.
    """
    here = probe_isa()
    goal = resolve_target(target, here)
    tries = recipes or candidates(goal.isa)
    manifest = static_manifest(bundle.manifest, imgsz)
    eval_opts = dict(conf=0.001, iou=0.6, multi_label=True, scaleup=False, imgsz=imgsz, rect=False)
    settings = EvalSettings(imgsz=imgsz, rect=False)
    sample = [read_image(p) for p in dataset.images[:16]]
    trials: list[_Trial] = []
    with tempfile.TemporaryDirectory(prefix="bastion-quantize-") as tmp:
        base = Detector(
            open_backend(bundle.model_path, device=device, threads=threads), bundle.manifest, DetectOptions(**eval_opts)
        )
        fp32_report = evaluate_detector(base, dataset, settings)
        if tick:
            tick()
        for recipe in tries:
            int8_path = Path(tmp) / recipe.name / f"{bundle.manifest.name}-int8-{imgsz}.onnx"
            quantize_int8(base, bundle.model_path, calibration, int8_path, size_hw=(imgsz, imgsz), recipe=recipe)
            int8 = Detector(
                open_backend(int8_path, device=device, threads=threads), manifest, DetectOptions(**eval_opts)
            )
            provider = (int8.backend.providers or ["unknown"])[0]
            on_cpu = provider == CPU_EP
            measured_on = here.name if on_cpu else ep_class(provider)
            target_kernels = on_cpu and same_integer_results(recipe.saturation_free, here.name, goal.isa.name)
            report = evaluate_detector(int8, dataset, replace(settings, bootstrap=bootstrap))
            latency = latency_ms({"fp32": base, "int8": int8}, sample)
            int8.close()
            drop = round((fp32_report.map50 - report.map50) * 100, 2)
            speedup = round(latency["fp32"] / latency["int8"], 3)
            verdict = "drop" if drop > max_drop_points else "speed" if speedup < min_speedup else "accepted"
            trials.append(
                _Trial(
                    recipe,
                    int8_path,
                    report,
                    latency["int8"],
                    latency["fp32"],
                    drop,
                    speedup,
                    verdict,
                    provider,
                    measured_on,
                    target_kernels,
                )
            )
            log.info("INT8 candidate measured", extra=trials[-1].summary())
            if verdict == "accepted":
                break
        base.close()
        if tick:
            tick()
        chosen = next((t for t in trials if t.verdict == "accepted"), None) or min(trials, key=lambda t: t.drop)
        result = _result(chosen, trials, fp32_report, imgsz, max_drop_points, min_speedup, calibration, here, goal)
        if result.accepted and out_dir is not None:
            result.bundle = str(out_dir)
            verdict = _verdict(chosen, result, fp32_report, dataset, calibration, here, goal)
            result.int8_verdict = verdict.model_dump(mode="json")
            _write_bundle(
                bundle,
                manifest,
                chosen.path,
                out_dir,
                dataset,
                fp32_report,
                chosen.report,
                imgsz,
                sign_key,
                calibration,
                chosen.recipe,
                verdict,
                fp32_sibling,
            )
        return result


def _result(
    chosen: _Trial,
    trials: list[_Trial],
    fp32_report,
    imgsz: int,
    max_drop: float,
    min_speedup: float,
    calibration: list[Path],
    here: IsaClass,
    goal: Int8Target,
) -> GateResult:
    on_target = chosen.target_kernels
    note = _plain_note(chosen, here, goal)
    fp32 = {
        "map50": fp32_report.map50,
        "map50_95": fp32_report.map50_95,
        "latency_ms": round(chosen.fp32_ms, 2),
        "per_class": fp32_report.per_class,
    }
    q = {
        "map50": chosen.report.map50,
        "map50_95": chosen.report.map50_95,
        "latency_ms": round(chosen.latency_ms, 2),
        "per_class": chosen.report.per_class,
        "map50_interval": chosen.report.to_dict()["map50_interval"],
    }
    drop, speedup, recipe = chosen.drop, chosen.speedup, chosen.recipe
    tried = f" ({recipe.name}: {recipe.describe()}; tried {', '.join(t.recipe.name for t in trials)})"
    if chosen.verdict == "drop":
        reason = (
            f"refused: mAP50 drops {drop:.2f} points at best (limit {max_drop}){tried}; the model stays FP32"
            + _not_target_kernels(trials, goal)
        )
    elif chosen.verdict == "speed":
        reason = (
            f"refused: only {speedup:.2f}× faster than FP32 (need {min_speedup}×) for a {drop:.2f}-point "
            f"mAP50 cost{tried}; the model stays FP32" + _not_target_kernels(trials, goal)
        )
    else:
        reason = f"accepted: mAP50 drop {drop:.2f} points ≤ {max_drop}, {speedup:.2f}× faster{tried}"
    return GateResult(
        chosen.verdict == "accepted",
        reason,
        imgsz,
        fp32,
        q,
        drop,
        speedup,
        calibration_images=len(calibration),
        recipe=recipe.name,
        isa=chosen.measured_on,
        execution_provider=chosen.provider,
        target=goal.name,
        target_isa=goal.isa.name,
        measured_on_target=on_target,
        note=note,
        candidates=[t.summary() for t in trials],
    )


def _not_target_kernels(trials: list[_Trial], goal: Int8Target) -> str:
    """For a refusal: which refused candidates were not measured with the target's kernels (their drop there may
    differ, either way), so 'refused' is not read as 'cannot hold on the target'."""
    elsewhere = [t for t in trials if not t.target_kernels]
    if not elsewhere:
        return ""
    return (
        f"; NOT measured with the target's kernels ({goal.isa.name}): "
        + ", ".join(f"{t.recipe.name} (on {t.measured_on}, {t.drop:.2f} points)" for t in elsewhere)
        + f" — measure on a {goal.isa.name} machine before ruling INT8 out there"
    )


def _plain_note(chosen: _Trial, here: IsaClass, goal: Int8Target) -> str:
    """One sentence on whether the measurement holds on the target's CPU, for the report and the CLI."""
    recipe = chosen.recipe
    if chosen.provider != CPU_EP:
        return (
            f"NOT measured with the target's kernels: the INT8 model ran on {chosen.provider} "
            f"({chosen.measured_on}), the target {goal.name} is {goal.isa.name} CPU kernels; the mAP and speed-up "
            f"hold on {chosen.measured_on} only"
        )
    if here.name == goal.isa.name:
        return f"measured on this CPU ({here.name}), the target's own class"
    if chosen.target_kernels:
        return (
            f"measured on {here.name} for a {goal.isa.name} target: this recipe computes the same integers "
            f"there, so the mAP holds; the speed-up was not measured on {goal.isa.name}"
        )
    return (
        f"NOT measured with the target's kernels: this CPU is {here.name}, the target {goal.name} is "
        f"{goal.isa.name}, and a {recipe.activation.upper()}{recipe.weight.upper()} 8-bit model computes "
        f"differently there; measure it on a {goal.isa.name} machine before trusting the mAP"
    )


def _verdict(
    chosen: _Trial,
    result: GateResult,
    fp32_report,
    dataset: YoloDataset,
    calibration: list[Path],
    here: IsaClass,
    goal: Int8Target,
) -> Int8Verdict:
    import onnxruntime

    return Int8Verdict(
        recipe=chosen.recipe.name,
        recipe_params=chosen.recipe.to_dict(),
        isa=chosen.measured_on,
        holds_on=(
            classes_holding(chosen.recipe.saturation_free, here.name)
            if chosen.provider == CPU_EP
            else [chosen.measured_on]  # a GPU provider's kernels: only that provider on that GPU generation
        ),
        target=goal.name,
        target_isa=goal.isa.name,
        measured_on_target=result.measured_on_target,
        execution_provider=chosen.provider,
        onnxruntime=onnxruntime.__version__,
        calibration_sha256=files_sha256(sorted(calibration)),
        calibration_images=len(calibration),
        evaluation_sha256=dataset.sha256(),
        evaluation_images=len(dataset.images),
        fp32_map50=round(fp32_report.map50, 4),
        int8_map50=round(chosen.report.map50, 4),
        map50_drop_points=chosen.drop,
        speedup=chosen.speedup,
        candidates=[{k: v for k, v in c.items() if k != "describe"} for c in result.candidates],
    )


def _write_bundle(
    bundle,
    manifest,
    int8_path,
    out_dir,
    dataset,
    fp32_report,
    int8_report,
    imgsz,
    sign_key,
    calibration,
    recipe,
    verdict,
    fp32_sibling: bool = True,
) -> None:
    from bastion.runtime.bundle_create import create_bundle

    sha = dataset.sha256()
    settings = {"imgsz": imgsz, "conf": 0.001, "iou": 0.6, "rect": False}
    evaluation = [
        EvalResult(
            metric=m,
            value=getattr(r, attr),
            dataset=dataset.root.name,
            dataset_sha256=sha,
            settings={**settings, "precision": p},
        )
        for p, r in (("fp32", fp32_report), ("int8", int8_report))
        for m, attr in (("mAP50", "map50"), ("mAP50-95", "map50_95"))
    ]
    fields = manifest.model_dump(mode="json", exclude={"files"})
    fields.update(
        name=f"{manifest.name}-int8",
        version=f"{manifest.version}-int8-{imgsz}",
        precision="int8",
        evaluation=[e.model_dump(mode="json") for e in evaluation],
        int8_verdict=verdict.model_dump(mode="json"),
        provenance={
            **fields["provenance"],
            "source": f"INT8 (ONNX Runtime static QDQ, {recipe.describe()}, {len(calibration)} calibration images, "
            f"measured on {verdict.isa} for {verdict.target_isa}) of {manifest.name}:{manifest.version}",
            "datasets": fields["provenance"]["datasets"]
            + [
                {"name": f"INT8 calibration ({len(calibration)} images)", "sha256": files_sha256(sorted(calibration))},
                {"name": f"INT8 gate evaluation ({dataset.root.name})", "sha256": sha},
            ],
            "teachers": [bundle.sha256],
            **stamp(),
            "bastion_version": __version__,
        },
    )
    licenses = [bundle.root / f.path for f in bundle.manifest.files if f.role == "license"]
    fields["license"] = {**fields["license"], "files": [p.name for p in licenses]}
    sibling = None
    if fp32_sibling:  # the FP32 parent as verified now, not its path again
        sibling = Path(int8_path).parent / "fp32" / Path(bundle.manifest.model_file().path).name
        sibling.parent.mkdir(exist_ok=True)
        sibling.write_bytes(bundle.model_bytes())
    create_bundle(int8_path, out_dir, fields, licenses, sign_key, fp32_sibling=sibling)

"""INT8 recipes, and which of them a target CPU class allows, in the order the gate tries them.

A recipe is everything that changes the INT8 model's numbers: activation/weight
types, 7-bit weights (``reduce_range``), per-channel weights, the calibration
method, symmetric activations, and which nodes stay FP32.  The gate quantizes
with each candidate the target allows, measures mAP and speed, and keeps the
first that passes (``distill/int8_gate.py``).

Why these candidates (measured, docs/benchmarks.md):
- x86 without VNNI saturates full-range U8S8 sums, so it gets only recipes that
  cannot saturate: 7-bit weights (255 · 64 · 2 = 32,640 fits int16), U8U8 (widened
  to 16 bits before multiplying) or S8S8 (no VNNI-INT8 S8S8 kernel there: exact,
  but ONNX Runtime's generic path is slow).  7-bit weights with entropy calibration
  first (no measurable loss on yolov5n@320), then with MinMax and the tuned ranges.
- VNNI/AMX x86 and ARM compute U8S8 exactly: full range first (the fastest INT8
  kernel there, and within 0.4 points on yolov5n@320).
- Saturation-free recipes give the same integers on every class of an
  architecture, so a verdict measured with one of them on any x86 machine holds
  on every x86 target (``hardware/isa.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from bastion.hardware.isa import IsaClass


# Entropy calibration's histogram (``quantize.entropy_ranges``): ONNX Runtime's default of 128 bins and 128
# quantized bins leaves one threshold to try, the full range (MinMax); TensorRT's 2048 → 128 leaves 961.
ENTROPY_BINS = 2048
ENTROPY_QUANTIZED_BINS = 128


@dataclass(frozen=True)
class Recipe:
    name: str
    activation: Literal["u8", "s8"] = "u8"
    weight: Literal["s8", "u8"] = "s8"
    reduce_range: bool = False  # 7-bit weights: no U8S8 saturation on x86 without VNNI
    per_channel: bool = True
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    activation_symmetric: bool = False
    exclude_first_conv: bool = False
    exclude_head_convs: bool = False  # the convolutions whose outputs only the post-processing reads
    exclude_neck_concats: bool = False  # the Concats on the paths into the head convs (quantize.neck_concats)
    keep_post_fp32: bool = True  # head post-processing (box decode + final Concat) stays FP32

    @property
    def saturation_free(self) -> bool:
        """Can this model's INT8 sums never saturate a 16-bit lane, whatever the x86 kernel?"""
        return self.reduce_range or self.activation == "s8" or self.weight == "u8"

    def describe(self) -> str:
        parts = [
            f"{self.activation.upper()}{self.weight.upper()}",
            "per-channel" if self.per_channel else "per-tensor",
            "7-bit weights" if self.reduce_range else "8-bit weights",
            f"{self.calibration} calibration"
            + (f" ({ENTROPY_BINS} bins → {ENTROPY_QUANTIZED_BINS})" if self.calibration == "entropy" else ""),
        ]
        if self.activation_symmetric:
            parts.append("symmetric activations")
        if self.exclude_first_conv:
            parts.append("first conv FP32")
        if self.exclude_head_convs:
            parts.append("head convs FP32")
        if self.exclude_neck_concats:
            parts.append("neck concats FP32")
        if self.keep_post_fp32:
            parts.append("post-processing FP32")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "saturation_free": self.saturation_free}


U8S8 = Recipe("u8s8")
U8S8_7BIT = Recipe("u8s8-7bit", reduce_range=True)
S8S8 = Recipe("s8s8", activation="s8", activation_symmetric=True)
U8U8 = Recipe("u8u8", weight="u8")  # x86 widens U8 weights to 16 bits before multiplying: never saturates
# 7-bit weights lost 3.89 mAP50 points on yolov5n@320; symmetric activations and an FP32 first conv won 2.5 back
U8S8_7BIT_TUNED = replace(
    U8S8_7BIT, name="u8s8-7bit-symact-first-fp32", activation_symmetric=True, exclude_first_conv=True
)
# entropy calibration with a real histogram (2048 bins) won all 3.89 back (−1.18: within the noise of 32 images),
# every convolution INT8; its calibration takes ~1 min for yolov5n on the 2 shared cores (~30 s of it the threshold
# search, distill/quantize.entropy_threshold) where MinMax's takes a few seconds
U8S8_7BIT_ENTROPY = replace(U8S8_7BIT, name="u8s8-7bit-entropy", calibration="entropy")

# Variants the benchmark sweep measures (scripts/int8_sweep.py); the gate's candidates are below.
SWEEP: list[Recipe] = [
    U8S8,
    U8S8_7BIT,
    S8S8,
    U8S8_7BIT_ENTROPY,
    replace(U8S8_7BIT, name="u8s8-7bit-percentile", calibration="percentile"),
    replace(U8S8_7BIT, name="u8s8-7bit-symact", activation_symmetric=True),
    replace(U8S8_7BIT, name="u8s8-7bit-first-fp32", exclude_first_conv=True),
    replace(U8S8_7BIT, name="u8s8-7bit-head-fp32", exclude_head_convs=True),
    replace(U8S8_7BIT, name="u8s8-7bit-ends-fp32", exclude_first_conv=True, exclude_head_convs=True),
    U8S8_7BIT_TUNED,
    U8U8,
    replace(U8S8, name="u8s8-head-fp32", exclude_head_convs=True),
    replace(U8S8_7BIT_TUNED, name="u8s8-7bit-symact-first-fp32-entropy", calibration="entropy"),
    replace(U8S8_7BIT_TUNED, name="u8s8-7bit-symact-first-fp32-percentile", calibration="percentile"),
    # measured: the same model bytes as without it (ORT 1.32 quantizes a Concat's output for the convolutions
    # after it either way), kept so the sweep can show it
    replace(U8S8_7BIT_TUNED, name="u8s8-7bit-symact-first-neck-fp32", exclude_neck_concats=True),
]

RECIPES: dict[str, Recipe] = {r.name: r for r in SWEEP}


def candidates(target: IsaClass) -> list[Recipe]:
    """The recipes ``target`` allows, fastest kernel first; the gate keeps the first within the drop limit.

    U8S8 runs the fastest INT8 kernel on every x86 class (``vpmaddubsw``/VNNI/AMX); U8U8 widens to 16 bits (the
    most accurate here, but slower); S8S8 has no fast x86 kernel without AVX-VNNI-INT8 (docs/benchmarks.md).
    """
    if target.u8s8_saturates:
        first = [U8S8_7BIT_ENTROPY] if entropy_ranges_supported() else []
        return [*first, U8S8_7BIT_TUNED, U8U8, S8S8]
    return [U8S8, U8U8, S8S8]


def entropy_ranges_supported() -> bool:
    """Whether this ONNX Runtime takes ranges made outside ``quantize_static`` (``save_tensors_data`` and its
    ``calibration_cache_path``, which the entropy recipe needs; onnxruntime 1.32 has both, and the pyproject floor
    is older). Without them the entropy recipe is not offered — it would fail, not fall back to MinMax."""
    import inspect

    try:
        from onnxruntime.quantization import quantize_static, save_tensors_data  # noqa: F401
    except ImportError:
        return False
    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


def recipe_by_name(name: str) -> Recipe:
    """``--recipe NAME``; an unknown name is one line listing the known ones."""
    try:
        return RECIPES[name]
    except KeyError:
        from bastion.errors import ConfigError

        raise ConfigError(f"unknown INT8 recipe {name!r}", f"known: {', '.join(RECIPES)}") from None

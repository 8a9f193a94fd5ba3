"""A signed-manifest INT8 verdict for tests, with every field filled and any of them overridden."""

from __future__ import annotations

from bastion.hardware.isa import classes_holding
from bastion.models.manifest import Int8Verdict


def int8_verdict(isa: str = "x86-avx2", saturation_free: bool = True, **over) -> Int8Verdict:
    """A verdict gated on ``isa`` with a saturation-free (7-bit) recipe or the full-range one; ``over`` replaces
    any field."""
    fields = dict(
        recipe="u8s8-7bit" if saturation_free else "u8s8",
        isa=isa,
        holds_on=over.pop("holds_on", None) or classes_holding(saturation_free, isa),
        target=isa,
        target_isa=isa,
        measured_on_target=True,
        onnxruntime="1.32.0",
        calibration_sha256="a" * 64,
        calibration_images=32,
        evaluation_sha256="b" * 64,
        evaluation_images=32,
        fp32_map50=0.553,
        int8_map50=0.539,
        map50_drop_points=1.39,
        speedup=1.21,
    )
    return Int8Verdict(**{**fields, **over})

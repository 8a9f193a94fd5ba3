"""Does this INT8 bundle's gate verdict hold on the CPU (and execution provider) that is loading it?

The INT8 gate records in the signed manifest the CPU instruction-set class it
measured on and the classes whose kernels compute the same integers
(``Manifest.int8_verdict``, ``bastion.hardware.isa``).  A unit of another class
gets a warning, once per bundle and class; one outside ``holds_on`` may be
losing accuracy the gate never saw (U8S8 saturation on AVX2), and with
``int8_policy="strict"`` it refuses the bundle.  The result is kept on the
Detector (``detector.int8_check``) so a node can write it to its audit log.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from bastion.errors import ModelLoadError
from bastion.hardware.isa import IsaClass, probe_isa
from bastion.models.manifest import Manifest

log = logging.getLogger(__name__)

Int8Policy = Literal["warn", "strict"]
POLICIES = ("warn", "strict")
CPU_EP = "CPUExecutionProvider"
_warned: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Int8Check:
    """``holds``: the recorded verdict covers this CPU/EP; ``same``: measured on exactly this class and EP."""

    holds: bool
    same: bool
    measured_on: str
    running_on: str
    message: str

    def audit_fields(self) -> dict[str, object]:
        return {
            "holds": self.holds,
            "measured_on": self.measured_on,
            "running_on": self.running_on,
            "message": self.message,
        }


def check_int8(
    manifest: Manifest,
    sha256: str,
    providers: list[str] | None = None,
    policy: Int8Policy = "warn",
    running: IsaClass | None = None,
) -> Int8Check | None:
    """None for a non-INT8 bundle; else the check, logged once per bundle and CPU class when it differs.

    Raises ModelLoadError under ``strict`` when the verdict does not hold here.
    """
    if manifest.precision != "int8":
        return None
    if policy not in POLICIES:
        raise ModelLoadError(f"int8_policy {policy!r} is not one of {', '.join(POLICIES)}")
    running = running or probe_isa()
    provider = (providers or [CPU_EP])[0]
    here = running.name if provider == CPU_EP else provider
    verdict = manifest.int8_verdict
    if verdict is None:
        check = Int8Check(
            False,
            False,
            "unknown",
            here,
            f"INT8 bundle {manifest.name} does not record the CPU its "
            "accuracy was measured on (made before bastion recorded it): its mAP may not hold here",
        )
    elif provider != verdict.execution_provider:
        check = Int8Check(
            False,
            False,
            verdict.isa,
            here,
            f"INT8 bundle {manifest.name} was measured on "
            f"{verdict.execution_provider} ({verdict.isa}) but runs on {provider}: its "
            f"{verdict.map50_drop_points:.2f}-point mAP50 drop was not measured with these kernels",
        )
    elif running.name == verdict.isa:
        return Int8Check(True, True, verdict.isa, here, f"INT8 verdict measured on this CPU class ({here})")
    elif running.name in verdict.holds_on:
        check = Int8Check(
            True,
            False,
            verdict.isa,
            here,
            f"INT8 bundle {manifest.name} was measured on "
            f"{verdict.isa}, this CPU is {here}: its recipe ({verdict.recipe}) computes the same "
            f"integers here, so the accuracy holds; the {verdict.speedup:.2f}× speed-up was not "
            "measured on this CPU",
        )
    else:
        check = Int8Check(
            False,
            False,
            verdict.isa,
            here,
            f"INT8 bundle {manifest.name} was gated on "
            f"{verdict.isa}, this CPU is {here}: its {verdict.recipe} kernels compute differently "
            f"here and may lose accuracy the gate never measured ({verdict.map50_drop_points:.2f} "
            f"points there); re-run bastion quantize --target {here}",
        )
    if not check.holds and policy == "strict":
        raise ModelLoadError(
            f"refused: {check.message}",
            "int8_policy is strict: load the FP32 bundle, or a "
            f"bundle quantized for {here} (bastion quantize --target {here})",
        )
    key = (sha256, here)
    if key not in _warned:
        _warned.add(key)
        log.warning(
            check.message, extra={"int8_holds": check.holds, "measured_on": check.measured_on, "running_on": here}
        )
    return check


def plan_note(manifest: Manifest, profile_name: str, profile_isa: str | None, backend: str) -> str:
    """One line for ``bastion hw plan``: does this INT8 bundle's verdict hold on a device profile?"""
    verdict = manifest.int8_verdict
    if verdict is None:
        return "this INT8 bundle records no CPU class: its measured mAP may not hold on this profile"
    if backend != "ort-cpu":
        return (
            f"INT8 verdict measured on {verdict.execution_provider} ({verdict.isa}); this profile runs "
            f"{backend}: not measured with its kernels"
        )
    if profile_isa is None:
        return f"the profile names no CPU class (isa:): cannot tell whether the INT8 verdict ({verdict.isa}) holds"
    if profile_isa in verdict.holds_on:
        return f"INT8 verdict (measured on {verdict.isa}, {verdict.recipe}) holds on {profile_isa}"
    return (
        f"INT8 verdict measured on {verdict.isa} does NOT hold on {profile_isa} ({verdict.recipe} computes "
        f"differently there): bastion quantize --target {profile_name}, or plan the FP32 bundle"
    )

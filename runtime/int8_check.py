"""Does this INT8 bundle's gate verdict hold on the CPU (and execution provider) that is loading it?

The INT8 gate records in the signed manifest the CPU instruction-set class it
measured on and the classes whose kernels compute the same integers
(``Manifest.int8_verdict``, ``bastion.hardware.isa``).  A unit of another class
gets a warning, once per bundle and class; one outside ``holds_on`` may be
losing accuracy the gate never saw (U8S8 saturation on AVX2), and with
``int8_policy="strict"`` it runs the bundle's FP32 sibling instead (the INT8
model's FP32 parent, signed in the same manifest) or, when the bundle carries
none, refuses it.  The result is kept on the Detector (``detector.int8_check``)
so a node can write it to its audit log and say which precision runs and why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable, Literal, Protocol, TypeVar

from bastion.errors import ModelLoadError
from bastion.hardware.isa import CPU_EP, UNKNOWN_GPU, IsaClass, ep_class, probe_isa
from bastion.models.bundle import Bundle
from bastion.models.manifest import Manifest

log = logging.getLogger(__name__)

Int8Policy = Literal["warn", "strict"]
POLICIES = ("warn", "strict")
_warned: set[tuple[str, str, str]] = set()
RUN_INT8 = "int8"
RUN_FP32_SIBLING = "fp32-sibling"
AUDIT_MISMATCH = "int8_cpu_mismatch"
AUDIT_FALLBACK = "int8_fallback_fp32"


@dataclass(frozen=True)
class Int8Check:
    """``holds``: the recorded verdict covers this CPU/EP; ``same``: measured on exactly this class and EP."""

    holds: bool
    same: bool
    measured_on: str
    running_on: str
    message: str
    runs: str = RUN_INT8  # which model runs: the INT8 one, or (strict, verdict not holding) the FP32 sibling

    @property
    def fell_back(self) -> bool:
        return self.runs == RUN_FP32_SIBLING

    @property
    def audit_kind(self) -> str:
        """The audit record for this load: ``int8_fallback_fp32`` when the FP32 sibling runs, else a mismatch."""
        return AUDIT_FALLBACK if self.fell_back else AUDIT_MISMATCH

    @property
    def precision(self) -> str:
        """The precision of the model actually running."""
        return "fp32" if self.fell_back else "int8"

    def why(self) -> str:
        """One line: which precision runs and why (``Detector.precision_status``, ``bundle inspect``)."""
        if self.fell_back:
            return f"FP32 sibling: int8_policy strict and the INT8 verdict does not hold here — {self.message}"
        if self.same:
            return self.message
        return f"INT8 ({'verdict holds' if self.holds else 'WARNING: verdict does not hold'}) — {self.message}"

    def audit_fields(self) -> dict[str, object]:
        return {
            "holds": self.holds,
            "measured_on": self.measured_on,
            "running_on": self.running_on,
            "message": self.message,
            "runs": self.runs,
        }


def check_int8(
    manifest: Manifest,
    sha256: str,
    providers: list[str] | None = None,
    policy: Int8Policy = "warn",
    running: IsaClass | None = None,
    has_fp32_sibling: bool = False,
    running_ep: str | None = None,
) -> Int8Check | None:
    """None for a non-INT8 bundle; else the check, logged once per bundle and CPU class when it differs.

    Under ``strict``, when the verdict does not hold here, the check says to run the FP32 sibling
    (``runs == "fp32-sibling"``) if the bundle carries one, and raises ModelLoadError if it does not.

    A verdict measured on a GPU provider (``execution_provider`` CUDA or TensorRT, ``isa`` like ``cuda-sm87``) holds
    on that provider and GPU generation only; ``running_ep`` is this unit's (``hardware.isa.ep_class``, probed when
    not given).
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
    elif provider != CPU_EP:  # measured on this same GPU provider: its GPU generation decides
        here = running_ep or ep_class(provider)
        if here == verdict.isa and not here.endswith(UNKNOWN_GPU):  # an unknown generation matches nothing
            return Int8Check(True, True, verdict.isa, here, f"INT8 verdict measured on this provider and GPU ({here})")
        check = Int8Check(
            False,
            False,
            verdict.isa,
            here,
            f"INT8 bundle {manifest.name} was measured on {provider} {verdict.isa}, this unit runs it on {here}: "
            f"its {verdict.map50_drop_points:.2f}-point mAP50 drop was not measured with these kernels",
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
        if not has_fp32_sibling:
            instead = (
                f"a bundle quantized for {here} (bastion quantize --target {here}, which ships the FP32 sibling)"
                if provider == CPU_EP
                else f"run this one on the CPU provider it was measured on ({verdict.isa}: --device ort-cpu)"
                if verdict is not None and verdict.execution_provider == CPU_EP
                else "quantize it again on this unit's provider and GPU"
            )
            raise ModelLoadError(
                f"refused: {check.message}",
                f"int8_policy is strict and this bundle carries no FP32 sibling: load the FP32 bundle, or {instead}",
            )
        check = replace(check, runs=RUN_FP32_SIBLING)
    key = (sha256, here, check.runs)  # a fallback is told even after the same bundle warned under "warn"
    if key not in _warned:
        _warned.add(key)
        log.warning(
            f"running the FP32 sibling: {check.message}" if check.fell_back else check.message,
            extra={"int8_holds": check.holds, "measured_on": check.measured_on, "running_on": here, "runs": check.runs},
        )
    return check


class _Closable(Protocol):
    def close(self) -> None: ...


B = TypeVar("B", bound=_Closable)


def open_checked(
    bundle: Bundle, open_model: Callable[[bytes, str, str], B], policy: Int8Policy = "warn"
) -> tuple[B, Int8Check | None]:
    """Open ``bundle``'s model with ``open_model(verified bytes, precision, label)`` and check its INT8 verdict on
    this CPU and the backend's execution provider; under ``strict``, where the verdict does not hold, close it and
    open the FP32 sibling's verified bytes instead (or refuse when the bundle carries none).

    The provider is known only once a backend exists (``device="auto"`` may pick CUDA), so the INT8 model is
    opened first; a fallback costs one extra session build at load, never anything per frame.
    """
    manifest = bundle.manifest
    backend = open_model(bundle.model_bytes(), manifest.precision, manifest.model_file().path)
    try:
        check = check_int8(
            manifest,
            bundle.sha256,
            getattr(backend, "providers", None),
            policy,
            has_fp32_sibling=manifest.fp32_sibling_file() is not None,
        )
    except BaseException:
        backend.close()
        raise
    if check is None or not check.fell_back:
        return backend, check
    backend.close()
    sibling = manifest.fp32_sibling_file()
    assert sibling is not None  # check_int8 falls back only when there is one
    return open_model(bundle.read_verified(sibling), "fp32", sibling.path), check


def precision_status(manifest: Manifest, check: Int8Check | None) -> dict[str, str]:
    """Which precision a loaded bundle runs and why: for ``Detector.precision_status`` and a node's ``status``."""
    if check is None:
        return {"bundle": manifest.precision, "running": manifest.precision, "why": "as the bundle was made"}
    return {"bundle": manifest.precision, "running": check.precision, "why": check.why()}


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
        + ("; int8_policy strict runs its FP32 sibling there" if manifest.fp32_sibling_file() else "")
    )

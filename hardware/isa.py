"""Which INT8 kernels will this CPU run?  One instruction-set class name per CPU.

ONNX Runtime's CPU kernels (MLAS) pick their INT8 GEMM/convolution at start-up from
CPUID, and the choice changes the *numbers*, not only the speed: on x86 without
VNNI (AVX2, AVX-512 without VNNI) a U8 activation × S8 weight kernel adds two
products into a saturating 16-bit lane (``vpmaddubsw``), so a full-range U8S8 model
loses accuracy there that it does not lose on a VNNI or AMX CPU (measured: 9.55
mAP50 points for yolov5n@320 on an AVX2 EPYC; see docs/benchmarks.md).  An INT8
verdict is therefore recorded with the class it was measured on and checked
against the class of the CPU that loads the bundle.

The class comes from ``/proc/cpuinfo`` flags (x86 ``flags``, ARM ``Features``) and
``platform.machine()``.  ``BASTION_CPU_CLASS`` overrides it (tests simulate another
CPU with it; an operator can pin it), and every function takes the values it
reads as arguments so a test never has to patch globals.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

ENV_OVERRIDE = "BASTION_CPU_CLASS"


@dataclass(frozen=True)
class IsaClass:
    """What an instruction-set class means for INT8 kernels.

    ``family``: classes whose INT8 kernels give the same integer results for a
    full-range U8S8 model ("x86-saturating", "x86-exact", "arm").  A recipe that can
    never saturate (7-bit weights, S8S8) gives the same results on every class of
    the same architecture.
    """

    name: str
    arch: str  # "x86" | "arm64"
    family: str
    u8s8_saturates: bool
    description: str


# Most capable first: the first class whose flags are all present wins.
_X86: list[tuple[frozenset[str], IsaClass]] = [
    (
        frozenset({"amx_int8", "amx_tile"}),
        IsaClass("x86-amx", "x86", "x86-exact", False, "AMX-INT8 tiles (Sapphire Rapids or newer)"),
    ),
    (
        frozenset({"avx512_vnni"}),
        IsaClass(
            "x86-avx512-vnni", "x86", "x86-exact", False, "AVX-512 with VNNI (Cascade Lake, Ice Lake, Zen 4 or newer)"
        ),
    ),
    (
        frozenset({"avx_vnni"}),
        IsaClass("x86-avx-vnni", "x86", "x86-exact", False, "AVX2 with AVX-VNNI (Alder Lake, Zen 5 or newer)"),
    ),
    (
        frozenset({"avx512f", "avx512bw"}),
        IsaClass("x86-avx512", "x86", "x86-saturating", True, "AVX-512 without VNNI (Skylake-SP): U8S8 sums saturate"),
    ),
    (
        frozenset({"avx2"}),
        IsaClass(
            "x86-avx2",
            "x86",
            "x86-saturating",
            True,
            "AVX2 without VNNI (Haswell to Coffee Lake, Zen 1-3): U8S8 sums saturate",
        ),
    ),
    (
        frozenset(),
        IsaClass(
            "x86-sse",
            "x86",
            "x86-exact",
            False,  # MLAS's SSE kernel widens both to int16
            "x86-64 without AVX2 (SSE kernels: exact, slow)",
        ),
    ),
]
_ARM: list[tuple[frozenset[str], IsaClass]] = [
    (
        frozenset({"asimddp"}),
        IsaClass(
            "arm64-dotprod",
            "arm64",
            "arm",
            False,
            "ARMv8.2+ with dot product (Cortex-A76/A78, Neoverse, Jetson Orin CPUs)",
        ),
    ),
    (frozenset(), IsaClass("arm64", "arm64", "arm", False, "ARMv8 NEON without dot product (Cortex-A53/A72)")),
]
CLASSES: dict[str, IsaClass] = {c.name: c for _, c in (*_X86, *_ARM)}


def isa_class(name: str) -> IsaClass:
    """The class called ``name``; an unknown name is a one-line ConfigError listing the known ones."""
    try:
        return CLASSES[name]
    except KeyError:
        from bastion.errors import ConfigError

        raise ConfigError(f"unknown CPU instruction-set class {name!r}", f"known: {', '.join(CLASSES)}") from None


def classify(flags: set[str], machine: str) -> IsaClass:
    """The class of a CPU with these cpuinfo ``flags`` on this ``platform.machine()``."""
    table = _ARM if machine.lower() in ("aarch64", "arm64") else _X86
    return next(c for needed, c in table if needed <= flags)


def cpu_flags(cpuinfo: str) -> set[str]:
    """Flags (x86) or Features (ARM) of the first processor listed in ``/proc/cpuinfo`` text."""
    match = re.search(r"^(flags|Features)\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    return set(match.group(2).split()) if match else set()


def probe_isa(root: Path = Path("/"), machine: str | None = None, env: dict[str, str] | None = None) -> IsaClass:
    """This CPU's class: ``BASTION_CPU_CLASS`` if set, else from ``root``/proc/cpuinfo and the machine name."""
    override = (os.environ if env is None else env).get(ENV_OVERRIDE, "").strip()
    if override:
        from bastion.errors import ConfigError

        try:
            return isa_class(override)
        except ConfigError as exc:  # say which setting holds the bad name
            raise ConfigError(f"{ENV_OVERRIDE}: {exc.message}", exc.hint) from None
    try:
        text = (root / "proc" / "cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    return classify(cpu_flags(text), machine or platform.machine())


def same_integer_results(recipe_saturation_free: bool, measured: str, running: str) -> bool:
    """Would a model quantized with this recipe compute the same integers on ``running`` as on ``measured``?

    Saturation-free recipes (7-bit weights, S8S8) compute exactly on every class of one
    architecture; a full-range U8S8 model only on classes of the same kernel family.
    """
    a, b = isa_class(measured), isa_class(running)
    if a.name == b.name:
        return True
    if recipe_saturation_free:
        return a.arch == b.arch
    return a.family == b.family


def classes_holding(recipe_saturation_free: bool, measured: str) -> list[str]:
    """Every class on which a verdict measured on ``measured`` with this recipe still holds."""
    return [name for name in CLASSES if same_integer_results(recipe_saturation_free, measured, name)]


@dataclass(frozen=True)
class Int8Target:
    """What INT8 is being made for: a device profile (its ``isa``), a class name, or this machine."""

    name: str
    isa: IsaClass


def resolve_target(target: str | None, here: IsaClass | None = None) -> Int8Target:
    """``--target``: a CPU class name (``x86-avx2``), a device profile name or YAML path, or None for this CPU."""
    here = here or probe_isa()
    if not target:
        return Int8Target(f"this machine ({here.name})", here)
    if target in CLASSES:
        return Int8Target(target, CLASSES[target])
    from bastion.errors import ConfigError
    from bastion.hardware.profiles import load_profile, profile_names

    try:
        profile = load_profile(target)
    except ConfigError as exc:
        if "unknown device profile" not in str(exc):
            raise
        raise ConfigError(
            f"--target {target!r} is neither a device profile nor a CPU class",
            f"profiles: {', '.join(profile_names())}; CPU classes: {', '.join(CLASSES)}",
        ) from None
    isa = getattr(profile, "isa", None)
    if not isa:
        raise ConfigError(
            f"device profile {profile.name} names no CPU instruction-set class (isa:)",
            f"add isa: one of {', '.join(CLASSES)} to it, or pass --target CLASS",
        )
    return Int8Target(profile.name, isa_class(isa))


CPU_EP = "CPUExecutionProvider"
_EP_SHORT = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "tensorrt"}


UNKNOWN_GPU = "-sm?"  # the suffix of a GPU class whose generation could not be probed


def ep_class(provider: str, compute_capability: str | None = None) -> str:
    """The class an INT8 verdict measured on ``provider`` is recorded under: this CPU's class for ONNX Runtime's CPU
    provider, else the provider and GPU generation (``cuda-sm87``: CUDA on compute capability 8.7).

    ``compute_capability`` ("8.7"): the first GPU's, probed through NVML when not given; without one (no NVML, as
    on a Jetson) the generation is unknown: ``cuda-sm?``, a class no verdict holds on (``UNKNOWN_GPU``), so an INT8
    verdict measured on one unknown GPU is never taken to hold on another.  Native TensorRT's provider line
    ("TensorRT 10.3 (int8, Orin)") is ``tensorrt``.
    """
    if provider == CPU_EP:
        return probe_isa().name
    short = _EP_SHORT.get(provider) or (
        "tensorrt" if provider.startswith("TensorRT") else provider.removesuffix("ExecutionProvider").lower()
    )
    if compute_capability is None:
        from bastion.hardware.probe import nvidia_gpus

        gpus = nvidia_gpus()
        compute_capability = gpus[0].compute_capability if gpus else None
    return f"{short}-sm{compute_capability.replace('.', '')}" if compute_capability else f"{short}{UNKNOWN_GPU}"

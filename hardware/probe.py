"""What machine is this? CPU, memory, NVIDIA GPUs, Jetson release, and the inference stack's versions.

Every probe reads files under ``root`` (``/`` normally; a fixture directory in
tests) or asks an optional library, and leaves a field out rather than failing:
the same call works on a Jetson, a GPU workstation, a CPU box and in a container.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

X86_FLAGS = {
    "avx2": "AVX2",
    "avx512f": "AVX-512",
    "avx512_vnni": "AVX512-VNNI",
    "avx_vnni": "AVX-VNNI",
    "fma": "FMA",
    "f16c": "F16C",
    "amx_int8": "AMX-INT8",
}
ARM_FLAGS = {"asimd": "NEON", "asimddp": "NEON-DOTPROD", "sve": "SVE", "fphp": "FP16", "i8mm": "I8MM"}


@dataclass
class GpuInfo:
    index: int
    name: str
    memory_mb: int | None = None
    compute_capability: str | None = None
    driver: str | None = None
    power_limit_w: float | None = None


@dataclass
class HardwareReport:
    machine: str
    cpu_model: str | None
    cores_logical: int | None
    instruction_sets: list[str]
    memory_mb: int | None
    container: bool
    jetson_model: str | None = None
    l4t_release: str | None = None
    gpus: list[GpuInfo] = field(default_factory=list)
    software: dict[str, str | None] = field(default_factory=dict)
    ort_providers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read(root: Path, rel: str) -> str | None:
    try:
        return (root / rel).read_text(errors="replace")
    except OSError:
        return None


def cpu_info(root: Path) -> tuple[str | None, list[str]]:
    text = _read(root, "proc/cpuinfo") or ""
    model = None
    for key in ("model name", "Hardware", "Model", "cpu model"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE)
        if m:
            model = m.group(1).strip()
            break
    flags_line = re.search(r"^(flags|Features)\s*:\s*(.+)$", text, re.MULTILINE)
    flags = set(flags_line.group(2).split()) if flags_line else set()
    table = {**X86_FLAGS, **ARM_FLAGS}
    return model, sorted({label for flag, label in table.items() if flag in flags})


def memory_mb(root: Path) -> int | None:
    text = _read(root, "proc/meminfo") or ""
    m = re.search(r"^MemTotal:\s*(\d+)\s*kB", text, re.MULTILINE)
    return int(m.group(1)) // 1024 if m else None


def jetson(root: Path) -> tuple[str | None, str | None]:
    model = _read(root, "proc/device-tree/model")
    model = model.strip("\x00\n ") if model else None
    release = _read(root, "etc/nv_tegra_release")
    l4t = None
    if release:  # "# R36 (release), REVISION: 3.0, GCID: …"
        m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", release)
        l4t = f"{m.group(1)}.{m.group(2)}" if m else release.splitlines()[0].strip("# ")
    if model and "jetson" not in model.lower() and not release:
        model = None  # a device tree that is not a Jetson (e.g. a Raspberry Pi) is reported as the CPU only
    return model, l4t


def in_container(root: Path) -> bool:
    if (root / ".dockerenv").exists() or (root / "run/.containerenv").exists():
        return True
    cgroup = _read(root, "proc/1/cgroup") or ""
    return any(k in cgroup for k in ("docker", "kubepods", "containerd", "lxc"))


def nvidia_gpus() -> list[GpuInfo]:
    """GPUs through NVML (the ``nvidia-ml-py`` package) when it and a driver are present; else none."""
    if importlib.util.find_spec("pynvml") is None:
        return []
    import pynvml

    try:
        pynvml.nvmlInit()
    except Exception:  # no driver / no GPU: a CPU box
        return []
    gpus = []
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            try:
                power = pynvml.nvmlDeviceGetPowerManagementLimit(h) / 1000
            except Exception:
                power = None
            gpus.append(
                GpuInfo(
                    i,
                    name.decode() if isinstance(name, bytes) else name,
                    pynvml.nvmlDeviceGetMemoryInfo(h).total // 2**20,
                    f"{major}.{minor}",
                    driver.decode() if isinstance(driver, bytes) else driver,
                    power,
                )
            )
    finally:
        pynvml.nvmlShutdown()
    return gpus


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        from importlib.metadata import version

        return version({"cv2": "opencv-python-headless", "zmq": "pyzmq", "tensorrt": "tensorrt"}.get(module, module))
    except Exception:
        return "installed"


def software() -> tuple[dict[str, str | None], list[str]]:
    import onnxruntime

    versions = {
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "tensorrt": _version("tensorrt"),
        "cuda_runtime": os.environ.get("CUDA_VERSION"),
        "opencv": _version("cv2"),
        "pyzmq": _version("zmq"),
        "torch": _version("torch"),
    }
    return versions, list(onnxruntime.get_available_providers())


def probe(root: Path = Path("/"), with_gpus: bool = True) -> HardwareReport:
    model, isa = cpu_info(root)
    jetson_model, l4t = jetson(root)
    versions, providers = software()
    return HardwareReport(
        machine=platform.machine(),
        cpu_model=model,
        cores_logical=os.cpu_count() if root == Path("/") else None,
        instruction_sets=isa,
        memory_mb=memory_mb(root),
        container=in_container(root),
        jetson_model=jetson_model,
        l4t_release=l4t,
        gpus=nvidia_gpus() if with_gpus else [],
        software=versions,
        ort_providers=providers,
    )

"""Where a distillation trains: ``--device auto|cpu|cuda|cuda:N``, checked before any work is done."""

from __future__ import annotations

import re

from bastion.errors import ConfigError

DEVICE_HELP = (
    "Where to train: auto (a CUDA GPU if torch sees one), cpu, cuda, cuda:N. Evaluation, timing and "
    "export run on the CPU, as the node serves."
)


def training_device(requested: str) -> str:
    """``auto``: the first CUDA GPU when torch sees one, else the CPU; ``cuda``/``cuda:N`` must exist."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return "cpu"
    name, _, index = requested.partition(":")
    if name != "cuda" or not (index == "" or index.isdigit()):
        raise ConfigError(f"--device {requested} is not a training device", "use auto, cpu, cuda or cuda:N")
    if int(index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {requested}: torch sees {torch.cuda.device_count()} CUDA device(s)", "use --device cpu, or auto"
        )
    return requested


def ultralytics_device(device: str) -> str:
    """Ultralytics' spelling of a resolved device: ``cpu`` or the CUDA index (``cuda:1`` → ``1``, ``cuda:0,1`` →
    ``0,1``: its DDP over those GPUs)."""
    return "cpu" if device == "cpu" else (device.partition(":")[2] or "0")


def data_parallel_devices(device: str, nproc: int) -> str:
    """The detector's devices for Ultralytics' own multi-GPU DDP: ``cuda:0`` with ``--nproc 3`` → ``cuda:0,1,2``.

    GPUs only: CPU workers are launched by bastion itself (``distill/ultra_ddp.py``, gloo under torchrun), since
    Ultralytics counts a CPU run as world size 0 and never starts DDP there; a CPU device reaching this is a caller's
    mistake. Ultralytics' multi-GPU launcher pickles the trainer with cloudpickle and would try to *download*
    cloudpickle when missing: refused here, offline, before any work."""
    import importlib.util

    import torch

    if nproc == 1:
        return device
    if device == "cpu":
        raise ConfigError("Ultralytics' own DDP runs only on CUDA devices; CPU workers go through bastion's launcher")
    first = int(device.partition(":")[2] or 0)
    if first + nproc > torch.cuda.device_count():
        raise ConfigError(
            f"--nproc {nproc} from {device}: torch sees {torch.cuda.device_count()} CUDA device(s)",
            "give at most one process per GPU",
        )
    if importlib.util.find_spec("cloudpickle") is None:
        raise ConfigError(
            "Ultralytics' multi-GPU launch needs cloudpickle, which is not installed",
            "pip install 'cloudpickle>=3.1.1' (Ultralytics would otherwise try to download it)",
        )
    _check_cloudpickle()
    return "cuda:" + ",".join(str(first + i) for i in range(nproc))


CLOUDPICKLE_MIN = (3, 1, 1)  # what Ultralytics' generate_ddp_file asks for (check_requirements: a pip install)


def _check_cloudpickle() -> None:
    """An older cloudpickle than Ultralytics' launcher asks for would make it try ``pip install`` (the network)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("cloudpickle")
    except PackageNotFoundError:
        installed = "0"
    numbers = [int(n) for n in re.findall(r"\d+", installed)[:3]]
    if tuple(numbers + [0] * (3 - len(numbers))) < CLOUDPICKLE_MIN:
        want = ".".join(map(str, CLOUDPICKLE_MIN))
        raise ConfigError(
            f"Ultralytics' multi-GPU launch needs cloudpickle>={want}, this environment has {installed}",
            f"pip install 'cloudpickle>={want}' (Ultralytics would otherwise try to download it)",
        )


def launched_devices(device: str) -> str:
    """The detector's devices in a rank of an external torchrun on GPUs: this node's GPUs from ``device`` on, one
    per local rank (``cuda:0`` on a node of 8 → ``cuda:0,…,7``; Ultralytics' DDP rank takes the LOCAL_RANK-th).
    No cloudpickle: torchrun, not Ultralytics, started the processes."""
    import os

    import torch

    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE") or 1)
    first = int(device.partition(":")[2] or 0)
    if first + local > torch.cuda.device_count():
        raise ConfigError(
            f"{local} ranks on this node from {device}: torch sees {torch.cuda.device_count()} CUDA device(s)",
            "start at most one process per GPU on each node (--nproc-per-node), or use --device cpu",
        )
    return "cuda:" + ",".join(str(first + i) for i in range(local))

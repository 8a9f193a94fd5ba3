"""Where a distillation trains: ``--device auto|cpu|cuda|cuda:N``, checked before any work is done."""

from __future__ import annotations

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
    """Ultralytics' spelling of a resolved device: ``cpu`` or the CUDA index (``cuda:1`` → ``1``)."""
    return "cpu" if device == "cpu" else (device.partition(":")[2] or "0")

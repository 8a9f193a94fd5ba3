"""``open_backend``: read a model's bytes once, pick the backend for ``device``, load it from those bytes.

``device`` is ``auto`` or one of the registry's names (``bastion.hardware.backend_names``; old spellings are mapped
there). ``auto`` takes the first available backend of ``AUTO_ORDER``; native TensorRT that cannot start under
``auto`` falls back to the next one with a logged reason, while an explicit ``trt`` fails with the reason.
"""

from __future__ import annotations

import logging
from pathlib import Path

from bastion.errors import BastionError, ConfigError, ModelLoadError
from bastion.hardware.backend_names import AUTO, AUTO_ORDER, device_name
from bastion.runtime.backends.base import Backend, OpenOptions
from bastion.runtime.backends.registry import BackendSpec, backend_specs

log = logging.getLogger(__name__)


def auto_candidates() -> list[type[BackendSpec]]:
    """The backends ``device="auto"`` would try here, best first (only those whose libraries are installed)."""
    specs = backend_specs()
    return [specs[name] for name in AUTO_ORDER if name in specs and specs[name].available()]


def resolve_device(device: str) -> str:
    """The backend name ``device`` means on this machine (``auto`` → the first available one)."""
    name = device_name(device)
    return auto_candidates()[0].name if name == AUTO else name


def _load(spec: type[BackendSpec], data: bytes, options: OpenOptions, label: str) -> Backend:
    missing = spec.why_unavailable()
    if missing:  # the line already says what to install
        raise ConfigError(missing)
    try:
        return spec.load(data, spec.config_for(options), label)
    except BastionError:
        raise
    except Exception as exc:  # a GPU library's own error: one line, never a traceback
        first = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise ModelLoadError(
            f"{spec.name} failed: {first[:200]}", "try --device ort-cuda or ort-cpu, or 'bastion engine clear'"
        ) from None


def open_backend(
    model: str | Path | bytes,
    device: str = "auto",
    threads: int | None = None,
    precision: str | None = None,
    size_hw: tuple[int, int] | None = None,
    max_batch: int = 1,
    label: str | None = None,
) -> Backend:
    """Open ``model`` on ``device`` ('auto' or a backend name). ``precision`` (the bundle's), ``size_hw`` (its
    input size) and ``max_batch`` shape a TensorRT engine: an INT8 (QDQ) bundle builds an INT8 engine, anything
    else FP16; ONNX Runtime takes ``threads``.

    ``model`` is a bundle's verified bytes (``Bundle.model_bytes()``; ``label`` names it in messages) or the path
    of a bare ONNX file. Either way it is read once and every session or engine is built from those bytes."""
    from bastion.runtime.backends.onnxrt import read_model

    name = device_name(device)  # a bad name fails before the model is read
    data, read_label = read_model(model)  # once, for whichever backend starts (and its fallback)
    label = label or read_label
    options = OpenOptions(threads=threads, precision=precision, size_hw=size_hw, max_batch=max_batch)
    if name != AUTO:
        return _load(backend_specs()[name], data, options, label)
    candidates = auto_candidates()
    for spec in candidates[:-1]:
        try:
            return _load(spec, data, options, label)
        except BastionError as exc:
            log.warning("%s could not start (%s); trying the next backend", spec.name, exc)
    return _load(candidates[-1], data, options, label)

"""The one set of backend names: ``ort-cpu``, ``ort-cuda``, ``ort-trt``, ``trt`` (+ ``auto``), and the one alias table.

Every place that names a backend reads it from here — ``Detector.load(device=…)``, the node config's ``device:``,
``bastion detect|eval --device``, ``bench detect --backends``, the device profiles' ``preferred_backend:``, ``hw
plan`` and ``doctor`` — so one word means one thing everywhere. It lives in ``hardware`` (not beside the backends
in ``runtime.backends``) because the node config and the profiles validate names without loading ONNX Runtime.

The spellings older releases accepted are aliases, mapped here and nowhere else: ``cpu`` → ``ort-cpu``, ``cuda`` →
``ort-cuda``, ``tensorrt`` → ``ort-trt`` (what ``--device tensorrt`` always meant: ONNX Runtime's TensorRT
execution provider; the native TensorRT backend is ``trt``).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator

from bastion.errors import ConfigError

AUTO = "auto"
BACKEND_NAMES: tuple[str, ...] = ("ort-cpu", "ort-cuda", "ort-trt", "trt")
DESCRIPTIONS = {
    "ort-cpu": "ONNX Runtime, CPU",
    "ort-cuda": "ONNX Runtime, CUDA execution provider",
    "ort-trt": "ONNX Runtime, TensorRT execution provider",
    "trt": "native TensorRT (engine cache)",
}
ALIASES = {"cpu": "ort-cpu", "cuda": "ort-cuda", "tensorrt": "ort-trt"}
# device="auto" tries these in order and takes the first whose libraries are installed (native TensorRT falls
# back to the next one, with a logged reason, when it cannot start).
AUTO_ORDER: tuple[str, ...] = ("trt", "ort-trt", "ort-cuda", "ort-cpu")

VALID_LINE = (
    f"use {AUTO}, {', '.join(BACKEND_NAMES)} "
    f"(old spellings: {', '.join(f'{old}={new}' for old, new in ALIASES.items())})"
)
DEVICE_HELP = (
    "auto, ort-cpu, ort-cuda, ort-trt (ONNX Runtime's TensorRT provider) or trt (native TensorRT); "
    "cpu, cuda, tensorrt are aliases of the ort-* names."
)


def backend_name(name: str) -> str:
    """The canonical backend name for ``name`` (an alias is mapped), or a ConfigError naming the valid ones."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in BACKEND_NAMES:
        raise ConfigError(f"unknown backend {name!r}", VALID_LINE)
    return key


def device_name(name: str) -> str:
    """Like ``backend_name`` but also accepts ``auto`` (a device choice, not a backend)."""
    if str(name).strip().lower() == AUTO:
        return AUTO
    try:
        return backend_name(name)
    except ConfigError:
        raise ConfigError(f"unknown device {name!r}", VALID_LINE) from None


def _pydantic(check):
    def validate(value: str) -> str:
        try:
            return check(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None  # pydantic reports it under the field's name

    return AfterValidator(validate)


# pydantic field types for configs: an alias is stored as its canonical name.
DeviceName = Annotated[str, _pydantic(device_name)]  # the node's ``device:`` (auto or a backend)
BackendName = Annotated[str, _pydantic(backend_name)]  # a device profile's ``preferred_backend:``

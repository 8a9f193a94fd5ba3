"""One registry of backends (mmdeploy's backend manager, Frigate's ``DETECTOR_KEY`` + ``Literal`` configs).

Each backend module registers a ``BackendSpec`` under one of the names of ``bastion.hardware.backend_names``::

    DETECTOR_KEY = "ort-cpu"

    class OrtCpuConfig(BackendConfig):
        type: Literal[DETECTOR_KEY] = DETECTOR_KEY

    @register_backend(DETECTOR_KEY)
    class OrtCpu(BackendSpec):
        config = OrtCpuConfig
        thread_safe = True
        ...

A spec answers ``available()`` (are its libraries installed here — cheap, imports nothing heavy), ``version()``,
``why_unavailable()`` (one line saying what to install) and ``load(model_bytes, config, label)`` → a running
``Backend``. The same registry serves ``Detector``, ``bench --backends``, ``doctor`` and ``hw plan``.
"""

from __future__ import annotations

import importlib
from typing import Annotated, ClassVar, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from bastion.errors import ConfigError
from bastion.hardware.backend_names import BACKEND_NAMES, VALID_LINE, backend_name
from bastion.models.textfiles import first_error
from bastion.runtime.backends.base import Backend

# The modules that register the specs, imported on first use (the TensorRT one imports nothing heavy itself).
_MODULES = ("bastion.runtime.backends.onnxrt", "bastion.runtime.backends.tensorrt")
_SPECS: dict[str, type["BackendSpec"]] = {}


class BackendConfig(BaseModel):
    """What one backend needs to open a model; ``type`` is the discriminator (a backend name)."""

    model_config = ConfigDict(extra="forbid")
    type: str


class BackendSpec:
    """The class-level face of one backend: availability, version, thread safety, config and loader."""

    name: ClassVar[str]
    config: ClassVar[type[BackendConfig]]
    thread_safe: ClassVar[bool] = True  # may several threads call run() on one instance at once?
    library: ClassVar[str] = ""  # the library behind it, as doctor names it
    needs: ClassVar[str] = ""  # what to install where it is not available (a few words, for doctor)

    @classmethod
    def available(cls) -> bool:
        return cls.why_unavailable() is None

    @classmethod
    def why_unavailable(cls) -> str | None:
        """None when this machine can run the backend, else one line saying what is missing and what to do."""
        return None

    @classmethod
    def version(cls) -> str | None:
        """The version of the library behind the backend, None when it is not installed."""
        return None

    @classmethod
    def load(cls, model: bytes, config: BackendConfig, label: str) -> Backend:
        """A running backend on ``model`` — verified bytes, never a path — with ``config``."""
        raise NotImplementedError


def register_backend(name: str):
    """Class decorator: register a ``BackendSpec`` subclass under ``name`` (one of ``BACKEND_NAMES``)."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"{name!r} is not a backend name (hardware/backend_names.py: {', '.join(BACKEND_NAMES)})")

    def decorate(spec: type[BackendSpec]) -> type[BackendSpec]:
        if name in _SPECS and _SPECS[name] is not spec:
            raise ValueError(f"backend {name!r} is registered twice")
        if spec.config.model_fields["type"].default != name:
            raise ValueError(f"{spec.__name__}.config's type must default to {name!r}")
        spec.name = name
        _SPECS[name] = spec
        return spec

    return decorate


def _load_modules() -> None:
    for module in _MODULES:
        importlib.import_module(module)


def backend_specs() -> dict[str, type[BackendSpec]]:
    """Every registered backend, in ``BACKEND_NAMES`` order."""
    _load_modules()
    return {name: _SPECS[name] for name in BACKEND_NAMES if name in _SPECS}


def get_backend(name: str) -> type[BackendSpec]:
    """The spec for ``name`` (an alias is mapped); a ConfigError naming the valid names otherwise."""
    return backend_specs()[backend_name(name)]


def _adapter() -> TypeAdapter:
    configs = tuple(spec.config for spec in backend_specs().values())
    return TypeAdapter(Annotated[Union[configs], Field(discriminator="type")])  # type: ignore[valid-type]


def parse_backend_config(value: str | dict | BackendConfig) -> BackendConfig:
    """A backend config from a name (``"ort-cpu"``, an alias) or a mapping with ``type`` — validated by the
    backend's own pydantic model; an unknown type or a bad field is one ConfigError line."""
    if isinstance(value, BackendConfig):
        return value
    data = {"type": value} if isinstance(value, str) else dict(value)
    if "type" not in data:
        raise ConfigError("a backend config needs a 'type'", VALID_LINE)
    data["type"] = backend_name(data["type"])  # unknown → one line naming the valid names; an alias → its name
    try:
        return _adapter().validate_python(data)
    except ValidationError as exc:
        raise ConfigError(f"backend {data['type']}: {first_error(exc)}") from None

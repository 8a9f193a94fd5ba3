"""Device profiles (``hardware/profiles/*.yaml``): what a class of machine offers a model."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bastion.errors import ConfigError
from bastion.hardware.backend_names import BackendName
from bastion.models.textfiles import first_error, read_yaml_mapping

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"


class Reference(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    imgsz: int
    latency_ms: float = Field(gt=0)
    threads: int | None = None
    source: str


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str
    kind: Literal["cpu", "gpu", "jetson"]
    memory_mb: int = Field(gt=0)
    compute_capability: str | None = None
    preferred_backend: BackendName  # hardware/backend_names.py
    precision: Literal["fp32", "fp16", "int8"]
    max_batch: int = Field(ge=1)
    max_imgsz: int = Field(ge=32)
    workspace_mb: int = Field(0, ge=0)
    reference: Reference | None = None
    isa: str | None = None  # CPU instruction-set class INT8 is made for (bastion.hardware.isa; --target)

    @field_validator("isa")
    @classmethod
    def _known_isa(cls, value: str | None) -> str | None:
        from bastion.hardware.isa import CLASSES

        if value is not None and value not in CLASSES:
            raise ValueError(f"unknown CPU class {value!r} (known: {', '.join(CLASSES)})")
        return value


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def load_profile(name_or_path: str) -> Profile:
    path = Path(name_or_path)
    if not path.is_file():
        path = PROFILES_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown device profile {name_or_path!r}", f"known: {', '.join(profile_names())}")
    try:
        return Profile.model_validate(read_yaml_mapping(path, "device profile"))
    except ValidationError as exc:
        raise ConfigError(f"device profile {path}: {first_error(exc)}") from None

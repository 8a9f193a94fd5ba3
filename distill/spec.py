"""What a ``bastion distill detect`` run is asked to do, as one validated object.

The CLI maps its flags onto a :class:`DistillSpec` and nothing else; the pipeline reads only the spec. Pydantic (like
``edge/config.py``'s ``NodeConfig``) so a bad value is refused where it is given, with the field's name, before any
stage runs — not half-way through a run that has already spent minutes pseudo-labelling.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bastion.distill.train import TrainSpec
from bastion.errors import ConfigError
from bastion.models.textfiles import first_error

Spec = TypeVar("Spec", bound=BaseModel)


class DistillSpec(BaseModel):
    """Teachers, data, the student's classes and size, what may ship, and (optionally) how to train."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, arbitrary_types_allowed=True)

    teachers: list[str] = Field(min_length=1)
    images: Path
    labels: Path | None = None
    classes: list[str] = Field(min_length=1)
    class_map: dict[str, str] = Field(default_factory=dict)
    conf: dict[str, float] = Field(default_factory=dict)  # per class, "*" for the rest (pseudo-label thresholds)
    imgsz: int = Field(320, ge=32, le=4096)
    out: Path
    val_fraction: float = Field(0.25, gt=0, lt=1)
    min_map50: float = Field(0.0, ge=0, le=1)
    max_latency_ms: float | None = Field(None, gt=0)
    max_map50_drop: float | None = Field(None, ge=0, le=100)  # points below the best: the fastest within it ships
    conf_auto: bool = False  # per-class thresholds chosen by F1 against the labelled *training* images
    int8: bool = True
    max_int8_drop: float = Field(1.0, ge=0, le=100)  # mAP50 points an INT8 model may lose against its FP32 source
    int8_target: str | None = None  # device profile or CPU class the INT8 recipe must hold on (None: this CPU)
    val_images: Path | None = None  # a separate labelled held-out set (else: a share of the labelled images)
    val_labels: Path | None = None
    allow_unsigned: bool = False
    force: set[str] = Field(default_factory=set)
    train: TrainSpec | None = None  # None: no student is trained (only the no-training candidates)

    @model_validator(mode="after")
    def _held_out_pair(self) -> "DistillSpec":
        if (self.val_images is None) != (self.val_labels is None):
            raise ValueError("--val-images and --val-labels go together: give both, or neither")
        if any(not 0 <= v <= 1 for v in self.conf.values()):
            raise ValueError("thresholds are between 0 and 1")
        return self


def checked(model: type[Spec], **fields) -> Spec:
    """``model(**fields)``, with a validation error turned into the one-line ``ConfigError`` the CLI shows."""
    try:
        return model(**fields)
    except ValidationError as exc:
        raise ConfigError(f"{model.__name__}: {first_error(exc)}") from None

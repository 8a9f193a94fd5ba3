"""What a ``bastion distill detect`` or ``distill lm`` run is asked to do, as one validated object.

The CLI maps its flags onto a :class:`DistillSpec` and nothing else; the pipeline reads only the spec. Pydantic (like
``edge/config.py``'s ``NodeConfig``) so a bad value is refused where it is given, with the field's name, before any
stage runs — not half-way through a run that has already spent minutes pseudo-labelling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bastion.distill.run import DetectRunDir
from bastion.distill.train import TrainSpec
from bastion.errors import ConfigError
from bastion.models.manifest import Markings

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
    labeller: str = "single"  # who runs the teachers: single | ray | ray:auto | ray:HOST:PORT (labellers.py)
    labeller_workers: int | None = None  # Ray actors (None: one per core or GPU of the cluster)
    markings: Markings | None = None  # signed into the shipped bundle's manifest (classification, releasability)

    @model_validator(mode="after")
    def _held_out_pair(self) -> "DistillSpec":
        if (self.val_images is None) != (self.val_labels is None):
            raise ValueError("--val-images and --val-labels go together: give both, or neither")
        if any(not 0 <= v <= 1 for v in self.conf.values()):
            raise ValueError("--conf: thresholds are between 0 and 1")
        from bastion.distill.labellers import parse_labeller

        parse_labeller(self.labeller, self.labeller_workers)  # a bad --labeller is refused before any stage runs
        if self.int8_target:  # a bad --target too, not at stage 4 after the teachers, the labels and the training
            from bastion.hardware.isa import resolve_target

            resolve_target(self.int8_target)
        unknown = sorted(self.force - set(DetectRunDir.STAGES))
        if unknown:
            raise ValueError(f"--force {unknown[0]}: unknown stage (stages: {', '.join(DetectRunDir.STAGES)})")
        return self


class LMDistillSpec(BaseModel):
    """How the LM student trains; validated where it is given (the CLI maps its flags onto it)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    keep_layers: list[int] | None = None  # None: evenly spaced `depth` layers
    depth: int | None = Field(None, ge=1)
    steps: int = Field(200, ge=1)
    batch: int = Field(16, ge=1)
    block: int = Field(128, ge=2)
    lr: float = Field(3e-3, gt=0)
    warmup: int = Field(20, ge=0)
    accumulate: int = Field(1, ge=1)
    temperature: float = Field(1.0, gt=0)  # measured best on stories260K (2.0: +2 points of perplexity rise)
    alpha: float = Field(0.1, ge=0, le=1)  # weight of the cross-entropy next to the KL term (0, 0.3, 0.5 did worse)
    eval_every: int = Field(50, ge=1)
    seed: int = 0
    device: str = "cpu"  # or "cuda"/"cuda:N": teacher and student train there (lm_pipeline resolves "auto")


class LMRunSpec(BaseModel):
    """What a ``bastion distill lm`` run is asked to do; the CLI maps its flags onto this and nothing else."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    teacher: Path  # a llama2.c .bin or a Hugging Face Llama/Mistral/Qwen2 directory
    tokenizer: Path
    out: Path
    weights_license: str = Field(min_length=1)
    corpus: Path | None = None  # domain text; else `synthetic` texts the teacher writes
    synthetic: int = Field(0, ge=0)
    keep_layers: list[int] | None = None
    depth: int | None = Field(None, ge=1)
    layer_choice: Literal["even", "importance"] = "even"
    ffn_ratio: float = Field(1.0, gt=0, le=1)
    student_config: Path | None = None  # a fresh architecture instead of pruning
    gguf_type: Literal["f32", "f16", "q8_0"] | None = "f16"
    max_int8_ppl_rise: float = Field(0.05, ge=0)
    train: LMDistillSpec = Field(default_factory=LMDistillSpec)
    markings: Markings | None = None  # signed into the student bundle's manifest (and its INT8 copy's)

    @model_validator(mode="after")
    def _consistent(self) -> "LMRunSpec":
        if (self.corpus is None) == (self.synthetic <= 0):
            raise ValueError("give --corpus FILE|DIR or --synthetic N (text the teacher writes)")
        if self.student_config is not None and (self.keep_layers or self.depth or self.ffn_ratio < 1.0):
            raise ValueError("--student-config replaces pruning: leave out --keep-layers, --depth and --ffn-ratio")
        return self


# the flag of a spec field where it is not simply --field-name (what a refused value is called in the message)
FLAGS = {
    "teachers": "--teacher",
    "max_latency_ms": "--max-latency",
    "int8_target": "--target",
    "gguf_type": "--gguf",
    "feature_weight": "--feature-kd",
    "out": "--out",
}


def checked(model: type[Spec], **fields) -> Spec:
    """``model(**fields)``, with a validation error turned into the one-line ``ConfigError`` the CLI shows, naming
    the flag (``--imgsz: Input should be greater than or equal to 32``)."""
    try:
        return model(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first["loc"]]
        where = FLAGS.get(loc[0], "--" + loc[0].replace("_", "-")) if loc else ""
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{where}: {message}" if where else message) from None

"""What a model *is*: the schema-versioned ``manifest.json`` of a bundle.

The manifest is the single source of truth for running a model: how to feed
it (``InputSpec``), how to read its outputs (``DecoderSpec``), what its classes
mean, where it came from and under which license.  It holds no signature of
its own: the bundle's ``signature`` file signs the canonical bytes of this
whole document (see ``canonical_bytes``), so adding signing never changes
these fields.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from bastion.errors import ManifestError
from bastion.models.decoder_spec import MAX_STRIDE, DecoderSpec, LlamaKvDecoderSpec, YoloDecoderSpec

__all__ = ["DecoderSpec", "LlamaKvDecoderSpec", "YoloDecoderSpec"]  # the decoder union lives in decoder_spec.py

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
MAX_INPUT_SIZE = 4096  # px per side: a 4096² float32 input is 192 MiB, already more than an edge unit spares
MAX_DET = 10_000  # detections kept per image: NMS output is sized by it, and no scene needs more
MAX_MANIFEST_BYTES = 1 << 20  # the zoo's are ~4 KB; class lists and provenance never approach this


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


MAX_PATH_DEPTH = 32  # folders in a payload path (as models/archive.py MAX_DEPTH)


class FileEntry(_Strict):
    """One payload file, relative to the bundle directory."""

    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    role: Literal["model", "fp32-sibling", "license", "source", "tokenizer", "other"] = "other"

    @field_validator("path")
    @classmethod
    def _relative(cls, value: str) -> str:
        parts = Path(value).parts
        if Path(value).is_absolute() or ".." in parts or not parts:
            raise ValueError(f"file path must be relative and inside the bundle: {value!r}")
        if len(parts) > MAX_PATH_DEPTH or len(value) > 4096:  # copying it would recurse per folder (mkdir parents)
            raise ValueError(f"file path {value[:60]!r}… is {len(parts)} folders deep (at most {MAX_PATH_DEPTH})")
        return value


class InputSpec(_Strict):
    """How an image becomes the model's input tensor.

    ``shape`` uses ``None`` for dynamic axes (batch, or H/W when ``dynamic_hw``).
    ``size`` is the default network input (H, W) for dynamic models.

    Sizes, strides and shapes are bounded, so a hostile or mistyped manifest is refused at load in one line,
    not later by a MemoryError (a 40000² input is 18 GiB) or a ZeroDivisionError (stride 0) in pre-processing.
    """

    name: str
    shape: list[Annotated[int, Field(ge=1, le=MAX_INPUT_SIZE)] | None] = Field(max_length=8)
    dtype: Literal["float32", "float16", "uint8"] = "float32"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    color: Literal["RGB", "BGR"] = "RGB"
    scale: float = 1.0 / 255.0
    mean: list[float] = Field([0.0, 0.0, 0.0], min_length=1, max_length=4)
    std: list[Annotated[float, Field(gt=0)]] = Field([1.0, 1.0, 1.0], min_length=1, max_length=4)
    resize: Literal["letterbox", "stretch"] = "letterbox"
    pad_value: int = 114
    pad_position: Literal["center", "top-left"] = "center"
    size: tuple[Annotated[int, Field(ge=1, le=MAX_INPUT_SIZE)], Annotated[int, Field(ge=1, le=MAX_INPUT_SIZE)]]
    stride: int = Field(32, ge=1, le=MAX_STRIDE)
    dynamic_hw: bool = False


class Thresholds(_Strict):
    """Defaults the model's maker recommends; every call may override them."""

    conf: float = Field(0.25, ge=0.0, le=1.0)
    iou: float = Field(0.45, ge=0.0, le=1.0)
    max_det: int = Field(300, ge=1, le=MAX_DET)


class DatasetRef(_Strict):
    name: str
    sha256: str | None = None
    license: str | None = None
    source: str | None = None


class Provenance(_Strict):
    """Where the weights came from: enough to reproduce or audit them."""

    source: str
    teachers: list[str] = []  # sha256 of teacher bundles
    datasets: list[DatasetRef] = []
    command: str | None = None
    bastion_version: str | None = None
    created: str | None = None
    notes: str | None = None


class LicenseInfo(_Strict):
    weights: str
    data: str | None = None
    files: list[str] = []
    notes: str | None = None


class EvalResult(_Strict):
    metric: str
    value: float
    dataset: str
    dataset_sha256: str | None = None
    settings: dict[str, Any] = {}


class Int8Verdict(_Strict):
    """Where the INT8 gate measured this model, so the unit that runs it can tell whether the verdict holds there.

    ONNX Runtime's INT8 kernels differ by CPU instruction set (``bastion.hardware.isa``): a full-range U8S8 model
    measured on a VNNI CPU loses accuracy on an AVX2 one.  ``holds_on`` lists the CPU classes whose kernels compute
    the same integers as the one measured (``isa``); a loader on any other class warns or, strict, refuses.
    """

    recipe: str
    recipe_params: dict[str, Any] = {}
    isa: str  # CPU instruction-set class the mAP and speed were measured on; on a GPU provider its class (cuda-sm87)
    holds_on: list[str]
    target: str  # device profile (or CPU class) the recipe was chosen for
    target_isa: str
    measured_on_target: bool
    execution_provider: str = "CPUExecutionProvider"  # the one the INT8 session ran on (the gate measures on CPU)
    onnxruntime: str
    calibration_sha256: str
    calibration_images: int = Field(ge=0)
    evaluation_sha256: str
    evaluation_images: int = Field(ge=0)
    fp32_map50: float
    int8_map50: float
    map50_drop_points: float
    speedup: float
    candidates: list[dict[str, Any]] = []  # every recipe tried: name, drop, speed-up, verdict

    def summary(self) -> str:
        """Lines for ``bastion bundle inspect`` and reports."""
        where = "" if self.measured_on_target else f" — NOT measured with {self.target_isa} kernels"
        return (
            f"{self.recipe}: mAP50 {self.fp32_map50:.3f} → {self.int8_map50:.3f} "
            f"({self.map50_drop_points:.2f} points), {self.speedup:.2f}× on {self.isa} "
            f"({self.execution_provider}, onnxruntime {self.onnxruntime})\n"
            f"made for {self.target} ({self.target_isa}){where}; holds on {', '.join(self.holds_on)}\n"
            f"calibration {self.calibration_images} images sha256 {self.calibration_sha256[:12]}…, "
            f"evaluation {self.evaluation_images} images sha256 {self.evaluation_sha256[:12]}…"
        )


class Markings(_Strict):
    """Signed markings: how the model is classified and which nations may run it.

    They are part of the canonical manifest bytes, so every signature covers them: a marking cannot be
    edited without breaking the bundle.  ``releasable_to`` holds ISO 3166 alpha-3 codes (or a group
    code such as ``NATO``); a unit configured with its nation refuses a bundle whose non-empty list lacks
    it (``bastion.models.releasability``).  An empty list restricts nothing.
    """

    classification: str = Field(min_length=1, max_length=64)
    releasable_to: list[Annotated[str, Field(pattern=r"^[A-Z][A-Z0-9]{1,9}$")]] = Field([], max_length=64)
    marking: str | None = Field(None, max_length=256)  # free text in the nation's own marking system

    @field_validator("classification", "marking")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        """Text that says something, on one line: a blank label, or one with a line break or other control
        character, could fake a line of the report, ``bundle inspect`` or ``status`` it is printed into."""
        if value is None:
            return None
        if not value.strip():
            raise ValueError("is blank")
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError("has a control character (a line break, a tab…): give one line of printable text")
        return value

    def summary(self) -> str:
        """``SECRET // REL TO: CAN, GBR (caveat)`` for ``bundle inspect`` and ``status``."""
        rel = f" // REL TO: {', '.join(self.releasable_to)}" if self.releasable_to else ""
        return f"{self.classification}{rel}" + (f" ({self.marking})" if self.marking else "")


def report_line(markings: Markings | None) -> str:
    """A run report's line on what its bundle is marked: the markings are signed with it, so a model team's report
    says what a unit will enforce (``distill detect|lm --classification/--releasable-to/--marking``)."""
    if markings is None:
        return "Markings: none (every unit may run it; mark with --classification and --releasable-to)."
    return f"Markings (signed into the bundle): {markings.summary()}."


SEALED_FORMAT = "bastion-sealed/1"
SEALED_SUFFIX = ".sealed"  # a sealed payload file is its clear path + this (never the clear name on disk)
_B64_32 = r"^[A-Za-z0-9+/]{43}=$"  # 32 raw bytes in base64: an X25519 public key
_B64_12 = r"^[A-Za-z0-9+/]{16}$"  # 12 bytes: an AES-GCM nonce
_B64_48 = r"^[A-Za-z0-9+/]{64}$"  # 48 bytes: a 32-byte content key and its 16-byte GCM tag


class SealedRecipient(_Strict):
    """One unit that may open the bundle: the content key wrapped for its X25519 key (``bastion.models.seal``)."""

    key_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    name: str | None = Field(None, max_length=64)  # the unit.pub file's stem when sealed, for messages
    ephemeral: str = Field(pattern=_B64_32)
    nonce: str = Field(pattern=_B64_12)
    wrapped_key: str = Field(pattern=_B64_48)

    def label(self) -> str:
        return f"{self.name} ({self.key_id})" if self.name else self.key_id


class Sealed(_Strict):
    """The payload files listed here are AES-256-GCM ciphertext; only the recipients' unit keys open them.

    It is part of the signed manifest, so signatures cover the sealed bytes and the recipient list: a partner
    verifies a sealed bundle without a unit key. ``clear_manifest_sha256`` is the bundle that was sealed; every
    AAD binds it (and each wrap binds its recipient's key id), so ciphertext or a wrapped key moved between
    bundles or recipients does not open."""

    format: Literal["bastion-sealed/1"] = SEALED_FORMAT
    cipher: Literal["aes-256-gcm"] = "aes-256-gcm"
    key_wrap: Literal["x25519-hkdf-sha256-aes-256-gcm"] = "x25519-hkdf-sha256-aes-256-gcm"
    clear_manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    files: list[str] = Field(min_length=1, max_length=8)
    recipients: list[SealedRecipient] = Field(min_length=1, max_length=64)

    def labels(self) -> str:
        return ", ".join(r.label() for r in self.recipients)


_OMIT_WHEN_ABSENT = ("int8_verdict", "markings", "sealed")


class Manifest(_Strict):
    """The whole manifest.  ``schema_version`` guards against future formats."""

    schema_version: int = SCHEMA_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    version: str
    task: Literal["detect", "lm"]
    files: list[FileEntry]
    input: InputSpec | None = None
    decoder: DecoderSpec | None = None
    classes: list[str] = []
    thresholds: Thresholds = Thresholds()
    precision: Literal["fp32", "fp16", "int8", "mixed"] = "fp32"
    provenance: Provenance
    license: LicenseInfo
    evaluation: list[EvalResult] = []
    int8_verdict: Int8Verdict | None = None  # INT8 bundles from the gate; absent (not null) otherwise
    markings: Markings | None = None  # classification and releasability; absent (not null) when unmarked
    sealed: Sealed | None = None  # payload encrypted to named units; absent (not null) when in clear

    @model_serializer(mode="wrap")
    def _omit_absent_fields(self, handler):
        """An absent ``int8_verdict`` or ``markings`` is left out of the JSON, so manifests signed before the
        field existed keep the same canonical bytes (and their signatures)."""
        data = handler(self)
        if isinstance(data, dict):
            for field in _OMIT_WHEN_ABSENT:
                if field in data and data[field] is None:
                    del data[field]
        return data

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, value: int) -> int:
        if value > SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {value} is newer than this bastion understands ({SCHEMA_VERSION}); upgrade bastion"
            )
        return value

    @model_validator(mode="after")
    def _decoder_fits_task(self) -> "Manifest":
        """A detection bundle needs a YOLO output decoder, an LM bundle the llama-kv cache spec: the wrong kind is
        refused here, not by a decoder or generator failing later."""
        wanted = {"detect": YoloDecoderSpec, "lm": LlamaKvDecoderSpec}[self.task]
        if self.decoder is not None and not isinstance(self.decoder, wanted):
            raise ValueError(f"decoder: type {self.decoder.type!r} does not read a task {self.task!r} model")
        return self

    @model_validator(mode="after")
    def _one_fp32_sibling_on_int8(self) -> "Manifest":
        """An FP32 sibling is the INT8 model's FP32 parent: one at most, and only beside an INT8 model (a unit that
        falls back to it must know which file it is, and an FP32 bundle has nothing to fall back from)."""
        siblings = [f.path for f in self.files if f.role == "fp32-sibling"]
        if len(siblings) > 1:
            raise ValueError(
                f"files: {len(siblings)} files with role 'fp32-sibling' ({', '.join(siblings)}); at most 1"
            )
        if siblings and self.precision != "int8":
            raise ValueError(
                f"files: an fp32-sibling ({siblings[0]}) belongs to an int8 bundle, this one is {self.precision}"
            )
        return self

    @model_validator(mode="after")
    def _sealed_files_listed(self) -> "Manifest":
        """Every sealed path is a payload file named ``<clear path>.sealed``, each once, and recipients distinct."""
        if self.sealed is None:
            return self
        listed = {f.path for f in self.files}
        for path in self.sealed.files:
            if path not in listed or not path.endswith(SEALED_SUFFIX):
                raise ValueError(f"sealed: {path!r} is not a payload file ending {SEALED_SUFFIX}")
        if len(set(self.sealed.files)) != len(self.sealed.files):
            raise ValueError("sealed: a file is listed twice")
        ids = [r.key_id for r in self.sealed.recipients]
        if len(set(ids)) != len(ids):
            raise ValueError("sealed: a unit is listed twice among the recipients")
        return self

    def model_file(self) -> FileEntry:
        """The file the runtime opens (the first with role 'model')."""
        for entry in self.files:
            if entry.role == "model":
                return entry
        raise ManifestError(f"manifest of {self.name} lists no file with role 'model'")

    def fp32_sibling_file(self) -> FileEntry | None:
        """The INT8 model's FP32 parent, if the bundle carries it: what ``int8_policy: strict`` runs instead of an
        INT8 model whose gate verdict does not hold on this CPU (``bastion.runtime.int8_check``)."""
        return next((entry for entry in self.files if entry.role == "fp32-sibling"), None)

    def canonical_bytes(self) -> bytes:
        """Deterministic bytes to hash and sign: sorted keys, no whitespace, UTF-8."""
        data = self.model_dump(mode="json")
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_bytes()).hexdigest()


def read_manifest(path: Path) -> Manifest:
    """Parse and validate ``manifest.json``; every failure is a one-line ManifestError."""
    from bastion.models.safe_read import TooLarge, read_bounded

    try:  # bounded before it is buffered: a manifest is a few KB
        raw = read_bounded(path, MAX_MANIFEST_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise ManifestError(f"no manifest.json in {path.parent}", "is this a bastion model bundle?") from None
    except TooLarge as exc:
        raise ManifestError(
            f"{path} is {exc.size} bytes, larger than a manifest may be ({MAX_MANIFEST_BYTES})",
            "the bundle is damaged or not a bastion bundle",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read {path}: {exc}") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ManifestError(
            f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})", "the bundle is damaged; copy it again"
        ) from None
    except RecursionError:
        raise ManifestError(
            f"{path} is nested too deeply to be a manifest", "the bundle is damaged; copy it again"
        ) from None
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        from bastion.models.textfiles import first_error

        raise ManifestError(
            f"{path}: {first_error(exc, 'manifest')}", "the bundle is damaged or from another tool"
        ) from None


def write_manifest(manifest: Manifest, path: Path) -> None:
    """Write pretty JSON atomically (temp file, fsync, rename)."""
    from bastion.models.atomic import atomic_write_bytes

    text = json.dumps(manifest.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def files_sha256(paths) -> str:
    """One hash over several files' names and contents, in the given order (a dataset's identity)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).name.encode())
        digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return digest.hexdigest()

"""``Detector``: a bundle → a backend → ``detect(image or list) -> Detections``.

Pre-processing follows the manifest's ``InputSpec``, decoding its ``DecoderSpec``;
NMS is class-aware and vectorised.  Images are BGR uint8 arrays (OpenCV's
convention) or paths.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bastion.errors import ConfigError, ShapeError, SignatureError
from bastion.models.bundle import Bundle, warn_unsigned
from bastion.models.manifest import MAX_DET, MAX_INPUT_SIZE, Manifest
from bastion.models.trust import TrustStore
from bastion.models.zoo import DEFAULT_DETECTOR
from bastion.hardware.backend_names import device_name
from bastion.runtime.backends import Backend, open_backend
from bastion.runtime.backends.onnxrt import read_model
from bastion.runtime.decoders import Candidates, DecodeContext, get_decoder
from bastion.runtime.detections import Detections, class_ids
from bastion.runtime.int8_check import Int8Check, open_checked, precision_status
from bastion.runtime.media import as_bgr, read_image
from bastion.runtime.nms import batched_nms
from bastion.runtime.onnx_manifest import manifest_from_onnx
from bastion.runtime.preprocess import Placement, batch_inputs, make_input, rect_size

log = logging.getLogger(__name__)

ImageLike = Union[np.ndarray, str, Path]


MAX_BATCH = 256  # images per inference call: the batch tensor is sized by it
MAX_CLASSES = 4096  # entries in a class filter: names or ids, no model has more


class DetectOptions(BaseModel):
    """Per-detector settings; ``None`` means the manifest's recommendation. Typed and bounded like the manifest
    (an NMS output or an input buffer is sized by these before anything runs); an unknown or out-of-range
    setting is one line (``DetectOptions.of``), never a TypeError deep inside."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    conf: float | None = Field(None, ge=0.0, le=1.0)
    iou: float | None = Field(None, ge=0.0, le=1.0)
    max_det: int | None = Field(None, ge=1, le=MAX_DET)
    classes: tuple[int | str, ...] | None = Field(None, max_length=MAX_CLASSES)
    imgsz: int | None = Field(None, ge=1, le=MAX_INPUT_SIZE)
    rect: bool = True  # smallest stride-multiple input for dynamic-shape models
    multi_label: bool = False
    scaleup: bool = True
    max_batch: int = Field(8, ge=1, le=MAX_BATCH)
    int8_policy: Literal["warn", "strict"] = "warn"  # an INT8 bundle gated on another CPU class: warn, or refuse

    @classmethod
    def of(cls, **options: Any) -> "DetectOptions":
        """Options from keyword arguments (the SDK's ``Detector.load(..., conf=0.4)``), refused in one line."""
        try:
            return cls(**options)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "options"
            raise ConfigError(
                f"detector option {where}: {first['msg']}",
                "options: " + ", ".join(cls.model_fields),
            ) from None


def _device_for_sealed(bundle: Bundle, device: str) -> str:
    """Native TensorRT caches the compiled engine on disk — the model in clear — so a sealed bundle never runs on
    it: ``auto`` skips it, an explicit ``trt`` is refused (docs/security.md, "Bundles sealed to units")."""
    if bundle.manifest.sealed is None or device not in ("auto", "trt"):
        return device
    if device == "trt":
        raise ConfigError(
            f"{bundle.manifest.name} is sealed: native TensorRT would cache its engine, the model in clear, on disk",
            "run it with --device ort-trt, ort-cuda or ort-cpu",
        )
    from bastion.runtime.backends.select import auto_candidates

    return next(spec.name for spec in auto_candidates() if spec.name != "trt")


class Detector:
    """Run a detection bundle on images."""

    def __init__(
        self,
        backend: Backend,
        manifest: Manifest,
        options: DetectOptions | None = None,
        bundle_sha256: str | None = None,
    ) -> None:
        if manifest.task != "detect" or manifest.input is None or manifest.decoder is None:
            raise ConfigError(f"model {manifest.name} is not a detection model (task {manifest.task})")
        self.backend = backend
        self.manifest = manifest
        self.spec = manifest.input
        self.names = list(manifest.classes)
        self.bundle_sha256 = bundle_sha256 or manifest.sha256()
        self.verified_by: str | None = None  # signer key id when loaded from a verified bundle
        self.verified_signers: tuple[str, ...] = ()  # every key id whose signature counted (k-of-n bundles)
        self.verified_under = ""  # "trust policy v3, rule 'coalition-*' …" when a signed policy decided
        self.bundle_root: Path | None = None  # the verified bundle's folder; None for a bare ONNX file
        self.int8_check = None  # an Int8Check when loaded from an INT8 bundle (runtime/int8_check.py)
        self.options = options or DetectOptions()
        self._decode = get_decoder(manifest.decoder)
        self._input_name = backend.inputs[0].name
        self._dynamic_batch = backend.inputs[0].dynamic_batch
        self.set_options(self.options)

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        model: str | Path = DEFAULT_DETECTOR,
        device: str = "auto",
        threads: int | None = None,
        warmup: bool = True,
        allow_unsigned: bool = False,
        trust: TrustStore | None = None,
        nation: str | None = None,
        **options,
    ) -> "Detector":
        """Open and verify a bundle (directory, ``.bastion``, registry or zoo name) and its backend.

        A bare YOLOv5/Ultralytics ``.onnx`` carries no signature, so it needs ``allow_unsigned=True``
        (development only). ``device``: ``auto`` or a backend name (``bastion.hardware.backend_names``).
        ``nation``: this unit's nation (else ``BASTION_NATION``); a bundle whose signed markings do not release
        it there is refused (``bastion.models.releasability``).
        """
        device = device_name(device)  # a bad name is one line before anything is read
        opts = DetectOptions.of(**options)
        path = Path(model)
        if path.suffix.lower() == ".onnx" and path.is_file():
            if not allow_unsigned:
                raise SignatureError(
                    f"{path.name} is a bare ONNX file: it has no manifest and no signature",
                    "make a signed bundle (bastion bundle create --sign KEY), or for "
                    "development only pass --allow-unsigned",
                )
            warn_unsigned(path.name, "it is a bare ONNX file with no signature")
            data, _ = read_model(path)  # read once: the manifest hashes what the backend runs
            backend = open_backend(data, device=device, threads=threads, label=path.name)
            manifest = manifest_from_onnx(path, backend, data)
            return cls._ready(backend, manifest, opts, manifest.files[0].sha256, None, warmup)
        return cls.from_bundle(
            Bundle.open(model, trust=trust, allow_unsigned=allow_unsigned, nation=nation),
            device,
            threads,
            warmup,
            **options,
        )

    @classmethod
    def from_bundle(
        cls, bundle: Bundle, device: str = "auto", threads: int | None = None, warmup: bool = True, **options
    ) -> "Detector":
        """A detector on a bundle already opened (verified, or read back by the run that wrote it). The backend
        is built from the model's bytes as read and hashed now (``Bundle.model_bytes``), never from its path."""
        device = _device_for_sealed(bundle, device_name(device))
        opts = DetectOptions.of(**options)
        check_imgsz(opts.imgsz)
        size = (
            (opts.imgsz, opts.imgsz)
            if opts.imgsz
            else (tuple(bundle.manifest.input.size) if bundle.manifest.input else None)
        )

        def open_model(model: bytes, precision: str, label: str) -> Backend:
            return open_backend(
                model,
                device=device,
                threads=threads,
                precision=precision,
                size_hw=size,  # a TensorRT profile's range
                max_batch=opts.max_batch,
                label=label,
            )

        # the INT8 model, or under int8_policy strict its FP32 sibling where the INT8 verdict does not hold here
        backend, int8 = open_checked(bundle, open_model, opts.int8_policy)
        detector = cls._ready(backend, bundle.manifest, opts, bundle.sha256, bundle.verification.key_id, warmup, int8)
        detector.verified_signers = bundle.verification.signers
        detector.verified_under = bundle.verification.policy
        detector.bundle_root = bundle.root  # a running node re-verifies its signatures (edge/trust_recheck.py)
        return detector

    @classmethod
    def _ready(
        cls,
        backend: Backend,
        manifest: Manifest,
        opts: DetectOptions,
        sha256: str,
        signer: str | None,
        warmup: bool,
        int8: Int8Check | None = None,
    ) -> "Detector":
        detector = cls(backend, manifest, opts, bundle_sha256=sha256)
        detector.verified_by = signer
        detector.int8_check = int8
        if warmup:
            detector.warmup()
        return detector

    def set_options(self, options: DetectOptions) -> None:
        """Validate and apply thresholds/classes/size; errors name the bad value."""
        t = self.manifest.thresholds
        self.conf = t.conf if options.conf is None else options.conf
        self.iou = t.iou if options.iou is None else options.iou
        self.max_det = t.max_det if options.max_det is None else options.max_det
        if not 0 <= self.conf <= 1 or not 0 <= self.iou <= 1:
            raise ConfigError("conf and iou must be between 0 and 1")
        self.class_mask = None
        if options.classes:
            mask = np.zeros(len(self.names), dtype=bool)
            mask[class_ids(options.classes, self.names)] = True
            self.class_mask = mask
        static = self.backend.inputs[0].shape
        check_imgsz(options.imgsz)
        if options.imgsz is not None:
            if options.imgsz % self.spec.stride:
                raise ConfigError(f"--imgsz {options.imgsz} must be a multiple of {self.spec.stride}")
            if not self.spec.dynamic_hw and (options.imgsz, options.imgsz) != tuple(static[2:]):
                raise ConfigError(
                    f"this model has a fixed input {static[2]}x{static[3]}; --imgsz {options.imgsz} is not possible"
                )
            self.size = (options.imgsz, options.imgsz)
        else:
            self.size = tuple(self.spec.size)
        self.options = options

    def warmup(self) -> None:
        h, w = self.size
        self.backend.warmup(1, {self._input_name: (1, 3, h, w) if self.spec.layout == "NCHW" else (1, h, w, 3)})

    # -- the three steps -----------------------------------------------------------------------
    def input_size(self, orig_hw: tuple[int, int]) -> tuple[int, int]:
        if self.spec.dynamic_hw and self.options.rect:
            return rect_size(orig_hw, max(self.size), self.spec.stride)
        return self.size

    def prepare(self, image: np.ndarray, size_hw: tuple[int, int] | None = None) -> tuple[np.ndarray, Placement]:
        """One BGR image → (input tensor without batch axis, Placement). Thread-safe: run it on a reader thread.

        ``size_hw`` forces the network input size (e.g. a batch shape shared by several images).
        """
        image = as_bgr(image)
        return make_input(image, self.spec, size_hw or self.input_size(image.shape[:2]), self.options.scaleup)

    def infer(self, tensors: list[np.ndarray]) -> list[np.ndarray]:
        """Run the backend on equally-sized prepared tensors, in one batch when the model allows it."""
        if self._dynamic_batch or len(tensors) == 1:
            return self.backend.run({self._input_name: batch_inputs(tensors)})
        parts = [self.backend.run({self._input_name: t[None]}) for t in tensors]
        return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]

    def postprocess(self, outputs: list[np.ndarray], placements: list[Placement]) -> list[Detections]:
        ctx = DecodeContext(
            spec=self.manifest.decoder,
            num_classes=len(self.names),
            input_hw=placements[0].input_hw,
            conf=self.conf,
            multi_label=self.options.multi_label,
            class_mask=self.class_mask,
        )
        results = []
        for cand, placement in zip(self._decode(outputs, ctx), placements):
            results.append(self._finish(cand, placement))
        return results

    def _finish(self, cand: Candidates, placement: Placement) -> Detections:
        if len(cand.scores) == 0:
            return Detections.empty(self.names)
        keep = batched_nms(cand.boxes, cand.scores, cand.classes, self.iou, self.max_det)
        return Detections(placement.to_original(cand.boxes[keep]), cand.scores[keep], cand.classes[keep], self.names)

    # -- public API ------------------------------------------------------------------------------
    def detect(self, images: ImageLike | Iterable[ImageLike]) -> Detections | list[Detections]:
        """Detect on one image (→ Detections) or a list of images (→ list of Detections)."""
        single = isinstance(images, (str, Path)) or (isinstance(images, np.ndarray) and images.ndim in (2, 3))
        batch = [images] if single else list(images)  # type: ignore[list-item]
        arrays = [read_image(x) if isinstance(x, (str, Path)) else _check_array(x) for x in batch]
        prepared = [self.prepare(a) for a in arrays]
        results = self.detect_prepared(prepared)
        return results[0] if single else results

    def detect_prepared(self, prepared: list[tuple[np.ndarray, Placement]]) -> list[Detections]:
        """Detect on already prepared tensors; groups equal input sizes into batches."""
        results: list[Detections | None] = [None] * len(prepared)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (_, placement) in enumerate(prepared):
            groups.setdefault(placement.input_hw, []).append(i)
        step = self.options.max_batch if self._dynamic_batch else 1
        for indices in groups.values():
            for start in range(0, len(indices), step):
                chunk = indices[start : start + step]
                outputs = self.infer([prepared[i][0] for i in chunk])
                for i, det in zip(chunk, self.postprocess(outputs, [prepared[i][1] for i in chunk])):
                    results[i] = det
        return results  # type: ignore[return-value]

    @property
    def precision_status(self) -> dict[str, str]:
        """Which precision runs and why (an INT8 bundle may run its FP32 sibling under int8_policy strict)."""
        return precision_status(self.manifest, self.int8_check)

    @property
    def dynamic_batch(self) -> bool:
        return self._dynamic_batch

    @property
    def thread_safe(self) -> bool:
        """May several threads run inferences at once? False on a backend that shares one context, stream and
        buffers between calls (native TensorRT): ``detect_stream`` then runs a single inference worker."""
        return bool(self.backend.thread_safe)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Detector":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_imgsz(imgsz: int | None) -> None:
    """An input size the manifest schema would accept (bounded before any buffer of that size exists)."""
    if imgsz is not None and not 1 <= imgsz <= MAX_INPUT_SIZE:
        raise ConfigError(f"--imgsz {imgsz} is out of range", f"use 32..{MAX_INPUT_SIZE}, a multiple of the stride")


def _check_array(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ShapeError(
            f"expected a uint8 BGR image array HxWx3, got {type(image).__name__}"
            f" {getattr(image, 'shape', '')} {getattr(image, 'dtype', '')}"
        )
    return image

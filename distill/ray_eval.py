"""``bastion eval detect --on ray[:ADDRESS]``: the evaluation's per-image work on a Ray cluster (the ``[scale]`` extra).

The two passes that read images — each image's size (which decides the rectangular batch shapes) and the model's
inference — run as Ray Data ``map_batches``: the sizes as plain tasks, the inference over ONNX Runtime actors
(``EvalActor``, one per CPU core or per GPU), each opening the model once. The driver keeps everything else as the
single process does it (``evaluate.evaluate_detector``): the plan of shapes, the ground truth, the COCO metric and
the bootstrap. The actors hand back each image's boxes as ``.npy`` bytes (dtype and shape kept), so the metrics are
the single process's to the last digit. The cluster is ``ray_session.RaySession``: the same private, offline,
loopback-only local cluster (or joined one) as ``distill detect --labeller ray``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from bastion.distill.evaluate import Predicted, PredictOutcome, _image_hw, predict_image
from bastion.distill.labellers import EVAL_FLAGS, LabellerChoice
from bastion.distill.ray_session import RaySession
from bastion.errors import BastionError, ConfigError
from bastion.hardware.backend_names import device_name
from bastion.models.bundle import Bundle
from bastion.runtime.detect import Detector

# a model the driver opened, as the actors rebuild it: the verified bundle, or a bare .onnx file's path
ModelSource = Bundle | Path


def open_source(model: str | Path, allow_unsigned: bool) -> ModelSource:
    """What ``Detector.load(model)`` would open, kept so the actors build the same model: a bare ``.onnx`` by path
    (development only, checked by hash on each actor), else the bundle opened and verified here."""
    path = Path(model)
    if path.suffix.lower() == ".onnx" and path.is_file():
        return path.absolute()
    bundle = Bundle.open(model, allow_unsigned=allow_unsigned)
    if bundle.manifest.sealed is not None:
        raise ConfigError(
            f"{bundle.manifest.name} is sealed: its weights are opened only where its unit key is",
            "evaluate it with --on single on the machine that holds the key",
        )
    return bundle


def build_detector(
    source: ModelSource, device: str, threads: int | None, allow_unsigned: bool, options: dict[str, Any]
) -> Detector:
    """The detector of ``source``: on the driver, and the same on every actor."""
    if isinstance(source, Bundle):  # the backend is built from the model's bytes, re-hashed against the manifest
        return Detector.from_bundle(source, device, threads, **options)
    return Detector.load(source, device, threads, allow_unsigned=allow_unsigned, **options)


def _pack(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _unpack(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def read_sizes(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A Ray task: each image's (height, width) as the single process reads it (``evaluate._image_hw``)."""
    sizes = [_image_hw(Path(str(p))) for p in batch["path"]]
    return {
        "path": np.asarray([str(p) for p in batch["path"]], dtype=object),
        "h": np.asarray([h for h, _ in sizes], dtype=np.int64),
        "w": np.asarray([w for _, w in sizes], dtype=np.int64),
    }


class EvalActor:
    """One Ray actor: the model's session, built once, run over batches of (path, input shape)."""

    def __init__(
        self,
        source: ModelSource,
        device: str,
        threads: int | None,
        options: dict[str, Any],
        imgsz: int,
        sha256: str,
    ) -> None:
        self.detector = build_detector(source, device, threads, True, options)  # a bare file: checked by hash below
        if self.detector.bundle_sha256 != sha256:
            name = source.manifest.name if isinstance(source, Bundle) else source.name
            raise BastionError(f"{name} changed since this evaluation opened it")
        self.imgsz = imgsz

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cols: dict[str, list] = {"path": [], "error": [], "xyxy": [], "conf": [], "cls": []}
        for p, h, w in zip(batch["path"], batch["h"], batch["w"]):
            outcome = predict_image(self.detector, Path(str(p)), (int(h), int(w)), self.imgsz)
            cols["path"].append(str(p))
            if isinstance(outcome, str):
                cols["error"].append(outcome or "unreadable")
                for k in ("xyxy", "conf", "cls"):
                    cols[k].append(b"")
                continue
            cols["error"].append("")
            cols["xyxy"].append(_pack(outcome.xyxy))
            cols["conf"].append(_pack(outcome.conf))
            cols["cls"].append(_pack(outcome.cls))
        return {k: np.array(v, dtype=object) for k, v in cols.items()}


def decode(row: dict[str, Any]) -> PredictOutcome:
    """An actor's row back into what ``predict_image`` returned in the actor."""
    if row["error"]:
        return str(row["error"])
    return Predicted(_unpack(row["xyxy"]), _unpack(row["conf"]), _unpack(row["cls"]))


class RayEvalRunner:
    """``evaluate.EvalRunner`` on a Ray cluster: the sizes as tasks, the inference on a pool of ``EvalActor``."""

    def __init__(
        self,
        session: RaySession,
        source: ModelSource,
        detector: Detector,
        device: str,
        threads: int | None,
        options: dict[str, Any],
        imgsz: int,
    ) -> None:
        self.session, self.source, self.device, self.options, self.imgsz = session, source, device, options, imgsz
        self.sha256 = detector.bundle_sha256
        # one ONNX Runtime thread per CPU actor (Ray gives each one core), unless --threads says otherwise
        self.use_gpus = device_name(device) != "ort-cpu"
        self.threads = None if session.gpus and self.use_gpus else (threads or 1)

    def sizes(self, paths: Sequence[Path]) -> list[tuple[int, int]]:
        rows = self.session.ordered_map([{"path": str(p)} for p in paths], read_sizes)
        return [(int(row["h"]), int(row["w"])) for row in rows]

    def predict(self, plan: Sequence[tuple[Path, tuple[int, int]]]) -> Iterator[PredictOutcome]:
        items = [{"path": str(p), "h": h, "w": w} for p, (h, w) in plan]
        args = (self.source, self.device, self.threads, self.options, self.imgsz, self.sha256)
        for row in self.session.ordered_map(items, EvalActor, args, use_gpus=self.use_gpus):
            yield decode(row)


def open_session(choice: LabellerChoice) -> RaySession:
    """The Ray cluster for ``eval detect --on``: a private local one, or the one at ``choice.address``."""
    return RaySession(choice, EVAL_FLAGS)

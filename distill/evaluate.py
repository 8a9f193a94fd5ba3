"""COCO-style detection metrics (mAP50-95, mAP50, per-class AP) with faster-coco-eval.

Inference follows the YOLOv5 reference validation (``val.py``) so numbers are
comparable with upstream: images are resized so the long side is ``imgsz``,
sorted by aspect ratio into batches of 32 that share a rectangular input
shape (padded by half a stride), letterboxed without up-scaling; NMS uses
conf 0.001, IoU 0.6, multi-label, at most 300 boxes per image.  The metric
itself is the kept COCO evaluator (101-point interpolated AP over IoU
0.50:0.95), with ``maxDets`` raised to ``max_det``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import cv2
import numpy as np

from bastion.distill.datasets import YoloDataset
from bastion.errors import ConfigError, MissingExtraError
from bastion.runtime.detect import Detector
from bastion.runtime.media import read_image
from bastion.runtime.preprocess import Placement

log = logging.getLogger(__name__)


REPORT_BOOTSTRAP = 200  # resamples behind the mAP50 intervals of a distillation report


@dataclass
class EvalSettings:
    imgsz: int = 640
    conf: float = 0.001
    iou: float = 0.6
    max_det: int = 300
    multi_label: bool = True
    rect: bool = True
    batch: int = 32
    pad: float = 0.5
    bootstrap: int = 0  # > 0: resample the images this many times for a 90 % interval on mAP50


@dataclass
class BootstrapInterval:
    """5th–95th percentile of mAP50 over resamples of the evaluation images (with replacement). Why: on a few
    dozen held-out images two candidates a few points apart may not differ at all (docs/benchmarks.md: the same
    model kept 95 % of the teacher's mAP50 on one 34-image split and 80 % on all 128 images)."""

    low: float
    high: float
    rounds: int


@dataclass
class EvalReport:
    map50_95: float
    map50: float
    per_class: dict[str, dict[str, float]]
    images: int
    instances: int
    dataset_sha256: str
    settings: dict[str, Any]
    model: str
    model_sha256: str
    skipped: list[str] = field(default_factory=list)
    map50_interval: BootstrapInterval | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dict(vars(self))
        out["map50_interval"] = vars(self.map50_interval) if self.map50_interval else None
        return out


def batch_shapes(hw: np.ndarray, imgsz: int, stride: int, batch: int, pad: float) -> tuple[np.ndarray, np.ndarray]:
    """YOLOv5's rectangular batches: (order of images, input shape [H, W] for each image in that order)."""
    ar = hw[:, 0] / hw[:, 1]
    order = np.argsort(ar, kind="stable")
    ar = ar[order]
    shapes = np.zeros((len(order), 2), dtype=np.int64)
    for start in range(0, len(order), batch):
        ari = ar[start : start + batch]
        mini, maxi = ari.min(), ari.max()
        s = [1.0, 1.0]
        if maxi < 1:
            s = [maxi, 1.0]
        elif mini > 1:
            s = [1.0, 1.0 / mini]
        shape = np.ceil(np.asarray(s) * imgsz / stride + pad).astype(int) * stride
        shapes[start : start + batch] = shape
    return order, shapes


def _load_resized(path: Any, imgsz: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Read and resize so the long side is ``imgsz`` (INTER_AREA when shrinking), like YOLOv5's load_image."""
    image = read_image(path)
    h0, w0 = image.shape[:2]
    r = imgsz / max(h0, w0)
    if r != 1:
        interp = cv2.INTER_LINEAR if r > 1 else cv2.INTER_AREA
        image = cv2.resize(image, (math.ceil(w0 * r), math.ceil(h0 * r)), interpolation=interp)
    return image, (h0, w0)


def _to_original(placement: Placement, resized_hw: tuple[int, int], orig_hw: tuple[int, int]) -> Placement:
    """Compose the load-time resize with the letterbox so boxes land in original pixels."""
    fy, fx = resized_hw[0] / orig_hw[0], resized_hw[1] / orig_hw[1]
    return Placement(
        placement.scale_x * fx, placement.scale_y * fy, placement.pad_x, placement.pad_y, orig_hw, placement.input_hw
    )


@dataclass(frozen=True)
class Predicted:
    """One image's boxes as the detector returned them: xyxy [N,4] in original pixels, conf [N], model class [N]."""

    xyxy: np.ndarray
    conf: np.ndarray
    cls: np.ndarray


# what inference hands back per image: its boxes, or why it could not be read
PredictOutcome = Predicted | str


class EvalRunner(Protocol):
    """Where the per-image work of an evaluation runs (``ray_eval.RayEvalRunner``); in this process without one.

    Both methods return one result per path, in the order given, as this process would have computed it."""

    def sizes(self, paths: Sequence[Path]) -> list[tuple[int, int]]: ...

    def predict(self, plan: Sequence[tuple[Path, tuple[int, int]]]) -> Iterator[PredictOutcome]: ...


def predict_image(detector: Detector, path: Path, shape: tuple[int, int], imgsz: int) -> PredictOutcome:
    """Read, resize, letterbox to ``shape`` and detect one image — the per-image step of every evaluation."""
    try:
        image, orig_hw = _load_resized(path, imgsz)
    except Exception as exc:  # a corrupt image scores as "no predictions", and is reported
        return str(exc)
    placed, placement = detector.prepare(image, shape)
    det = detector.postprocess(detector.infer([placed]), [_to_original(placement, image.shape[:2], orig_hw)])[0]
    return Predicted(det.xyxy, det.conf, det.cls)


def evaluate_detector(
    detector: Detector,
    dataset: YoloDataset,
    settings: EvalSettings,
    tick: Callable[[], None] | None = None,
    class_map: dict[int, int] | None = None,
    bootstrap_tick: Callable[[], None] | None = None,
    runner: EvalRunner | None = None,
) -> EvalReport:
    """Score ``detector`` on ``dataset``; model classes match dataset names, or go through ``class_map``.
    ``tick`` advances once per image, ``bootstrap_tick`` once per resample. ``runner``: where the images are read
    and ``detector``'s model is run (e.g. a Ray cluster); the metrics are computed here either way, the same."""
    model_to_data = class_map if class_map is not None else _class_map(detector.names, dataset.names)
    sizes = runner.sizes(dataset.images) if runner else [_image_hw(p) for p in dataset.images]
    hw = np.asarray(sizes, dtype=np.float64)
    if settings.rect and detector.spec.dynamic_hw:
        order, shapes = batch_shapes(hw, settings.imgsz, detector.spec.stride, settings.batch, settings.pad)
    else:
        order = np.arange(len(dataset.images))
        shapes = np.tile(np.asarray(detector.size), (len(order), 1))
    plan = [(dataset.images[idx], (int(shape[0]), int(shape[1]))) for idx, shape in zip(order, shapes)]
    if runner:
        outcomes = runner.predict(plan)
    else:
        outcomes = (predict_image(detector, path, shape, settings.imgsz) for path, shape in plan)
    images, annotations, predictions = [], [], []
    skipped: list[str] = []
    for image_id, (idx, outcome) in enumerate(zip(order, outcomes), start=1):
        path = dataset.images[idx]
        h0, w0 = int(hw[idx][0]), int(hw[idx][1])
        images.append({"id": image_id, "width": w0, "height": h0, "file_name": path.name})
        for cls, cx, cy, bw, bh in dataset.labels(path):
            w, h = bw * w0, bh * h0
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(cls) + 1,
                    "bbox": [cx * w0 - w / 2, cy * h0 - h / 2, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        if isinstance(outcome, str):
            skipped.append(f"{path}: {outcome}")
            continue
        for box, score, cls in zip(outcome.xyxy, outcome.conf, outcome.cls):
            data_cls = model_to_data.get(int(cls))
            if data_cls is None:
                continue
            x1, y1, x2, y2 = (float(v) for v in box)
            predictions.append(
                {
                    "image_id": image_id,
                    "category_id": data_cls + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )
        if tick:
            tick()
    m, m50, per_class = coco_map(images, annotations, predictions, dataset.names, settings.max_det)
    interval = (
        bootstrap_map50(
            images, annotations, predictions, dataset.names, settings.max_det, settings.bootstrap, tick=bootstrap_tick
        )
        if settings.bootstrap > 0 and annotations
        else None
    )
    return EvalReport(
        map50_95=round(m, 4),
        map50=round(m50, 4),
        per_class=per_class,
        images=len(images),
        instances=len(annotations),
        dataset_sha256=dataset.sha256(),
        settings=vars(settings).copy(),
        model=detector.manifest.name,
        model_sha256=detector.bundle_sha256,
        skipped=skipped,
        map50_interval=interval,
    )


def bootstrap_map50(
    images: list[dict],
    annotations: list[dict],
    predictions: list[dict],
    names: list[str],
    max_det: int,
    rounds: int,
    seed: int = 0,
    tick: Callable[[], None] | None = None,
) -> BootstrapInterval:
    """mAP50 on ``rounds`` resamples of the images; a fixed seed draws the same resamples for every model of a
    run, so their intervals compare like for like.  A percentile interval: where a class has only a few boxes,
    resamples that repeat its images swing its AP widely, and the interval is lopsided around the point value."""
    anns_of: dict[int, list[dict]] = {}
    preds_of: dict[int, list[dict]] = {}
    for a in annotations:
        anns_of.setdefault(a["image_id"], []).append(a)
    for p in predictions:
        preds_of.setdefault(p["image_id"], []).append(p)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(rounds):
        picked, anns, preds = [], [], []
        for new_id, index in enumerate(rng.integers(0, len(images), len(images)), start=1):
            image = images[index]
            picked.append({**image, "id": new_id})
            anns += [
                {**a, "id": len(anns) + k + 1, "image_id": new_id} for k, a in enumerate(anns_of.get(image["id"], []))
            ]
            preds += [{**p, "image_id": new_id} for p in preds_of.get(image["id"], [])]
        values.append(coco_map(picked, anns, preds, names, max_det)[1])
        if tick:
            tick()
    low, high = np.percentile(values, [5, 95])
    return BootstrapInterval(round(float(low), 4), round(float(high), 4), rounds)


def coco_map(
    images: list[dict], annotations: list[dict], predictions: list[dict], names: list[str], max_det: int = 100
) -> tuple[float, float, dict[str, dict[str, float]]]:
    """(mAP50-95, mAP50, per-class AP) from COCO-format dicts; category ids are 1 + class index."""
    try:
        from faster_coco_eval import COCO, COCOeval_faster
    except ImportError:
        raise MissingExtraError("bastion eval", "eval", "faster-coco-eval") from None
    counts = np.bincount([a["category_id"] - 1 for a in annotations], minlength=len(names))
    if not predictions or not annotations:
        zero = {n: {"ap50_95": 0.0, "ap50": 0.0, "instances": int(counts[i])} for i, n in enumerate(names) if counts[i]}
        return 0.0, 0.0, zero
    gt = COCO()
    gt.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(predictions)
        evaluator = COCOeval_faster(gt, dt, "bbox", print_function=log.debug)
        evaluator.params.maxDets = [1, 10, max_det]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = evaluator.eval["precision"]  # [T, R, K, A, M]
    per_class = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        if counts[cat_id - 1] == 0:
            continue
        p, p50 = precision[:, :, k, 0, -1], precision[0, :, k, 0, -1]
        per_class[names[cat_id - 1]] = {
            "ap50_95": float(np.mean(p[p > -1])) if np.any(p > -1) else 0.0,
            "ap50": float(np.mean(p50[p50 > -1])) if np.any(p50 > -1) else 0.0,
            "instances": int(counts[cat_id - 1]),
        }
    return float(evaluator.stats[0]), float(evaluator.stats[1]), per_class


def latency_ms(detectors: dict[str, Detector], images: list[np.ndarray], rounds: int = 3) -> dict[str, float]:
    """Median per-image latency (ms) of each detector, taking turns per round so machine drift hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in detectors}
    for det in detectors.values():
        det.detect(images[0])
    for _ in range(rounds):
        for name, det in detectors.items():
            for image in images:
                t = time.perf_counter()
                det.detect(image)
                times[name].append(time.perf_counter() - t)
    return {k: float(np.median(v)) * 1000 for k, v in times.items()}


def _image_hw(path: Any) -> tuple[int, int]:
    """Height and width of an image (1x1 for an unreadable one, which is then skipped and reported)."""
    image = cv2.imread(str(path))
    return image.shape[:2] if image is not None else (1, 1)


def _class_map(model_names: list[str], data_names: list[str]) -> dict[int, int]:
    """Model class id → dataset class id, by name; the sets must overlap."""
    lookup = {n: i for i, n in enumerate(data_names)}
    mapping = {i: lookup[n] for i, n in enumerate(model_names) if n in lookup}
    if not mapping:
        raise ConfigError(
            "the model's classes and the dataset's names have nothing in common",
            f"model: {', '.join(model_names[:5])}...; dataset: {', '.join(data_names[:5])}...",
        )
    return mapping

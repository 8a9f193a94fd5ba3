"""Raw model outputs → candidate boxes, one small registered function per output family.

A decoder turns the batch outputs into, per image, ``Candidates``: xyxy boxes in
*network-input* pixels, scores and class ids, already above the confidence
threshold.  NMS and the mapping back to the original image are shared and live
in ``bastion.runtime.detect``.  The registry dispatches on the manifest's typed spec
(``get_decoder(manifest.decoder)``); add a family by naming its type in ``models/decoder_spec.py`` and
registering its function with ``@register_decoder("name")``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

from bastion.errors import DecoderError
from bastion.models.decoder_spec import YOLO_DECODERS, DecoderSpec, YoloDecoderSpec


@dataclass(frozen=True)
class Candidates:
    boxes: np.ndarray  # float32 [N,4] xyxy, input pixels
    scores: np.ndarray  # float32 [N]
    classes: np.ndarray  # int64 [N]

    @classmethod
    def empty(cls) -> "Candidates":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))


@dataclass(frozen=True)
class DecodeContext:
    """What a decoder needs besides the tensors."""

    spec: YoloDecoderSpec
    num_classes: int
    input_hw: tuple[int, int]
    conf: float
    multi_label: bool = False
    class_mask: np.ndarray | None = None  # bool [nc]; False = class not wanted
    max_candidates: int = 30000


DecoderFn = Callable[[list[np.ndarray], DecodeContext], list[Candidates]]
_DECODERS: dict[str, DecoderFn] = {}


def register_decoder(name: str) -> Callable[[DecoderFn], DecoderFn]:
    """Register the function for one YOLO decoder ``type``. The manifest's union (``models/decoder_spec.py``) names
    the types a bundle may carry, so a decoder registered under any other name could never be reached."""
    if name not in YOLO_DECODERS:
        raise ValueError(f"decoder {name!r} is not a type the manifest knows ({', '.join(YOLO_DECODERS)})")

    def wrap(fn: DecoderFn) -> DecoderFn:
        _DECODERS[name] = fn
        return fn

    return wrap


def get_decoder(spec: DecoderSpec) -> DecoderFn:
    """The registered function for a manifest's typed decoder spec (a YOLO one; an LM's KV-cache spec decodes no
    boxes)."""
    if not isinstance(spec, YoloDecoderSpec):
        raise DecoderError(
            f"decoder {spec.type!r} is a language model's KV-cache spec, not an output decoder",
            "run it with bastion ask (a detection bundle names yolov5, yolov8 or yolox)",
        )
    try:
        return _DECODERS[spec.type]
    except KeyError:  # a type the manifest allows that this build registers no function for
        raise DecoderError(
            f"no output decoder named {spec.type!r}", f"known decoders: {', '.join(sorted(_DECODERS))}"
        ) from None


def decoder_names() -> list[str]:
    return sorted(_DECODERS)


def cxcywh_to_xyxy(xywh: np.ndarray) -> np.ndarray:
    out = np.empty_like(xywh, dtype=np.float32)
    half_w, half_h = xywh[:, 2] / 2, xywh[:, 3] / 2
    out[:, 0] = xywh[:, 0] - half_w
    out[:, 1] = xywh[:, 1] - half_h
    out[:, 2] = xywh[:, 0] + half_w
    out[:, 3] = xywh[:, 1] + half_h
    return out


def select_classes(xyxy: np.ndarray, class_scores: np.ndarray, ctx: DecodeContext) -> Candidates:
    """Per-row class choice: best class, or every class above ``conf`` when ``multi_label``."""
    if ctx.class_mask is not None:
        class_scores = np.where(ctx.class_mask[None, :], class_scores, 0.0)
    if ctx.multi_label:
        rows, cls = np.nonzero(class_scores > ctx.conf)
        scores = class_scores[rows, cls]
    else:
        cls = class_scores.argmax(axis=1)
        rows = np.arange(len(class_scores))
        scores = class_scores[rows, cls]
        keep = scores > ctx.conf
        rows, cls, scores = rows[keep], cls[keep], scores[keep]
    if len(scores) > ctx.max_candidates:
        top = np.argsort(-scores)[: ctx.max_candidates]
        rows, cls, scores = rows[top], cls[top], scores[top]
    return Candidates(xyxy[rows], scores.astype(np.float32), cls.astype(np.int64))


def _check_rows(output: np.ndarray, expected_cols: int, family: str) -> None:
    if output.ndim != 3 or output.shape[2] != expected_cols:
        raise DecoderError(
            f"{family} decoder expects outputs [batch, anchors, {expected_cols}], got {list(output.shape)}",
            "the manifest's decoder does not fit this model",
        )


@register_decoder("yolov5")
def decode_yolov5(outputs: list[np.ndarray], ctx: DecodeContext) -> list[Candidates]:
    """[B, N, 5+nc]: cx, cy, w, h (input pixels), objectness, class probabilities (all sigmoided)."""
    out = outputs[0]
    _check_rows(out, 5 + ctx.num_classes, "yolov5")
    result = []
    for x in out:
        x = x[x[:, 4] > ctx.conf]
        result.append(select_classes(cxcywh_to_xyxy(x[:, :4]), x[:, 5:] * x[:, 4:5], ctx))
    return result


@register_decoder("yolov8")
def decode_yolov8(outputs: list[np.ndarray], ctx: DecodeContext) -> list[Candidates]:
    """[B, 4+nc, N] (Ultralytics YOLOv8/YOLO11): cx, cy, w, h then class probabilities; no objectness."""
    out = outputs[0]
    if out.ndim != 3 or out.shape[1] != 4 + ctx.num_classes:
        raise DecoderError(
            f"yolov8 decoder expects outputs [batch, {4 + ctx.num_classes}, anchors], got {list(out.shape)}",
            "the manifest's decoder does not fit this model",
        )
    result = []
    for x in out:
        # OpenCV's reduction is ~25 % faster than numpy's max over axis 0 for this [nc, N] layout
        best = cv2.reduce(np.ascontiguousarray(x[4:]), 0, cv2.REDUCE_MAX)[0]
        x = np.compress(best > ctx.conf, x, axis=1).T
        result.append(select_classes(cxcywh_to_xyxy(x[:, :4]), x[:, 4:], ctx))
    return result


_GRID_CACHE: dict[tuple[int, int, tuple[int, ...]], tuple[np.ndarray, np.ndarray]] = {}


def anchor_grid(input_hw: tuple[int, int], strides: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(grid xy [N,2], stride [N,1]) for all cells, stride-major then row-major."""
    key = (input_hw[0], input_hw[1], strides)
    if key not in _GRID_CACHE:
        grids, steps = [], []
        for s in strides:
            gh, gw = input_hw[0] // s, input_hw[1] // s
            ys, xs = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
            grids.append(np.stack([xs.ravel(), ys.ravel()], axis=1))
            steps.append(np.full((gh * gw, 1), s))
        _GRID_CACHE[key] = (np.concatenate(grids).astype(np.float32), np.concatenate(steps).astype(np.float32))
    return _GRID_CACHE[key]


@register_decoder("yolox")
def decode_yolox(outputs: list[np.ndarray], ctx: DecodeContext) -> list[Candidates]:
    """[B, N, 5+nc] raw YOLOX head: dx, dy, log w, log h per grid cell; obj and class already sigmoided."""
    out = outputs[0]
    _check_rows(out, 5 + ctx.num_classes, "yolox")
    strides = tuple(ctx.spec.strides or (8, 16, 32))
    grid, step = anchor_grid(ctx.input_hw, strides)
    if len(grid) != out.shape[1]:
        raise DecoderError(
            f"yolox decoder: {out.shape[1]} rows do not match a {ctx.input_hw} input at strides {strides}"
            f" ({len(grid)} cells)"
        )
    result = []
    for x in out:
        keep = x[:, 4] > ctx.conf
        x, g, s = x[keep], grid[keep], step[keep]
        xywh = np.concatenate([(x[:, :2] + g) * s, np.exp(x[:, 2:4]) * s], axis=1)
        result.append(select_classes(cxcywh_to_xyxy(xywh), x[:, 5:] * x[:, 4:5], ctx))
    return result

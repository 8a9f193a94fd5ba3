"""Image → input tensor, driven by the manifest's ``InputSpec``; and the way back for boxes.

The geometry of each transform is kept in a ``Placement`` so boxes predicted in
network-input pixels can be mapped exactly back to the original image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from bastion.errors import ShapeError
from bastion.models.manifest import InputSpec


@dataclass(frozen=True)
class Placement:
    """Where the original image sits inside the network input: x' = x * scale + pad."""

    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float
    orig_hw: tuple[int, int]
    input_hw: tuple[int, int]

    def to_original(self, xyxy: np.ndarray, clip: bool = True) -> np.ndarray:
        """Input-pixel boxes → original-image pixels (clipped to the image)."""
        out = np.empty_like(xyxy, dtype=np.float32)
        out[:, [0, 2]] = (xyxy[:, [0, 2]] - self.pad_x) / self.scale_x
        out[:, [1, 3]] = (xyxy[:, [1, 3]] - self.pad_y) / self.scale_y
        if clip:
            h, w = self.orig_hw
            out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, w)
            out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, h)
        return out

    def to_input(self, xyxy: np.ndarray) -> np.ndarray:
        out = np.empty_like(xyxy, dtype=np.float32)
        out[:, [0, 2]] = xyxy[:, [0, 2]] * self.scale_x + self.pad_x
        out[:, [1, 3]] = xyxy[:, [1, 3]] * self.scale_y + self.pad_y
        return out


def rect_size(orig_hw: tuple[int, int], imgsz: int, stride: int) -> tuple[int, int]:
    """Smallest stride-multiple input whose long side is ``imgsz`` (YOLOv5 ``auto`` letterbox)."""
    h, w = orig_hw
    r = imgsz / max(h, w)
    return (
        int(math.ceil(round(h * r, 6) / stride) * stride),
        int(math.ceil(round(w * r, 6) / stride) * stride),
    )


def _geometry(
    orig_hw: tuple[int, int], size_hw: tuple[int, int], keep_ratio: bool, center: bool, scaleup: bool
) -> tuple[int, int, int, int]:
    """(new_w, new_h, left, top) of the resized image inside the network input."""
    h, w = orig_hw
    th, tw = size_hw
    if not keep_ratio:
        return tw, th, 0, 0
    r = min(th / h, tw / w)
    if not scaleup:
        r = min(r, 1.0)
    nw, nh = int(round(w * r)), int(round(h * r))
    if center:
        return nw, nh, int(round((tw - nw) / 2 - 0.1)), int(round((th - nh) / 2 - 0.1))
    return nw, nh, 0, 0


def letterbox(
    image: np.ndarray,
    size_hw: tuple[int, int],
    pad_value: int = 114,
    center: bool = True,
    scaleup: bool = True,
) -> tuple[np.ndarray, Placement]:
    """Resize keeping aspect ratio, then pad to ``size_hw`` (centred or top-left); uint8 in, uint8 out."""
    h, w = image.shape[:2]
    th, tw = size_hw
    nw, nh, left, top = _geometry((h, w), size_hw, True, center, scaleup)
    if (nw, nh) != (w, h):
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    right, bottom = tw - nw - left, th - nh - top
    if left or top or right or bottom:
        image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(pad_value,) * 3)
    return image, Placement(nw / w, nh / h, left, top, (h, w), (th, tw))


def make_input(
    image: np.ndarray, spec: InputSpec, size_hw: tuple[int, int], scaleup: bool = True
) -> tuple[np.ndarray, Placement]:
    """One BGR uint8 image → the model's input tensor for it (no batch axis) and its Placement.

    Resizing, padding, channel order, layout and normalisation happen in one
    pass per channel straight into the output buffer: no padded uint8 copy, no
    separate float conversion (this is most of the pre-processing budget).
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ShapeError(f"expected a colour image HxWx3, got shape {image.shape}")
    h, w = image.shape[:2]
    th, tw = size_hw
    nw, nh, left, top = _geometry((h, w), size_hw, spec.resize == "letterbox", spec.pad_position == "center", scaleup)
    if (nw, nh) != (w, h):
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    placement = Placement(nw / w, nh / h, left, top, (h, w), (th, tw))
    dtype = np.dtype(spec.dtype)
    channels = cv2.split(image)
    order = (2, 1, 0) if spec.color == "RGB" else (0, 1, 2)
    if spec.layout == "NCHW":
        out = np.empty((3, th, tw), dtype=dtype)
        planes = [out[c] for c in range(3)]
    else:
        out = np.empty((th, tw, 3), dtype=dtype)
        planes = [out[..., c] for c in range(3)]
    for c, src in enumerate(order):
        gain = spec.scale / spec.std[c]
        offset = spec.mean[c] / spec.std[c]
        plane = planes[c]
        pad = spec.pad_value * gain - offset
        if top:
            plane[:top] = pad
        if top + nh < th:
            plane[top + nh :] = pad
        if left:
            plane[top : top + nh, :left] = pad
        if left + nw < tw:
            plane[top : top + nh, left + nw :] = pad
        region = plane[top : top + nh, left : left + nw]
        np.multiply(channels[src], np.float32(gain), out=region, casting="unsafe")
        if offset:
            region -= np.float32(offset)
    return out, placement


def stretch(image: np.ndarray, size_hw: tuple[int, int]) -> tuple[np.ndarray, Placement]:
    """Resize to ``size_hw`` ignoring aspect ratio."""
    h, w = image.shape[:2]
    th, tw = size_hw
    resized = cv2.resize(image, (tw, th), interpolation=cv2.INTER_LINEAR)
    return resized, Placement(tw / w, th / h, 0.0, 0.0, (h, w), (th, tw))


def batch_inputs(tensors: list[np.ndarray]) -> np.ndarray:
    """Stack per-image tensors into a batch (no copy for a single image)."""
    return tensors[0][None] if len(tensors) == 1 else np.stack(tensors)

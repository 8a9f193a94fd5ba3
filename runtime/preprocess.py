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


def letterbox(
    image: np.ndarray,
    size_hw: tuple[int, int],
    pad_value: int = 114,
    center: bool = True,
    scaleup: bool = True,
) -> tuple[np.ndarray, Placement]:
    """Resize keeping aspect ratio, then pad to ``size_hw`` (centred or top-left)."""
    h, w = image.shape[:2]
    th, tw = size_hw
    r = min(th / h, tw / w)
    if not scaleup:
        r = min(r, 1.0)
    nw, nh = int(round(w * r)), int(round(h * r))
    if (nw, nh) != (w, h):
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    dw, dh = tw - nw, th - nh
    if center:
        left, top = int(round(dw / 2 - 0.1)), int(round(dh / 2 - 0.1))
    else:
        left, top = 0, 0
    right, bottom = dw - left, dh - top
    if dw or dh:
        image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(pad_value,) * 3)
    return image, Placement(nw / w, nh / h, left, top, (h, w), (th, tw))


def stretch(image: np.ndarray, size_hw: tuple[int, int]) -> tuple[np.ndarray, Placement]:
    """Resize to ``size_hw`` ignoring aspect ratio."""
    h, w = image.shape[:2]
    th, tw = size_hw
    resized = cv2.resize(image, (tw, th), interpolation=cv2.INTER_LINEAR)
    return resized, Placement(tw / w, th / h, 0.0, 0.0, (h, w), (th, tw))


def place(image: np.ndarray, spec: InputSpec, size_hw: tuple[int, int], scaleup: bool = True) -> tuple[np.ndarray, Placement]:
    """Geometric step only: the image resized/padded to the network input size (still HWC BGR uint8)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ShapeError(f"expected a colour image HxWx3, got shape {image.shape}")
    if spec.resize == "stretch":
        return stretch(image, size_hw)
    return letterbox(image, size_hw, spec.pad_value, spec.pad_position == "center", scaleup)


def to_blob(images: list[np.ndarray], spec: InputSpec) -> np.ndarray:
    """Placed BGR uint8 images (all one size) → the NCHW/NHWC float tensor the model expects."""
    swap = spec.color == "RGB"
    std = np.asarray(spec.std, dtype=np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32)
    if spec.layout == "NCHW" and np.all(std == std[0]) and spec.dtype == "float32" and spec.scale > 0:
        # OpenCV's C++ path: (pixel - mean/scale) * scale/std, channel swap and HWC→CHW in one pass.
        return cv2.dnn.blobFromImages(
            images,
            scalefactor=spec.scale / float(std[0]),
            # mean is in the model's channel order, which is what OpenCV expects after swapRB
            mean=tuple(float(m) / spec.scale for m in mean),
            swapRB=swap,
            crop=False,
        )
    batch = np.stack(images).astype(np.float32)
    if swap:
        batch = batch[..., ::-1]
    batch = (batch * spec.scale - mean) / std
    if spec.layout == "NCHW":
        batch = batch.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(batch, dtype=np.dtype(spec.dtype))

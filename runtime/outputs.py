"""Writing annotated images and videos without leaving half-written files behind."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from bastion.errors import BastionError
from bastion.models.atomic import atomic_write_bytes


def save_image(path: Path, image: np.ndarray, quality: int = 90) -> None:
    """Encode (JPEG/PNG by suffix) and write atomically."""
    suffix = path.suffix.lower() or ".jpg"
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if suffix in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(suffix, image, params)
    if not ok:
        raise BastionError(f"cannot encode {path.name} as {suffix}")
    atomic_write_bytes(path, buf.tobytes())


class AtomicVideoWriter:
    """An MP4 written to a temp name and renamed into place only when closed successfully."""

    def __init__(self, path: Path, fps: float, size_wh: tuple[int, int]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.stem}.tmp{self.path.suffix}")
        self.writer = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps or 25.0, size_wh)
        if not self.writer.isOpened():
            raise BastionError(f"cannot write video {self.path} (no MP4 encoder in this OpenCV build?)")
        self.frames = 0

    def write(self, image: np.ndarray) -> None:
        self.writer.write(image)
        self.frames += 1

    def close(self, keep: bool = True) -> None:
        self.writer.release()
        if keep and self.frames:
            with open(self.tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "AtomicVideoWriter":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.close(keep=exc_type is None)


def contact_sheet(images: list[np.ndarray], columns: int = 4, tile_width: int = 384) -> np.ndarray:
    """A grid of images scaled to ``tile_width`` (for reports and the demo)."""
    tiles = []
    for img in images:
        h, w = img.shape[:2]
        tiles.append(cv2.resize(img, (tile_width, int(round(h * tile_width / w))), interpolation=cv2.INTER_AREA))
    tile_h = max(t.shape[0] for t in tiles)
    tiles = [cv2.copyMakeBorder(t, 0, tile_h - t.shape[0], 0, 0, cv2.BORDER_CONSTANT, value=(0, 0, 0)) for t in tiles]
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.hstack(tiles[i : i + columns]) for i in range(0, len(tiles), columns)]
    return np.vstack(rows)

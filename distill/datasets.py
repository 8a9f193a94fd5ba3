"""YOLO-format datasets (Ultralytics ``data.yaml``): images, labels, names and a content hash."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bastion.errors import ConfigError, InputNotFoundError
from bastion.models.manifest import files_sha256
from bastion.models.textfiles import read_yaml_mapping
from bastion.runtime.media import list_images


@dataclass
class YoloDataset:
    root: Path
    images: list[Path]
    names: list[str]

    def label_path(self, image: Path) -> Path:
        """Ultralytics convention: the last ``images`` path component becomes ``labels``."""
        parts = list(image.parts)
        idx = len(parts) - 1 - parts[::-1].index("images")
        parts[idx] = "labels"
        return Path(*parts).with_suffix(".txt")

    def labels(self, image: Path) -> np.ndarray:
        """[N,5] float32: class, cx, cy, w, h (normalised); empty if no label file."""
        path = self.label_path(image)
        if not path.is_file():
            return np.zeros((0, 5), np.float32)
        rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
        try:
            arr = np.asarray([[float(v) for v in r[:5]] for r in rows], dtype=np.float32).reshape(-1, 5)
        except ValueError:
            raise ConfigError(f"malformed label file {path}", "each line must be: class cx cy w h") from None
        return arr

    def sha256(self) -> str:
        """Hash of every image and label file's name and bytes, in sorted order."""
        return files_sha256(p for image in sorted(self.images) for p in (image, self.label_path(image)) if p.is_file())


def load_data_yaml(path: Path, split: str = "val", limit: int | None = None) -> YoloDataset:
    data = read_yaml_mapping(path, "dataset file")
    if split not in data or "names" not in data:
        raise ConfigError(f"{path} needs '{split}:' and 'names:' keys (Ultralytics data.yaml format)")
    root = Path(path).resolve().parent
    if data.get("path"):
        root = (root / data["path"]).resolve()
    names = data["names"]
    names = [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)
    entries = data[split] if isinstance(data[split], list) else [data[split]]
    images: list[Path] = []
    for entry in entries:
        target = (root / str(entry)).resolve()
        if target.is_dir():
            images.extend(list_images(target))
        elif target.is_file() and target.suffix == ".txt":
            images.extend((root / line.strip()).resolve() for line in target.read_text().splitlines() if line.strip())
        else:
            raise InputNotFoundError(f"{split} images not found: {target}")
    if not images:
        raise InputNotFoundError(f"no images in the {split} split of {path}")
    return YoloDataset(root=root, images=sorted(images)[:limit] if limit else sorted(images), names=names)

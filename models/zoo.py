"""The vendored default bundles shipped inside the package (``models/zoo/``)."""

from __future__ import annotations

from pathlib import Path

ZOO_DIR = Path(__file__).resolve().parent / "zoo"
DEFAULT_DETECTOR = "yolov5n"


def zoo_names() -> list[str]:
    """Names of the vendored bundles (directories holding a manifest.json)."""
    if not ZOO_DIR.is_dir():
        return []
    return sorted(p.name for p in ZOO_DIR.iterdir() if (p / "manifest.json").is_file())


def zoo_path(name: str) -> Path | None:
    """Directory of a vendored bundle by name (``yolov5n`` or ``zoo:yolov5n``), else None."""
    name = name.removeprefix("zoo:")
    if "/" in name or name.startswith("."):
        return None
    path = ZOO_DIR / name
    return path if (path / "manifest.json").is_file() else None

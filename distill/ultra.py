"""Ultralytics, always offline: the one place that imports and configures it.

Ultralytics by default checks connectivity at import, downloads fonts and
weights, and syncs settings.  ``load_ultralytics()`` sets its offline switches
*before* the import, points its config dir at a directory we own (with a
vendored font so nothing is fetched), and turns every integration off.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path
from types import ModuleType

from bastion.errors import MissingExtraError
from bastion.models.home import bastion_home

log = logging.getLogger(__name__)

_INTEGRATIONS_OFF = {
    "sync": False,
    "hub": False,
    "clearml": False,
    "comet": False,
    "dvc": False,
    "mlflow": False,
    "neptune": False,
    "raytune": False,
    "tensorboard": False,
    "wandb": False,
}


def ultralytics_available() -> bool:
    return importlib.util.find_spec("ultralytics") is not None


def config_dir() -> Path:
    return bastion_home() / "ultralytics"


def _find_font() -> Path | None:
    """A TTF already on this machine (matplotlib ships DejaVuSans) to stand in for Arial."""
    try:
        import matplotlib

        candidate = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        if candidate.is_file():
            return candidate
    except ImportError:
        pass
    for path in ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",):
        if Path(path).is_file():
            return Path(path)
    return None


def load_ultralytics() -> ModuleType:
    """Import ultralytics configured for zero egress; raises MissingExtraError if absent."""
    if not ultralytics_available():
        raise MissingExtraError("this step", "distill", "ultralytics-opencv-headless")
    cfg = config_dir()
    fonts = cfg / "Ultralytics"
    fonts.mkdir(parents=True, exist_ok=True)
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_CONFIG_DIR"] = str(cfg)
    os.environ.setdefault("YOLO_VERBOSE", "False")
    font = _find_font()
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        if font is not None and not (fonts / name).exists():
            shutil.copyfile(font, fonts / name)
    import ultralytics
    from ultralytics import settings

    settings.update({k: v for k, v in _INTEGRATIONS_OFF.items() if k in settings})
    log.info("ultralytics loaded offline", extra={"version": ultralytics.__version__, "config_dir": str(cfg)})
    return ultralytics

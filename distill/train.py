"""Student training with Ultralytics (the ``[distill]`` extra), always offline.

A ``DetectionTrainer`` subclass — not a fork — whose ``get_model`` builds the
student from its YAML and then copies every tensor whose name and shape match
from a warm-start checkpoint (``.pt`` or ``.safetensors``): on a CPU budget
learned features are everything (../shared/NOTES.md).  Training runs on the
pseudo-labelled dataset the ``labels`` stage wrote, then the best checkpoint is
exported to ONNX for the runtime.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bastion.distill.ultra import load_ultralytics
from bastion.errors import ConfigError, InputNotFoundError, MissingExtraError

log = logging.getLogger(__name__)


@dataclass
class TrainSpec:
    student: str = "yolov5n.yaml"  # an Ultralytics model YAML name or path
    warm_start: Path | None = None
    epochs: int = 10
    batch: int = 16
    freeze: int = 0  # first N layers frozen (e.g. 10: backbone, 24: backbone + neck of yolov5n)
    width: float | None = None  # override the YAML's width multiple (a narrower, cheaper student)
    depth: float | None = None  # override the YAML's depth multiple


def load_state(path: Path) -> dict[str, Any]:
    """Plain tensors from a .safetensors file, an Ultralytics/YOLOv5 .pt, or a state-dict .pt."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"warm-start checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise MissingExtraError("--warm-start .safetensors", "distill", "safetensors") from None
        return load_file(str(path))
    ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
    model = ckpt.get("ema") or ckpt.get("model") if isinstance(ckpt, dict) else ckpt
    if hasattr(model, "state_dict"):
        return {k: v.float() for k, v in model.float().state_dict().items()}
    if isinstance(ckpt, dict) and all(hasattr(v, "shape") for v in ckpt.values()):
        return ckpt
    raise ConfigError(f"{path} holds no model weights bastion can read")


def copy_matching(model, state: dict[str, Any]) -> tuple[int, int]:  # noqa: ANN001
    """Copy tensors whose name and shape match; returns (copied, total in the student)."""
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    own.update(matched)
    model.load_state_dict(own)
    return len(matched), len(own)


def _student_cfg(spec: TrainSpec) -> Any:
    if spec.width is None and spec.depth is None:
        return spec.student
    from ultralytics.nn.tasks import yaml_model_load

    cfg = yaml_model_load(spec.student)
    scale = cfg.get("scale") or (next(iter(cfg["scales"])) if cfg.get("scales") else None)
    if cfg.get("scales") and scale:
        depth, width, max_ch = cfg["scales"][scale]
        cfg["scales"] = {scale: [spec.depth or depth, spec.width or width, max_ch]}
    else:
        cfg["depth_multiple"] = spec.depth or cfg.get("depth_multiple", 1.0)
        cfg["width_multiple"] = spec.width or cfg.get("width_multiple", 1.0)
    return cfg


def train_student(data_yaml: Path, spec: TrainSpec, imgsz: int, out_dir: Path) -> dict[str, Any]:
    """Train, export ONNX; returns paths and the warm-start count. Writes only inside ``out_dir``."""
    ultralytics = load_ultralytics()
    from ultralytics.models.yolo.detect import DetectionTrainer

    state = load_state(spec.warm_start) if spec.warm_start else None
    record: dict[str, Any] = {}

    class WarmStartTrainer(DetectionTrainer):
        def get_model(self, cfg=None, weights=None, verbose=True):  # noqa: ANN001, ANN202
            model = super().get_model(cfg, weights, verbose)
            if state is not None:
                copied, total = copy_matching(model, state)
                record["warm_start_copied"], record["student_tensors"] = copied, total
                log.info("warm start: copied %d of %d student tensors from %s", copied, total, spec.warm_start)
            return model

    model = ultralytics.YOLO(_student_cfg(spec), task="detect")
    model.train(
        trainer=WarmStartTrainer, data=str(data_yaml), imgsz=imgsz, epochs=spec.epochs, batch=spec.batch,
        workers=0, device="cpu", project=str(out_dir), name="train", exist_ok=True, amp=False, plots=True,
        verbose=False, seed=0, deterministic=True, freeze=spec.freeze or None, nbs=spec.batch,
        close_mosaic=max(0, min(10, spec.epochs // 2)), warmup_epochs=min(3.0, spec.epochs / 4), patience=0,
    )
    weights = out_dir / "train" / "weights" / "best.pt"
    if not weights.is_file():
        weights = out_dir / "train" / "weights" / "last.pt"
    exported = ultralytics.YOLO(str(weights)).export(format="onnx", imgsz=imgsz, dynamic=False, simplify=True,
                                                     device="cpu", verbose=False)
    onnx_path = out_dir / "student.onnx"
    Path(exported).replace(onnx_path)
    params = sum(p.numel() for p in model.model.parameters()) if getattr(model, "model", None) else None
    record.update(weights=str(weights.relative_to(out_dir)), onnx=onnx_path.name, parameters=params,
                  results_csv=str((out_dir / "train" / "results.csv").relative_to(out_dir)))
    return record

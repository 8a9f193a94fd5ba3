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
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field

from bastion.distill.progress import TrainingProgress
from bastion.distill.soft_targets import attach_scores, soft_detection_loss
from bastion.distill.torch_device import ultralytics_device
from bastion.distill.ultra import load_ultralytics
from bastion.errors import ConfigError, InputNotFoundError, MissingExtraError

log = logging.getLogger(__name__)


class TrainSpec(BaseModel):
    """How the detector student trains (Ultralytics); validated where it is given, like ``DistillSpec``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    student: str = "yolov5n.yaml"  # an Ultralytics model YAML name or path
    warm_start: Path | None = None
    epochs: int = Field(10, ge=1, le=10_000)
    batch: int = Field(16, ge=1, le=4096)
    freeze: int = Field(0, ge=0)  # first N layers frozen (e.g. 10: backbone, 24: backbone + neck of yolov5n)
    width: float | None = Field(None, gt=0, le=4)  # override the YAML's width multiple (a narrower student)
    depth: float | None = Field(None, gt=0, le=4)  # override the YAML's depth multiple
    soft: bool = True  # the teachers' scores scale the classification target (soft_targets.py)
    feature_teacher: Path | None = None  # an Ultralytics .pt teacher: Ultralytics' feature distillation too
    feature_weight: float = Field(6.0, ge=0)  # Ultralytics' ``dis``: weight of the feature-distillation loss
    prune: float | None = None  # after the warm start, remove this share of channels (structured, by magnitude)
    device: str = "cpu"  # resolved by bastion.distill.torch_device ("cuda:1" → device=1; "cuda:0,1" → its DDP)
    nproc: int = Field(1, ge=1, le=4096)  # CPU worker processes (gloo, ultra_ddp.py); GPUs are named in ``device``


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


def copy_matching(model, state: dict[str, Any]) -> tuple[int, int]:
    """Copy tensors whose name and shape match; returns (copied, total in the student)."""
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    own.update(matched)
    model.load_state_dict(own)
    return len(matched), len(own)


def prune_channels(model, ratio: float, imgsz: int) -> dict[str, Any]:  # a DetectionModel
    """Structured pruning with torch-pruning's dependency graph: the ``ratio`` of channels with the smallest L2
    norm go, everywhere except the Detect head's output convolutions, and every layer that consumes them is cut
    to match (concatenations included). What stays keeps its warm-started weights, so the student is cheaper than
    the teacher at the same input size *and* starts from learned features; training then recovers the loss."""
    try:
        import torch
        import torch_pruning as tp
    except ImportError:
        raise MissingExtraError("--prune", "distill", "torch-pruning") from None
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"--prune must be between 0 and 1, got {ratio}")
    head = model.model[-1]
    ignored = [seq[-1] for seq in head.cv2] + [seq[-1] for seq in head.cv3] + [getattr(head, "dfl", None)]
    example = torch.zeros(1, 3, imgsz, imgsz)
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    macs0, params0 = tp.utils.count_ops_and_params(model, example)
    pruner = tp.pruner.MagnitudePruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=[m for m in ignored if m is not None],
    )
    pruner.step()
    macs, params = tp.utils.count_ops_and_params(model, example)
    model.train(was_training)
    result = {"ratio": ratio, "parameters": [int(params0), int(params)], "macs": [int(macs0), int(macs)]}
    log.info(
        "pruned %.0f %% of channels: %.2fM → %.2fM parameters, %.0fM → %.0fM MACs at %d px",
        ratio * 100,
        params0 / 1e6,
        params / 1e6,
        macs0 / 1e6,
        macs / 1e6,
        imgsz,
    )
    return result


def _student_cfg(spec: TrainSpec, out_dir: Path) -> str:
    """The student's YAML; with a width/depth override, a copy in the run (Ultralytics wants a file), written by
    ``write_student_cfg`` where the run is led (the launcher, or rank 0): a data-parallel rank only reads it."""
    from bastion.distill import ddp

    path = _student_cfg_file(spec, out_dir)
    if path is None:
        return spec.student
    if not path.is_file():
        world = ddp.launched_world()
        if world is not None and not world.is_main:  # a rank never writes into the run: rank 0 wrote it
            raise ConfigError(f"rank {world.rank} cannot see {path}, which the run's leader wrote")
        write_student_cfg(spec, out_dir)  # a single process
    return str(path)


def _student_cfg_file(spec: TrainSpec, out_dir: Path) -> Path | None:
    if spec.width is None and spec.depth is None:
        return None
    return out_dir / f"{Path(spec.student).stem}-d{spec.depth or 'x'}-w{spec.width or 'x'}.yaml"


def write_student_cfg(spec: TrainSpec, out_dir: Path) -> None:
    """Write the width/depth-overridden copy of the student's YAML into ``out_dir`` (temp file, rename)."""
    path = _student_cfg_file(spec, out_dir)
    if path is None:
        return
    import yaml

    from bastion.models.atomic import atomic_write_bytes

    load_ultralytics()  # configured (quiet, offline) before its first import
    from ultralytics.nn.tasks import yaml_model_load

    cfg = yaml_model_load(spec.student)
    if cfg.get("scales"):
        scale = cfg.get("scale") or next(iter(cfg["scales"]))
        depth, width, max_ch = cfg["scales"][scale]
        cfg["scales"] = {scale: [spec.depth or depth, spec.width or width, max_ch]}
    else:
        cfg["depth_multiple"] = spec.depth or cfg.get("depth_multiple", 1.0)
        cfg["width_multiple"] = spec.width or cfg.get("width_multiple", 1.0)
    cfg.pop("yaml_file", None)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, yaml.safe_dump(cfg, sort_keys=False).encode())


def progress_callbacks(progress: TrainingProgress) -> dict[str, Callable[[Any], None]]:
    """Ultralytics trainer callbacks that feed ``progress``: epochs × batches at the start, each batch with the
    running mean loss, each epoch's end."""
    batch = 0

    def on_train_start(trainer) -> None:
        progress.start(trainer.epochs, len(trainer.train_loader))

    def on_train_epoch_start(trainer) -> None:
        nonlocal batch
        batch = 0

    def on_train_batch_end(trainer) -> None:
        nonlocal batch
        batch += 1
        progress.batch(trainer.epoch + 1, batch, mean_loss(trainer.tloss))

    def on_train_epoch_end(trainer) -> None:
        progress.epoch_end(trainer.epoch + 1, mean_loss(trainer.tloss))
        if trainer.epoch + 1 == trainer.epochs:  # what the quiet half-minute after the last epoch is
            progress.note("last epoch done: Ultralytics validates, then the best checkpoint is exported to ONNX")

    return {
        "on_train_start": on_train_start,
        "on_train_epoch_start": on_train_epoch_start,
        "on_train_batch_end": on_train_batch_end,
        "on_train_epoch_end": on_train_epoch_end,
    }


def mean_loss(tloss: Any) -> float | None:
    """The sum of Ultralytics' running mean losses (a dict of tensors in 8.4, one tensor before), or None."""
    if tloss is None:
        return None
    values = tloss.values() if isinstance(tloss, dict) else [tloss]
    return float(sum(float(v.sum()) if hasattr(v, "sum") else float(v) for v in values))


def train_student(
    data_yaml: Path, spec: TrainSpec, imgsz: int, out_dir: Path, progress: TrainingProgress | None = None
) -> dict[str, Any]:
    """Train, export ONNX; returns paths and the warm-start count. Writes only inside ``out_dir``. ``progress``
    hears every batch and epoch end through Ultralytics' own callbacks (its tqdm bar is off in a log). With
    ``spec.nproc`` > 1 on the CPU the training runs in that many gloo workers (``ultra_ddp``); the export here.
    In rank 0 of an external torchrun the training is the whole world's (``ultra_ddp.lead``); the export here."""
    from bastion.distill import ddp

    out_dir = Path(out_dir).resolve()  # Ultralytics puts a relative project under its own runs_dir
    world = ddp.launched_world()
    if world is not None and world.size > 1:
        if spec.nproc > 1:
            raise ConfigError("nproc names bastion's own CPU workers; under torchrun the world is torchrun's")
        from bastion.distill.ultra_ddp import lead

        record = lead(data_yaml, spec, imgsz, out_dir, progress)
    elif spec.nproc > 1:
        if spec.device != "cpu":
            raise ConfigError("nproc names CPU worker processes; GPUs are named in device (cuda:0,1)")
        from bastion.distill.ultra_ddp import train_on_cpu_workers

        record = train_on_cpu_workers(data_yaml, spec, imgsz, out_dir)
    else:
        record = fit(data_yaml, spec, imgsz, out_dir, progress)
    return export_student(out_dir, imgsz, record)


def student_trainer(base: tuple[type, ...], spec: TrainSpec, state: dict[str, Any] | None, record: dict[str, Any]):
    """Ultralytics' trainer (``base``: its ``DetectionTrainer``, after any mixin) with the warm start in
    ``get_model`` and the soft scores in the train labels and the loss; what it did goes into ``record``."""

    class StudentTrainer(*base):
        def get_model(self, cfg=None, weights=None, verbose=True):
            model = super().get_model(cfg, weights, verbose)
            if state is not None:
                copied, total = copy_matching(model, state)
                record["warm_start_copied"], record["student_tensors"] = copied, total
                log.info("warm start: copied %d of %d student tensors from %s", copied, total, spec.warm_start)
            if spec.prune:
                record["pruning"] = prune_channels(model, spec.prune, self.args.imgsz)
            return model

        def build_dataset(self, img_path, mode="train", batch=None):
            dataset = super().build_dataset(img_path, mode, batch)
            if spec.soft and mode == "train":
                soft, total = attach_scores(dataset.labels, dataset.label_files)
                record["soft_boxes"], record["train_boxes"] = soft, total
                log.info("soft targets: %d of %d training boxes carry a teacher score below 1", soft, total)
            return dataset

        def _setup_train(self):
            super()._setup_train()
            if getattr(self, "data_parallel", None):  # ultra_ddp.CpuDataParallel: each rank's share of the data
                record["data_parallel"] = self.data_parallel
            if spec.soft:  # the student's criterion (inside Ultralytics' DistillationModel when distilling)
                model = getattr(self.model, "module", self.model)  # under DDP, the model it wraps
                student = getattr(model, "student_model", model)
                student.criterion = soft_detection_loss(student)

    return StudentTrainer


def fit(
    data_yaml: Path,
    spec: TrainSpec,
    imgsz: int,
    out_dir: Path,
    progress: TrainingProgress | None = None,
    mixins: tuple[type, ...] = (),
) -> dict[str, Any]:
    """Ultralytics' training of the student into ``out_dir/train``; returns what it did (no export)."""
    ultralytics = load_ultralytics()
    from ultralytics.models.yolo.detect import DetectionTrainer

    state = load_state(spec.warm_start) if spec.warm_start else None
    record: dict[str, Any] = {}
    model = ultralytics.YOLO(_student_cfg(spec, out_dir), task="detect")
    if progress is not None:
        for event, callback in progress_callbacks(progress).items():
            model.add_callback(event, callback)
    extra: dict[str, Any] = {}
    if spec.feature_teacher is not None:
        extra = dict(distill_model=str(spec.feature_teacher), dis=spec.feature_weight)
        record["feature_teacher"] = str(spec.feature_teacher)
    model.train(
        trainer=student_trainer((*mixins, DetectionTrainer), spec, state, record),
        data=str(data_yaml),
        imgsz=imgsz,
        epochs=spec.epochs,
        batch=spec.batch,
        # amp stays off on a GPU too: Ultralytics' AMP check downloads weights (../shared/NOTES.md, offline recipe)
        workers=0,
        device=ultralytics_device(spec.device),
        project=str(out_dir),
        name="train",
        exist_ok=True,
        amp=False,
        plots=True,
        verbose=False,
        seed=0,
        deterministic=True,
        freeze=spec.freeze or None,
        nbs=spec.batch,
        close_mosaic=max(0, min(10, spec.epochs // 2)),
        warmup_epochs=min(3.0, spec.epochs / 4),
        patience=0,
        **extra,
    )
    return record


def export_student(out_dir: Path, imgsz: int, record: dict[str, Any]) -> dict[str, Any]:
    """The best checkpoint (else the last) exported to ``out_dir/student.onnx``; ``record`` plus its paths."""
    ultralytics = load_ultralytics()
    weights = out_dir / "train" / "weights" / "best.pt"
    if not weights.is_file():
        weights = out_dir / "train" / "weights" / "last.pt"
    best = ultralytics.YOLO(str(weights))
    params = sum(p.numel() for p in best.model.parameters())
    exported = best.export(format="onnx", imgsz=imgsz, dynamic=False, simplify=True, device="cpu", verbose=False)
    onnx_path = out_dir / "student.onnx"
    Path(exported).replace(onnx_path)
    record.update(
        weights=str(weights.relative_to(out_dir)),
        onnx=onnx_path.name,
        parameters=params,
        results_csv=str((out_dir / "train" / "results.csv").relative_to(out_dir)),
    )
    return record

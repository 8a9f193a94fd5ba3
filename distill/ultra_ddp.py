"""The detector student data-parallel on CPU cores: Ultralytics' own trainer in N gloo workers under torchrun.

Ultralytics runs DDP only on CUDA: it counts a CPU run as world size 0 and never wraps it (``BaseTrainer.__init__``),
its ``_setup_ddp`` sets a CUDA device, and its wrap passes ``device_ids=[device.index]`` — ``[None]`` on a CPU,
which ``DistributedDataParallel`` refuses. ``CpuDataParallel`` is a mixin over its ``DetectionTrainer`` that fills
exactly those three gaps and leaves everything else to Ultralytics: its distributed sampler (``rank=LOCAL_RANK``),
the batch split, the loss scaling, rank-0-only validation metrics, checkpoints and plots, the stop broadcast.

Launch: ``train_on_cpu_workers`` runs ``python -m bastion.distill.ultra_ddp JOB`` as N workers through bastion's
own torchrun launcher (``ddp.launch_local``, as ``distill lm --nproc`` does) — never Ultralytics' own
``generate_ddp_command``, which only the CUDA path takes. The pipeline around it (labels, candidates, export, the
report) runs once, in the launching process, as on GPUs. Rank 0 alone writes the weights and ``ddp-record.json``
(temp file, fsync, rename); the other ranks write nothing.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from bastion.distill import ddp
from bastion.errors import BastionError, ConfigError

log = logging.getLogger(__name__)
JOB = "ddp-job.json"
RECORD = "ddp-record.json"


class CpuDataParallel:
    """Mixin (first base) over Ultralytics' ``DetectionTrainer`` for a worker that torchrun started on the CPU."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        world = ddp.launched_world()
        if world is None or world.size < 2 or self.device.type != "cpu":
            raise ConfigError("the CPU data-parallel trainer runs only in torchrun workers on the CPU")
        self.cpu_world = world
        self.world_size = world.size  # Ultralytics said 0 (a CPU run); now _do_train calls _setup_ddp

    def _setup_ddp(self):
        """gloo on the CPU (Ultralytics' own sets a CUDA/NPU/XPU device first)."""
        import torch

        ddp.join("cpu")
        self.device = torch.device("cpu")

    def _setup_train(self):
        # Hide the world from Ultralytics' own DDP wrap (device_ids=[None] on a CPU is refused by torch) and its AMP
        # broadcast (amp is off on every rank: fit passes amp=False). _build_train_pipeline puts it back and wraps.
        self.world_size = 1
        super()._setup_train()
        if getattr(self, "data_parallel", None) is None:  # a release that no longer builds its loaders there
            raise ConfigError(
                "this Ultralytics release does not set up its trainer as bastion's CPU workers expect",
                "train on one process (--nproc 1); tested with Ultralytics 8.4",
            )

    def _build_train_pipeline(self):
        """Called by ``_setup_train`` after the freeze and the distillation wrap: wrap as Ultralytics does on a GPU
        (no buffer broadcast in the forward pass), without device_ids; then its per-rank loaders, whose
        distributed sampler gives each rank its share. Each rank's share is gathered for the record."""
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        self.world_size = self.cpu_world.size
        if not isinstance(self.model, DistributedDataParallel):
            params = inspect.signature(DistributedDataParallel.__init__).parameters
            no_sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
            # unused parameters only with a feature teacher (its frozen half); Ultralytics always searches for
            # them, and torch then warns on every rank that it found none
            unused = self.args.distill_model is not None
            self.model = DistributedDataParallel(self.model, find_unused_parameters=unused, **{no_sync: False})
        super()._build_train_pipeline()
        mine = {
            "rank": self.cpu_world.rank,
            "images": len(self.train_loader.sampler),
            "batches": len(self.train_loader),
            "batch": self.train_loader.batch_size,
        }
        shares: list[Any] = [None] * self.cpu_world.size
        dist.all_gather_object(shares, mine)
        self.data_parallel = {"backend": dist.get_backend(), "world_size": self.cpu_world.size, "ranks": shares}

    def final_eval(self):
        """Rank 0 strips the checkpoints as Ultralytics' ``final_eval`` does, without its last validation of
        best.pt: in a DDP rank its validator asks CUDA for the current device (engine/validator.py,
        ``get_torch_device_backend(...).current_device()``), and the pipeline scores the exported student on the
        held-out set anyway. The metrics stay those of the last epoch's validation (which ran on every rank)."""
        from ultralytics.utils.torch_utils import strip_optimizer

        if self.cpu_world.is_main:
            ckpt = strip_optimizer(self.last) if self.last.exists() else {}
            if self.best.exists():
                strip_optimizer(self.best, updates={"train_results": ckpt.get("train_results")})
        ddp.barrier()


def train_on_cpu_workers(data_yaml: Path, spec, imgsz: int, out_dir: Path) -> dict[str, Any]:
    """Train ``spec`` on ``spec.nproc`` gloo workers; returns rank 0's record (as ``train.fit`` returns it)."""
    from bastion.models.atomic import atomic_write_bytes

    out_dir.mkdir(parents=True, exist_ok=True)
    job = {"data_yaml": str(data_yaml), "spec": spec.model_dump(mode="json"), "imgsz": imgsz, "out_dir": str(out_dir)}
    atomic_write_bytes(out_dir / JOB, json.dumps(job).encode())
    (out_dir / RECORD).unlink(missing_ok=True)
    log.info("training the student on %d CPU worker processes (gloo)", spec.nproc)
    ddp.launch_local(spec.nproc, [str(out_dir / JOB)], module="bastion.distill.ultra_ddp")
    if not (out_dir / RECORD).is_file():
        raise ConfigError(f"the data-parallel student training left no record in {out_dir}")
    (out_dir / JOB).unlink()
    return json.loads((out_dir / RECORD).read_text())


def worker(job_path: Path) -> None:
    """One torchrun worker: Ultralytics' trainer with ``CpuDataParallel``; rank 0 writes the record."""
    from bastion.distill.progress import RunProgress
    from bastion.distill.train import TrainSpec, fit
    from bastion.models.atomic import atomic_write_bytes

    world = ddp.launched_world()
    if world is None or world.size < 2:
        raise ConfigError("bastion.distill.ultra_ddp runs in torchrun workers", "use bastion distill detect --nproc N")
    job = json.loads(Path(job_path).read_text())
    spec = TrainSpec.model_validate(job["spec"])
    out_dir = Path(job["out_dir"])
    # rank 0 says how training goes in plain lines on the stderr it shares with the launcher (no bars across
    # processes); the others stay quiet
    progress = RunProgress(plain=True).training("train student") if world.is_main else None
    record = fit(Path(job["data_yaml"]), spec, int(job["imgsz"]), out_dir, progress, mixins=(CpuDataParallel,))
    ddp.barrier()  # every rank done before rank 0 says so
    if world.is_main:
        atomic_write_bytes(out_dir / RECORD, json.dumps(record, default=str).encode())


def main(argv: list[str] | None = None) -> int:
    """``python -m bastion.distill.ultra_ddp JOB``: errors as one line each, exit codes as the CLI's."""
    from bastion.log import setup_logging

    args = sys.argv[1:] if argv is None else argv
    setup_logging()
    world = ddp.launched_world() or ddp.World()
    ddp.quiet_on_interrupt()
    try:
        if len(args) != 1:
            raise ConfigError("usage: python -m bastion.distill.ultra_ddp JOB.json (started by distill detect)")
        worker(Path(args[0]))
        return 0
    except BastionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except RuntimeError as exc:
        stopped = ddp.peer_stopped(world, exc)
        if stopped is None:
            raise
        print(f"error: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:  # Ctrl-C, forwarded by the launcher: it says "interrupted" once (ddp.launch_local)
        if not os.environ.get(ddp.QUIET_INTERRUPT_ENV):
            print("interrupted", file=sys.stderr)
        return 130
    finally:
        ddp.leave()


if __name__ == "__main__":
    sys.exit(main())

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

Under an external torchrun (``torchrun --nnodes … --nproc-per-node … -m bastion.cli distill detect …``) every rank
runs the command: rank 0 runs the pipeline and, at the student's stage, posts the job on the launcher's c10d store
(``ddp.Meeting``: ``lead``); the other ranks run no stage, they wait for that job (``follow``), check that they see
the dataset rank 0 wrote at the same path, and then all train together — ``CpuDataParallel`` on the CPU, Ultralytics'
own DDP rank on GPUs (``LaunchedGpuRank``: its ``_setup_ddp`` with the whole world's size). Rank 0 then exports and
reports; the others exit quietly.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator

from bastion.distill import ddp
from bastion.errors import BastionError, ConfigError

log = logging.getLogger(__name__)
JOB = "ddp-job.json"
RECORD = "ddp-record.json"
WAIT_FOR_JOB_S = 48 * 3600  # rank 0 labels first: hundreds of thousands of frames take hours
WAIT_FOR_PEERS_S = 30 * 60  # each rank's look at the dataset: a stat per file, on a network file system


def _gather_shares(trainer, world) -> dict[str, Any]:
    """Each rank's share of the training data (Ultralytics' distributed sampler), gathered for the record."""
    import torch.distributed as dist

    mine = {
        "rank": world.rank,
        "images": len(trainer.train_loader.sampler),
        "batches": len(trainer.train_loader),
        "batch": trainer.train_loader.batch_size,
    }
    shares: list[Any] = [None] * world.size
    dist.all_gather_object(shares, mine)
    return {"backend": dist.get_backend(), "world_size": world.size, "ranks": shares}


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
        self.data_parallel = _gather_shares(self, self.cpu_world)

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


class LaunchedGpuRank:
    """Mixin (first base) over Ultralytics' ``DetectionTrainer`` in a GPU rank an external torchrun started.

    Ultralytics trains as a DDP rank when LOCAL_RANK is set (``BaseTrainer.__init__``: no launch of its own), and its
    ``_setup_ddp`` takes this rank's GPU from ``device`` ("0,1,…", indexed by LOCAL_RANK) and joins nccl with
    ``world_size`` — which it counts from ``device``, i.e. one node's GPUs. Across several nodes the world is larger:
    the world size comes from torchrun's environment instead. Everything else is Ultralytics' own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        world = ddp.launched_world()
        if world is None or world.size < 2 or self.device.type == "cpu":
            raise ConfigError("the GPU data-parallel trainer runs only in torchrun workers on CUDA devices")
        self.launched_world = world
        self.world_size = world.size

    def _build_train_pipeline(self):
        super()._build_train_pipeline()
        self.data_parallel = _gather_shares(self, self.launched_world)


def _mixins(spec) -> tuple[type, ...]:
    return (CpuDataParallel,) if spec.device == "cpu" else (LaunchedGpuRank,)


def _dataset_digest(data_yaml: Path) -> str:
    """sha256 of data.yaml and the dataset manifest beside it (every image and label by hash): the same on a
    shared file system, different in a stale copy at the same path."""
    import hashlib

    from bastion.distill.pseudo import DATASET_MANIFEST

    digest = hashlib.sha256(data_yaml.read_bytes())
    manifest = data_yaml.parent / DATASET_MANIFEST
    if manifest.is_file():
        digest.update(manifest.read_bytes())
    return digest.hexdigest()


def _missing_from(data_yaml: Path, digest: str) -> str | None:
    """Why this rank cannot train on the dataset rank 0 wrote at ``data_yaml`` (None when it can): not there, a
    different one there, or an image or label of it missing (images are links to ``--images``)."""
    from bastion.distill.pseudo import DATASET_MANIFEST

    if not data_yaml.is_file():
        return f"{data_yaml} is not there"
    try:
        if _dataset_digest(data_yaml) != digest:
            return f"{data_yaml} is a different dataset from rank 0's (a stale copy?)"
        manifest = json.loads((data_yaml.parent / DATASET_MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        return f"{data_yaml.parent}: {exc}"
    for split, rows in manifest.get("splits", {}).items():
        for row in rows:
            image = data_yaml.parent / "images" / split / row["image"]
            if not image.is_file():  # follows the link to the original image
                return f"{image} is not there (or its link's target, under --images, is not)"
            label = data_yaml.parent / "labels" / split / (Path(row["image"]).stem + ".txt")
            if row.get("labels_sha256") and not label.is_file():
                return f"{label} is not there"
    return None


def _inputs_missing(spec, out_dir: Path) -> str | None:
    """The other files every rank reads: the student's YAML rank 0 wrote, a warm start, an Ultralytics teacher."""
    from bastion.distill.train import _student_cfg_file

    for path in (_student_cfg_file(spec, out_dir), spec.warm_start, spec.feature_teacher):
        if path is not None and not Path(path).is_file():
            return f"{path} is not there"
    return None


class _Lead:
    """Rank 0 of an external torchrun: whether the followers have been given their job yet."""

    posted = False


def _world_or_none():
    world = ddp.launched_world()
    return world if world is not None and world.size > 1 else None


def lead(data_yaml: Path, spec, imgsz: int, out_dir: Path, progress=None) -> dict[str, Any]:
    """Rank 0 at the student's stage under an external torchrun: post the job, hear from every rank that it sees
    the dataset, then train as rank 0 of the world; returns the record (as ``train.fit`` does)."""
    from bastion.distill.train import fit, write_student_cfg

    world = _world_or_none()
    if world is None or not world.is_main:
        raise ConfigError("ultra_ddp.lead runs in rank 0 of an external torchrun")
    meeting = ddp.meeting(world)
    write_student_cfg(spec, out_dir)  # rank 0 writes every file; the others find it written
    job = {
        "data_yaml": str(Path(data_yaml).resolve()),
        "dataset": _dataset_digest(Path(data_yaml)),
        "spec": spec.model_dump(mode="json"),
        "imgsz": imgsz,
        "out_dir": str(out_dir),
    }
    meeting.post("job", job)
    _Lead.posted = True
    log.info("training the student on %d ranks: waiting for each to see the dataset", world.size)
    for rank in range(1, world.size):
        seen = meeting.wait(f"seen/{rank}", WAIT_FOR_PEERS_S, f"rank {rank} to look at the dataset")
        if seen.get("error"):
            message = f"rank {rank} cannot see the dataset rank 0 wrote: {seen['error']}"
            meeting.post("go", {"error": message})
            raise ConfigError(message, SHARED_FS_HINT)
    meeting.post("go", {})
    return _train_as_rank(world, lambda: fit(Path(data_yaml), spec, imgsz, out_dir, progress, mixins=_mixins(spec)))


SHARED_FS_HINT = "put --out and --images on a file system every node mounts at the same path (docs/scale.md)"


@contextlib.contextmanager
def leading(world) -> Iterator[None]:
    """Around rank 0's command under an external torchrun (a no-op otherwise): when it ends without having posted
    the student's job (cached, --no-train, or failed before), the ranks still waiting are told there is none —
    they exit 0 after a success, one line and non-zero after a failure — instead of waiting for the store to go."""
    if world is None or world.size < 2 or not world.is_main:
        yield
        return
    ddp.meeting(world)  # reach (or host) the launcher's store before any work
    _Lead.posted = False
    try:
        yield
    except BaseException:
        _release(world, failed=True)
        raise
    _release(world, failed=False)


def _release(world, failed: bool) -> None:
    if _Lead.posted:
        return
    try:
        ddp.meeting(world).post("job", {"none": True, "failed": failed})
    except (RuntimeError, BastionError):  # the store is gone: the followers notice that themselves
        pass


def _other_node_shape(spec) -> str | None:
    """On GPUs the device list rank 0 posts is one per local rank of *its* node: a node running another number of
    ranks would index past it. Every node must run the same ``--nproc-per-node``."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    devices = [d for d in str(spec.device).split(",") if d.strip().isdigit()]
    if local and devices and len(devices) != int(local):
        return f"{local} ranks on this node, {len(devices)} on rank 0's: give every node the same --nproc-per-node"
    return None


def follow(world) -> None:
    """A rank other than 0 under an external torchrun: no stage of the pipeline, only the student's training, when
    rank 0 posts it; then quiet."""
    from bastion.distill.train import TrainSpec, fit

    meeting = ddp.meeting(world)
    job = meeting.wait("job", WAIT_FOR_JOB_S, "rank 0 to reach the student's training")
    if job.get("none"):
        if job.get("failed"):
            raise ddp.PeerStoppedError(f"worker {world.rank} of {world.size} stopped: rank 0 failed before training")
        return  # nothing to train (cached, or not asked for): rank 0 goes on alone
    data_yaml, out_dir = Path(job["data_yaml"]), Path(job["out_dir"])
    spec = TrainSpec.model_validate(job["spec"])
    missing = _missing_from(data_yaml, job["dataset"]) or _inputs_missing(spec, out_dir) or _other_node_shape(spec)
    meeting.post(f"seen/{world.rank}", {"error": missing} if missing else {})
    if missing:
        raise ConfigError(f"rank {world.rank} cannot see the dataset rank 0 wrote: {missing}", SHARED_FS_HINT)
    go = meeting.wait("go", WAIT_FOR_PEERS_S, "every rank to look at the dataset")
    if go.get("error"):
        raise ddp.PeerStoppedError(f"worker {world.rank} of {world.size} stopped: {go['error']}")
    _train_as_rank(world, lambda: fit(data_yaml, spec, int(job["imgsz"]), out_dir, None, _mixins(spec)))


def _train_as_rank(world, train):
    """Train in the world (the trainer joins the process group), then leave it; a collective broken by a rank
    that failed first is one line."""
    with ddp.in_world(world):
        record = train()
        ddp.barrier()  # every rank done before rank 0 goes on alone
        return record


def train_on_cpu_workers(data_yaml: Path, spec, imgsz: int, out_dir: Path) -> dict[str, Any]:
    """Train ``spec`` on ``spec.nproc`` gloo workers; returns rank 0's record (as ``train.fit`` returns it)."""
    from bastion.models.atomic import atomic_write_bytes

    from bastion.distill.train import write_student_cfg

    out_dir.mkdir(parents=True, exist_ok=True)
    write_student_cfg(spec, out_dir)  # here, once: the workers find it written
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

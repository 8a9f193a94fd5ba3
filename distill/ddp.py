"""Data-parallel distillation on PyTorch's own engine: torchrun (``torch.distributed.run``) and DDP.

``--nproc N`` on one machine starts N copies of the very command the user typed through torchrun's own launcher,
with a static rendezvous on a c10d TCPStore at 127.0.0.1 — no rendezvous service, nothing off the host. Launched
by an external ``torchrun`` (several nodes, or a cluster's scheduler) the same code finds RANK / WORLD_SIZE /
LOCAL_RANK in its environment and joins that world instead. Why torchrun and not ``torch.multiprocessing.spawn``:
one code path for both cases (a worker is a worker however it was started), a worker that dies takes the others
down with it instead of leaving them blocked in an all-reduce, and the rendezvous flags a cluster team already
knows work unchanged (docs/scale.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from bastion.errors import BastionError, ConfigError

log = logging.getLogger(__name__)

NPROC_HELP = (
    "Data-parallel processes on this machine (torchrun + DDP; one per GPU, or gloo on CPU cores). The batch is "
    "the whole step's batch whatever N. Under an external torchrun leave it out. See docs/scale.md."
)
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
QUIET_INTERRUPT_ENV = "BASTION_DDP_WORKER"  # set for --nproc workers: Ctrl-C is said by the launcher (bastion/cli.py)


@dataclass(frozen=True)
class World:
    """Where this process stands in a data-parallel run (a single process is rank 0 of a world of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, shows progress, writes checkpoints and the report."""
        return self.rank == 0


def check_nproc(value: str | int) -> int:
    """``--nproc``: a whole number from 1 to four per CPU core (more only queue for the same cores)."""
    limit = 4 * (os.cpu_count() or 1)
    try:
        n = int(str(value).strip())
    except ValueError:
        raise ConfigError(f"--nproc {value!r}: give a whole number of processes, e.g. --nproc 2") from None
    if not 1 <= n <= limit:
        raise ConfigError(f"--nproc {n}: give 1 to {limit} (four per CPU core of this machine)")
    return n


def launched_world() -> World | None:
    """The world an external launcher (torchrun, or ``--nproc``'s own) put this process in, from its environment;
    None when started plainly. A partial or garbled environment is refused rather than guessed at."""
    present = [k for k in ENV_KEYS if k in os.environ]
    if not present:
        return None
    try:
        rank, size, local = (int(os.environ[k]) for k in ENV_KEYS)
    except (KeyError, ValueError):
        raise ConfigError(
            f"torchrun environment incomplete or not numbers ({', '.join(f'{k}={os.environ.get(k)}' for k in ENV_KEYS)})",
            "launch with torchrun, or unset RANK, WORLD_SIZE and LOCAL_RANK",
        ) from None
    if not (0 <= rank < size and 0 <= local <= rank):
        raise ConfigError(f"torchrun environment out of range: RANK={rank} WORLD_SIZE={size} LOCAL_RANK={local}")
    return World(rank, size, local)


def launched_world_for(workers: int) -> World | None:
    """``launched_world()`` for a command given ``--nproc workers``: the two ways of starting several processes do
    not mix (its own launcher under an external torchrun would start workers per worker)."""
    world = launched_world()
    if world is not None and workers > 1:
        raise ConfigError(
            f"already a torchrun worker (RANK={world.rank}, WORLD_SIZE={world.size})",
            "leave out --nproc under torchrun",
        )
    return world


@contextlib.contextmanager
def in_world(world: World) -> Iterator[None]:
    """The body runs in ``world``'s process group, which is left at the end however it ends; a collective broken
    by a worker that failed first is one line (PeerStoppedError), not a bug report."""
    try:
        yield
    except RuntimeError as exc:
        stopped = peer_stopped(world, exc)
        if stopped is None:
            raise
        raise stopped from None
    finally:
        leave()


def current_world() -> World:
    """The world of an initialised process group, else a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return World()


def join(device: str) -> tuple[World, str]:
    """Join the launcher's world (a no-op when started plainly): gloo on CPU, nccl on CUDA, one GPU per local rank.
    Returns the world and this rank's device; ranks other than 0 go quiet (warnings and errors only)."""
    world = launched_world()
    if world is None or world.size == 1:
        return world or World(), device
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):  # one GPU per local rank (CUDA_VISIBLE_DEVICES chooses which)
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {world.local_rank} has no GPU: torch sees {torch.cuda.device_count()} CUDA device(s)",
                "start at most one process per GPU on each node, or use --device cpu",
            )
        device = f"cuda:{world.local_rank}"
        torch.cuda.set_device(device)
    quiet_on_interrupt()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo", init_method="env://")
    if not world.is_main:
        logging.getLogger("bastion").setLevel(logging.WARNING)
    log.info("joined a data-parallel world of %d on %s (rank %d)", world.size, device, world.rank)
    return world, device


def quiet_on_interrupt() -> None:
    """In a worker that ``launch_local`` started, the Ctrl-C torchrun forwards ends it at once, silently: the launcher
    says "interrupted" once. A KeyboardInterrupt would land anywhere (seen: inside a weakref callback, "Exception
    ignored … KeyboardInterrupt") and the peers would say "stopped: another worker exited first". Checkpoints are
    written by rename, so none is left half-written (torchrun would SIGKILL a slow worker anyway)."""
    if os.environ.get(QUIET_INTERRUPT_ENV):
        signal.signal(signal.SIGINT, lambda *_: os._exit(130))


def leave() -> None:
    """Tear the process group down (a clean exit, so torchrun reports success)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def mean_across(value: float) -> float:
    """The mean of ``value`` over all ranks (the loss a step had on the whole batch), or itself alone."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    backend = dist.get_backend()
    t = torch.tensor([value], dtype=torch.float64, device="cuda" if backend == "nccl" else "cpu")
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def without_nproc(argv: list[str]) -> list[str]:
    """The command line minus ``--nproc N`` / ``--nproc=N``: what each worker runs."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(nproc: int, argv: list[str], module: str = "bastion.cli") -> None:
    """Run ``bastion ARGV`` (or ``python -m MODULE ARGV``) as ``nproc`` workers through torchrun's launcher, in this
    process, on 127.0.0.1 only. The detector's CPU workers are ``bastion.distill.ultra_ddp`` (docs/scale.md).

    Workers inherit stdout/stderr: rank 0 prints the report, the others stay quiet. One thread pool per worker
    (the cores shared out) unless OMP_NUM_THREADS says otherwise; gloo pinned to the loopback interface."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    env = os.environ
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    args = get_args_parser().parse_args(
        [
            "--nnodes=1",
            f"--nproc-per-node={nproc}",
            "--rdzv-backend=static",
            "--master-addr=127.0.0.1",
            f"--master-port={_free_loopback_port()}",
            "--max-restarts=0",
            "--monitor-interval=0.5",
            "-m",
            module,
            *without_nproc(argv),
        ]
    )
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.elastic")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)  # a failure is said once, below, after the worker's own
    before = env.get(QUIET_INTERRUPT_ENV)
    env[QUIET_INTERRUPT_ENV] = "1"  # the workers inherit it: a Ctrl-C is said once, by this launcher
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = _root_failure(exc)
        raise WorkerFailedError(
            f"data-parallel worker {rank} of {nproc} failed (exit {failure.exitcode})",
            "its own error is printed above",
        ) from None
    except SignalException as exc:  # torchrun's handler turns Ctrl-C/SIGTERM into this, after stopping the workers
        if exc.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None  # the CLI's one line "interrupted", exit 130
        raise WorkerFailedError(
            f"data-parallel run stopped by {exc.sigval.name}",
            "run the command again: the run directory resumes what was done",
        ) from None
    finally:
        if before is None:
            env.pop(QUIET_INTERRUPT_ENV, None)
        else:
            env[QUIET_INTERRUPT_ENV] = before


def _root_failure(exc) -> tuple[int, object]:
    """The worker that failed for its own reason: torchrun names the first to exit, and under load that can be a
    peer that only stopped because the real failure broke its collective (it exits PeerStoppedError.exit_code), or
    one torchrun's teardown signalled (a negative exit code)."""
    own = [
        (r, f) for r, f in sorted(exc.failures.items()) if f.exitcode > 0 and f.exitcode != PeerStoppedError.exit_code
    ]
    return own[0] if own else exc.get_first_failure()


class WorkerFailedError(BastionError):
    """A torchrun worker exited non-zero; its own one-line error is already on stderr."""


class PeerStoppedError(BastionError):
    """This worker's collective broke because another worker exited first (whose own error says why). Its own exit
    status, so the launcher can tell the worker that failed first from those it stopped."""

    exit_code = 3


def peer_stopped(world: World, exc: BaseException) -> PeerStoppedError | None:
    """A one-line error for a collective that failed because a peer went away, else None (a real error)."""
    text = str(exc)
    if world.size > 1 and isinstance(exc, RuntimeError) and ("by peer" in text or "remote worker" in text):
        return PeerStoppedError(f"worker {world.rank} of {world.size} stopped: another worker exited first")
    return None


class Meeting:
    """A few keys on the launcher's own c10d store (the TCPStore torchrun's agent serves at MASTER_ADDR:MASTER_PORT,
    or rank 0 does where the launcher does not): how ranks that must not run a pipeline's stages wait for rank 0,
    outside any process group — no collective timeout to outlast, and no group that Ultralytics' own DDP setup
    would then find already initialised. Nothing but the launcher's store is contacted.

    Keys live under the attempt's prefix (``TORCHELASTIC_RESTART_COUNT``): a restarted group never reads a key
    the failed attempt left. A store that goes away (rank 0's node gone, its agent with it) stops a waiting rank
    in one line instead of leaving it waiting."""

    POLL_S = 0.5

    def __init__(self, world: World, store) -> None:
        self.world = world
        self.store = store

    def post(self, key: str, value: dict) -> None:
        self.store.set(key, json.dumps(value))

    def wait(self, key: str, timeout_s: float, waiting_for: str) -> dict:
        """The value rank 0 (or a peer) posted under ``key``; polls, so a lost store is noticed at once."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.store.check([key]):
                    return json.loads(self.store.get(key))
            except RuntimeError:  # torch.distributed.DistStoreError: the store's server is gone
                raise PeerStoppedError(
                    f"worker {self.world.rank} of {self.world.size} stopped: the launcher's store went away "
                    f"while it waited for {waiting_for}"
                ) from None
            if time.monotonic() > deadline:
                raise WorkerFailedError(
                    f"worker {self.world.rank} of {self.world.size} waited {timeout_s / 3600:.3g} h for {waiting_for}",
                    "see rank 0's output",
                )
            time.sleep(self.POLL_S)


CONNECT_S = 600  # how long a rank waits for the launcher's store to answer (another node may start later)
_meeting: Meeting | None = None


def meeting(world: World) -> Meeting:
    """This process's connection to the launcher's store (opened once; rank 0 may host it, see ``Meeting``)."""
    global _meeting
    if _meeting is None:
        from datetime import timedelta

        import torch.distributed as dist

        try:
            store, _, _ = next(
                dist.rendezvous("env://", rank=world.rank, world_size=world.size, timeout=timedelta(seconds=CONNECT_S))
            )
        except (ValueError, RuntimeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise ConfigError(
                f"cannot reach the launcher's store (MASTER_ADDR={os.environ.get('MASTER_ADDR')} "
                f"MASTER_PORT={os.environ.get('MASTER_PORT')}): {first}",
                "launch with torchrun",
            ) from None
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        _meeting = Meeting(world, dist.PrefixStore(f"bastion/attempt-{attempt}/", store))
    return _meeting


def argv() -> list[str]:
    """This command's arguments (after ``bastion`` / ``python -c …`` / ``python -m bastion.cli``)."""
    return sys.argv[1:]

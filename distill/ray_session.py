"""One Ray cluster for one bastion run (the ``[scale]`` extra): what ``--labeller ray`` and ``eval detect --on ray``
share — starting a private local cluster or joining a running one, keeping it offline, streaming Ray Data
``map_batches`` results back in order, and shutting it down (or leaving it) however the run ends.

Offline, as everything else. A local cluster (``ray``) starts with usage statistics off (``RAY_USAGE_STATS_ENABLED=0``,
and the report address a closed loopback port, so not even Ray's "stats are disabled" ping could leave), no
dashboard, and on the loopback interface only: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is Ray's own switch that keeps
a node on 127.0.0.1 rather than looking up its outward address, so every Ray port listens on 127.0.0.1. Its session
directory is a short private temp dir (a unix socket path must stay under about 107 characters), removed at the end
unless ``BASTION_RAY_TMPDIR`` names one to keep.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from bastion.distill.labellers import LABELLER_FLAGS, Flags, LabellerChoice
from bastion.errors import BastionError, ConfigError, MissingExtraError

log = logging.getLogger(__name__)
# every process of a Ray cluster this run starts or joins: no usage report, not even the "disabled" one
NO_PHONE_HOME = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/"}
DEAD_END = "http://127.0.0.1:9"  # the discard port, closed: a request sent there is refused on this host
LOOPBACK_ONLY = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # a local cluster: node IP 127.0.0.1, every port on loopback
    # Ray's dashboard process asks the cloud metadata services (169.254.169.254, metadata.google.internal) what
    # cloud it runs on even with usage stats off (ray/_common/usage/usage_lib.py, 2.60; the zero-egress guard
    # caught it): every HTTP request of the cluster's processes goes to a closed loopback proxy instead, and
    # only the cluster's own loopback traffic bypasses it
    **{k: DEAD_END for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")},
    **{k: "127.0.0.1,localhost,::1" for k in ("no_proxy", "NO_PROXY")},
}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")  # what parse_labeller lets through of a loopback address
TMPDIR_ENV = "BASTION_RAY_TMPDIR"
MAX_TMPDIR = 40  # + "/session_<date>_<pid>/sockets/plasma_store" stays under the unix socket path limit
BATCH = 8  # images per actor call: large enough to amortise Ray's per-task cost, small enough to stream
CONNECT_TIMEOUT_S = 3.0
REMOVE_WAIT_S = 5.0  # a shut-down cluster's last processes may still write into its session dir this long
OBJECT_STORE = 128 * 2**20  # a local cluster moves paths and small arrays only; Ray's default is 30 % of RAM


def require_ray(flags: Flags = LABELLER_FLAGS):
    """``ray`` (with ``ray.data``), or the one line that says how to get it."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise MissingExtraError(f"{flags.flag} ray", "scale", "ray[data]", f"(or use {flags.flag} single)") from None
    return ray


def session_dir() -> tuple[Path, bool]:
    """Where a local cluster keeps its session (sockets, logs): (dir, whether this run made it and removes it)."""
    kept = os.environ.get(TMPDIR_ENV)
    if kept:
        path = Path(kept).absolute()
        if len(str(path)) > MAX_TMPDIR:
            raise ConfigError(
                f"{TMPDIR_ENV}={kept}: at most {MAX_TMPDIR} characters",
                "Ray puts unix sockets under it and a socket path is limited to about 107 characters",
            )
        path.mkdir(parents=True, exist_ok=True)
        return path, False
    base = tempfile.gettempdir()
    if len(base) > MAX_TMPDIR - 20:
        base = "/tmp"
    return Path(tempfile.mkdtemp(prefix="bastion-ray-", dir=base)), True


def check_reachable(address: str, flags: Flags = LABELLER_FLAGS) -> None:
    """A HOST:PORT nobody answers on is one line now, not Ray's minute of retries and a traceback."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ConfigError(
            f"{flags.flag} ray:{address}: no Ray cluster answers there ({exc.strerror or type(exc).__name__})",
            f"start one with 'ray start --head --port {port}' (docs/scale.md), or check the address",
        ) from None


class RaySession:
    """A Ray cluster for this run: a private local one (``address`` None), or the one at ``auto`` / HOST:PORT.

    ``workers``: the actors a map runs on (``choice.workers``, else one per GPU of the cluster, else one per CPU);
    ``gpus``: the cluster's GPUs (each actor then takes one). Nothing is left running or set when it closes, and a
    failed start closes it at once."""

    def __init__(self, choice: LabellerChoice, flags: Flags = LABELLER_FLAGS) -> None:
        self.choice, self.flags = choice, flags
        self._saved_env = {k: os.environ.get(k) for k in (*NO_PHONE_HOME, *LOOPBACK_ONLY)}
        self._tmp: Path | None = None
        self._remove_tmp = False
        self._owned = False
        self.ray = require_ray(flags)
        self._cluster_switch = self.ray._private.ray_constants.ENABLE_RAY_CLUSTER
        try:
            self._start()
        except BaseException:  # a refused address or Ctrl-C while starting: nothing left running or set
            self.close()
            raise

    def _start(self) -> None:
        ray, choice, flag = self.ray, self.choice, self.flags.flag
        if ray.is_initialized():  # embedded in a program that already joined a cluster: use it, leave it up
            log.info("using the Ray cluster this process already joined")
        elif choice.address is None:
            os.environ.update({**NO_PHONE_HOME, **LOOPBACK_ONLY})
            ray._private.ray_constants.ENABLE_RAY_CLUSTER = False  # the same switch, if ray was imported before
            tmp, self._remove_tmp = session_dir()
            self._tmp = tmp
            self._owned = True
            ray.init(
                address="local",
                num_cpus=choice.workers or os.cpu_count() or 1,
                include_dashboard=False,
                _temp_dir=str(tmp),
                object_store_memory=OBJECT_STORE,
                log_to_driver=False,
                configure_logging=False,
            )
        else:
            os.environ.update(NO_PHONE_HOME)  # this driver's part; the cluster's nodes are started with it too
            if choice.address.rpartition(":")[0] in LOOPBACK_HOSTS:
                # a cluster on this host's loopback (ray start --node-ip-address 127.0.0.1, another run's local
                # cluster): this driver's node must be 127.0.0.1 too, or Ray swaps the address for the host's
                # outward one, where nothing listens, and waits there for minutes
                os.environ.update(LOOPBACK_ONLY)
                ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
            if choice.address != "auto":
                check_reachable(choice.address, self.flags)
            self._owned = True  # ray.shutdown() disconnects this driver; the cluster stays up
            try:
                ray.init(address=choice.address, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                hint = "start one with 'ray start --head' (docs/scale.md), or give ray:HOST:PORT"
                if choice.address != "auto" and os.environ.get("RAY_AUTH_MODE") != "token":  # Ray does not say it
                    hint = (
                        "a cluster from 'ray start' wants its token (Ray 2.60 turns token authentication on): "
                        "export RAY_AUTH_MODE=token on this node (docs/scale.md); else " + hint
                    )
                raise ConfigError(
                    f"{flag} ray:{choice.address}: could not join the Ray cluster: {first}", hint
                ) from None
        resources = ray.cluster_resources()
        self.gpus = int(resources.get("GPU", 0))
        slots = self.gpus or int(resources.get("CPU", 1))
        if choice.workers is not None and choice.workers > slots:  # Ray would wait for them forever
            unit = "GPUs" if self.gpus else "CPUs"
            raise ConfigError(
                f"{self.flags.workers} {choice.workers}: the Ray cluster has {slots} {unit}",
                f"give at most {slots} (one worker per {unit[:-1]}), or add nodes",
            )
        self.workers = choice.workers or max(1, slots)
        log.info("%s: %d worker(s) on %s", self.flags.what, self.workers, choice.address or "a local cluster")

    def ordered_map(
        self,
        items: Sequence[dict[str, Any]],
        fn: type | Callable,
        fn_args: tuple = (),
        use_gpus: bool = True,
        key: str = "path",
    ) -> Iterator[dict[str, Any]]:
        """Ray Data ``map_batches`` of ``fn`` over ``items``, one result row per item, in the items' order.

        ``fn`` a class: a pool of ``self.workers`` actors, each built once with ``fn_args`` (one GPU each where the
        cluster has GPUs and ``use_gpus``, else one CPU); a function: plain tasks of one CPU. Each row is checked
        against its item by ``key``; a worker's error is one line."""
        if not items:
            return
        ray, what = self.ray, self.flags.what
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # results come back in the order of `items`
        ctx.enable_progress_bars = False  # bastion shows its own progress; stdout stays the report's (--json)
        ctx.print_on_execution_start = False
        blocks = max(1, -(-len(items) // BATCH))
        ds = ray.data.from_items(list(items), override_num_blocks=blocks)
        if isinstance(fn, type):
            per_actor = {"num_gpus": 1} if self.gpus and use_gpus else {"num_cpus": 1}
            ds = ds.map_batches(
                fn,
                fn_constructor_args=fn_args,
                batch_size=BATCH,
                batch_format="numpy",
                # no more actors than blocks: Ray Data warns on stderr of a pool it cannot keep busy
                compute=ray.data.ActorPoolStrategy(size=min(self.workers, blocks)),
                **per_actor,
            )
        else:
            ds = ds.map_batches(fn, fn_args=fn_args, batch_size=BATCH, batch_format="numpy", num_cpus=1)
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # its execution notes are not the operator's
        rows = iter(ds.iter_rows())
        for item in items:
            try:
                row = next(rows)
            except StopIteration:
                raise BastionError(f"{what} returned no result for {Path(str(item[key])).name}") from None
            except Exception as exc:  # a worker's error arrives wrapped by Ray: one line for the operator
                first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                raise BastionError(f"{what} failed: {first}", f"rerun with {self.flags.flag} single to see") from None
            if str(row[key]) != str(item[key]):
                raise BastionError(f"{what} returned {row[key]} where {item[key]} was due")
            yield row

    def describe(self) -> dict:
        return {**self.choice.describe(), "workers": self.workers, "gpus_per_worker": 1 if self.gpus else 0}

    def close(self) -> None:
        """Shut down a cluster this run started (disconnect from one it joined); remove its temp dir.

        A Ctrl-C that lands while Ray shuts down (it takes a second or two) would stop the shutdown half-way and
        leave Ray's processes writing into the session dir while it is removed (seen: an empty session dir left in
        /tmp): the shutdown is finished first, then the interrupt goes on.
        """
        interrupted: KeyboardInterrupt | None = None
        try:
            if self._owned and self.ray.is_initialized():
                try:
                    self.ray.shutdown()
                except KeyboardInterrupt as exc:
                    interrupted = exc
                    self.ray.shutdown()
        finally:
            self._owned = False
            self.ray._private.ray_constants.ENABLE_RAY_CLUSTER = self._cluster_switch
            for k, v in self._saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            if self._tmp is not None and self._remove_tmp:
                remove_tree(self._tmp)
            self._tmp = None
        if interrupted is not None:
            raise interrupted

    def __enter__(self) -> "RaySession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def remove_tree(path: Path, wait_s: float = REMOVE_WAIT_S) -> bool:
    """Remove a session dir that a dying Ray process may still write into: retry until it is gone (or wait_s)."""
    deadline = time.monotonic() + wait_s
    while True:
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return True
        if time.monotonic() > deadline:
            log.warning("could not remove Ray's session dir %s: remove it by hand", path)
            return False
        time.sleep(0.05)

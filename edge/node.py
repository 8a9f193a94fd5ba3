"""The field node: sources → one inference worker → event store → ZeroMQ, with an audit trail.

Order of every event's life: frame read → detect → filter → **stored and
committed** (seq assigned) → published.  If storing fails the event is not
published and the node reports a storage error until the disk recovers.

No worker thread may die silently: the node's workers run under a
``Supervisor``; a death is reported in ``status``, the health log and the audit
log, and stops the node with a non-zero exit (systemd restarts it).  The
watchdog is pinged only while the inference loop is turning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any


from bastion import __version__
from bastion.edge.audit import AuditLog, open_node_key
from bastion.edge.bridges import Bridges
from bastion.edge.config import NodeConfig
from bastion.edge.control_ops import Reply, dispatch
from bastion.edge.curve_allow import client_roles
from bastion.edge.node_models import load_detector, load_lm
from bastion.edge.pin import load_start_model
from bastion.edge.pipeline import INFER, PREPARE, FramePipeline, source_filter
from bastion.edge.protocol import ControlRequest
from bastion.edge.roles import NO_CURVE_ROLE
from bastion.edge.server import NodeServer
from bastion.edge.seqmark import SeqMark
from bastion.edge.store import EventStore, StorageError
from bastion.edge.supervisor import Supervisor
from bastion.edge.systemd_notify import sd_notify, watchdog_interval_s
from bastion.edge.trust_recheck import RunningBundle, untrusted
from bastion.errors import BastionError
from bastion.models.atomic import atomic_write_bytes
from bastion.models.releasability import unit_nation
from bastion.runtime.detect import Detector
from bastion.runtime.detections import class_ids
from bastion.runtime.reader import SourceReader
from bastion.runtime.stop_signals import STOP_SIGNALS, StopSignals

log = logging.getLogger(__name__)
RUNTIME_FILE = "node.json"
NODE_KEY = "node-audit.key"  # default name of the audit checkpoint key in the storage dir


class NodeFailed(BastionError):
    """A worker thread died: the node stopped rather than run on half-alive (exit 2, systemd restarts it)."""

    exit_code = 2


class Node(FramePipeline):
    """The field node: its parts, their lifecycle, its health and its control answers (the frame pipeline's
    stages are ``FramePipeline``, edge/pipeline.py)."""

    def __init__(self, config: NodeConfig, accept_seq_gap: bool = False) -> None:
        self.config = config
        self.storage = Path(config.storage.dir)
        try:
            self.storage.mkdir(parents=True, exist_ok=True)
            key, created = open_node_key(config.security.audit_key or self.storage / NODE_KEY)
            self.audit = AuditLog(self.storage / "audit.log", signer=key)
        except OSError as exc:
            raise StorageError(
                f"cannot use the storage dir {self.storage}: {exc.strerror or exc}",
                "set storage.dir to a writable directory on a real disk",
            ) from None
        if created:
            self.audit.append("audit_key_created", key_id=self.audit.key_id, path=str(created))
        self.failure: str | None = None
        self.failure_hint = "see the node log for the traceback; systemd restarts it (Restart=on-failure)"
        self._trust_lock = threading.Lock()
        self.supervisor = Supervisor(self._thread_died)
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self.started = time.time()
        self.storage_error: str | None = None
        self.published = 0
        self._detector_lock = threading.Lock()
        self.audit.append(
            "node_start", node=config.id, config_sha256=config.sha256(), bastion=__version__, pid=os.getpid()
        )
        try:
            # the allow list (keys and roles) is read before seconds go into loading a model: a typo stops at once
            roles = client_roles(config.security.allowed_clients) if config.curve_enabled else None
            # the model an admin pinned with a persisted reload, if it still verifies, else the config's (edge/pin.py)
            self.detector, self.pin = load_start_model(
                self.storage, config.model, self.audit, self._load_detector, self._fits_config
            )
            self.generator = self._load_lm(config.lm) if config.lm else None
            self.store = EventStore(
                self.storage / "events.db",
                mark=SeqMark(self.storage, self.audit),
                accept_seq_gap=accept_seq_gap,
                audit=self.audit,
            )  # refuses a store behind its mark
        except BastionError:  # a refused start is anchored like a clean stop: `audit verify --key` stays clean
            with contextlib.suppress(Exception):
                self.audit.checkpoint()
            raise
        self.vault = None
        self.clips = None
        if config.storage.snapshots or config.storage.clips:
            from bastion.edge.snapshots import SnapshotVault, load_key

            key = load_key(config.storage.snapshot_key)
            if config.storage.snapshots:
                self.vault = SnapshotVault(self.storage / "snapshots", key, config.id)
            if config.storage.clips:  # evidence clips, sealed with the same key (edge/clips.py)
                from bastion.edge.clip_store import ClipVault
                from bastion.edge.clips import ClipRecorder

                try:
                    clip_vault = ClipVault(self.storage / "clips", key, config.id)
                except OSError as exc:  # one line at start, like the storage dir itself
                    raise StorageError(
                        f"cannot use the clips dir {self.storage / 'clips'}: {exc.strerror or exc}",
                        "make it a writable directory, or set storage.clips: false",
                    ) from None
                self.clips = ClipRecorder(clip_vault, config.storage, self.store.first_seq)
        self.readers = [SourceReader(s, config.queue_size, self.wake, self.stop_event) for s in config.sources]
        self.server = NodeServer(config, self.handle, self.audit, self.store.last_seq, roles)
        self.bridges = Bridges(config, self.store, self.status_dict, self.storage)  # sinks, metrics (docs/bridges.md)
        running = lambda: not self.stop_event.is_set()  # noqa: E731
        self._spawn_pipeline(running)
        self._maintenance = self.supervisor.spawn("node-maintenance", self._maintain, running)
        self._clip_threads = []
        if self.clips is not None:
            from bastion.edge.clips import ENCODE, FRAMES

            self._clip_threads = [
                self.supervisor.spawn(FRAMES, self.clips.frames_loop, running),
                self.supervisor.spawn(ENCODE, self.clips.encode_loop, running),
            ]
        for thread in self.server.threads:
            self.supervisor.watch(thread.name, thread, running)
        auth = self.server.auth  # CurveZMQ's ZAP handler: without it no client gets in
        if auth is not None and auth.thread is not None:
            self.supervisor.watch("node-zap", auth.thread, running)
        for reader in self.readers:  # a file source that reached its end stops normally
            self.supervisor.watch(reader.name, reader, lambda r=reader: running() and r.stats.state != "finished")

    # -- model ---------------------------------------------------------------------------------------
    def _load_detector(self, model: str, audit_refusal: bool = True) -> Detector:
        return load_detector(self.config, self.audit, model, audit_refusal)

    def _load_lm(self, model: str):
        return load_lm(self.config, self.audit, model)

    def _fits_config(self, detector: Detector) -> None:
        """ConfigError if a source filter or a zone/line rule names a class ``detector`` lacks: a pinned model can
        meet a config edited after it was pinned (edge/pin.py then runs the config's model)."""
        for source in self.config.sources:
            source_filter(source, detector.names)
        for rule in [*self.config.objects.zones, *self.config.objects.lines] if self.config.objects else []:
            if rule.classes:
                class_ids(rule.classes, detector.names)

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        self.server.start()
        for reader in self.readers:
            reader.start()
        self._preparer.start()
        self._worker.start()
        self._maintenance.start()
        for thread in self._clip_threads:
            thread.start()
        self.bridges.start(self.supervisor, lambda: not self.stop_event.is_set())
        self.audit.checkpoint()
        try:
            self._write_runtime_file()
        except OSError as exc:  # a full or read-only disk at start: one line, exit 1 (run() closes what started)
            raise StorageError(
                f"cannot write {self.storage / RUNTIME_FILE}: {exc.strerror or exc}",
                "free disk space in the storage dir",
            ) from None
        sd_notify("READY=1")
        log.info(
            "node ready",
            extra={
                "node": self.config.id,
                "events": self.server.events_endpoint,
                "control": self.server.control_endpoint,
            },
        )

    def run(self, take_signals: bool = True) -> None:
        """Start, then block until SIGTERM/SIGINT (or ``stop()``), then shut down cleanly.

        The signals are a stop request taken by a lock-free handler (runtime/stop_signals.py): a handler calling
        ``stop_event.set()`` could wait for ever on the lock this thread holds inside ``stop_event.wait()``, and
        systemd would SIGKILL the node, losing its clean stop. A second signal ends the process at once. Where the
        caller took the signals already (``bastion node run``, from before the model load) it passes
        ``take_signals=False``: after a first signal they are the kernel's, and must stay so."""
        with StopSignals(on_stop=self.stop_requested, signals=STOP_SIGNALS if take_signals else ()):
            try:
                self.start()  # inside: a start that fails half-way still closes what it started
                while not self.stop_event.wait(0.5):
                    self.supervisor.check()  # also watches the maintenance thread, which watches the rest
            finally:
                self.close()
        if self.failure:
            raise NodeFailed(f"node {self.config.id} stopped: {self.failure}", self.failure_hint)

    def stop(self) -> None:
        self.stop_event.set()

    def stop_requested(self, signum: int) -> None:
        """SIGTERM/SIGINT, from StopSignals' watcher thread (never from the handler itself)."""
        log.info("%s: stopping cleanly (again to quit at once)", signal.Signals(signum).name)
        self.stop()

    def close(self) -> None:
        sd_notify("STOPPING=1")
        self.stop_event.set()
        self.wake.set()
        for reader in self.readers:
            if reader.ident is not None:
                reader.join(timeout=5)
        self._join_pipeline()  # drains what the readers queued
        if self.clips is not None:  # the clips still recording finish with what they have
            self.clips.stop()
            for thread in self._clip_threads:
                if thread.ident is not None:
                    thread.join(timeout=30)
        self.server.close()
        self.bridges.close()  # the sinks read the store until they stop
        self.store.close()
        self.detector.close()
        if self.generator is not None:
            self.generator.close()
        self.audit.append("node_stop", node=self.config.id, published=self.published, failure=self.failure)
        self.audit.checkpoint()  # a clean stop anchors the head
        if self.audit.pending:
            log.error("%d audit record(s) could not be written before exit: %s", self.audit.pending, self.audit.error)
        try:
            (self.storage / RUNTIME_FILE).unlink(missing_ok=True)
        except OSError as exc:  # closing must finish, and must not hide why the node stopped
            log.warning("cannot remove %s: %s", self.storage / RUNTIME_FILE, exc)

    def _thread_died(self, name: str, error: str) -> None:
        """A worker ended while it should run: say so everywhere, then stop (the exit code tells systemd)."""
        self.failure = f"thread {name} died: {error}"
        log.error("%s; stopping the node", self.failure, extra={"node": self.config.id})
        self.audit.append("thread_died", thread=name, error=error)
        sd_notify(f"STATUS=failed: {self.failure}")
        self.stop_event.set()
        self.wake.set()

    def _write_runtime_file(self) -> None:
        info = {
            "pid": os.getpid(),
            "node": self.config.id,
            "events": self.server.events_endpoint,
            "control": self.server.control_endpoint,
            "started": self.started,
            "server_public_key": self.server.server_public.decode() if self.server.server_public else None,
        }
        atomic_write_bytes(self.storage / RUNTIME_FILE, json.dumps(info, indent=2).encode())

    def _maintain(self) -> None:
        """Thread supervision, the systemd watchdog, the health line, audit flushes and checkpoints, retention."""
        watchdog = watchdog_interval_s()
        step = min(x for x in (watchdog, 1.0) if x)
        last_health = last_retention = last_checkpoint = last_trust = time.monotonic()
        while not self.stop_event.wait(step):
            now = time.monotonic()
            self.supervisor.check()
            # The ping vouches for the inference loop: it stops when that loop has not turned for a whole
            # watchdog period (stuck in a batch, dead), and systemd restarts the node.
            if watchdog and not self.failure and self._pipeline_turning(2 * watchdog):
                sd_notify("WATCHDOG=1")
            if self.audit.pending:
                self.audit.flush()
            if now - last_health >= self.config.health_log_s:
                last_health = now
                status = self.status_dict()
                log.info(
                    "health %s %s",
                    status["state"],
                    json.dumps({k: status[k] for k in ("sources", "threads", "storage_error", "audit", "sinks")}),
                    extra={"node": self.config.id},
                )
            if now - last_checkpoint >= self.config.audit_checkpoint_s:
                last_checkpoint = now
                if self.audit.head()[0] > self.audit.checkpointed + 1:  # something new since the last one
                    self.audit.checkpoint()
            if now - last_retention >= 60:
                last_retention = now
                self.enforce_retention()
            if now - last_trust >= self.config.trust_recheck_s:  # a failing node is not asked (recheck_trust)
                last_trust = now
                self.recheck_trust()

    def running_bundles(self) -> list[RunningBundle]:
        """The verified bundles this node runs now (a reload swaps the detector; unsigned ones are left out)."""
        if self.config.security.allow_unsigned:  # its next start would load them anyway (edge/trust_recheck.py)
            return []
        running = []
        det = self.detector
        if det.verified_by is not None and det.bundle_root is not None:
            label = f"{det.manifest.name}:{det.manifest.version}"
            running.append(RunningBundle("model", label, det.bundle_root, det.manifest, det.bundle_sha256))
        if self.generator is not None and self.generator.bundle.verification.signed:
            b = self.generator.bundle
            label = f"{b.manifest.name}:{b.manifest.version}"
            running.append(RunningBundle("lm", label, b.root, b.manifest, b.sha256))
        return running

    def recheck_trust(self) -> str | None:
        """Verify the running bundles against the trust in force now (edge/trust_recheck.py); one that no longer
        verifies stops the node, audited. The failure, or None (also when the node is failing already)."""
        with self._trust_lock:  # the maintenance thread asks, and so may a caller: one verdict, audited once
            if self.failure:
                return None
            return self._recheck_trust_locked()

    def _recheck_trust_locked(self) -> str | None:
        for running in self.running_bundles():
            why = untrusted(running)
            if why is None:
                continue
            self.failure = f"{running.role} {running.label} is no longer trusted: {why}"
            self.failure_hint = (
                "get the bundle re-signed by a key this unit trusts, or put back the trust it had "
                "(bastion keys list, bastion policy show); its next start refuses it"
            )
            log.error("%s; stopping the node", self.failure, extra={"node": self.config.id})
            self.audit.append("model_untrusted", role=running.role, sha256=running.sha256, reason=why)
            sd_notify(f"STATUS=failed: {self.failure}")
            self.stop_event.set()
            self.wake.set()
            return self.failure
        return None

    def _pipeline_turning(self, max_age_s: float) -> bool:
        return self.supervisor.healthy(INFER, max_age_s) and self.supervisor.beat_age(PREPARE) <= max_age_s

    def enforce_retention(self) -> int:
        """Drop events (and their snapshots) beyond the configured age / size. Never raises."""
        try:
            deleted = self.store.enforce_retention(self.config.storage.retention_days, self.config.storage.max_mb)
            if self.vault is not None or self.clips is not None:
                first = self.store.first_seq()
                keep_from = first if first is not None else self.store.last_seq() + 1
                if self.vault is not None:
                    self.vault.delete_before(keep_from)
                if self.clips is not None:  # a clip goes with its event; and the clips' own disk budget
                    self.clips.apply_retention(keep_from)
            return deleted
        except Exception as exc:  # retention must never stop the node
            log.warning("retention failed: %s", exc)
            return 0

    # -- control ---------------------------------------------------------------------------------------
    def state(self) -> str:
        if self.failure:
            return "failed"
        storage = self.storage_error or self.store.error
        clips = self.clips is not None and self.clips.error is not None  # detection goes on; evidence does not
        return "degraded" if storage or clips or self.audit.error or self.audit.pending else "running"

    def status_dict(self) -> dict[str, Any]:
        det = self.detector
        count, head = self.audit.head()
        return {
            "node": self.config.id,
            "state": self.state(),
            "failure": self.failure,
            "uptime_s": round(time.time() - self.started, 1),
            "bastion": __version__,
            "model": {
                "name": det.manifest.name,
                "version": det.manifest.version,
                "sha256": det.bundle_sha256,
                "signer": det.verified_by,
                "signers": list(det.verified_signers),  # every signature that counted (a k-of-n bundle: all k)
                "trust_policy": det.verified_under or None,  # the policy version and rule that accepted it
                "precision": det.precision_status,
                # signed markings (SECRET // REL TO: CAN, GBR) and whether it runs from ciphertext: what a
                # coalition operator must see without a shell on the unit; None / false when unmarked / clear
                "markings": det.manifest.markings.summary() if det.manifest.markings else None,
                "sealed": det.manifest.sealed is not None,
            },
            "nation": unit_nation(self.config.nation),  # the releasability this unit enforces (None: none)
            "pin": self.pin,  # None: the config's model; else the pinned bundle and its state (running, refused)
            "objects": self.tracker_status(),  # None without an objects: section
            "events_by_kind": dict(self.events_by_kind),
            "clips": self.clips.status() if self.clips is not None else None,  # storage.clips off: None
            "inference": {"latency": self.inference_latency.as_dict()},
            **self.bridges.status(),  # sinks (state, cursor, backlog, lag) and the metrics address
            "sources": {r.spec.name: r.stats.as_dict(len(r.queue)) for r in self.readers},
            "last_seq": self.store.last_seq(),
            "published": self.published,
            "storage_error": self.storage_error or self.store.error,
            "store": self.store.health(),
            "endpoints": {"events": self.server.events_endpoint, "control": self.server.control_endpoint},
            "threads": self.supervisor.as_dict(),
            "audit": {
                "count": count,
                "head": head,
                "key_id": self.audit.key_id,
                "pending": self.audit.pending,
                "error": self.audit.error,
                "last_checkpoint": self.audit.checkpointed,
            },
        }

    def handle(self, request: ControlRequest, client: str = "local", role: str | None = NO_CURVE_ROLE) -> Reply:
        """One control request, answered by its op's handler once ``role`` may run it (edge/control_ops.py); slow
        work comes back as a ``Deferred`` the server runs off its control thread."""
        return dispatch(self, request, client, role)

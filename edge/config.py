"""``NodeConfig``: everything a field node needs, from one YAML file plus environment overrides.

Overrides: ``BASTION_NODE_<FIELD>`` for top-level scalar fields (``BASTION_NODE_MODEL``,
``BASTION_NODE_STORAGE_DIR``, ``BASTION_NODE_ID`` …), so a systemd unit can change a
setting without editing the file.  A bad file fails at start naming the field.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from pathlib import Path


from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bastion.errors import ConfigError
from bastion.hardware.backend_names import DeviceName
from bastion.lm_limits import MAX_NEW_TOKENS
from bastion.edge.rules_config import ObjectsConfig
from bastion.edge.sink_config import SinkConfig, check_sink_names
from bastion.models.textfiles import first_error, read_yaml_mapping
from bastion.runtime.sources import SourceSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # .inf / .nan in YAML are floats too


class SourceConfig(SourceSpec):
    """One camera/stream/file (what ``runtime/sources.py`` reads: a file, a directory, rtsp://…/http://…, or a
    USB camera 0, 1 … or /dev/video0) and the node's filters on its detections."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=200)  # a topic det.<name> fits a subscription
    classes: list[str] | None = None
    conf: float | None = Field(None, ge=0, le=1)
    roi: tuple[float, float, float, float] | None = None  # normalised x1, y1, x2, y2: keep boxes centred inside

    @field_validator("roi")
    @classmethod
    def _roi(cls, v):
        if v is not None and not (0 <= v[0] < v[2] <= 1 and 0 <= v[1] < v[3] <= 1):
            raise ValueError("roi must be normalised x1 < x2, y1 < y2 within [0, 1]")
        return v


class Endpoints(_Strict):
    events: str = "tcp://127.0.0.1:7700"
    control: str = "tcp://127.0.0.1:7701"

    def beyond_loopback(self) -> list[str]:
        return [e for e in (self.events, self.control) if not _is_loopback_endpoint(e)]


class Security(_Strict):
    """CurveZMQ: the node's secret certificate and the public certificates of allowed clients."""

    curve: bool | None = None  # None: on whenever an endpoint is beyond loopback
    server_secret_key: Path | None = None  # zmq certificate with secret key (bastion node keygen)
    allowed_clients: list[Path] = []  # public certificate files or directories of them
    allow_unsigned: bool = False  # DEVELOPMENT ONLY: run an unverified bundle (audited)
    audit_key: Path | None = None  # Ed25519 key signing audit checkpoints (default STORAGE/node-audit.key)


class Storage(_Strict):
    dir: Path = Path("node-data")
    retention_days: float | None = Field(30, gt=0, le=36500)
    max_mb: float | None = Field(None, gt=0, le=1e9)
    snapshots: bool = False  # keep an encrypted JPEG of every frame that produced an event
    snapshot_key: Path | None = None  # 256-bit hex key file (bastion node snapshot-key)
    # Evidence clips (docs/events.md "Evidence clips"): around each object.end and zone/line event, encrypted
    # with snapshot_key. Memory: per source at most clip_pre_s seconds and clip_ring_mb of JPEG frames.
    clips: bool = False
    clip_pre_s: float = Field(3.0, ge=0, le=30)  # seconds kept before the event …
    clip_post_s: float = Field(3.0, ge=0, le=30)  # … and recorded after it
    clip_fps: float = Field(10.0, ge=1, le=30)  # frames a second kept (a faster source is thinned)
    clip_max_width: int = Field(1280, ge=160, le=3840)  # wider frames are scaled down
    clip_quality: int = Field(80, ge=30, le=95)  # JPEG quality of the kept frames
    clip_codec: Literal["mjpeg", "mp4v", "h264"] = "mjpeg"  # mp4v / h264 fall back to mjpeg where unavailable
    clip_ring_mb: float = Field(32.0, ge=1, le=1024)  # per source
    clip_max_pending: int = Field(4, ge=1, le=32)  # clips recording or encoding at once; more are dropped
    clip_max_mb: float = Field(2048.0, ge=1, le=1e7)  # disk budget for clips, oldest pruned first

    @model_validator(mode="after")
    def _encrypted(self) -> "Storage":
        if (self.snapshots or self.clips) and self.snapshot_key is None:
            what = "snapshots" if self.snapshots else "clips"
            raise ValueError(
                f"{what} are stored encrypted: set storage.snapshot_key (bastion node snapshot-key --out FILE)"
            )
        return self


class NodeConfig(_Strict):
    id: str = Field("node-1", pattern=r"^[A-Za-z0-9_.-]+$")
    model: str = "yolov5n"
    imgsz: int | None = Field(None, ge=32, le=8192)
    conf: float = Field(0.25, ge=0, le=1)
    iou: float = Field(0.45, ge=0, le=1)
    threads: int | None = Field(None, ge=1, le=1024)
    device: DeviceName = "auto"  # auto or ort-cpu, ort-cuda, ort-trt, trt (hardware/backend_names.py; + aliases)
    queue_size: int = Field(4, ge=1, le=256)
    max_batch: int = Field(4, ge=1, le=64)
    int8_policy: Literal["warn", "strict"] = "warn"  # an INT8 bundle gated on another CPU class: audit, or refuse
    nation: str | None = Field(None, pattern=r"^[A-Z][A-Z0-9]{1,9}$")  # refuse bundles not releasable to it
    sources: list[SourceConfig] = Field(min_length=1)
    endpoints: Endpoints = Endpoints()
    security: Security = Security()
    storage: Storage = Storage()
    objects: ObjectsConfig | None = None  # tracker, object events, zones, lines (docs/events.md); None: v1 frames
    sinks: list[SinkConfig] = Field([], max_length=16)  # MQTT / NATS bridges fed from the store (docs/bridges.md)
    metrics: str | None = Field(None, max_length=300)  # Prometheus endpoint HOST:PORT, e.g. 127.0.0.1:9108
    metrics_allow_remote: bool = False  # serve metrics beyond loopback (unauthenticated: think first)
    lm: str | None = None  # a task: lm bundle for the ask op (verified like the detector)
    lm_max_new_tokens: int = Field(256, ge=1, le=MAX_NEW_TOKENS)
    lm_max_prompt_chars: int = Field(4000, ge=1, le=8192)  # a request carries at most 8192
    lm_queue: int = Field(4, ge=0, le=64)  # asks that wait behind the one generating; more get 'busy'
    # Every interval is bounded: .inf would kill the thread that waits on it, a microsecond would spin a core.
    heartbeat_s: float = Field(1.0, ge=0.05, le=3600)
    health_log_s: float = Field(30.0, ge=1, le=86400)
    audit_checkpoint_s: float = Field(60.0, ge=1, le=86400)  # sign the audit head this often (and at stop)
    trust_recheck_s: float = Field(10.0, ge=1, le=86400)  # re-verify running bundles (edge/trust_recheck.py)
    control_rate_per_s: float = Field(50.0, gt=0, le=100_000)  # control requests per client, sustained
    control_burst: int = Field(100, ge=1, le=100_000)  # … and in one burst (docs/protocol.md "Limits")

    @model_validator(mode="after")
    def _checks(self) -> "NodeConfig":
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique: {names}")
        if self.objects is not None:
            self.objects.check_sources(names)
        check_sink_names(self.sinks)
        if self.storage.clips and (self.objects is None or self.objects.tracker == "none"):
            raise ValueError(
                "storage.clips needs tracked objects (an objects: section): clips are kept for "
                "object.end and zone/line events"
            )
        if self.metrics is not None:
            host, _ = metrics_address(self.metrics)
            if not self.metrics_allow_remote and not _is_loopback_endpoint(f"tcp://{host}:0"):
                raise ValueError(
                    f"metrics: {self.metrics} is beyond loopback and metrics are not authenticated: bind "
                    "127.0.0.1:PORT, or set metrics_allow_remote: true"
                )
        if self.curve_enabled and self.security.server_secret_key is None:
            raise ValueError("security.server_secret_key is required with CurveZMQ (bastion node keygen)")
        if self.endpoints.beyond_loopback() and self.security.curve is False:
            raise ValueError(
                f"endpoints {self.endpoints.beyond_loopback()} are beyond loopback: CurveZMQ "
                "cannot be turned off for them"
            )
        return self

    @property
    def curve_enabled(self) -> bool:
        return bool(self.security.curve) or (self.security.curve is None and bool(self.endpoints.beyond_loopback()))

    def sha256(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


def metrics_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) of the metrics endpoint; a ValueError names what is wrong."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"metrics must be HOST:PORT (e.g. 127.0.0.1:9108), not {value!r}")
    return host, int(port)


def _is_loopback_endpoint(endpoint: str) -> bool:
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = endpoint.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', an interface name or a hostname: beyond loopback


def load_config(path: Path | None, overrides: dict | None = None) -> NodeConfig:
    data: dict = {}
    if path is not None:
        path = Path(path)
        data = read_yaml_mapping(path, "node config", "write an example with: bastion node init")
    for key in NodeConfig.model_fields:
        env = os.environ.get(f"BASTION_NODE_{key.upper()}")
        if env is not None:
            data[key] = env
    data.update(overrides or {})
    try:
        config = NodeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"node config {path or ''}: {first_error(exc, 'config')}") from None
    if path is not None:
        _resolve_relative_paths(config, path.resolve().parent)
    return config


def _resolve_relative_paths(config: NodeConfig, base: Path) -> None:
    """Paths written in node.yaml mean paths next to node.yaml, whatever directory the node is started from."""

    def rel(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else base / p

    config.storage.dir = rel(config.storage.dir)
    config.storage.snapshot_key = rel(config.storage.snapshot_key)
    config.security.server_secret_key = rel(config.security.server_secret_key)
    config.security.audit_key = rel(config.security.audit_key)
    config.security.allowed_clients = [rel(p) for p in config.security.allowed_clients]
    for sink in config.sinks:  # secrets and certificates of the bridges (docs/bridges.md)
        sink.password_file = rel(sink.password_file)
        if sink.tls is not None:
            sink.tls.ca, sink.tls.cert, sink.tls.key = rel(sink.tls.ca), rel(sink.tls.cert), rel(sink.tls.key)
    for source in config.sources:
        uri = source.uri
        if isinstance(uri, str) and not uri.isdigit() and "://" not in uri and not Path(uri).is_absolute():
            source.uri = str(base / uri)
    for name in ("model", "lm"):  # a bundle path next to the config; a registry or zoo name stays a name
        value = getattr(config, name)
        if value and not Path(value).is_absolute() and (base / value).exists():
            setattr(config, name, str(base / value))

"""The ``sinks:`` list of ``NodeConfig``: one typed entry per bridge, told apart by ``type`` (docs/bridges.md).

An unknown ``type`` or a field another type has is refused at config load in one line (pydantic's
discriminated union), before anything connects. Secrets are files (``password_file``), not YAML values: the
node's config is hashed into its audit log (``node_start``'s ``config_sha256``, so a password in it would be
guessable offline from the log) and node.yaml is a file operators read, copy and paste into reports; a password
file can be ``0600`` and owned by the node's user alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

NAME = r"^[A-Za-z0-9_.-]+$"


class SinkTLS(BaseModel):
    """TLS to the broker: a CA to trust (default: the system's), and a client certificate where the broker asks."""

    model_config = ConfigDict(extra="forbid")

    ca: Path | None = None
    cert: Path | None = None  # client certificate (PEM) ...
    key: Path | None = None  # ... and its private key

    @model_validator(mode="after")
    def _pair(self) -> "SinkTLS":
        if (self.cert is None) != (self.key is None):
            raise ValueError("tls.cert and tls.key go together (a client certificate and its key)")
        return self


class _SinkBase(BaseModel):
    """What every sink has: a name (its cursor in the store) and the bounds of its forwarding loop."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str | None = Field(None, pattern=NAME, max_length=100)  # default: the type; unique per node
    batch: int = Field(200, ge=1, le=10_000)  # events read from the store per round
    max_in_flight: int = Field(100, ge=1, le=10_000)  # published, not yet acknowledged
    connect_timeout_s: float = Field(5.0, ge=0.1, le=300)
    ack_timeout_s: float = Field(10.0, ge=0.1, le=300)  # for a whole window of in-flight events
    backoff_s: float = Field(0.5, ge=0.05, le=60)  # first retry after a failure, doubling ...
    backoff_max_s: float = Field(30.0, ge=0.1, le=3600)  # ... up to this
    # the store wakes a sink at each commit; an idle sink looks anyway after this long (a backstop, not a poll)
    poll_s: float = Field(5.0, ge=0.01, le=60)
    username: str | None = Field(None, max_length=256)
    password_file: Path | None = None  # the password, alone in a file (trailing newline ignored)
    tls: SinkTLS | None = None

    @property
    def cursor_name(self) -> str:
        return self.name or self.type  # type: ignore[attr-defined]


class MqttSinkConfig(_SinkBase):
    """MQTT 3.1.1, QoS 1: topics ``<topic_prefix>/<node>/<kind>/<source>``, node status retained."""

    type: Literal["mqtt"]
    host: str = Field("127.0.0.1", min_length=1, max_length=253)
    port: int | None = Field(None, ge=1, le=65535)  # default 1883, or 8883 with tls
    topic_prefix: str = Field("bastion", pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$", max_length=200)
    client_id: str | None = Field(None, pattern=NAME, max_length=23)  # default bastion-<node>-<name>, clipped
    keepalive_s: int = Field(30, ge=5, le=3600)


class NatsSinkConfig(_SinkBase):
    """NATS JetStream: subjects ``<subject_prefix>.<node>.<kind>.<source>``, a stream created when missing."""

    type: Literal["nats"]
    url: str = Field("nats://127.0.0.1:4222", pattern=r"^(nats|tls)://[^\s]+$", max_length=500)
    stream: str = Field("BASTION", pattern=r"^[A-Za-z0-9_-]+$", max_length=100)
    subject_prefix: str = Field("bastion", pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$", max_length=200)


SinkConfig = Annotated[MqttSinkConfig | NatsSinkConfig, Field(discriminator="type")]


def check_sink_names(sinks: list[MqttSinkConfig | NatsSinkConfig]) -> None:
    """Each sink's cursor is its name: two sinks with one name would share (and corrupt) one cursor."""
    names = [s.cursor_name for s in sinks]
    if len(set(names)) != len(names):
        raise ValueError(f"sink names must be unique (set `name:` on each sink of one type): {names}")

"""The wire protocol (docs/protocol.md): typed messages, JSON on the wire, versioned.

events (PUB):   frames [topic, payload]; topic ``det.<source>`` (detections) or ``hb`` (heartbeat).
control (ROUTER/DEALER): one JSON request → one JSON reply ``{"id", "ok", ...}`` (or a stream for ``ask``).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bastion.models.textfiles import first_error

PROTOCOL_VERSION = 1
MAX_REQUEST_BYTES = 64 * 1024
EVENT_TOPIC_PREFIX = b"det."
HEARTBEAT_TOPIC = b"hb"


class DetectionItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cls: int
    name: str
    conf: float
    box: list[float] = Field(min_length=4, max_length=4)
    track: int | None = None


class DetectionEvent(BaseModel):
    """One processed frame with detections, as stored and as published."""

    model_config = ConfigDict(extra="forbid")

    v: int = PROTOCOL_VERSION
    seq: int
    node: str
    source: str
    ts: float  # unix seconds when the frame was read
    frame: int
    model: str  # bundle sha256
    detections: list[DetectionItem]

    def topic(self) -> bytes:
        return EVENT_TOPIC_PREFIX + self.source.encode()

    def to_wire(self) -> bytes:
        return self.model_dump_json().encode()


class Heartbeat(BaseModel):
    v: int = PROTOCOL_VERSION
    node: str
    ts: float
    last_seq: int
    audit_count: int | None = None  # records in the node's audit log and the hash of the last one
    audit_head: str | None = None  # (bastion audit verify --expect-count/--expect-head)


class ControlRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    op: Literal["status", "replay", "reload", "ask", "ping", "snapshot"]
    id: str | int | None = None
    since: int = Field(0, ge=0)
    seq: int = Field(0, ge=0)
    limit: int = Field(500, ge=1, le=5000)
    bundle: str | None = None
    prompt: str | None = Field(None, max_length=8192)
    max_new_tokens: int = Field(128, ge=1, le=4096)


class ProtocolError(ValueError):
    """A message that is not valid protocol; the reply says why."""


def parse_request(raw: bytes) -> ControlRequest:
    if len(raw) > MAX_REQUEST_BYTES:
        raise ProtocolError(f"request of {len(raw)} bytes exceeds the {MAX_REQUEST_BYTES}-byte limit")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"request is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError("request must be a JSON object with an 'op'")
    try:
        return ControlRequest.model_validate(data)
    except ValidationError as exc:
        raise ProtocolError(first_error(exc, "request")) from None


def reply(request_id: Any, ok: bool = True, **fields: Any) -> bytes:
    return json.dumps({"v": PROTOCOL_VERSION, "id": request_id, "ok": ok, **fields}, default=str).encode()

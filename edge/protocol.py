"""The wire protocol (docs/protocol.md): typed messages, JSON on the wire, versioned.

events (PUB):   frames [topic, payload]; topic ``det.<source>`` (detections), ``obj.<source>`` (object events,
                protocol v2: edge/events_v2.py) or ``hb`` (heartbeat).
control (ROUTER/DEALER): one JSON request → one JSON reply ``{"id", "ok", ...}`` (or a stream for ``ask``).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from bastion.lm_limits import MAX_NEW_TOKENS

PROTOCOL_VERSION = 1
MAX_REQUEST_BYTES = 64 * 1024  # all frames of one request together, counted before anything is kept
MAX_REQUEST_FRAMES = 3  # routing id + (REQ's empty delimiter) + the JSON request
MAX_ID_CHARS = 128  # a request id longer than this is not echoed
MAX_SEQ = 2**63 - 1  # SQLite's INTEGER; a larger seq cannot exist
MAX_ERROR_CHARS = 200  # an error reply never grows with what the client sent
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


RequestId = (
    Annotated[str, Field(strict=True, max_length=MAX_ID_CHARS)]
    | Annotated[int, Field(strict=True, ge=-MAX_SEQ, le=MAX_SEQ)]
)


class _Request(BaseModel):
    """What every control request has: its op (the discriminator) and an optional id the reply echoes.

    Each op is its own model with only its own fields, each bounded, and no others
    (``extra="forbid"``): a field of another op is refused like any unknown one.  Strict types too: a number
    field takes a JSON integer, never ``"5"``, ``5.0`` or ``true`` (pydantic's lax mode would coerce each to 5 or
    1), a flag ``true``/``false`` only, a text field a string — a client that sends anything else has a bug this
    reply names, instead of a request the node guessed at.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    id: RequestId | None = None


class PingRequest(_Request):
    op: Literal["ping"]


class StatusRequest(_Request):
    op: Literal["status"]


class ReplayRequest(_Request):
    op: Literal["replay"]
    since: int = Field(0, ge=0, le=MAX_SEQ)
    limit: int = Field(500, ge=1, le=5000)
    v: int = Field(1, ge=1, le=2)  # the reader's protocol: a v1 reader is refused object events (docs/protocol.md)


class ReloadRequest(_Request):
    op: Literal["reload"]
    bundle: str = Field(min_length=1, max_length=4096)  # PATH_MAX
    allow_downgrade: bool = False  # an older version of the running model only when asked (#15 item 9)
    persist: bool = False  # also after a restart: the node pins this bundle (edge/pin.py; admins only, as reload)


class SnapshotRequest(_Request):
    op: Literal["snapshot"]
    seq: int = Field(ge=0, le=MAX_SEQ)


class ClipRequest(_Request):
    op: Literal["clip"]
    seq: int = Field(ge=0, le=MAX_SEQ)
    offset: int = Field(0, ge=0, le=MAX_SEQ)  # video bytes already read: answers come in chunks (docs/protocol.md)


class AskRequest(_Request):
    op: Literal["ask"]
    prompt: str = Field(min_length=1, max_length=8192)  # the node's lm_max_prompt_chars may allow less
    max_new_tokens: int = Field(128, ge=1, le=MAX_NEW_TOKENS)  # the generator's own limit (bastion.lm_limits)


ControlRequest = Annotated[
    PingRequest | StatusRequest | ReplayRequest | ReloadRequest | SnapshotRequest | ClipRequest | AskRequest,
    Field(discriminator="op"),
]
_CONTROL_REQUEST = TypeAdapter(ControlRequest)
OPS: tuple[str, ...] = tuple(_CONTROL_REQUEST.json_schema()["discriminator"]["mapping"])  # every op there is


class ProtocolError(ValueError):
    """A message that is not valid protocol; the reply says why, echoing the request's id if it could be read."""

    def __init__(self, message: str, request_id: str | int | None = None) -> None:
        super().__init__(_clip(message))
        self.request_id = request_id


def json_or_none(raw: bytes) -> Any:
    """``raw`` parsed as JSON, or None for anything that is not (bad bytes, nesting too deep, a 5000-digit int):
    what a peer sends is never a RecursionError or ValueError in the reader."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def readable_id(data: object) -> str | int | None:
    """The request's ``id`` when it is one a reply may echo (a short string or an int), else None."""
    rid = data.get("id") if isinstance(data, dict) else None
    if isinstance(rid, str) and len(rid) <= MAX_ID_CHARS:
        return rid
    if isinstance(rid, int) and not isinstance(rid, bool) and -MAX_SEQ <= rid <= MAX_SEQ:
        return rid
    return None


def parse_request(raw: bytes) -> ControlRequest:
    """A validated request, or ProtocolError: one short line, never an internal error, whatever ``raw`` holds."""
    if len(raw) > MAX_REQUEST_BYTES:
        raise ProtocolError(f"request of {len(raw)} bytes exceeds the {MAX_REQUEST_BYTES}-byte limit")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ProtocolError("request is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an int of more than 4300 digits
        raise ProtocolError(f"request is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError("request must be a JSON object with an 'op'")
    request_id = readable_id(data)
    op = data.get("op")
    if op not in OPS:  # said plainly, before the union's own message (which would quote a long op in full)
        what = "has no 'op'" if op is None else f"has an unknown op {_clip_op(op)}"
        raise ProtocolError(f"request {what}; ops: {', '.join(OPS)}", request_id)
    try:
        return _CONTROL_REQUEST.validate_python(data)
    except ValidationError as exc:
        raise ProtocolError(_first_error(exc), request_id) from None
    except RecursionError:
        raise ProtocolError("request is nested too deeply", request_id) from None


def _clip_op(op: object) -> str:
    text = json.dumps(op) if isinstance(op, str) else type(op).__name__
    return text if len(text) <= 40 else f"{text[:40]}…"


def _first_error(exc: ValidationError) -> str:
    """'OP: field: message' for the first problem (pydantic puts the op's tag first in the location)."""
    first = exc.errors()[0]
    op, *where = first["loc"] or ("request",)
    field = ".".join(str(p) for p in where)
    return f"{op}: {field}: {first['msg']}" if field else f"{op}: {first['msg']}"


def _clip(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else f"{text[:MAX_ERROR_CHARS]}…"


def reply(request_id: Any, ok: bool = True, **fields: Any) -> bytes:
    if not ok and isinstance(fields.get("error"), str):
        fields["error"] = _clip(fields["error"])
    return json.dumps({"v": PROTOCOL_VERSION, "id": request_id, "ok": ok, **fields}, default=str).encode()

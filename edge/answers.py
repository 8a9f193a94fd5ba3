"""What the SDK accepts from a node: its answers and its published messages, checked before use (#15).

A node can be broken, of another version, or an impostor on the same address; whatever it sends, the integrator's
program sees a ``BastionError`` (``NodeRequestError``: "the node's answer to OP …"), never a KeyError, ValueError or
pydantic ValidationError from inside the SDK.

Answers to requests (``status``, ``replay``, ``snapshot``) are the truth the client acts on; a malformed one raises.
Published messages (PUB) are only hints that something new exists — the store behind ``replay`` holds every event —
so a malformed one is skipped, counted and logged; ``Published.seq`` keeps the seq a broken event claims, so the
client still fetches that event from the store (see ``Client.events``).
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bastion.edge.events_v2 import OBJECT_TOPIC_PREFIX, parse_event
from bastion.edge.protocol import (
    EVENT_TOPIC_PREFIX,
    HEARTBEAT_TOPIC,
    MAX_SEQ,
    DetectionEvent,
    Heartbeat,
    json_or_none,
)
from bastion.errors import BastionError
from bastion.models.textfiles import first_error

log = logging.getLogger(__name__)

HINT = "is this endpoint a bastion node of this version?"
_LOG_FIRST, _LOG_EVERY = 10, 1000  # a flood of garbage must not become a flood of log lines


class NodeRequestError(BastionError):
    """The node answered with an error, or with an answer that is not what the protocol says."""


def bad_answer(op: str, what: str) -> NodeRequestError:
    what = what if len(what) <= 200 else f"{what[:200]}…"
    return NodeRequestError(f"the node's answer to {op} {what}", HINT)


def _why(exc: Exception, default: str) -> str:
    return first_error(exc, default) if isinstance(exc, ValidationError) else "is nested too deeply"


class _Audit(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    count: int | None = Field(None, ge=0)
    head: str | None = None


class _Status(BaseModel):
    """The fields of a status answer the client relies on; the rest is passed through to the caller as it came."""

    model_config = ConfigDict(extra="allow", strict=True)

    node: str = Field(max_length=256)
    last_seq: int = Field(ge=0, le=MAX_SEQ)
    audit: _Audit | None = None


def status(answer: dict[str, Any]) -> dict[str, Any]:
    raw = answer.get("status")
    try:
        _Status.model_validate(raw)
    except (ValidationError, RecursionError) as exc:
        raise bad_answer("status", f"is not a node status ({_why(exc, 'status')})") from None
    return raw


def events_endpoint(status_: dict[str, Any]) -> str:
    endpoints = status_.get("endpoints")
    bound = endpoints.get("events") if isinstance(endpoints, dict) else None
    if not isinstance(bound, str):
        raise bad_answer("status", "names no events endpoint (give Client(events=…) if you know it)")
    return bound


def replay(answer: dict[str, Any], since: int) -> tuple[list[DetectionEvent], int | None]:
    """The page's events (strictly ascending, after ``since``) and the node's ``last_seq`` if it sent one.

    An invalid event here raises: the store is the only full copy, so skipping it would lose it for good."""
    raw = answer.get("events")
    if not isinstance(raw, list):
        raise bad_answer("replay", "holds no list of events")
    events: list[DetectionEvent] = []
    for item in raw:
        try:
            event = parse_event(item)  # a v1 frame event or a typed v2 object event (edge/events_v2.py)
        except (ValidationError, RecursionError) as exc:
            seq = item.get("seq") if isinstance(item, dict) else None
            raise bad_answer("replay", f"holds an invalid event (seq {seq!r:.20}): {_why(exc, 'event')}") from None
        if event.seq <= (events[-1].seq if events else since):
            raise bad_answer("replay", f"is out of order (seq {event.seq} after {events[-1].seq if events else since})")
        events.append(event)
    last_seq = answer.get("last_seq")
    if last_seq is not None and (not isinstance(last_seq, int) or isinstance(last_seq, bool)):
        raise bad_answer("replay", f"has a last_seq that is not a number ({last_seq!r:.20})")
    return events, last_seq


def snapshot(answer: dict[str, Any]) -> bytes:
    raw = answer.get("jpeg_b64")
    try:
        if not isinstance(raw, str):
            raise ValueError
        return base64.b64decode(raw, validate=True)
    except (ValueError, binascii.Error):
        raise bad_answer("snapshot", "holds no base64 image (jpeg_b64)") from None


def text_piece(answer: dict[str, Any]) -> str:
    text = answer.get("text") or ""
    if not isinstance(text, str):
        raise bad_answer("ask", f"holds text that is not a string ({type(text).__name__})")
    return text


@dataclass
class Published:
    """One message from the events socket: a heartbeat, an event, or a broken one (``seq``: what it claims)."""

    heartbeat: Heartbeat | None = None
    event: DetectionEvent | None = None
    seq: int | None = None


def published(frames: list[bytes], skipped: int) -> Published:
    """The message; a malformed one has neither heartbeat nor event, and is logged (``skipped``: how many before)."""
    why = f"{len(frames)} frames, not 2"
    if len(frames) == 2:
        topic, payload = frames
        try:
            if topic == HEARTBEAT_TOPIC:
                return Published(heartbeat=Heartbeat.model_validate_json(payload))
            if topic.startswith(EVENT_TOPIC_PREFIX):
                return Published(event=DetectionEvent.model_validate_json(payload))
            if topic.startswith(OBJECT_TOPIC_PREFIX):
                return Published(event=parse_event(payload))  # type: ignore[arg-type]
            why = f"unknown topic {topic[:40]!r}"
        except (ValueError, RecursionError) as exc:  # ValidationError, and JSON that is not JSON
            why = _why(exc, "message")
    if skipped < _LOG_FIRST or skipped % _LOG_EVERY == 0:
        log.warning(
            "skipped a malformed message from the node's events socket (%s; %d so far); the events "
            "themselves come from its store",
            why[:200],
            skipped + 1,
        )
    return Published(seq=_claimed_seq(frames))


def _claimed_seq(frames: list[bytes]) -> int | None:
    """The seq a broken event names, if it names one: that event is then fetched from the store, not lost."""
    if len(frames) != 2 or not frames[0].startswith((EVENT_TOPIC_PREFIX, OBJECT_TOPIC_PREFIX)):
        return None
    data = json_or_none(frames[1])
    seq = data.get("seq") if isinstance(data, dict) else None
    if isinstance(seq, int) and not isinstance(seq, bool) and 0 < seq <= MAX_SEQ:
        return seq
    return None

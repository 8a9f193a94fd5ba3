"""Protocol v2 events: object events on the wire and in the store, beside v1 frame events (docs/protocol.md).

A v1 frame event (``DetectionEvent``, topic ``det.<source>``) keeps its exact shape, so a node without an
``objects:`` section is a v1 node for every reader. An object event (``object.new`` … ``line.cross``, meaning
in docs/events.md) is the ``ObjectEvent`` record inside a small envelope: ``v: 2``, the store's ``seq``, the
node and the model, published on topic ``obj.<source>``. A reader tells them apart by ``kind``: present on
every v2 event, absent on a frame event (whose kind is ``det``).

Each kind is its own pydantic class (``ObjectNew``, ``LineCross`` …) in one discriminated union, so a reader
switches on the class and finds only fields that mean something for it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import Field, TypeAdapter, ValidationError

from bastion.edge.object_events import OBJECT_EVENT_KINDS, ObjectEvent
from bastion.edge.protocol import DetectionEvent
from bastion.edge.store import StorageError

if TYPE_CHECKING:
    from bastion.edge.store import EventStore

OBJECT_PROTOCOL_VERSION = 2
OBJECT_TOPIC_PREFIX = b"obj."
FRAME_KIND = "det"  # the kind of a v1 frame event (it carries no kind field: v1 readers forbid unknown fields)
EVENT_KINDS: tuple[str, ...] = (FRAME_KIND, *OBJECT_EVENT_KINDS)


class ObjectEventMessage(ObjectEvent):
    """An object event as stored and published: the layer's record plus the envelope every event has."""

    v: Literal[2] = OBJECT_PROTOCOL_VERSION
    seq: int
    node: str
    model: str  # bundle sha256 of the model that saw it

    def topic(self) -> bytes:
        return OBJECT_TOPIC_PREFIX + self.source.encode()

    def to_wire(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


# -- one class per kind, for readers (Client.events) ---------------------------------------------------------
class ObjectNew(ObjectEventMessage):
    kind: Literal["object.new"]


class ObjectUpdate(ObjectEventMessage):
    kind: Literal["object.update"]


class ObjectEnd(ObjectEventMessage):
    kind: Literal["object.end"]


class ZoneEnter(ObjectEventMessage):
    kind: Literal["zone.enter"]


class ZoneLeave(ObjectEventMessage):
    kind: Literal["zone.leave"]


class Loiter(ObjectEventMessage):
    kind: Literal["loiter"]


class LineCross(ObjectEventMessage):
    kind: Literal["line.cross"]


TypedObjectEvent = Annotated[
    Union[ObjectNew, ObjectUpdate, ObjectEnd, ZoneEnter, ZoneLeave, Loiter, LineCross], Field(discriminator="kind")
]
_TYPED = TypeAdapter(TypedObjectEvent)
NodeEvent = Union[DetectionEvent, ObjectEventMessage]


def parse_event(data: Any) -> NodeEvent:
    """A frame event (no ``kind``) or the typed object event its ``kind`` names; ValidationError/ValueError else."""
    if isinstance(data, (bytes, str)):
        data = json.loads(data)
    if isinstance(data, dict) and "kind" in data:
        return _TYPED.validate_python(data)
    return DetectionEvent.model_validate(data)


def kind_of(event: NodeEvent) -> str:
    return getattr(event, "kind", FRAME_KIND)


def check_kinds(kinds: list[str] | tuple[str, ...] | None) -> frozenset[str] | None:
    """The kinds a reader asked for, or ValueError naming an unknown one (a typo would otherwise match nothing)."""
    if kinds is None:
        return None
    unknown = [k for k in kinds if k not in EVENT_KINDS]
    if unknown:
        raise ValueError(f"unknown event kind {unknown[0]!r}; kinds: {', '.join(EVENT_KINDS)}")
    return frozenset(kinds)


def is_object_payload(payload: str) -> bool:
    """Whether a stored payload is a v2 object event (cheap: no validation)."""
    try:
        data = json.loads(payload)
    except ValueError:
        return False
    return isinstance(data, dict) and "kind" in data


__all__ = [
    "EVENT_KINDS",
    "LineCross",
    "Loiter",
    "NodeEvent",
    "ObjectEnd",
    "ObjectEventMessage",
    "ObjectNew",
    "ObjectUpdate",
    "V1ReaderRefused",
    "ValidationError",
    "ZoneEnter",
    "ZoneLeave",
    "check_kinds",
    "kind_of",
    "parse_event",
]


class V1ReaderRefused(StorageError):
    """A replay for a v1 reader met a v2 object event: refused in one line rather than served half a stream."""


V1_REFUSAL = (
    "this node publishes protocol v2 object events (seq {seq}: {kind}) that a protocol v1 reader cannot read: "
    "upgrade bastion on the reading side, or remove objects: from the node's config (docs/protocol.md)"
)


def event_v(event: NodeEvent) -> int:
    return event.v


def read_events(store: "EventStore", since: int, limit: int, reader_v: int = 2) -> list[NodeEvent]:
    """Up to ``limit`` stored events after ``since``, frame and object events alike (``EventStore.since`` knows
    only frame events). A row that is not an event puts the store in its error state, like ``since`` does."""
    events: list[NodeEvent] = []
    for seq, _, payload in store.rows_since(since, limit):
        try:
            event = parse_event(payload)
        except (ValueError, RecursionError) as exc:  # ValidationError is a ValueError
            raise store._failed(ValueError(f"a stored row is not an event: {exc}"), "read events from") from None
        if reader_v < OBJECT_PROTOCOL_VERSION and isinstance(event, ObjectEventMessage):
            raise V1ReaderRefused(V1_REFUSAL.format(seq=seq, kind=event.kind))
        events.append(event)
    return events

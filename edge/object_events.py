"""``ObjectEvent``: what the object layer says about tracked objects (schema and semantics: docs/events.md).

One flat, typed record per event; each kind fills the fields that mean something for it and leaves the
rest None (``to_dict`` drops them), so a reader switches on ``kind`` and never meets a half-filled union.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ObjectEventKind = Literal[
    "object.new", "object.update", "object.end", "zone.enter", "zone.leave", "loiter", "line.cross"
]
OBJECT_EVENT_KINDS: tuple[str, ...] = ObjectEventKind.__args__  # type: ignore[attr-defined]


class ObjectEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: ObjectEventKind
    source: str
    ts: float  # unix seconds of the frame that caused it (object.end: the frame that ended the track)
    frame: int  # that frame's index in its source
    track: int  # the object's id: per source, stable across frames, never reused within a node
    cls: int  # the object's class: the class with the most confidence summed over its sightings
    name: str
    conf: float  # confidence of the latest sighting
    box: list[float] = Field(min_length=4, max_length=4)  # latest box, x1 y1 x2 y2 in original pixels
    # object.new / object.update / object.end
    first_seen: float | None = None
    last_seen: float | None = None
    best_conf: float | None = None
    best_frame: int | None = None  # the frame of the best sighting (held to best_conf; not always snapshotted)
    # with storage.snapshots: the seq whose snapshot is the best frame stored of this object — object.new's, or
    # an object.update's that stored a higher-confidence sighting (its own seq then); null without snapshots
    best_snapshot_seq: int | None = None
    zones: list[str] | None = None  # the zones the object is in now
    reason: str | None = None  # object.update: class|zone|conf|periodic; object.end/zone.leave: lost|stop|left
    # zone.enter / zone.leave / loiter
    zone: str | None = None
    dwell_s: float | None = None  # zone.leave, loiter: seconds since it entered
    # line.cross
    line: str | None = None
    direction: Literal["in", "out"] | None = None
    count_in: int | None = None  # the line's running counts on this source, this crossing included
    count_out: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)

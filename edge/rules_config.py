"""``objects:`` in the node config: the tracker, when objects are announced, and the zones and lines.

Everything is checked when the config loads, so a bad rule is one line at start, not a surprise at the
first person who walks past: an unknown tracker, a zone that intersects itself or leaves [0, 1], a line of
zero length, a rule naming a source the node does not have. Coordinates are normalised (0–1, x right,
y down), so a rule survives a change of camera resolution. Event semantics: docs/events.md.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bastion.edge.geometry import Point, polygon_problem

RULE_NAME = r"^[A-Za-z0-9_.-]+$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _normalised(points: list[Point], what: str) -> list[Point]:
    for x, y in points:
        if not (0 <= x <= 1 and 0 <= y <= 1):
            raise ValueError(f"{what} point ({x}, {y}) lies outside [0, 1]: coordinates are fractions of the frame")
    return points


class RuleConfig(_Strict):
    name: str = Field(pattern=RULE_NAME, max_length=100)
    source: str | None = None  # the source it applies to; None: every source
    classes: list[str] | None = Field(None, max_length=1000)  # class names it counts; None: all
    min_area: float = Field(0.0, ge=0, le=1)  # smallest box counted, as a fraction of the frame's area

    @field_validator("classes")
    @classmethod
    def _some(cls, classes: list[str] | None) -> list[str] | None:
        if classes == []:  # would count nothing, silently: the operator meant "all" or forgot a name
            raise ValueError("classes: [] counts no class at all: name some, or leave classes out to count every class")
        return classes


class ZoneConfig(RuleConfig):
    """A polygon: ``zone.enter``/``zone.leave`` with dwell time, ``loiter`` once per visit after ``loiter_s``."""

    points: list[Point] = Field(min_length=3, max_length=64)
    loiter_s: float | None = Field(None, gt=0, le=86400 * 7)

    @field_validator("points")
    @classmethod
    def _shape(cls, points: list[Point]) -> list[Point]:
        _normalised(points, "zone")
        problem = polygon_problem(points)
        if problem:
            raise ValueError(f"{problem}: list the corners in order around the zone")
        return points


class LineConfig(RuleConfig):
    """A directed segment a→b: ``line.cross`` with direction ``in`` (left of a→b to its right, as drawn on
    the image) or ``out``, and the running counts of each."""

    a: Point
    b: Point

    @model_validator(mode="after")
    def _length(self) -> "LineConfig":
        _normalised([self.a, self.b], "line")
        if abs(self.a[0] - self.b[0]) < 1e-6 and abs(self.a[1] - self.b[1]) < 1e-6:
            raise ValueError(f"line {self.name!r} has zero length (a == b): give two different points")
        return self


class ObjectsConfig(_Strict):
    """The tracker (ByteTrack's thresholds), the object-event policy, and the rules."""

    tracker: str = "bytetrack"  # a key of edge/tracking.py TRACKERS: bytetrack | none
    track_thresh: float = Field(0.5, ge=0, le=1)  # detections at or above: first association
    low_thresh: float = Field(0.1, ge=0, le=1)  # between this and track_thresh: second association only
    new_track_thresh: float = Field(0.6, ge=0, le=1)  # an unmatched detection starts a track from here
    match_thresh: float = Field(0.8, gt=0, le=1)  # first association: largest 1 - IoU accepted
    track_buffer: int = Field(30, ge=1, le=100_000)  # frames a lost track waits to be found again
    min_hits: int = Field(3, ge=1, le=10_000)  # frames seen before object.new (and any rule event)
    update_s: float = Field(10.0, gt=0, le=86400)  # object.update at least this often while seen
    update_min_s: float = Field(1.0, ge=0, le=86400)  # … and never more often than this
    conf_jump: float = Field(0.2, gt=0, le=1)  # a confidence change this large is worth an update
    anchor: Literal["bottom", "center"] = "bottom"  # the box point tested against zones and lines
    frame_events: bool = False  # also store/publish one event per frame with detections (topic det.<source>)
    zones: list[ZoneConfig] = Field([], max_length=256)
    lines: list[LineConfig] = Field([], max_length=256)

    @field_validator("tracker")
    @classmethod
    def _known_tracker(cls, name: str) -> str:
        from bastion.edge.tracking import TRACKERS  # the registry lives with the trackers

        if name not in TRACKERS:
            raise ValueError(f"unknown tracker {name!r}; known: {', '.join(sorted(TRACKERS))}")
        return name

    @model_validator(mode="after")
    def _consistent(self) -> "ObjectsConfig":
        if self.low_thresh > self.track_thresh:
            raise ValueError(f"low_thresh {self.low_thresh} is above track_thresh {self.track_thresh}")
        for kind, rules in (("zone", self.zones), ("line", self.lines)):
            seen: set[tuple[str | None, str]] = set()
            for rule in rules:
                if (rule.source, rule.name) in seen:
                    raise ValueError(f"two {kind}s are named {rule.name!r}: names must be unique")
                seen.add((rule.source, rule.name))
        return self

    def check_sources(self, names: list[str]) -> None:
        """ValueError naming the first rule whose ``source`` is not one of the node's ``names``."""
        for kind, rules in (("zones", self.zones), ("lines", self.lines)):
            for rule in rules:
                if rule.source is not None and rule.source not in names:
                    raise ValueError(
                        f"objects.{kind} {rule.name!r} names source {rule.source!r}; the sources are {names}"
                    )

    def zones_for(self, source: str) -> list[ZoneConfig]:
        return [z for z in self.zones if z.source in (None, source)]

    def lines_for(self, source: str) -> list[LineConfig]:
        return [ln for ln in self.lines if ln.source in (None, source)]

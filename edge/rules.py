"""Zones and lines: turn tracked positions into ``zone.enter``/``zone.leave``/``loiter`` and ``line.cross``.

Each rule keeps its own small state per track id and is stepped once a frame with the announced objects
seen in that frame (edge/object_layer.py decides who is announced). An object not seen in a frame (occluded,
or missed by the detector) keeps its state: it has not left a zone just because one frame lost it. When its
track ends, ``end`` closes what it had open (a zone visit ends with ``zone.leave``, reason ``lost``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bastion.edge.geometry import Point, cross, inside_polygon, segments_cross
from bastion.edge.rules_config import LineConfig, RuleConfig, ZoneConfig


@dataclass
class Sighting:
    """An announced object as seen in this frame, in the rules' terms."""

    track: int
    name: str  # the object's class name
    anchor: Point  # normalised point tested against zones and lines (bottom centre or centre of the box)
    area: float  # box area / frame area


@dataclass
class RuleHit:
    """What a rule saw happen; the object layer turns it into an ``ObjectEvent``."""

    kind: str  # zone.enter | zone.leave | loiter | line.cross
    track: int
    zone: str | None = None
    dwell_s: float | None = None
    reason: str | None = None
    line: str | None = None
    direction: str | None = None
    count_in: int | None = None
    count_out: int | None = None


def counts(rule: RuleConfig, obj: Sighting) -> bool:
    """Whether ``rule`` counts ``obj``: its class filter and minimum size."""
    return (rule.classes is None or obj.name in rule.classes) and obj.area >= rule.min_area


class ZoneRule:
    def __init__(self, cfg: ZoneConfig) -> None:
        self.cfg = cfg
        self.polygon = np.asarray(cfg.points, dtype=np.float64)
        self.following = np.roll(self.polygon, -1, axis=0)
        self.entered: dict[int, float] = {}  # track -> ts it entered
        self.loitered: set[int] = set()

    def contains(self, track: int) -> bool:
        return track in self.entered

    def step(self, seen: list[Sighting], ts: float) -> list[RuleHit]:
        if not seen:
            return []
        inside = inside_polygon(np.asarray([s.anchor for s in seen], dtype=np.float64), self.polygon, self.following)
        hits = []
        for obj, now_in in zip(seen, inside.tolist()):  # Python bools: no numpy scalar per object
            now_in = now_in and counts(self.cfg, obj)
            was_in = obj.track in self.entered
            if now_in and not was_in:
                self.entered[obj.track] = ts
                hits.append(RuleHit("zone.enter", obj.track, zone=self.cfg.name))
            elif was_in and not now_in:
                hits.append(self._leave(obj.track, ts, "left"))
            elif now_in and self.cfg.loiter_s is not None and obj.track not in self.loitered:
                dwell = ts - self.entered[obj.track]
                if dwell >= self.cfg.loiter_s:
                    self.loitered.add(obj.track)
                    hits.append(RuleHit("loiter", obj.track, zone=self.cfg.name, dwell_s=round(dwell, 3)))
        return hits

    def end(self, track: int, ts: float, reason: str) -> list[RuleHit]:
        return [self._leave(track, ts, reason)] if track in self.entered else []

    def _leave(self, track: int, ts: float, reason: str) -> RuleHit:
        dwell = ts - self.entered.pop(track)
        self.loitered.discard(track)
        return RuleHit("zone.leave", track, zone=self.cfg.name, dwell_s=round(dwell, 3), reason=reason)


class LineRule:
    """Counts an object once each time its anchor moves from one side of the segment a→b to the other
    *through* the segment (passing beside its end is not a crossing)."""

    def __init__(self, cfg: LineConfig) -> None:
        self.cfg = cfg
        self.a, self.b = cfg.a, cfg.b
        self.last: dict[int, Point] = {}  # track -> last anchor that was off the line
        self.count_in = 0
        self.count_out = 0

    def step(self, seen: list[Sighting]) -> list[RuleHit]:
        hits = []
        for obj in seen:
            if not counts(self.cfg, obj):
                continue
            side = cross(self.a, self.b, obj.anchor)
            if side == 0:
                continue  # on the line: decide when it steps off
            before = self.last.get(obj.track)
            self.last[obj.track] = obj.anchor
            if before is None or (cross(self.a, self.b, before) > 0) == (side > 0):
                continue
            if not segments_cross(before, obj.anchor, self.a, self.b):
                continue  # changed side beyond the segment's ends
            direction = "in" if side > 0 else "out"
            if direction == "in":
                self.count_in += 1
            else:
                self.count_out += 1
            hits.append(
                RuleHit(
                    "line.cross",
                    obj.track,
                    line=self.cfg.name,
                    direction=direction,
                    count_in=self.count_in,
                    count_out=self.count_out,
                )
            )
        return hits

    def end(self, track: int) -> None:
        self.last.pop(track, None)

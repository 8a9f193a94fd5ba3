"""The object layer: per source, a tracker plus the rules, turning frame detections into object events.

One person standing in front of a 30 fps camera is 30 frame events a second; here it is one
``object.new``, an ``object.update`` every ``update_s`` (or on a class, zone or confidence change), and one
``object.end``, plus the zone and line events the config asks for. Event semantics: docs/events.md.

How the node calls it (the whole contract; no threads, no I/O except the id store)::

    from bastion.edge.object_layer import ObjectLayer
    from bastion.edge.track_ids import StoreIdAllocator

    # at start, after the store and the detector are open:
    layer = ObjectLayer(config.objects, StoreIdAllocator(store), class_names=detector.names)  # ConfigError
    # for EVERY inferred frame of a source, in frame order, detections or not (an empty frame ages tracks),
    # after the source's own class/conf/roi filter:
    result = layer.process(frame.source, frame.index, frame.ts, det, frame.image.shape)
    det = result.detections           # same boxes, tracker_id filled: to_dict() items carry "track"
    for event in result.events:       # ObjectEvent, in order: store (commit) then publish each
        ...
    # when a source ends (a file without loop) or the node stops:
    for event in layer.close_source(name, ts, last_frame_index): ...
    # before a reload swaps the detector (tracks carry on; the new model's names must cover the rules):
    layer.check_classes(new_detector.names)  # ConfigError: refuse the reload

``ObjectEvent`` is not a ``DetectionEvent``: the store and the wire need the protocol v2 envelope
(docs/protocol.md) before these events can be committed and published like frame events.

``process`` is not thread-safe per source: the node's single inference thread is the only caller. It raises
``StorageError`` when a new object needs an id and the store cannot reserve a block (full disk, damaged file):
treat it like a failed ``store.append`` (log, pause, carry on with the next frame — the unconfirmed track asks
again on its next sighting); it must not end the inference thread.
With ``tracker: none`` detections pass untracked and no object events are made.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bastion.edge.object_events import ObjectEvent
from bastion.edge.rules import LineRule, RuleHit, Sighting, ZoneRule
from bastion.edge.rules_config import ObjectsConfig
from bastion.edge.track_ids import IdAllocator
from bastion.edge.tracking import Tracker, make_tracker
from bastion.runtime.detections import Detections, class_ids


@dataclass
class ObjectFrame:
    detections: Detections  # the frame's detections with ``tracker_id``
    events: list[ObjectEvent]


@dataclass
class _Object:
    track: int
    first_seen: float
    last_seen: float
    frame: int
    box: np.ndarray
    conf: float
    best_conf: float
    best_frame: int
    hits: int = 1
    votes: dict[int, float] = field(default_factory=dict)  # class -> summed confidence
    cls: int = -1  # the class with the most votes
    announced: bool = False
    reported: tuple[int, frozenset[str], float] | None = None  # class, zones, conf at the last new/update
    reported_ts: float = 0.0

    def vote(self, cls: int, conf: float) -> None:
        self.votes[cls] = self.votes.get(cls, 0.0) + conf
        if self.cls < 0 or self.votes[cls] > self.votes[self.cls]:
            self.cls = cls


class _SourceObjects:
    """One source's tracker, rules and objects."""

    def __init__(self, name: str, config: ObjectsConfig, tracker: Tracker) -> None:
        self.name = name
        self.config = config
        self.tracker = tracker
        self.zones = [ZoneRule(z) for z in config.zones_for(name)]
        self.lines = [LineRule(ln) for ln in config.lines_for(name)]
        self.objects: dict[int, _Object] = {}
        self.names: list[str] = []  # the model's class names, as the last frame gave them

    def process(self, frame: int, ts: float, det: Detections, shape: tuple[int, ...]) -> ObjectFrame:
        self.names = det.names
        out = self.tracker.update(det.xyxy, det.conf, det.cls)
        tracked = Detections(det.xyxy, det.conf, det.cls, det.names, out.tracker_id)
        if out.tracker_id is None:
            return ObjectFrame(tracked, [])
        events: list[ObjectEvent] = []
        for track in out.ended:
            events += self._end(track, ts, frame, "lost", det.names)
        height, width = shape[0], shape[1]
        seen: list[Sighting] = []
        new: list[_Object] = []
        for i in np.flatnonzero(out.tracker_id >= 0):
            obj = self._sighted(int(out.tracker_id[i]), frame, ts, det, int(i))
            if not obj.announced and obj.hits >= self.config.min_hits:
                obj.announced = True
                new.append(obj)
            if obj.announced:
                seen.append(self._sighting(obj, det.names, width, height))
        hits: list[RuleHit] = []
        for zone in self.zones:
            hits += zone.step(seen, ts)
        for line in self.lines:
            hits += line.step(seen)
        for obj in new:  # after the rules, so object.new names the zones it appeared in; before their events
            events.append(self._event("object.new", obj, ts, frame, det.names))
            obj.reported, obj.reported_ts = self._state(obj), ts
        events += [self._rule_event(h, ts, frame, det.names) for h in hits]
        for sighting in seen:
            events += self._maybe_update(self.objects[sighting.track], ts, frame, det.names)
        return ObjectFrame(tracked, events)

    def close(self, ts: float, frame: int) -> list[ObjectEvent]:
        events: list[ObjectEvent] = []
        for track in list(self.objects):
            events += self._end(track, ts, frame, "stop", self.names)
        return events

    # -- object lifecycle --------------------------------------------------------------------------------
    def _sighted(self, track: int, frame: int, ts: float, det: Detections, i: int) -> _Object:
        conf = float(det.conf[i])
        obj = self.objects.get(track)
        if obj is None:
            obj = self.objects[track] = _Object(track, ts, ts, frame, det.xyxy[i].copy(), conf, conf, frame)
        else:
            obj.hits += 1
            obj.last_seen, obj.frame, obj.box, obj.conf = ts, frame, det.xyxy[i].copy(), conf
            if conf > obj.best_conf:
                obj.best_conf, obj.best_frame = conf, frame
        obj.vote(int(det.cls[i]), conf)
        return obj

    def _sighting(self, obj: _Object, names: list[str], width: int, height: int) -> Sighting:
        x1, y1, x2, y2 = (float(v) for v in obj.box)
        y = y2 if self.config.anchor == "bottom" else (y1 + y2) / 2
        area = max(x2 - x1, 0.0) * max(y2 - y1, 0.0) / max(width * height, 1)
        return Sighting(obj.track, _name(names, obj.cls), ((x1 + x2) / 2 / width, y / height), area)

    def _zones_of(self, track: int) -> frozenset[str]:
        return frozenset(z.cfg.name for z in self.zones if z.contains(track))

    def _state(self, obj: _Object) -> tuple[int, frozenset[str], float]:
        return obj.cls, self._zones_of(obj.track), obj.conf

    def _maybe_update(self, obj: _Object, ts: float, frame: int, names: list[str]) -> list[ObjectEvent]:
        """object.update when something changed (not more often than update_min_s) or every update_s."""
        assert obj.reported is not None
        cls, zones, conf = self._state(obj)
        since = ts - obj.reported_ts
        reason = None
        if since >= self.config.update_min_s:
            if cls != obj.reported[0]:
                reason = "class"
            elif zones != obj.reported[1]:
                reason = "zone"
            elif abs(conf - obj.reported[2]) >= self.config.conf_jump:
                reason = "conf"
        if reason is None and since >= self.config.update_s:
            reason = "periodic"
        if reason is None:
            return []
        obj.reported, obj.reported_ts = (cls, zones, conf), ts
        return [self._event("object.update", obj, ts, frame, names, reason=reason)]

    def _end(self, track: int, ts: float, frame: int, reason: str, names: list[str]) -> list[ObjectEvent]:
        obj = self.objects.pop(track, None)
        for line in self.lines:
            line.end(track)
        if obj is None or not obj.announced:
            for zone in self.zones:
                zone.end(track, ts, reason)
            return []
        hits = [h for zone in self.zones for h in zone.end(track, ts, reason)]
        events = [self._rule_event(h, ts, frame, names, obj) for h in hits]
        events.append(self._event("object.end", obj, ts, frame, names, reason=reason))
        return events

    # -- event records -----------------------------------------------------------------------------------
    def _identity(self, kind: str, obj: _Object, ts: float, frame: int, names: list[str]) -> dict:
        """The fields every object event carries (lifecycle and rule hits alike): which object, where, when."""
        return {
            "kind": kind,
            "source": self.name,
            "ts": ts,
            "frame": frame,
            "track": obj.track,
            "cls": obj.cls,
            "name": _name(names, obj.cls),
            "conf": round(obj.conf, 4),
            "box": [round(float(v), 1) for v in obj.box],
        }

    def _event(self, kind: str, obj: _Object, ts: float, frame: int, names: list[str], **extra) -> ObjectEvent:
        return ObjectEvent(
            **self._identity(kind, obj, ts, frame, names),
            first_seen=obj.first_seen,
            last_seen=obj.last_seen,
            best_conf=round(obj.best_conf, 4),
            best_frame=obj.best_frame,
            zones=sorted(self._zones_of(obj.track)),
            **extra,
        )

    def _rule_event(
        self, hit: RuleHit, ts: float, frame: int, names: list[str], obj: _Object | None = None
    ) -> ObjectEvent:
        obj = obj or self.objects[hit.track]
        return ObjectEvent(
            **self._identity(hit.kind, obj, ts, frame, names),
            zone=hit.zone,
            dwell_s=hit.dwell_s,
            reason=hit.reason,
            line=hit.line,
            direction=hit.direction,  # type: ignore[arg-type]
            count_in=hit.count_in,
            count_out=hit.count_out,
        )


def _name(names: list[str], cls: int) -> str:
    return names[cls] if 0 <= cls < len(names) else str(cls)


class ObjectLayer:
    """Tracker + rules for every source of a node; ids from one allocator (see the module docstring)."""

    def __init__(self, config: ObjectsConfig, ids: IdAllocator, class_names: list[str] | None = None) -> None:
        self.config = config
        if class_names is not None:
            self.check_classes(class_names)
        self.ids = ids
        self._sources: dict[str, _SourceObjects] = {}

    def check_classes(self, class_names: list[str]) -> None:
        """ConfigError when a rule names a class the model does not know (at start, and before a reload)."""
        for rule in [*self.config.zones, *self.config.lines]:
            if rule.classes:
                class_ids(rule.classes, class_names)

    def process(self, source: str, frame: int, ts: float, det: Detections, shape: tuple[int, ...]) -> ObjectFrame:
        """Track ``det`` (one inferred frame of ``source``, shape (h, w[, c])) and say what happened."""
        state = self._sources.get(source)
        if state is None:
            state = self._sources[source] = _SourceObjects(source, self.config, make_tracker(self.config, self.ids))
        return state.process(frame, ts, det, shape)

    def active_tracks(self) -> dict[str, int]:
        """Per source, the objects followed now (announced or not yet): for the node's ``status``."""
        return {name: len(state.objects) for name, state in list(self._sources.items())}

    def close_source(self, source: str, ts: float, frame: int) -> list[ObjectEvent]:
        """``object.end`` (reason ``stop``) for every announced object of ``source``; its tracker starts afresh."""
        state = self._sources.pop(source, None)
        return state.close(ts, frame) if state is not None else []

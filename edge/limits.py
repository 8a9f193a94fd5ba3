"""Per-client costs on the control socket, bounded: a token bucket per client and coalesced refusals.

A flood must cost the node little and the audit log less.  Each client (its
CurveZMQ key, or its connection on a loopback node without CurveZMQ) spends
tokens from its own bucket, so one noisy client cannot starve another.  A
refusal that repeats (the same client refused again, or hundreds of unknown
keys) is written once at once and then as one record with a count per window,
so an attacker cannot turn the fsynced audit log into a disk-filling,
CPU-burning amplifier — yet every refusal is still counted in the trail.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

CLIP_CHARS = 200  # longest client-supplied string written to a log line or an audit record
BUSY_SHARE = 0.5  # of the control thread's time one client may use, sustained …
BUSY_BURST_S = 5.0  # … and this many seconds of it at once
MAX_TRACKED_CLIENTS = 4096  # buckets kept; the least recently seen client is forgotten first


def clip(value: object, limit: int = CLIP_CHARS) -> str:
    """``value`` as text of at most ``limit`` characters, saying how much was cut (client strings in logs)."""
    text = str(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…(+{len(text) - limit} chars)"


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """Token bucket per client key: ``rate`` requests a second sustained, ``burst`` at once.

    The same bucket also meters time: with ``rate`` = a share of the control thread
    and ``burst`` = seconds, ``in_debt`` before a request and ``spend(elapsed)`` after
    it keep one client from holding the thread (long replays, answers, reloads).  Thread-safe: the control
    lanes (edge/control_lanes.py) charge their work to the client after the fact.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = MAX_TRACKED_CLIENTS,
    ) -> None:
        self.rate, self.burst, self.clock, self.max_clients = float(rate), float(burst), clock, max_clients
        self._buckets: OrderedDict[bytes, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, client: bytes) -> float:
        """0.0 if ``client`` may go on now (a token is spent), else the seconds until it may."""
        with self._lock:
            bucket = self._refilled(client)
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self.rate

    def _refilled(self, client: bytes) -> _Bucket:
        now = self.clock()
        bucket = self._buckets.pop(client, None) or _Bucket(self.burst, now)
        while len(self._buckets) >= self.max_clients:
            self._buckets.popitem(last=False)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
        bucket.stamp = now
        self._buckets[client] = bucket
        return bucket

    def in_debt(self, client: bytes) -> float:
        """0.0 if ``client`` has anything left, else the seconds until it has (spends nothing)."""
        with self._lock:
            bucket = self._refilled(client)
            return 0.0 if bucket.tokens > 0 else (1e-3 - bucket.tokens) / self.rate

    def spend(self, client: bytes, amount: float) -> None:
        """Take ``amount`` after the fact (a cost known only once paid); the balance may go below zero."""
        with self._lock:
            self._refilled(client).tokens -= amount


MAX_VARIANTS = 16  # distinct refusals (op, reason…) told apart in one coalesced record; beyond: counted together
VARIANTS_BYTES = 1200  # … and at most this much of their text, so a coalesced record stays under ~2 KB


@dataclass
class _Window:
    """One (kind, client)'s repeats in a window.  The repeats may differ (an observer trying snapshot, clip, ask
    and reload in turn): each distinct set of fields is counted, so the coalesced record says how many of each
    instead of naming the last one for them all."""

    started: float
    repeats: int = 0
    fields: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, int] = field(default_factory=dict)  # a repeat's fields (canonical JSON) → how many
    other: int = 0  # repeats beyond MAX_VARIANTS distinct ones or VARIANTS_BYTES ("other_variants")

    def repeat(self, fields: dict[str, Any]) -> None:
        self.repeats += 1
        self.fields = fields
        key = json.dumps(fields, sort_keys=True, default=str)
        room = len(self.variants) < MAX_VARIANTS and sum(map(len, self.variants)) + len(key) <= VARIANTS_BYTES
        if key in self.variants or room:
            self.variants[key] = self.variants.get(key, 0) + 1
        else:
            self.other += 1

    def record(self) -> dict[str, Any]:
        """The coalesced record's fields: as before when every repeat was alike, else the fields they share, and
        ``variants`` (what differed, with its count)."""
        if len(self.variants) <= 1 and not self.other:
            return {**self.fields, "count": self.repeats}
        rows = [json.loads(k) for k in self.variants]
        common = {k: v for k, v in rows[0].items() if all(k in r and r[k] == v for r in rows)}
        variants = [
            {**{k: v for k, v in r.items() if k not in common}, "count": n}
            for r, n in zip(rows, self.variants.values())
        ]
        return {
            **common,
            "count": self.repeats,
            "variants": variants,
            **({"other_variants": self.other} if self.other else {}),
        }


class RefusalCoalescer:
    """Audit refusals without letting their number drive the number of records.

    The first refusal of a (kind, client) in a window is written at once; repeats
    within the window are counted and written as one record (``count``) when the
    window closes.  At most ``max_clients`` clients get records of their own per
    window and kind; refusals of any further clients go into one summary record
    (``count``, ``clients``).  ``flush()`` closes the windows that are due; call it
    often (the control loop does) and with ``force=True`` at shutdown.
    """

    def __init__(
        self,
        append: Callable[..., Any],
        window_s: float = 60.0,
        max_clients: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.append, self.window_s, self.max_clients, self.clock = append, window_s, max_clients, clock
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str], _Window] = {}
        self._overflow: dict[str, tuple[float, int, set[str]]] = {}  # kind → (started, count, clients)
        self.total = 0

    def refuse(self, kind: str, client: str, **fields: Any) -> bool:
        """Count one refusal; True when it was written on its own (the first of its window)."""
        self.flush()
        clipped = {k: clip(v) if isinstance(v, str) else v for k, v in fields.items()}
        with self._lock:
            self.total += 1
            window = self._windows.get((kind, client))
            if window is not None:
                window.repeat(clipped)
                return False
            if sum(1 for k, _ in self._windows if k == kind) >= self.max_clients:
                started, count, clients = self._overflow.get(kind, (self.clock(), 0, set()))
                if len(clients) < 10_000:  # beyond that the summary says "at least"
                    clients.add(client)
                self._overflow[kind] = (started, count + 1, clients)
                return False
            self._windows[(kind, client)] = _Window(self.clock())
        self.append(kind, client=client, **clipped)
        return True

    def flush(self, force: bool = False) -> None:
        now = self.clock()
        records: list[tuple[str, dict[str, Any]]] = []
        with self._lock:
            for (kind, client), window in list(self._windows.items()):
                if force or now - window.started >= self.window_s:
                    del self._windows[(kind, client)]
                    if window.repeats:
                        records.append(
                            (kind, {"client": client, **window.record(), "repeated_within_s": self.window_s})
                        )
            for kind, (started, count, clients) in list(self._overflow.items()):
                if force or now - started >= self.window_s:
                    del self._overflow[kind]
                    records.append(
                        (
                            kind,
                            {
                                "count": count,
                                "clients": len(clients),
                                "repeated_within_s": self.window_s,
                                "note": f"more than {self.max_clients} clients refused in one window",
                            },
                        )
                    )
        for kind, fields in records:
            self.append(kind, **fields)

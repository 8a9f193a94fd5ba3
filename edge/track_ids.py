"""Where tracker ids come from: a counter in the event store, so no id is ever reused within a node.

An id is handed out when a track is confirmed (edge/tracking.py). Reserving one number per track would be
one SQLite commit per new object; instead a block is reserved durably (``EventStore.reserve_ids``) and
handed out from memory. A restart, clean or not, continues above the block, so ids may skip but never
repeat: an operator who saw object 17 leave can trust that the next 17 is not someone else.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from bastion.edge.store import EventStore

TRACK_COUNTER = "track"  # the store counter's name
DEFAULT_BLOCK = 64


class IdAllocator(Protocol):
    def next_id(self) -> int: ...


class StoreIdAllocator:
    """Ids from ``store``, reserved ``block`` at a time (thread-safe: one allocator serves every source)."""

    def __init__(self, store: "EventStore", block: int = DEFAULT_BLOCK, counter: str = TRACK_COUNTER) -> None:
        self.store = store
        self.block = block
        self.counter = counter
        self._lock = threading.Lock()
        self._pending: list[int] = []

    def next_id(self) -> int:
        with self._lock:
            if not self._pending:
                self._pending = list(reversed(self.store.reserve_ids(self.counter, self.block)))
            return self._pending.pop()


class MemoryIdAllocator:
    """1, 2, 3 … in memory: for benchmarks and tools that have no store (ids restart with the process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0

    def next_id(self) -> int:
        with self._lock:
            self._last += 1
            return self._last

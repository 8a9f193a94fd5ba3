"""Watching the node's worker threads: none may die silently, and a stuck one must not look alive.

A Python thread that raises simply ends; everything around it keeps going — a
node whose inference thread died kept answering ``status`` with "running" and
kept its watchdog pinging from another thread.  The supervisor runs the node's
own workers inside a wrapper that records how they ended, watches threads owned
by other parts (sockets, sources) by ``is_alive``, and keeps a liveness stamp
per worker so the systemd watchdog only vouches for a loop that is turning.
A death is reported once, through ``on_death``, which stops the node loudly.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)


@dataclass
class _Watched:
    thread: threading.Thread
    should_run: Callable[[], bool]  # False when ending is normal (a file source that finished, shutdown)
    error: str | None = None
    reported: bool = False


class Supervisor:
    def __init__(self, on_death: Callable[[str, str], None]) -> None:
        self.on_death = on_death
        self._watched: dict[str, _Watched] = {}
        self._beats: dict[str, float] = {}
        self._lock = threading.Lock()

    def spawn(self, name: str, target: Callable[[], None], should_run: Callable[[], bool]) -> threading.Thread:
        """A daemon thread running ``target``; an exception escaping it is recorded and reported at once."""

        def guarded() -> None:
            try:
                target()
            except BaseException as exc:
                log.exception("thread %s died", name)
                self._died(name, f"{type(exc).__name__}: {exc}")

        thread = threading.Thread(target=guarded, name=name, daemon=True)
        self.watch(name, thread, should_run)
        return thread

    def watch(self, name: str, thread: threading.Thread, should_run: Callable[[], bool]) -> None:
        with self._lock:
            self._watched[name] = _Watched(thread, should_run)

    def beat(self, name: str) -> None:
        """Called by a worker on every turn of its loop."""
        self._beats[name] = time.monotonic()

    def beat_age(self, name: str) -> float:
        last = self._beats.get(name)
        return float("inf") if last is None else time.monotonic() - last

    def _died(self, name: str, error: str) -> None:
        with self._lock:
            watched = self._watched.get(name)
            if watched is None or watched.reported:
                return
            watched.error, watched.reported = error, True
        self.on_death(name, error)

    def check(self) -> None:
        """Report every watched thread that ended while it should still run (each once)."""
        with self._lock:
            dead = [
                n
                for n, w in self._watched.items()
                if w.thread.ident is not None and not w.thread.is_alive() and not w.reported and w.should_run()
            ]
        for name in dead:
            self._died(name, "exited unexpectedly (its traceback, if any, is in the log)")

    def healthy(self, name: str, max_age_s: float) -> bool:
        """Every watched thread that should run is alive, and ``name`` turned within ``max_age_s``."""
        with self._lock:
            ok = all(
                w.thread.is_alive() or w.thread.ident is None or not w.should_run() for w in self._watched.values()
            )
        return ok and self.beat_age(name) <= max_age_s

    def as_dict(self) -> dict[str, dict]:
        with self._lock:
            items = list(self._watched.items())
        out = {}
        for name, w in items:
            entry = {"alive": w.thread.is_alive(), "error": w.error}
            if name in self._beats:
                entry["last_turn_s"] = round(self.beat_age(name), 2)
            out[name] = entry
        return out

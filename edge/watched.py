"""What the node's supervisor watches (``Supervisor.watch(name, thread, running)``): a part that runs on its own
thread says which thread, and whether it still lives. One mixin, so every such part (the metrics endpoint, a sink)
answers the same two questions the same way instead of each copying the two properties."""

from __future__ import annotations

import threading


class WatchedThread:
    """Mixin for a part whose work runs on ``self._thread``: ``thread`` for the supervisor, ``alive`` for status
    and tests (a dead thread is reported by the supervisor, never silently)."""

    _thread: threading.Thread

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

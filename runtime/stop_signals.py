"""SIGINT and SIGTERM as a request to stop, never an exception: for ``bastion detect`` and ``bastion node run``.

Why not Python's own SIGINT (KeyboardInterrupt) or a handler that sets a ``threading.Event``: a signal handler runs
in the main thread at whichever bytecode it was running. A KeyboardInterrupt raised right after
``threading.Condition.__enter__`` took its lock (a Future's in ``done()``, the pool's idle semaphore's, an Event's)
and before the ``with`` block began leaves that lock held for ever: the worker that needs it blocks, and the pool's
shutdown, then the interpreter's exit, wait on it for ever (``bastion detect 0`` still running a minute after
Ctrl-C). A handler that calls ``Event.set()`` takes that Event's lock; if the main thread was interrupted inside
``Event.wait()`` holding it (the node's main loop lives there), the process waits on itself: systemd SIGKILLs it
after TimeoutStopSec and the clean stop (the ``node_stop`` audit record, the exact seq mark, the sinks' last
flush) is lost.

So the handler raises nothing and takes no lock: it notes the signal, hands every signal it took back to the
system (a second SIGINT or SIGTERM ends the process at once, killed by that signal: a shell shows 128+signum,
130 or 143) and writes one byte to a pipe. A watcher thread reads it and calls ``on_stop`` with the signal's
number; that callback does the stopping (sets events, prints a line) outside any handler.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Callable

log = logging.getLogger(__name__)

# The signals taken, and the disposition each must still have for us to take it: anything else is a parent's
# choice (SIG_IGN: `nohup`, a job started with `&`) or an embedding program's own handler, and is left alone.
_DEFAULTS: dict[int, object] = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
    """Ctrl-C for SIGINT (what the operator pressed), else the signal's name (SIGTERM)."""
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


class StopSignals:
    """While inside ``with``, SIGINT and SIGTERM call ``on_stop(signum)`` from a watcher thread, once.

    ``received`` is the first signal's number (None until one came). It is set in the handler itself, so code that
    starts after the ``with`` began (a node built after a SIGTERM during its model load) can check it even when the
    watcher ran ``on_stop`` before there was anything to stop.
    """

    def __init__(self, on_stop: Callable[[int], None], signals: tuple[int, ...] = STOP_SIGNALS):
        self.received: int | None = None
        self._on_stop = on_stop
        self._signals = signals
        self._previous: dict[int, object] = {}
        self._pipe: tuple[int, int] | None = None
        self._watcher: threading.Thread | None = None

    @property
    def taken(self) -> tuple[int, ...]:
        """The signals this instance handles (empty outside the main thread or when each was someone else's)."""
        return tuple(self._previous)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers belong to the main thread: an embedding program's business
        mine = [s for s in self._signals if signal.getsignal(s) is _DEFAULTS.get(s, signal.SIG_DFL)]
        if not mine:
            return self
        self._pipe = os.pipe()
        os.set_blocking(self._pipe[1], False)
        self._watcher = threading.Thread(target=self._watch, args=(self._pipe[0],), name="bastion-stop", daemon=True)
        self._watcher.start()  # before the handlers: starting a thread takes locks a handler must not
        for s in mine:
            self._previous[s] = signal.signal(s, self._handler)
        return self

    def _handler(self, signum: int, frame: object) -> None:
        # No lock, no exception, no logging (logging takes locks): a flag, sigactions, one write.
        if self.received is None:
            self.received = signum
        for s in self._previous:
            signal.signal(s, signal.SIG_DFL)  # the next one is the kernel's: the process ends at once
        try:
            os.write(self._pipe[1], bytes([signum]))  # type: ignore[index]
        except OSError:  # the watcher is gone (or the pipe is full): `received` still says it
            pass

    def _watch(self, fd: int) -> None:
        try:
            data = os.read(fd, 16)  # one byte: the first signal's number, or __exit__'s 0 ("nothing came")
            if data and data[0]:
                try:
                    self._on_stop(data[0])
                except Exception:  # a watcher must not die silently
                    log.exception("stopping on %s failed", signal_name(data[0]))
        finally:
            os.close(fd)  # one stop request is all there is: a later signal is the kernel's

    def __exit__(self, *exc: object) -> None:
        if self._pipe is None:
            return
        if self.received is None:
            for s, previous in self._previous.items():
                signal.signal(s, previous)  # type: ignore[arg-type]
        try:
            os.write(self._pipe[1], b"\0")
        except OSError:
            pass
        if self._watcher is not None:
            self._watcher.join(5)  # bounded: on_stop only sets events and prints a line
        os.close(self._pipe[1])
        self._pipe = None

"""``bastion node tail``: a node's events as they come, for a person (a table, or plain lines in a pipe) or a
program (``--json``: one object per line, flushed at once so a reader downstream sees each event live)."""

from __future__ import annotations

import os
import select
import stat
import sys
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

import zmq

from bastion.console import out
from bastion.edge.events_v2 import NodeEvent, kind_of

if TYPE_CHECKING:
    from bastion.edge.client import Client

TABLE_ROWS = 25  # the table on a terminal shows the latest events; older ones scroll away
COLUMNS = ("seq", "time", "kind", "source", "track", "class", "what")


def describe(event: NodeEvent) -> tuple[str, ...]:
    """One row: what an operator reads first (an object's class and id, the zone or line and its direction)."""
    stamp = time.strftime("%H:%M:%S", time.localtime(event.ts))
    kind = kind_of(event)
    if kind == "det":
        items = event.detections  # type: ignore[union-attr]
        names = ", ".join(f"{d.name}#{d.track}" if d.track is not None else d.name for d in items[:6])
        return (str(event.seq), stamp, kind, event.source, "", "", f"{len(items)} detections: {names}")
    what = ""
    if event.line is not None:  # type: ignore[union-attr]
        what = f"line {event.line} {event.direction} (in {event.count_in}, out {event.count_out})"  # type: ignore[union-attr]
    elif event.zone is not None:  # type: ignore[union-attr]
        dwell = f" after {event.dwell_s:.1f} s" if event.dwell_s is not None else ""  # type: ignore[union-attr]
        what = f"zone {event.zone}{dwell}"  # type: ignore[union-attr]
    elif event.reason:  # type: ignore[union-attr]
        what = event.reason  # type: ignore[union-attr]
    cls = f"{event.name} {event.conf:.2f}"  # type: ignore[union-attr]
    return (str(event.seq), stamp, kind, event.source, str(event.track), cls, what)  # type: ignore[union-attr]


def tail(client: Client, kinds: list[str] | None, since: int | None, duration: float | None, json_out: bool) -> None:
    """Print until ``duration`` is over, Ctrl-C, or the reader downstream goes away (``| head -1``: a quiet end,
    not a BrokenPipeError traceback); the events generator is closed on every way out."""
    events = client.events(since=since, duration_s=duration, kinds=kinds)
    reader_gone = _watch_reader(client)
    try:
        if json_out:
            for event in events:
                sys.stdout.write(event.model_dump_json(exclude_none=kind_of(event) != "det") + "\n")
                sys.stdout.flush()
        elif not out.is_terminal:  # plain text, flushed per line for a reader downstream (never rich markup)
            for event in events:
                sys.stdout.write(" ".join(part for part in describe(event) if part) + "\n")
                sys.stdout.flush()
        else:
            _live_table(events)
    except BrokenPipeError:
        _quiet_stdout()
    except zmq.ZMQError:
        if not reader_gone.is_set():  # not our doing: the client was closed under us
            raise
        _quiet_stdout()
    finally:
        events.close()


def _watch_reader(client: Client) -> threading.Event:
    """On a pipe, notice the reader going away even while no event comes (``| head -1`` on a quiet node waited
    for ever for the next write to fail): the write end of a pipe reports POLLERR once its read end is closed.
    Then the client is closed from here, which ends the events loop with ETERM (``Client.close``)."""
    gone = threading.Event()
    try:
        is_pipe = stat.S_ISFIFO(os.fstat(sys.stdout.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):  # no real stdout (captured): nothing to watch
        is_pipe = False
    if not is_pipe:
        return gone

    def watch() -> None:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLERR)
        while not client.ctx.closed:
            if any(mask & (select.POLLERR | select.POLLHUP) for _, mask in poller.poll(200)):
                gone.set()
                client.close()
                return

    threading.Thread(target=watch, name="tail-reader-watch", daemon=True).start()
    return gone


def _quiet_stdout() -> None:
    """The pipe's reader is gone: point stdout at /dev/null so the interpreter's last flush cannot fail loudly."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def _live_table(events) -> None:
    from rich.live import Live
    from rich.table import Table

    rows: deque[tuple[str, ...]] = deque(maxlen=TABLE_ROWS)

    def table() -> Table:
        view = Table(show_edge=False, title="bastion node tail (Ctrl-C to stop)")
        for col in COLUMNS:
            view.add_column(col)
        for row in rows:
            view.add_row(*row)
        return view

    with Live(table(), console=out, refresh_per_second=8) as live:
        for event in events:
            rows.append(describe(event))
            live.update(table())

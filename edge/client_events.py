"""``Client.events(kinds=[...], since=seq)``: a node's events, typed per kind, filtered, without gaps or repeats.

The follow itself (replay, then live, gaps filled from the store, seq checked) is ``Client._follow_events``
(edge/client.py); it sees every event whatever ``kinds`` asks for, because the seq of an event the caller does
not want still closes a gap. Filtering happens after it, here. A frame event is a ``DetectionEvent`` (kind
``det``); an object event is the class of its kind (``ObjectNew``, ``LineCross`` …, edge/events_v2.py).
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Iterator

from bastion.edge.events_v2 import NodeEvent, check_kinds, kind_of
from bastion.edge.protocol import MAX_SEQ
from bastion.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterable


OLD_NODE_REFUSAL = "replay: v: Extra inputs are not permitted"  # a v1 node's answer to the v field


def replay_answer(client, since: int, limit: int) -> dict:
    """The node's replay page, asked as a v2 reader; a v1 node (which refuses the ``v`` field, and has no object
    events to protect) is asked again without it, and remembered, so a new SDK still reads old nodes."""
    from bastion.edge.answers import NodeRequestError

    if getattr(client, "_node_speaks_v1", False):
        return client.request("replay", since=since, limit=limit)
    try:
        return client.request("replay", since=since, limit=limit, v=2)
    except NodeRequestError as exc:
        if OLD_NODE_REFUSAL not in str(exc):
            raise
    client._node_speaks_v1 = True
    return client.request("replay", since=since, limit=limit)


def check_since(since: object) -> None:
    """A ``since`` no node can hold is the caller's mistake, said as such before anything is sent: past 2**63-1 it
    would otherwise read as a bookmark from before the node's store went back (NodeSeqWentBackwards, and a Client
    that refuses everything after), below 0 as the node's refusal of a replay."""
    if since is None or (isinstance(since, int) and not isinstance(since, bool) and 0 <= since <= MAX_SEQ):
        return
    raise ConfigError(
        f"since={shown(since)} is not a seq",
        "give a seq from 0 (every stored event) to 2**63-1; leave it out (None) for new events only",
    )


class EventsMixin:
    """``events()`` for ``Client``: kinds checked up front (a typo is an error, not a silent empty stream)."""

    def _follow_events(
        self, since: int | None, idle_timeout_s: float | None, duration_s: float | None
    ) -> Iterator[NodeEvent]:
        raise NotImplementedError  # Client's

    def events(
        self,
        since: int | None = None,
        idle_timeout_s: float | None = None,
        duration_s: float | None = None,
        kinds: Iterable[str] | None = None,
    ) -> Iterator[NodeEvent]:
        """Events after ``since`` (None: only new ones), replayed then live, each once, in seq order; only those
        of ``kinds`` (``det``, ``object.new``, ``object.update``, ``object.end``, ``zone.enter``, ``zone.leave``,
        ``loiter``, ``line.cross``; None: all). ConfigError for an unknown kind.

        Example::

            for event in client.events(kinds=["object.new", "line.cross"], since=0):
                print(event.seq, event.kind, event.track)
        """
        try:
            wanted = check_kinds(list(kinds) if kinds is not None else None)
        except ValueError as exc:
            raise ConfigError(str(exc), "e.g. kinds=['object.new', 'line.cross']") from None
        check_since(since)
        for event in self._follow_events(since, idle_timeout_s, duration_s):
            if wanted is None or kind_of(event) in wanted:
                yield event


def check_event_seq(seq: object, op: str) -> int:
    """The seq of one stored event (1 to 2**63-1) for ``op`` (``snapshot``, ``clip``) as a plain int, checked
    before anything is sent: any integer type will do (a numpy one from a DataFrame), anything else or out of range
    is the caller's mistake (ConfigError), not a node refusal to decode."""
    try:
        value = None if isinstance(seq, bool) else operator.index(seq)  # type: ignore[arg-type]
    except TypeError:
        value = None
    if value is not None and 1 <= value <= MAX_SEQ:
        return value
    raise ConfigError(
        f"seq={shown(seq)} is not an event seq",
        f"give {op} the seq of a stored event (a whole number from 1 to 2**63-1)",
    )


def shown(value: object, width: int = 40) -> str:
    """``repr(value)`` cut to ``width`` characters, with an ellipsis when cut (a caller's 10,000-character string
    stays one readable line)."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"

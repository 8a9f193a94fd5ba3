"""What a ``Client`` saw of each node, so a node whose ``seq`` or audit log went backwards is caught, not trusted.

A node's ``seq`` never goes backwards.  If it does (its event store was emptied,
replaced or restored from an older copy) the numbers the client already holds
now name different events, and skipping "duplicates" would silently drop new
ones; so the client raises ``NodeSeqWentBackwards`` instead.  Likewise the
audit head the node publishes (record count and last hash) only grows: less,
or another hash at the same count, raises ``NodeAuditWentBackwards``.
"""

from __future__ import annotations

from collections import OrderedDict

from bastion.edge.protocol import DetectionEvent
from bastion.errors import BastionError


class NodeSeqWentBackwards(BastionError):
    """The node reports a ``seq`` below one this client already saw from it: its event store went back."""


class NodeAuditWentBackwards(BastionError):
    """The node reports fewer audit records than this client saw, or another hash for the same record."""


class SeqGuard:
    """What this client saw of each node (by node id): highest ``seq``, audit head, recently delivered events.

    Each report is compared only with earlier reports on the same channel, where
    order is guaranteed: heartbeats (one PUB stream from one thread) and control
    answers (one request at a time; they also cover delivered events, which were
    committed before the client got them).  Across channels a heartbeat computed
    before an answer can arrive after it, and must not look like a regression.
    A report below the highest seen, or an event whose seq was delivered before
    with different content, means the node's store went back; a live event at or
    below the last delivered seq with the same content is the ordinary
    replay/live overlap and is skipped.
    """

    RECENT = 4096

    def __init__(self) -> None:
        self.high: dict[tuple[str, str], int] = {}  # (node, channel) → highest seq
        self.audit: dict[tuple[str, str], tuple[int, str]] = {}  # (node, channel) → (record count, last hash)
        self.recent: OrderedDict[tuple[str, int], str] = OrderedDict()

    def saw(self, node: str, seq: int, what: str, channel: str = "control") -> None:
        high = self.high.get((node, channel), 0)
        if seq < high:
            raise NodeSeqWentBackwards(
                f"node {node}'s seq went backwards: {what} {seq} after this client saw seq {high} — its event "
                f"store was emptied, replaced or restored from an older copy, so seq {seq + 1}..{high} will name "
                "different events than the ones you hold",
                "stop here; check the node (bastion node status, bastion audit verify) and restore its store, or "
                f"decide how to treat the events you hold and resume with events(since={seq}) on a new Client",
            )
        self.high[(node, channel)] = seq

    def saw_audit(self, node: str, count: int | None, head: str | None, channel: str = "control") -> None:
        """The audit trail only grows: fewer records, or another head at the same count, is a cut or a rewrite."""
        if count is None or head is None:
            return  # a node that does not publish its audit head
        known = self.audit.get((node, channel))
        if known is not None and (count < known[0] or (count == known[0] and head != known[1])):
            raise NodeAuditWentBackwards(
                f"node {node}'s audit log went backwards: it reports {count} records (head {head[:12]}) after this "
                f"client saw {known[0]} (head {known[1][:12]}) — records were cut off or the log was rewritten",
                f"prove it on the node: bastion audit verify audit.log --expect-count {known[0]} "
                f"--expect-head {known[1]}",
            )
        self.audit[(node, channel)] = (count, head)

    def latest_audit(self, node: str) -> tuple[int, str] | None:
        seen = [v for (n, _), v in self.audit.items() if n == node]
        return max(seen) if seen else None

    def delivered(self, event: DetectionEvent) -> None:
        key = (event.node, "control")  # any later control answer must report at least this seq
        self.high[key] = max(self.high.get(key, 0), event.seq)
        self.recent[(event.node, event.seq)] = event.model_dump_json()
        while len(self.recent) > self.RECENT:
            self.recent.popitem(last=False)

    def check_repeat(self, event: DetectionEvent) -> None:
        """An event at or below the last delivered seq: fine if it is the one delivered, else the node went back."""
        before = self.recent.get((event.node, event.seq))
        if before is not None and before != event.model_dump_json():
            raise NodeSeqWentBackwards(
                f"node {event.node}'s seq went backwards: event {event.seq} differs from the event {event.seq} "
                "this client delivered before — its event store was emptied, replaced or restored",
                "stop here; check the node (bastion node status, bastion audit verify) before resuming",
            )

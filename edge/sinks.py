"""Start and stop the node's sinks (``sinks:`` in node.yaml; docs/bridges.md): one thread each, one cursor each.

The node calls ``start_sinks`` once its store is open and ``stop_sinks`` before it closes the store; ``status``
reports ``sinks_status``. The two broker modules register themselves on import (``@register_sink``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from bastion.edge import sink_mqtt, sink_nats  # noqa: F401  (each registers its sink type)
from bastion.edge.sink_base import SINKS, Sink

if TYPE_CHECKING:
    from bastion.edge.config import NodeConfig
    from bastion.edge.store import EventStore

log = logging.getLogger(__name__)


def start_sinks(config: "NodeConfig", store: "EventStore") -> list[Sink]:
    """One started ``Sink`` per entry of ``config.sinks`` (none: an empty list, nothing imported runs)."""
    sinks = [SINKS[entry.type](entry, store, config.id) for entry in config.sinks]
    for sink in sinks:
        sink.start()
        log.info("sink %s (%s) started at cursor %d", sink.name, entry_type(sink), store.cursor(sink.name))
    return sinks


def stop_sinks(sinks: list[Sink], timeout: float = 10.0) -> None:
    """Stop every sink (each says goodbye to its broker when it can); the store stays open for the caller."""
    for sink in sinks:
        sink.stop(timeout)


def sinks_status(sinks: list[Sink]) -> dict[str, dict[str, Any]]:
    return {sink.name: sink.status() for sink in sinks}


def entry_type(sink: Sink) -> str:
    return sink.config.type

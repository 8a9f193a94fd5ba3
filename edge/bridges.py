"""``Bridges``: what the node starts beside its pipeline to reach other systems — its sinks and its metrics endpoint.

The node makes one at start (nothing runs yet), calls ``start`` once its store, server and pipeline are up,
reads ``status`` into its own status, and calls ``close`` before it closes the store (a sink reads the store
until it stops). The broker and Prometheus libraries are imported only when the config names a sink or a
metrics address, so a node without them loads neither.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from bastion.edge.config import NodeConfig
    from bastion.edge.metrics import MetricsServer
    from bastion.edge.sink_base import Sink
    from bastion.edge.store import EventStore
    from bastion.edge.supervisor import Supervisor


class Bridges:
    def __init__(
        self, config: "NodeConfig", store: "EventStore", status: Callable[[], dict[str, Any]], storage: Path
    ) -> None:
        self.config = config
        self.store = store
        self._status = status
        self.storage = storage
        self.sinks: list[Sink] = []
        self.metrics: MetricsServer | None = None

    def start(self, supervisor: "Supervisor", running: Callable[[], bool]) -> None:
        """Start each sink (its own thread, watched like the node's others) and the metrics endpoint.

        ``MetricsError`` (the port is taken) refuses the start in one line; a broker that is down is not an
        error here: the sink retries and says so in ``status``.
        """
        if self.config.sinks:
            from bastion.edge.sinks import start_sinks

            self.sinks = start_sinks(self.config, self.store)
            for sink in self.sinks:
                supervisor.watch(sink.thread_name, sink.thread, running)
        if self.config.metrics is not None:
            from bastion.edge.metrics import start_metrics

            self.metrics = start_metrics(self.config.metrics, self._status, self.storage)
            supervisor.watch("node-metrics", self.metrics.thread, running)

    def status(self) -> dict[str, Any]:
        """For the node's ``status``: each sink's state, cursor, backlog and lag, and where metrics are served."""
        out: dict[str, Any] = {"sinks": {sink.name: sink.status() for sink in self.sinks}}
        if self.metrics is not None:
            out["metrics"] = self.metrics.address
        return out

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.sinks:
            from bastion.edge.sinks import stop_sinks

            stop_sinks(self.sinks)

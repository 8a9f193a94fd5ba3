"""The node's Prometheus endpoint: its ``status`` dict, read at each scrape and written as metrics.

One record of how the node runs (``Node.status_dict``) serves ``bastion node status``, the health log and this
endpoint alike; the collector translates, it counts nothing of its own. It binds loopback unless the config
says ``metrics_allow_remote: true`` (checked at config load): the endpoint has no authentication, and the
model's sha256 and signer, source names and sink names are what an attacker would like to know.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterator

from bastion.edge.watched import WatchedThread
from bastion.errors import BastionError

log = logging.getLogger(__name__)
SOURCE_COUNTERS = {  # status key -> metric name (per source)
    "read": ("bastion_source_frames_read", "frames read from the source"),
    "dropped": ("bastion_source_frames_dropped", "frames dropped at the source queue (live sources, oldest first)"),
    "inferred": ("bastion_source_frames_inferred", "frames the model ran on"),
    "errors": ("bastion_source_errors", "frames or reads that failed"),
    "reconnects": ("bastion_source_reconnects", "times the source was opened again"),
}
SINK_GAUGES = {
    "backlog": ("bastion_sink_backlog_events", "events in the store the broker has not acknowledged"),
    "lag_s": ("bastion_sink_lag_seconds", "age of the oldest event not yet acknowledged"),
    "cursor": ("bastion_sink_cursor_seq", "the last seq the broker acknowledged"),
}
SINK_COUNTERS = {
    "forwarded": ("bastion_sink_forwarded_events", "events the broker acknowledged since start (re-sends too)"),
    "skipped": ("bastion_sink_skipped_events", "events retention deleted before they were forwarded"),
    "reconnects": ("bastion_sink_reconnects", "connections lost and made again"),
}

CLIP_COUNTERS = {
    "recorded": "clips encoded, sealed and kept since start",
    "failed": "clips that could not be kept (a write or an encode failed)",
    "frames_dropped": "frames the clip thread had no room for (its queue of raw frames was full)",
    "pruned": "clips removed to keep clip_max_mb",
}


class MetricsError(BastionError):
    """The metrics endpoint cannot be served (port taken, address not on this host)."""


class StatusCollector:
    """A prometheus_client collector over a ``status()`` callable (and the store's files, for their size)."""

    def __init__(self, status: Callable[[], dict[str, Any]], storage_dir: Path | None = None) -> None:
        self.status = status
        self.storage_dir = storage_dir

    def describe(self) -> list:
        return []  # unknown until a scrape: sources and sinks are named by the config

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        try:
            s = self.status()
        except Exception as exc:  # a scrape must not take the node's status down with it, nor fail silently
            log.warning("metrics: status failed: %s", exc)
            yield GaugeMetricFamily("bastion_up", "1 while the node answers its own status", value=0)
            return
        yield GaugeMetricFamily("bastion_up", "1 while the node answers its own status", value=1)
        model = s.get("model") or {}
        info = GaugeMetricFamily(
            "bastion_node_info",
            "the node, its version and its model",
            labels=["node", "bastion", "model", "version", "sha256", "signer"],
        )
        info.add_metric(
            [
                str(s.get("node")),
                str(s.get("bastion")),
                *(str(model.get(k) or "") for k in ("name", "version", "sha256", "signer")),
            ],
            1,
        )
        yield info
        state = GaugeMetricFamily("bastion_node_state", "1 for the node's current state", labels=["state"])
        for name in ("running", "degraded", "failed"):
            state.add_metric([name], 1 if s.get("state") == name else 0)
        yield state
        yield GaugeMetricFamily("bastion_uptime_seconds", "seconds since the node started", value=s.get("uptime_s", 0))
        yield GaugeMetricFamily("bastion_last_seq", "the highest event seq assigned", value=s.get("last_seq", 0))
        yield GaugeMetricFamily(
            "bastion_storage_error", "1 while the store cannot write", value=1 if s.get("storage_error") else 0
        )
        yield from self._events(s, CounterMetricFamily)
        yield from self._sources(s.get("sources") or {}, CounterMetricFamily, GaugeMetricFamily)
        yield from self._sinks(s.get("sinks") or {}, CounterMetricFamily, GaugeMetricFamily)
        yield from self._latency(s.get("inference") or {})
        yield from self._clips(s.get("clips"), CounterMetricFamily, GaugeMetricFamily)
        threads = GaugeMetricFamily("bastion_thread_alive", "1 while a supervised thread lives", labels=["thread"])
        for name, t in (s.get("threads") or {}).items():
            threads.add_metric([name], 1 if t.get("alive") else 0)
        yield threads
        audit = s.get("audit") or {}
        yield GaugeMetricFamily(
            "bastion_audit_pending", "audit records not yet on disk", value=audit.get("pending") or 0
        )
        if self.storage_dir is not None:
            yield GaugeMetricFamily(
                "bastion_store_bytes", "events.db with its WAL, in bytes", value=self._store_bytes()
            )

    @staticmethod
    def _events(s: dict[str, Any], counter) -> Iterator[Any]:
        published = counter("bastion_events_published", "events committed and published since start")
        published.add_metric([], s.get("published", 0))
        yield published
        by_kind = counter("bastion_events", "events published since start, by kind", labels=["kind"])
        for kind, n in (s.get("events_by_kind") or {"det": s.get("published", 0)}).items():
            by_kind.add_metric([kind], n)
        yield by_kind

    @staticmethod
    def _clips(clips: dict[str, Any] | None, counter, gauge) -> Iterator[Any]:
        """Evidence clips (docs/events.md): none without ``storage.clips``."""
        if not clips:
            return
        yield gauge("bastion_clips_error", "1 while clip writes fail (clips paused)", value=1 if clips["error"] else 0)
        yield gauge("bastion_clips_stored_bytes", "clips on disk, in bytes", value=clips.get("stored_bytes") or 0)
        yield gauge("bastion_clips_in_flight", "clips recording or encoding", value=clips.get("in_flight") or 0)
        for key, doc in CLIP_COUNTERS.items():
            yield counter(f"bastion_clips_{key}", doc, value=clips.get(key) or 0)
        dropped = counter("bastion_clips_dropped", "clips not recorded, by reason", labels=["reason"])
        for reason, n in (clips.get("dropped") or {}).items():
            dropped.add_metric([reason], n)
        yield dropped

    @staticmethod
    def _sources(sources: dict[str, dict], counter, gauge) -> Iterator[Any]:
        fps = gauge("bastion_source_fps", "frames per second read, recently", labels=["source"])
        queue = gauge("bastion_source_queue_depth", "frames waiting for the model", labels=["source"])
        up = gauge("bastion_source_state", "1 for the source's current state", labels=["source", "state"])
        counters = {k: counter(name, doc, labels=["source"]) for k, (name, doc) in SOURCE_COUNTERS.items()}
        for name, st in sources.items():
            fps.add_metric([name], st.get("fps") or 0)
            queue.add_metric([name], st.get("queue") or 0)
            up.add_metric([name, str(st.get("state"))], 1)
            for key, family in counters.items():
                family.add_metric([name], st.get(key) or 0)
        yield from (fps, queue, up, *counters.values())

    @staticmethod
    def _sinks(sinks: dict[str, dict], counter, gauge) -> Iterator[Any]:
        connected = gauge(
            "bastion_sink_connected", "1 while the sink is connected to its broker", labels=["sink", "type"]
        )
        gauges = {k: gauge(name, doc, labels=["sink", "type"]) for k, (name, doc) in SINK_GAUGES.items()}
        counters = {k: counter(name, doc, labels=["sink", "type"]) for k, (name, doc) in SINK_COUNTERS.items()}
        for name, st in sinks.items():
            labels = [name, str(st.get("type"))]
            connected.add_metric(labels, 1 if st.get("state") == "connected" else 0)
            for key, family in (*gauges.items(), *counters.items()):
                family.add_metric(labels, st.get(key) or 0)
        yield from (connected, *gauges.values(), *counters.values())

    @staticmethod
    def _latency(inference: dict[str, Any]) -> Iterator[Any]:
        from prometheus_client.core import HistogramMetricFamily

        hist = inference.get("latency")
        if not hist:
            return
        buckets = [(le, n) for le, n in hist["buckets"].items()] + [("+Inf", hist["count"])]
        yield HistogramMetricFamily(
            "bastion_inference_latency_seconds",
            "time the model took per batch",
            buckets=buckets,
            sum_value=hist["sum_s"],
        )

    def _store_bytes(self) -> int:
        from bastion.edge.store import store_bytes

        return store_bytes(self.storage_dir / "events.db")  # type: ignore[operator]


class MetricsServer(WatchedThread):
    """The HTTP endpoint: prometheus_client's own server on its own thread, closed with the node."""

    def __init__(self, address: str, collector: StatusCollector) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        from bastion.edge.config import metrics_address

        host, port = metrics_address(address)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        try:
            self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise MetricsError(
                f"cannot serve metrics on {address}: {exc.strerror or exc}",
                "pick a free port for `metrics:` in node.yaml (or stop what holds it)",
            ) from None
        bound = self._httpd.server_address
        self.address = f"{'[' + bound[0] + ']' if ':' in bound[0] else bound[0]}:{bound[1]}"
        log.info("metrics on http://%s/metrics", self.address)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def start_metrics(address: str, status: Callable[[], dict[str, Any]], storage_dir: Path | None) -> MetricsServer:
    return MetricsServer(address, StatusCollector(status, storage_dir))

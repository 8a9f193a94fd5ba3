"""``LatencyHistogram``: inference time per batch in fixed buckets, for ``status`` (and so for metrics).

The node keeps one record of how it runs, its ``status`` dict; the Prometheus endpoint (edge/metrics.py)
translates that dict and counts nothing of its own. Cumulative buckets in seconds, Prometheus' layout.
"""

from __future__ import annotations

import bisect
import threading
from typing import Any

BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LatencyHistogram:
    def __init__(self, buckets: tuple[float, ...] = BUCKETS_S) -> None:
        self.buckets = buckets
        self._counts = [0] * (len(buckets) + 1)  # the last one: above every bucket
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, seconds)] += 1
            self._sum += seconds

    def as_dict(self) -> dict[str, Any]:
        """``{"buckets": {"0.005": n, ...}, "count": n, "sum_s": s}``; bucket counts are cumulative (le)."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = {}, 0
        for le, n in zip(self.buckets, counts):
            running += n
            cumulative[repr(le)] = running
        return {"buckets": cumulative, "count": running + counts[-1], "sum_s": round(total, 6)}

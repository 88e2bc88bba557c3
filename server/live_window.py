"""The last hour of requests, minute by minute, for the console: how many ended, and the time to
first token and end-to-end latency percentiles of each minute.

Prometheus keeps the real history (`/metrics`); this is what a page shows without one. Each
minute keeps counts per latency bucket (the histogram buckets `/metrics` uses), so recording a
request is two bisections and three increments, and the memory is fixed: 60 minutes of two rows
of 18 counts. A percentile is read as Prometheus' `histogram_quantile` reads it: linear within
the bucket where the rank falls.
"""

from __future__ import annotations

import bisect
import collections
from dataclasses import dataclass, field

from server.metrics import LATENCY_BUCKETS

MINUTES = 60


@dataclass
class Minute:
    start: int  # minutes since the epoch of the clock it was fed
    requests: int = 0
    errors: int = 0
    ttft: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))


def quantile(q: float, counts: list[int]) -> float | None:
    """The q-quantile (0..1) of bucketed counts, None without any; past the last bound, that
    bound (as histogram_quantile answers)."""
    seen = sum(counts)
    if not seen:
        return None
    rank, below = q * seen, 0
    for index, count in enumerate(counts):
        if count and below + count >= rank:
            if index == len(LATENCY_BUCKETS):
                return LATENCY_BUCKETS[-1]
            low = LATENCY_BUCKETS[index - 1] if index else 0.0
            return low + (LATENCY_BUCKETS[index] - low) * (rank - below) / count
        below += count
    return LATENCY_BUCKETS[-1]


class LiveWindow:
    """Requests ended in each of the last MINUTES minutes of a clock in seconds."""

    def __init__(self) -> None:
        self._minutes: collections.deque[Minute] = collections.deque(maxlen=MINUTES)

    def observe(self, now_s: float, total_s: float, ttft_s: float | None, status: int) -> None:
        minute = self._minute(int(now_s // 60))
        minute.requests += 1
        minute.errors += status >= 400
        minute.total[bisect.bisect_left(LATENCY_BUCKETS, total_s)] += 1
        if ttft_s is not None:
            minute.ttft[bisect.bisect_left(LATENCY_BUCKETS, ttft_s)] += 1

    def _minute(self, start: int) -> Minute:
        if not self._minutes or self._minutes[-1].start != start:
            self._minutes.append(Minute(start))
        return self._minutes[-1]

    def report(self, now_s: float) -> list[dict[str, object]]:
        """The last hour's minutes that had requests, oldest first, with their percentiles in
        seconds (None where a minute had no first token, e.g. only refusals)."""
        since = int(now_s // 60) - MINUTES + 1
        return [{"minute": minute.start * 60, "requests": minute.requests,
                 "errors": minute.errors,
                 "ttft_p50_s": quantile(0.5, minute.ttft), "ttft_p99_s": quantile(0.99, minute.ttft),
                 "e2e_p50_s": quantile(0.5, minute.total), "e2e_p99_s": quantile(0.99, minute.total)}
                for minute in self._minutes if minute.start >= since]

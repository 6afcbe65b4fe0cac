"""Request metrics kept as plain counters on the hot path, exposed to Prometheus on scrape.

Recording a request is a dict update and a bucket search: no locks, no label lookups, no
objects. `MetricsCollector` turns the counters into Prometheus families only when
`/metrics` is read.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)


class PairCounts:
    """What one (route, upstream) pair counted: answers by status, the latency
    histogram and body bytes. Native counters, so recording a request allocates
    nothing but the boxed counts."""

    def __init__(self) -> None:
        self.statuses: dict[int, int] = {}
        self.buckets: list[int] = [0] * (len(LATENCY_BUCKETS) + 1)  # the last: +Inf
        self.seconds = 0.0
        self.bytes_in = 0
        self.bytes_out = 0


class RequestMetrics:
    """Counters of one process."""

    def __init__(self) -> None:
        # route -> upstream -> counts: two lookups of interned strings per request, no
        # tuples built or compared. `requests`, `latency` and `body_bytes` are the flat
        # views the exposition reads.
        self.pairs: dict[str, dict[str, PairCounts]] = {}
        self.config_version = ""
        self.config_applied = 0
        self.config_rejected = 0
        self.circuit_changes: dict[tuple[str, str, str], int] = {}
        self.events: dict[tuple[str, str], int] = {}
        self.access_log_dropped = 0  # records a slow sink could not take (accesslog.py)
        # (route, upstream) -> retries. Exposed with derived families by
        # kanal.dataplane.routemetrics.
        self.retries: dict[tuple[str, str], int] = {}
        self.overload_refused = 0  # requests answered 503 while overloaded (overload.py)

    def observe(self, route: str, upstream: str, status: int, seconds: float,
                bytes_in: int = 0, bytes_out: int = 0) -> None:
        by_upstream = self.pairs.get(route)
        if by_upstream is None:
            by_upstream = self.pairs[route] = {}
        counts = by_upstream.get(upstream)
        if counts is None:
            counts = by_upstream[upstream] = PairCounts()
        statuses = counts.statuses
        statuses[status] = statuses.get(status, 0) + 1
        bucket = 0
        last = len(LATENCY_BUCKETS)
        # (Compiled, indexing a Final tuple is a load and a compare: no iterator, no call.)
        while bucket < last and seconds > LATENCY_BUCKETS[bucket]:
            bucket += 1
        counts.buckets[bucket] += 1
        counts.seconds += seconds
        counts.bytes_in += bytes_in
        counts.bytes_out += bytes_out

    @property
    def requests(self) -> dict[tuple[str, str, int], int]:
        """(route, upstream, status) -> answers."""
        return {(route, upstream, status): count
                for route, by_upstream in self.pairs.items()
                for upstream, counts in by_upstream.items()
                for status, count in counts.statuses.items()}

    @property
    def latency(self) -> dict[tuple[str, str], list[float]]:
        """(route, upstream) -> [bucket counts..., +Inf count, sum of seconds]."""
        return {(route, upstream): [*map(float, counts.buckets), counts.seconds]
                for route, by_upstream in self.pairs.items()
                for upstream, counts in by_upstream.items()}

    @property
    def body_bytes(self) -> dict[tuple[str, str], list[int]]:
        """(route, upstream) -> [request body bytes, response body bytes], for pairs
        that moved any."""
        return {(route, upstream): [counts.bytes_in, counts.bytes_out]
                for route, by_upstream in self.pairs.items()
                for upstream, counts in by_upstream.items()
                if counts.bytes_in or counts.bytes_out}

    def count_retry(self, route: str, upstream: str) -> None:
        key = (route, upstream)
        self.retries[key] = self.retries.get(key, 0) + 1

    def count_event(self, name: str, upstream: str) -> None:
        key = (name, upstream)
        self.events[key] = self.events.get(key, 0) + 1


class MetricsCollector:
    """A prometheus_client collector reading `RequestMetrics` at scrape time."""

    def __init__(self, metrics: RequestMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        # prometheus_client (4 MiB resident) is loaded at the first scrape, not at start.
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        metrics = self.metrics
        requests = CounterMetricFamily(
            "kanal_requests", "Requests answered, by route, upstream and status code",
            labels=["route", "upstream", "code"],
        )
        for (route, upstream, status), count in sorted(metrics.requests.items()):
            requests.add_metric([route, upstream, str(status)], count)
        yield requests

        latency = HistogramMetricFamily(
            "kanal_request_duration_seconds",
            "Time from the request head to the end of the answer, by route and upstream",
            labels=["route", "upstream"],
        )
        for (route, upstream), cells in sorted(metrics.latency.items()):
            cumulative = 0.0
            buckets = []
            for bound, cell in zip(LATENCY_BUCKETS, cells, strict=False):
                cumulative += cell
                buckets.append((repr(bound), cumulative))
            cumulative += cells[len(LATENCY_BUCKETS)]
            buckets.append(("+Inf", cumulative))
            latency.add_metric([route, upstream], buckets, cells[-1])
        yield latency

        changes = CounterMetricFamily(
            "kanal_circuit_state_changes", "Circuit breaker transitions, by endpoint and new state",
            labels=["upstream", "endpoint", "state"],
        )
        for (upstream, endpoint, state), count in sorted(metrics.circuit_changes.items()):
            changes.add_metric([upstream, endpoint, state], count)
        yield changes

        events = CounterMetricFamily(
            "kanal_upstream_events", "Retries, overloads, ejections and failures, by upstream",
            labels=["event", "upstream"],
        )
        for (name, upstream), count in sorted(metrics.events.items()):
            events.add_metric([name, upstream], count)
        yield events

        version = GaugeMetricFamily(
            "kanal_config_info", "The applied configuration's version", labels=["version"]
        )
        if metrics.config_version:
            version.add_metric([metrics.config_version], 1)
        yield version
        applied = CounterMetricFamily("kanal_config_applied", "Configurations applied")
        applied.add_metric([], metrics.config_applied)
        yield applied
        rejected = CounterMetricFamily("kanal_config_rejected", "Configurations rejected")
        rejected.add_metric([], metrics.config_rejected)
        yield rejected
        dropped = CounterMetricFamily(
            "kanal_access_log_dropped", "Access log records dropped because the sink was slow")
        dropped.add_metric([], metrics.access_log_dropped)
        yield dropped
        yield from cache_families(CounterMetricFamily, GaugeMetricFamily)


def cache_families(counter: type[CounterMetricFamily],
                   gauge: type[GaugeMetricFamily]) -> Iterator[Metric]:
    """The process's cache: what it did per route, what it refused, what it holds."""
    from kanal.dataplane.cache.store import PROCESS_STORE

    stats = PROCESS_STORE.stats
    events = counter("kanal_cache_events", "Cache hits, misses, stale and revalidated answers, "
                     "bypasses, evictions, invalidations and disk errors, by route",
                     labels=["event", "route"])
    for (event, route), count in sorted(stats.events.items()):
        events.add_metric([event, route], count)
    yield events
    refused = counter("kanal_cache_not_stored", "Answers not stored, by reason",
                      labels=["reason"])
    for reason, count in sorted(stats.not_stored.items()):
        refused.add_metric([reason], count)
    yield refused
    stored = gauge("kanal_cache_stored_bytes", "Bytes of stored answers, in memory and on disk",
                   labels=["tier"])
    stored.add_metric(["memory"], stats.memory_bytes)
    stored.add_metric(["disk"], stats.disk_bytes)
    yield stored
    entries = gauge("kanal_cache_entries", "Stored answers")
    entries.add_metric([], stats.entries)
    yield entries

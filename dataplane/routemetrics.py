"""Per-route and per-upstream families, derived at scrape time.

The hot path records only what it must (`RequestMetrics.observe`: a count by status
code, a latency bucket, body bytes); everything else is computed here when `/metrics`
is read: status classes and per-upstream totals are sums of those counts, and requests
in flight are counted from the open client connections and the endpoints' counters, so
they cost no request anything. Labels are route and upstream keys of the applied
configuration and a status class: no path, client or other unbounded value.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from kanal.dataplane.metrics import LATENCY_BUCKETS, RequestMetrics

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from kanal.dataplane.runtime import Runtime


def status_class(code: int) -> str:
    """`2xx` for 204; `0xx` for "no status was sent"."""
    return f"{code // 100}xx" if 100 <= code <= 599 else "0xx"


def by_class(metrics: RequestMetrics) -> dict[tuple[str, str, str], int]:
    """(route, upstream, class) -> requests."""
    counts: dict[tuple[str, str, str], int] = {}
    for (route, upstream, code), count in metrics.requests.items():
        key = (route, upstream, status_class(code))
        counts[key] = counts.get(key, 0) + count
    return counts


def upstream_latency(metrics: RequestMetrics) -> dict[str, list[float]]:
    """upstream -> latency cells (buckets, +Inf, sum) summed over its routes."""
    summed: dict[str, list[float]] = {}
    for (_route, upstream), cells in metrics.latency.items():
        if not upstream:
            continue
        total = summed.get(upstream)
        if total is None:
            summed[upstream] = list(cells)
        else:
            for i, cell in enumerate(cells):
                total[i] += cell
    return summed


def in_flight(runtime: Runtime) -> dict[tuple[str, str], int]:
    """(route, upstream) -> requests under way on this process's reverse and inbound
    listeners (a request counts from its route choice to the end of its answer)."""
    from kanal.dataplane.proxy import ClientConnection

    counts: dict[tuple[str, str], int] = {}
    for owner in (runtime, *runtime.companions):
        for context in owner.contexts:
            for client in context.clients:
                if not isinstance(client, ClientConnection) or client.tunnel:
                    continue
                request = client.current
                if request is not None and request.route_key:
                    key = (request.route_key, request.upstream_key)
                    counts[key] = counts.get(key, 0) + 1
    return counts


class TrafficCollector:
    """A prometheus_client collector for the families above (read at scrape time)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        runtime = self.runtime
        metrics = runtime.metrics
        classes = by_class(metrics)

        routes = CounterMetricFamily(
            "kanal_route_requests", "Requests answered, by route, upstream and status class",
            labels=["route", "upstream", "code_class"])
        for (route, upstream, code_class), count in sorted(classes.items()):
            routes.add_metric([route, upstream, code_class], count)
        yield routes

        upstreams = CounterMetricFamily(
            "kanal_upstream_requests", "Requests answered, by upstream and status class",
            labels=["upstream", "code_class"])
        per_upstream: dict[tuple[str, str], int] = {}
        for (_route, upstream, code_class), count in classes.items():
            if upstream:
                per_upstream[(upstream, code_class)] = per_upstream.get((upstream, code_class), 0) + count
        for (upstream, code_class), count in sorted(per_upstream.items()):
            upstreams.add_metric([upstream, code_class], count)
        yield upstreams

        latency = HistogramMetricFamily(
            "kanal_upstream_request_duration_seconds",
            "Time from the request head to the end of the answer, by upstream",
            labels=["upstream"])
        for upstream, cells in sorted(upstream_latency(metrics).items()):
            cumulative = 0.0
            buckets = []
            for bound, cell in zip(LATENCY_BUCKETS, cells, strict=False):
                cumulative += cell
                buckets.append((repr(bound), cumulative))
            cumulative += cells[len(LATENCY_BUCKETS)]
            buckets.append(("+Inf", cumulative))
            latency.add_metric([upstream], buckets, cells[-1])
        yield latency

        received = CounterMetricFamily(
            "kanal_request_body_bytes", "Request body bytes received from clients, by route "
            "and upstream", labels=["route", "upstream"])
        sent = CounterMetricFamily(
            "kanal_response_body_bytes", "Response body bytes sent to clients, by route and "
            "upstream", labels=["route", "upstream"])
        for (route, upstream), (bytes_in, bytes_out) in sorted(metrics.body_bytes.items()):
            received.add_metric([route, upstream], bytes_in)
            sent.add_metric([route, upstream], bytes_out)
        yield received
        yield sent

        retries = CounterMetricFamily(
            "kanal_route_retries", "Tries after the first, by route and upstream",
            labels=["route", "upstream"])
        for (route, upstream), count in sorted(metrics.retries.items()):
            retries.add_metric([route, upstream], count)
        yield retries

        flying = GaugeMetricFamily(
            "kanal_route_requests_in_flight", "Requests under way, by route and upstream",
            labels=["route", "upstream"])
        for (route, upstream), count in sorted(in_flight(runtime).items()):
            flying.add_metric([route, upstream], count)
        yield flying

        active = GaugeMetricFamily(
            "kanal_upstream_requests_in_flight",
            "Requests under way to the upstream's endpoints (every listener, retries included)",
            labels=["upstream"])
        for owner in (runtime, *runtime.companions):
            config = owner.config
            if config is None:
                continue
            for key, upstream_runtime in sorted(config.upstreams.items()):
                active.add_metric([key], sum(state.active for state in upstream_runtime.states))
        yield active

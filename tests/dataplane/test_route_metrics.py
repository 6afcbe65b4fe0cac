"""Per-route and per-upstream metrics of `kanal run`'s /metrics, compared with the
traffic a real client sent through it to real backends."""

from __future__ import annotations

import asyncio

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from kanal.dataplane.routemetrics import status_class
from tests.conftest import async_wait_until, upstream_yaml

ROUTES = """\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: shop}
spec:
  hostnames: [shop.test]
  rules:
    - name: flaky
      matches: [{path: {type: PathPrefix, value: /status}}]
      backends: [{upstream: b}]
      retries: {attempts: 1, retryOn: ["503"]}
    - name: main
      backends: [{upstream: a}]
"""


async def scrape(admin: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as session, session.get(admin + "/metrics") as answer:
        text = await answer.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_requests_classes_bytes_latency_retries_and_in_flight(kanal, backends):
    a, b = await backends("a"), await backends("b")
    k = kanal({"up.yaml": upstream_yaml("a", a) + "---\n" + upstream_yaml("b", b),
               "route.yaml": ROUTES})
    route = "default/shop"
    async with aiohttp.ClientSession(headers={"Host": "shop.test"}) as session:
        sizes = []
        for _ in range(3):
            async with session.post(k.url + "/orders", data=b"x" * 500) as answer:
                assert answer.status == 200
                sizes.append(len(await answer.read()))
        async with session.get(k.url + "/status/503") as answer:
            assert answer.status == 503  # tried twice: one retry
        async with session.get(k.url + "/status/404") as answer:
            assert answer.status == 404
        async with session.get(k.url + "/", headers={"Host": "nowhere.test"}) as answer:
            assert answer.status == 404

        samples = await scrape(k.admin)
        assert value(samples, "kanal_route_requests_total", route=route, upstream="default/a",
                     code_class="2xx") == 3
        assert value(samples, "kanal_route_requests_total", route=route, upstream="default/b",
                     code_class="5xx") == 1
        assert value(samples, "kanal_route_requests_total", route=route, upstream="default/b",
                     code_class="4xx") == 1
        assert value(samples, "kanal_route_requests_total", route="", upstream="",
                     code_class="4xx") == 1
        assert value(samples, "kanal_upstream_requests_total", upstream="default/b",
                     code_class="5xx") == 1
        assert value(samples, "kanal_request_body_bytes_total", route=route,
                     upstream="default/a") == 1500
        assert value(samples, "kanal_response_body_bytes_total", route=route,
                     upstream="default/a") == sum(sizes)
        assert value(samples, "kanal_route_retries_total", route=route, upstream="default/b") == 1
        assert value(samples, "kanal_upstream_request_duration_seconds_count",
                     upstream="default/a") == 3
        assert value(samples, "kanal_upstream_request_duration_seconds_bucket",
                     upstream="default/a", le="+Inf") == 3
        # No label carries a path or a client address.
        labels = {name for (_, pairs) in samples for name, _ in pairs}
        assert not labels & {"path", "client", "peer", "host"}

        slow = asyncio.ensure_future(session.get(k.url + "/sleep/1.5"))
        try:
            async def flying(expected: float) -> bool:
                samples = await scrape(k.admin)
                return (value(samples, "kanal_route_requests_in_flight", route=route,
                              upstream="default/a") == expected
                        and value(samples, "kanal_upstream_requests_in_flight",
                                  upstream="default/a") == expected)

            await async_wait_until(lambda: flying(1))
        finally:
            answer = await slow
            answer.release()
        await async_wait_until(lambda: flying(0))


def test_status_class() -> None:
    assert [status_class(c) for c in (101, 200, 308, 404, 599, 0)] == [
        "1xx", "2xx", "3xx", "4xx", "5xx", "0xx"]

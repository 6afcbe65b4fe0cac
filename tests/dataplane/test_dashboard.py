"""The dashboard's data and tables without a browser: rates, recent errors, the page.

The page in a real browser is tested in test_dashboard_browser.py; here the parts a
browser would not show plainly: how rates and errors are counted, that the page is
whole without scripts, and that it loads nothing from elsewhere.
"""

from __future__ import annotations

import re

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from kanal.contract.snapshot import (
    Backend,
    Endpoint,
    HealthCheck,
    Route,
    Rule,
    Snapshot,
    Upstream,
)
from kanal.dataplane.dashview import Traffic, dashboard_view, render_tables
from kanal.dataplane.metrics import RequestMetrics
from kanal.dataplane.runtime import Runtime
from kanal.dataplane.splitwatch import SplitWatch
from tests.conftest import upstream_yaml

T0 = 1_800_000_000.0


def test_rates_are_differences_between_reads_and_errors_are_listed_once() -> None:
    metrics = RequestMetrics()
    traffic = Traffic()
    metrics.observe("shop/web", "shop/v1", 200, 0.01)
    metrics.observe("shop/web", "shop/v1", 502, 0.01)
    first = traffic.observe(metrics, T0)
    assert (first["shop/web"].requests, first["shop/web"].errors) == (2, 1)
    assert first["shop/web"].request_rate is None  # one read: no rate yet
    assert [e["message"] for e in traffic.errors] == [
        "1 × 502 from route shop/web to shop/v1 since the dataplane started"]
    for _ in range(20):
        metrics.observe("shop/web", "shop/v1", 200, 0.01)
    for _ in range(4):
        metrics.observe("shop/web", "shop/v1", 503, 0.01)
    metrics.count_event("ejection", "shop/v1")
    second = traffic.observe(metrics, T0 + 2)
    assert second["shop/web"].request_rate == 12.0
    assert second["shop/web"].error_rate == 2.0
    assert [e["message"] for e in traffic.errors][:2] == [
        "upstream shop/v1: a circuit opened (endpoint ejected)",
        "4 × 503 from route shop/web to shop/v1",
    ]
    traffic.observe(metrics, T0 + 3)
    assert len(traffic.errors) == 3  # nothing new, nothing added


def test_view_and_tables_show_routes_endpoints_and_splits() -> None:
    runtime = Runtime()
    config = runtime.apply(Snapshot(
        routes=(Route("shop/web", hostnames=("shop.example",), rules=(
            Rule(0, backends=(Backend("shop/v1", 9), Backend("shop/v2", 1))),)),),
        upstreams=(
            Upstream("shop/v1", endpoints=(Endpoint("127.0.0.1", 9001),)),
            Upstream("shop/v2", endpoints=(Endpoint("127.0.0.1", 9002),),
                     health_check=HealthCheck()),
        ),
    ).with_version())
    watch = SplitWatch()
    watch.follow(config.table)
    config.upstreams["shop/v2"].states[0].healthy = False  # as its checker would say
    selection = config.table.match("shop.example", "GET", "/")
    assert selection is not None
    for _ in range(10):
        selection.split.choose()
    view = dashboard_view(config, runtime.metrics, watch, Traffic(), T0)
    assert view["version"] == config.version
    [route] = view["routes"]
    assert route["rules"][0]["split"] == (
        "declared 90/10, observed 90.0/10.0 over the last 10 requests (shop/v1/shop/v2)")
    html = render_tables(view)
    assert '<tr data-route="shop/web" data-rule="0">' in html
    assert 'data-endpoint="127.0.0.1:9002" data-health="unhealthy"' in html
    assert "declared 90/10, observed 90.0/10.0" in html
    # Without health checks, health is passive: an endpoint whose circuit opened after
    # failed requests is unhealthy.
    breaker = config.upstreams["shop/v1"].states[0].breaker
    for _ in range(5):
        breaker.record(False, 0.01, 0.0)
    assert breaker.state == "open"
    html = render_tables(dashboard_view(config, runtime.metrics, watch, Traffic(), T0))
    assert ('data-endpoint="127.0.0.1:9001" data-health="unhealthy" data-circuit="open"'
            in html)
    # Text from the configuration is escaped, never markup.
    view["routes"][0]["key"] = "<script>alert(1)</script>"
    assert "<script>" not in render_tables(view)


async def test_the_page_is_whole_without_scripts_and_loads_nothing_from_elsewhere(
    kanal, backends
):
    v1 = await backends("v1")
    k = kanal({"up.yaml": upstream_yaml("v1", v1), "route.yaml": """\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: web}
spec:
  rules: [{backends: [{upstream: v1}]}]
"""})
    async with aiohttp.ClientSession() as session:
        async with session.get(k.url + "/status/503") as answer:
            assert answer.status == 503
        for path in ("/ui", "/"):
            async with session.get(k.admin + path) as answer:
                assert answer.status == 200
                assert answer.content_type == "text/html"
                policy = answer.headers["Content-Security-Policy"]
                page = await answer.text()
            assert "default-src 'none'" in policy
            assert "'sha256-" in policy and "unsafe-inline'; connect" not in policy
            # Served complete: the tables are in the page itself.
            assert '<tr data-route="default/web" data-rule="0">' in page
            assert f'data-endpoint="127.0.0.1:{v1.port}" data-health="healthy"' in page
            assert "1 × 503 from route default/web to default/v1" in page
            assert '<meta http-equiv="refresh" content="5">' in page  # inside <noscript>
            # Nothing from another origin: no src, href or url() with a scheme or //.
            assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
            assert not re.search(r"url\(\s*['\"]?(https?:)?//", page)
        async with session.get(k.admin + "/ui/state.json") as answer:
            state = await answer.json()
    assert state["version"] == k.version()
    assert [u["key"] for u in state["upstreams"]] == ["default/v1"]
    assert state["routes"][0]["requests"] == 1


async def test_with_workers_the_dashboard_answers_and_split_shares_are_not_summed(
    kanal, backends
):
    v1, v2 = await backends("v1"), await backends("v2")
    k = kanal({
        "up.yaml": upstream_yaml("v1", v1) + "---\n" + upstream_yaml("v2", v2),
        "route.yaml": """\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: web}
spec:
  rules: [{backends: [{upstream: v1, weight: 90}, {upstream: v2, weight: 10}]}]
""",
    }, "--workers", "2")
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            # A new connection each time, so both workers take requests.
            async with session.get(k.url + "/", headers={"Connection": "close"}) as answer:
                assert answer.status == 200
        async with session.get(k.admin + "/ui") as answer:
            assert answer.status == 200
            assert '<tr data-route="default/web" data-rule="0">' in await answer.text()
        async with session.get(k.admin + "/metrics") as answer:
            text = await answer.text()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("kanal_split_"):
                found[(sample.name, sample.labels.get("upstream"))] = sample.value
    assert found[("kanal_split_declared_weight", "default/v1")] == 90
    assert found[("kanal_split_window_requests", None)] == 200
    canary = found[("kanal_split_choices_total", "default/v2")]
    assert 18 <= canary <= 22  # each worker keeps 90/10 to within one request
    # The group's share is the share over both workers' windows, not a sum of shares.
    assert abs(found[("kanal_split_observed_share", "default/v2")] - canary / 200) < 1e-9


async def test_with_workers_the_dashboard_sums_what_every_worker_served(kanal, backends):
    import asyncio

    from tests.conftest import free_port

    v1, v2 = await backends("v1"), await backends("v2")
    dead = free_port()  # nothing listens there: every request to it fails
    k = kanal({
        "up.yaml": upstream_yaml("v1", v1) + "---\n" + upstream_yaml("v2", v2) + "---\n"
        + f"apiVersion: kanal.dev/v1alpha1\nkind: Upstream\nmetadata: {{name: dead}}\n"
          f"spec: {{endpoints: [{{address: 127.0.0.1, port: {dead}}}]}}\n",
        "route.yaml": """\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: web}
spec:
  hostnames: [web.test]
  rules: [{backends: [{upstream: v1, weight: 50}, {upstream: v2, weight: 50}]}]
---
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: broken}
spec:
  hostnames: [broken.test]
  rules: [{backends: [{upstream: dead}]}]
""",
    }, "--workers", "2")

    async def state(session: aiohttp.ClientSession) -> dict:
        async with session.get(k.admin + "/ui/state.json") as answer:
            assert answer.status == 200
            return await answer.json()

    async with aiohttp.ClientSession() as session:
        await state(session)  # the first read: each worker's rates start from here
        for i in range(60):
            # A new connection each time, so the kernel spreads them over both workers.
            host = "broken.test" if i % 6 == 0 else "web.test"
            async with session.get(k.url + "/", headers={"Host": host,
                                                        "Connection": "close"}) as answer:
                assert answer.status == 200 if host == "web.test" else answer.status >= 500
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while True:
            view = await state(session)
            routes = {route["key"]: route for route in view["routes"]}
            if routes["default/web"]["requestRate"] is not None or loop.time() > deadline:
                break
        async with session.get(k.admin + "/ui") as answer:
            page = await answer.text()

    web, broken = routes["default/web"], routes["default/broken"]
    # Every request, whichever worker served it: one worker's share would be about half.
    assert (web["requests"], web["errors"]) == (50, 0)
    assert (broken["requests"], broken["errors"]) == (10, 10)
    assert view["workers"] == {"answered": 2, "total": 2}
    assert web["requestRate"] > 0 and broken["errorRate"] > 0
    (split,) = view["splits"]
    assert split["window"] == 50
    assert sum(b["observed"] for b in split["backends"]) == 50
    # Each worker alternates its own requests: the group is within one per worker of 25.
    assert all(23 <= b["observed"] <= 27 for b in split["backends"])
    (rule,) = web["rules"]
    assert rule["split"] == split["message"]
    assert [b["observedShare"] for b in rule["backends"]] == [
        b["observedShare"] for b in split["backends"]]
    # Recent errors of both workers, newest first: their counts add up to every failure.
    failures = [re.match(r"(\d+) × \d+ from route default/broken", e["message"])
                for e in view["recentErrors"]]
    assert sum(int(m.group(1)) for m in failures if m) == 10
    assert [e["at"] for e in view["recentErrors"]] == sorted(
        (e["at"] for e in view["recentErrors"]), reverse=True)
    assert "sums over 2 of 2 workers" in page
    assert '<td class="num">50</td>' in page

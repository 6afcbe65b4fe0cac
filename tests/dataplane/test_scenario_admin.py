"""Scenario: the admin endpoints of `kanal run` (`--admin`): live, ready, config, explain, metrics."""

from __future__ import annotations

import re

import aiohttp
import pytest

from tests.conftest import upstream_yaml

ROUTE = """\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: web}
spec:
  hostnames: [shop.example.com]
  rules:
    - name: canary
      matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-canary, value: "true"}]}]
      backends: [{upstream: v2}]
    - name: main
      matches: [{path: {type: PathPrefix, value: /api}}]
      backends: [{upstream: v1, weight: 95}, {upstream: v2, weight: 5}]
"""


@pytest.fixture(scope="module")
def k(module_kanal, module_backends):
    v1, v2 = module_backends("v1"), module_backends("v2")
    return module_kanal(
        {
            "up.yaml": upstream_yaml("v1", v1) + "---\n" + upstream_yaml("v2", v2),
            "route.yaml": ROUTE,
        }
    )


async def admin_get(k, path: str, params: list[tuple[str, str]] | None = None):
    async with (
        aiohttp.ClientSession() as session,
        session.get(k.admin + path, params=params) as answer,
    ):
        return answer.status, answer.headers.get("Content-Type", ""), await answer.text()


async def test_live_and_ready(k):
    status, _, _ = await admin_get(k, "/live")
    assert status == 200
    status, _, body = await admin_get(k, "/ready")
    assert status == 200
    assert k.version() in body


async def test_config_shows_version_routes_upstreams_and_endpoint_state(k):
    config = k.config()
    assert isinstance(config["version"], str) and config["version"]
    assert [r["key"] for r in config["routes"]] == ["default/web"]
    rules = config["routes"][0]["rules"]
    assert [r["name"] for r in rules] == ["canary", "main"]
    upstreams = {u["key"]: u for u in config["upstreams"]}
    assert set(upstreams) == {"default/v1", "default/v2"}
    for upstream in upstreams.values():
        (endpoint,) = upstream["endpoints"]
        assert endpoint["address"] == "127.0.0.1"
        assert endpoint["health"] == "healthy"
        assert endpoint["circuit"] == "closed"


async def test_explain_names_route_rule_backends_and_why_others_lost(k):
    status, _, _ = await admin_get(k, "/explain", [("url", "http://shop.example.com/api/x")])
    assert status == 200
    async with aiohttp.ClientSession() as session:
        async with session.get(
            k.admin + "/explain",
            params=[
                ("url", "http://shop.example.com/api/orders"),
                ("method", "GET"),
                ("header", "x-canary:true"),
            ],
        ) as answer:
            canary = await answer.json()
        async with session.get(
            k.admin + "/explain",
            params=[
                ("url", "http://shop.example.com/api/orders"),
                ("method", "POST"),
            ],
        ) as answer:
            main = await answer.json()
        async with session.get(
            k.admin + "/explain",
            params=[
                ("url", "http://other.example.com/api/orders"),
            ],
        ) as answer:
            nothing = await answer.json()

    assert canary["route"] == "default/web"
    assert canary["rule"]["name"] == "canary"
    assert [b["upstream"] for b in canary["backends"]] == ["default/v2"]
    (lost,) = [c for c in canary["candidates"] if c["name"] == "main"]
    assert lost["result"] == "lost on precedence"

    assert main["rule"]["name"] == "main"
    assert {b["upstream"]: b["weight"] for b in main["backends"]} == {
        "default/v1": 95,
        "default/v2": 5,
    }
    (missed,) = [c for c in main["candidates"] if c["name"] == "canary"]
    assert missed["result"] == "no match"
    assert any("x-canary" in reason for reason in missed["reasons"]), missed

    assert nothing["matched"] is False
    assert all(c["result"] == "no match" for c in nothing["candidates"])
    assert any("other.example.com" in r for c in nothing["candidates"] for r in c["reasons"])


async def test_explain_without_url_is_a_400_that_says_why(k):
    status, _, body = await admin_get(k, "/explain")
    assert status == 400
    assert "url" in body


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text exposition as (name, labels, value) samples."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        found = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        assert found, line
        labels = dict(
            re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', found.group(2) or "")
        )
        samples.append((found.group(1), labels, float(found.group(3))))
    return samples


def value(samples, name: str, **labels: str) -> float:
    found = [
        v for n, ls, v in samples if n == name and all(ls.get(k) == w for k, w in labels.items())
    ]
    assert len(found) == 1, (name, labels, [(n, ls) for n, ls, _ in samples if n == name])
    return found[0]


async def scrape(k):
    status, content_type, text = await admin_get(k, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    return parse_metrics(text)


async def test_metrics_count_requests_by_route_upstream_and_code(k):
    before = await scrape(k)
    base = [
        v
        for n, ls, v in before
        if n == "kanal_requests_total"
        and ls.get("route") == "default/web"
        and ls.get("upstream") == "default/v2"
        and ls.get("code") == "200"
    ]
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.get(
                k.url + "/api/m", headers={"Host": "shop.example.com", "x-canary": "true"}
            ) as answer:
                assert answer.status == 200
    samples = await scrape(k)
    assert (
        value(
            samples, "kanal_requests_total", route="default/web", upstream="default/v2", code="200"
        )
        == (base[0] if base else 0) + 3
    )
    assert (
        value(
            samples,
            "kanal_request_duration_seconds_count",
            route="default/web",
            upstream="default/v2",
        )
        >= 3
    )
    assert (
        value(
            samples,
            "kanal_request_duration_seconds_bucket",
            route="default/web",
            upstream="default/v2",
            le="+Inf",
        )
        >= 3
    )
    assert value(samples, "kanal_config_info", version=k.version() or "") == 1


async def test_metrics_count_a_404_without_route_or_upstream(k):
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        for _ in range(2):
            async with session.get(k.url + "/nothing", headers={"Host": "nope.test"}) as answer:
                assert answer.status == 404
    samples = await scrape(k)
    assert value(samples, "kanal_requests_total", route="", upstream="", code="404") >= 2


async def test_metrics_do_not_blame_the_previous_upstream_for_a_404(k):
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        async with session.get(k.url + "/api/x", headers={"Host": "shop.example.com"}) as answer:
            assert answer.status == 200
        async with session.get(k.url + "/nothing", headers={"Host": "nope.test"}) as answer:
            assert answer.status == 404
    samples = await scrape(k)
    blamed = [
        (ls, v)
        for n, ls, v in samples
        if n == "kanal_requests_total" and ls.get("code") == "404" and ls.get("upstream")
    ]
    assert blamed == []

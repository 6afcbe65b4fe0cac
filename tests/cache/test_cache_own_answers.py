"""Answers the proxy makes itself on a rule with a cache carry `X-Cache` too: `BYPASS`
when they come before the cache was asked (a refusal, a rate limit, a body too large, a
filter's own answer), `MISS` when the cache was asked and had nothing to answer with
(the upstream failed, or `only-if-cached` found nothing)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.cache.helpers import get, q, upstream
from tests.cache.origin import Origin
from tests.conftest import Kanal, free_port, raw_request


@pytest.fixture(scope="module")
def proxy(origin: Origin, module_kanal: Callable[..., Kanal]) -> Kanal:
    manifests = {
        "origin.yaml": upstream(origin),
        "down.yaml": f"""\
            apiVersion: kanal.dev/v1alpha1
            kind: Upstream
            metadata: {{name: down}}
            spec:
              endpoints: [{{address: 127.0.0.1, port: {free_port()}}}]
            """,
        "route.yaml": """\
            apiVersion: kanal.dev/v1alpha1
            kind: Route
            metadata: {name: site}
            spec:
              rules:
                - matches: [{path: {type: PathPrefix, value: /denied}}]
                  backends: [{upstream: origin}]
                  policies: {ipRules: {deny: [127.0.0.1]}}
                  cache: {}
                - matches: [{path: {type: PathPrefix, value: /uncached-denied}}]
                  backends: [{upstream: origin}]
                  policies: {ipRules: {deny: [127.0.0.1]}}
                - matches: [{path: {type: PathPrefix, value: /limited}}]
                  backends: [{upstream: origin}]
                  policies:
                    rateLimit: {type: Local, limits: [{name: one, requests: 1, unit: Minute}]}
                  cache: {}
                - matches: [{path: {type: PathPrefix, value: /small-body}}]
                  backends: [{upstream: origin}]
                  maxRequestBodySize: "10"
                  cache: {}
                - matches: [{path: {type: PathPrefix, value: /moved}}]
                  filters:
                    - type: RequestRedirect
                      requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /}}
                  backends: [{upstream: origin}]
                  cache: {}
                - matches: [{path: {type: PathPrefix, value: /down}}]
                  backends: [{upstream: down}]
                  cache: {}
            """,
    }
    return module_kanal(manifests)


async def test_refusals_before_the_cache_say_bypass(proxy: Kanal):
    denied = await get(proxy, "/denied?" + q(cc="max-age=60"))
    assert denied.status == 403 and denied.header("X-Cache") == "BYPASS"
    uncached = await get(proxy, "/uncached-denied")
    assert uncached.status == 403 and uncached.header("X-Cache") is None
    allowed = await get(proxy, "/limited?" + q(cc="max-age=60"))
    limited = await get(proxy, "/limited?" + q(cc="max-age=60"))
    assert allowed.status == 200 and allowed.header("X-Cache") == "MISS"
    assert limited.status == 429 and limited.header("X-Cache") == "BYPASS"
    moved = await get(proxy, "/moved")
    assert moved.status == 302 and moved.header("X-Cache") == "BYPASS"


async def test_a_body_too_large_says_bypass(proxy: Kanal):
    data = (b"GET /small-body HTTP/1.1\r\nHost: site.test\r\nContent-Length: 100\r\n"
            b"Connection: close\r\n\r\n" + b"x" * 100)
    [answer] = await raw_request(proxy.port, data)
    assert answer.status == 413 and answer.header("X-Cache") == "BYPASS"


async def test_answers_after_the_cache_was_asked_say_miss(proxy: Kanal):
    failed = await get(proxy, "/down/page?" + q(cc="max-age=60"))
    assert failed.status in (502, 503) and failed.header("X-Cache") == "MISS"
    not_stored = await get(proxy, "/down/never", "Cache-Control: only-if-cached")
    assert not_stored.status == 504 and not_stored.header("X-Cache") == "MISS"

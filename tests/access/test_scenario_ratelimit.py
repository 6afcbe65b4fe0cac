"""Scenario: local rate limits through a real `kanal run`, with one worker and with
several, counting exactly how many requests of a burst reach the backend."""

from __future__ import annotations

import asyncio
import json
import urllib.request

from tests.access.helpers import api_manifests
from tests.conftest import raw_request, upstream_yaml


def manifests(backend, limits: str) -> dict[str, str]:
    return api_manifests(backend, f"""\
    rateLimit:
      limits: {limits}
""")


async def get(k, client: str = ""):
    forwarded = f"X-Forwarded-For: {client}\r\n" if client else ""
    (answer,) = await raw_request(k.port, f"GET / HTTP/1.1\r\nHost: a\r\n{forwarded}"
                                          "Connection: close\r\n\r\n".encode())
    return answer


async def test_per_client_and_overall_limits_with_headers(backends, kanal) -> None:
    backend = await backends("api")
    k = kanal(manifests(backend, "[{name: per-client, requests: 3, unit: Minute, "
                                 "key: {clientAddress: true}}, "
                                 "{name: overall, requests: 5, unit: Minute}]"),
              "--trusted-hops", "1")
    first = await get(k, "10.0.0.1")
    assert first.status == 200
    assert first.header("RateLimit-Policy") == '"per-client";q=3;w=60, "overall";q=5;w=60'
    assert first.header("RateLimit") == '"per-client";r=2;t=20, "overall";r=4;t=12'
    assert [(await get(k, "10.0.0.1")).status for _ in range(3)] == [200, 200, 429]
    refused = await get(k, "10.0.0.1")
    assert refused.status == 429
    assert int(refused.header("Retry-After") or 0) >= 1
    assert '"per-client";r=0' in (refused.header("RateLimit") or "")
    assert b"per-client" in refused.body
    # Another client has its own bucket, but the overall one has 2 tokens left.
    assert [(await get(k, "10.0.0.2")).status for _ in range(3)] == [200, 200, 429]
    assert len(backend.received) == 5

    # /explain reads the buckets without taking from them.
    for _ in range(2):
        with urllib.request.urlopen(f"{k.admin}/explain?url=http://a/&header=X-Real-IP:10.0.0.3",
                                    timeout=5) as answer:
            decision = json.loads(answer.read())["access"]["decisions"]["rateLimit"]
        assert decision == {"decision": "refuse", "remaining": {"per-client": 3, "overall": 0}}


async def test_workers_share_one_limit(backends, kanal) -> None:
    backend = await backends("api")
    k = kanal(manifests(backend, "[{name: all, requests: 12, unit: Hour}]"),
              "--workers", "3")
    answers = await asyncio.gather(*(get(k) for _ in range(40)))
    statuses = [answer.status for answer in answers]
    assert statuses.count(200) == 12, statuses
    assert statuses.count(429) == 28
    assert len(backend.received) == 12


async def test_a_routes_limit_is_shared_by_its_rules_a_rules_is_its_own(backends,
                                                                        kanal) -> None:
    backend = await backends("api")
    route = """\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: api}
spec:
  policies:
    rateLimit: {limits: [{name: route-wide, requests: 4, unit: Hour}]}
  rules:
    - matches: [{path: {type: PathPrefix, value: /a}}]
      backends: [{upstream: api}]
    - matches: [{path: {type: PathPrefix, value: /b}}]
      backends: [{upstream: api}]
    - matches: [{path: {type: PathPrefix, value: /own}}]
      policies:
        rateLimit: {limits: [{name: own, requests: 1, unit: Hour}]}
      backends: [{upstream: api}]
"""
    k = kanal({"route.yaml": route, "up.yaml": upstream_yaml("api", backend)})

    async def status(path: str) -> int:
        (answer,) = await raw_request(k.port, f"GET {path} HTTP/1.1\r\nHost: a\r\n"
                                              "Connection: close\r\n\r\n".encode())
        return answer.status

    assert [await status(p) for p in ("/a", "/b", "/a", "/b", "/a", "/b")] == [200] * 4 + [429] * 2
    assert [await status("/own") for _ in range(2)] == [200, 429]

"""Scenario: how one Upstream spreads requests over its endpoints (`loadBalancer.policy`).

Three real backends are the endpoints of one Upstream per policy; each policy has a
hostname of its own, so the counts of one case are not disturbed by another.
"""

from __future__ import annotations

import asyncio
import collections

import aiohttp
import pytest

from tests.conftest import async_wait_until


def upstream(
    name: str, ports: list[int], policy: str, extra: str = "", weights: list[int] | None = None
) -> str:
    weights = weights or [1] * len(ports)
    endpoints = ", ".join(
        f"{{address: 127.0.0.1, port: {p}, weight: {w}}}"
        for p, w in zip(ports, weights, strict=True)
    )
    return f"""\
apiVersion: kanal.dev/v1alpha1
kind: Upstream
metadata: {{name: {name}}}
spec:
  endpoints: [{endpoints}]
  loadBalancer: {{policy: {policy}{extra}}}
---
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {{name: {name}}}
spec:
  hostnames: [{name}.test]
  rules: [{{backends: [{{upstream: {name}}}]}}]
"""


@pytest.fixture(scope="module")
def setup(module_kanal, module_backends):
    ends = [module_backends(f"e{i}") for i in range(3)]
    ports = [b.port for b in ends]
    files = {
        "rr.yaml": upstream("rr", ports, "RoundRobin"),
        "wrr.yaml": upstream("wrr", ports[:2], "RoundRobin", weights=[3, 1]),
        "ring.yaml": upstream("ring", ports, "RingHash", ", hashOn: {header: x-user}"),
        "least.yaml": upstream("least", ports, "LeastRequest"),
        "least2.yaml": upstream("least2", ports[:2], "LeastRequest"),
        "random.yaml": upstream("random", ports, "Random"),
    }
    return module_kanal(files), ends


async def spread(
    k, host: str, count: int, headers: dict[str, str] | None = None, path: str = "/"
) -> collections.Counter[str]:
    seen: collections.Counter[str] = collections.Counter()
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            async with session.get(
                k.url + path, headers={"Host": host, **(headers or {})}
            ) as answer:
                assert answer.status == 200
                seen[(await answer.json())["backend"]] += 1
    return seen


async def test_round_robin_spreads_evenly(setup):
    k, _ = setup
    assert await spread(k, "rr.test", 30) == {"e0": 10, "e1": 10, "e2": 10}


async def test_round_robin_follows_endpoint_weights(setup):
    k, _ = setup
    assert await spread(k, "wrr.test", 40) == {"e0": 30, "e1": 10}


async def test_ring_hash_keeps_a_user_on_one_endpoint(setup):
    k, _ = setup
    placement: dict[str, set[str]] = {}
    for user in range(24):
        seen = await spread(k, "ring.test", 4, {"x-user": f"user-{user}"})
        placement[f"user-{user}"] = set(seen)
    assert all(len(endpoints) == 1 for endpoints in placement.values()), placement
    # and the users do not all land on one endpoint
    used = set().union(*placement.values())
    assert len(used) >= 2, placement


async def test_least_request_and_random_use_every_endpoint(setup):
    k, _ = setup
    assert set(await spread(k, "least.test", 40)) == {"e0", "e1", "e2"}
    assert set(await spread(k, "random.test", 40)) == {"e0", "e1", "e2"}


async def test_least_request_prefers_the_idle_endpoint(setup):
    k, ends = setup
    marks = {b.name: len(b.received) for b in ends}

    async def slow() -> str:
        async with (
            aiohttp.ClientSession() as session,
            session.get(k.url + "/sleep/1", headers={"Host": "least2.test"}) as answer,
        ):
            return str((await answer.json())["backend"])

    task = asyncio.create_task(slow())

    async def slow_arrived() -> bool:
        return any(r["path"] == "/sleep/1" for b in ends for r in b.received[marks[b.name] :])

    await async_wait_until(slow_arrived, timeout=5)
    busy = next(
        b.name for b in ends if any(r["path"] == "/sleep/1" for r in b.received[marks[b.name] :])
    )
    seen = await spread(k, "least2.test", 40, path="/fast")
    assert await task == busy
    idle = ({"e0", "e1"} - {busy}).pop()
    # Two choices, the less loaded wins: the busy endpoint only wins when drawn twice.
    assert seen[idle] > 20, seen

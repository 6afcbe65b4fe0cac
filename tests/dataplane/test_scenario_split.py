"""Scenario: weighted backends of a rule, session affinity, and a blue/green flip under load.

Each test starts its own `kanal run`, because each edits the manifests as a user would.
"""

from __future__ import annotations

import asyncio
import collections
import time

import aiohttp

from tests.conftest import upstream_yaml


def split_route(weights: dict[str, int], affinity: bool = False, timeout: str | None = None) -> str:
    backends = ", ".join(f"{{upstream: {name}, weight: {w}}}" for name, w in weights.items())
    text = f"""\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {{name: web}}
spec:
  rules:
    - backends: [{backends}]
"""
    if affinity:
        text += "      sessionAffinity: {cookie: {name: kanal-affinity, ttl: 1h}}\n"
    if timeout:
        text += f"      timeout: {timeout}\n"
    return text


async def test_split_follows_the_weights_and_weight_zero_gets_nothing(kanal, backends):
    v1, v2, v3 = await backends("v1"), await backends("v2"), await backends("v3")
    k = kanal(
        {
            "up.yaml": upstream_yaml("v1", v1)
            + "---\n"
            + upstream_yaml("v2", v2)
            + "---\n"
            + upstream_yaml("v3", v3),
            "route.yaml": split_route({"v1": 3, "v2": 1, "v3": 0}),
        }
    )
    seen: collections.Counter[str] = collections.Counter()
    async with aiohttp.ClientSession() as session:
        for _ in range(400):
            async with session.get(k.url + "/") as answer:
                assert answer.status == 200
                seen[(await answer.json())["backend"]] += 1
    assert seen == {"v1": 300, "v2": 100}
    assert v3.received == []


class Client:
    """A browser-like client: its own cookie jar and connection."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.set_cookies: list[str] = []

    async def get(self) -> str:
        async with self.session.get(self.url + "/") as answer:
            assert answer.status == 200, await answer.text()
            self.set_cookies += answer.headers.getall("Set-Cookie", [])
            return str((await answer.json())["backend"])

    async def close(self) -> None:
        await self.session.close()


async def test_session_affinity_survives_reloads_and_weight_changes_move_only_new_clients(
    kanal, backends
):
    v1, v2 = await backends("v1"), await backends("v2")
    ups = upstream_yaml("v1", v1) + "---\n" + upstream_yaml("v2", v2)
    k = kanal({"up.yaml": ups, "route.yaml": split_route({"v1": 1, "v2": 1}, affinity=True)})
    clients = [Client(k.url) for _ in range(8)]
    try:
        first = {id(c): await c.get() for c in clients}
        assert set(first.values()) == {"v1", "v2"}  # 1:1 puts clients on both sides
        for c in clients:
            assert len(c.set_cookies) == 1
            cookie = c.set_cookies[0]
            assert cookie.startswith("kanal-affinity=")
            assert "Max-Age=3600" in cookie
            for _ in range(4):
                assert await c.get() == first[id(c)]
            assert len(c.set_cookies) == 1  # a kept client is not handed a new cookie

        # A reload that changes something else keeps every client where it was.
        version = k.version()
        k.write("route.yaml", split_route({"v1": 1, "v2": 1}, affinity=True, timeout="30s"))
        version = await asyncio.to_thread(k.wait_for_new_version, version)
        for c in clients:
            assert await c.get() == first[id(c)]

        # A weight change moves new clients only.
        version = k.version()
        k.write("route.yaml", split_route({"v1": 1, "v2": 3}, affinity=True))
        await asyncio.to_thread(k.wait_for_new_version, version)
        for c in clients:
            for _ in range(3):
                assert await c.get() == first[id(c)]
        newcomers = [Client(k.url) for _ in range(40)]
        clients += newcomers
        placed = collections.Counter([await c.get() for c in newcomers])
        assert placed == {"v1": 10, "v2": 30}

        # Weight 0 drains a side: its clients move too (blue/green with affinity).
        version = k.version()
        k.write("route.yaml", split_route({"v1": 0, "v2": 1}, affinity=True))
        await asyncio.to_thread(k.wait_for_new_version, version)
        assert {await c.get() for c in clients} == {"v2"}
    finally:
        for c in clients:
            await c.close()


async def test_blue_green_flip_under_load_fails_nothing_and_switches_at_once(kanal, backends):
    blue, green = await backends("blue"), await backends("green")
    k = kanal(
        {
            "up.yaml": upstream_yaml("blue", blue) + "---\n" + upstream_yaml("green", green),
            "route.yaml": split_route({"blue": 100, "green": 0}),
        }
    )
    old = k.version()
    results: list[tuple[float, int, str]] = []  # (start, status, backend)
    stop = asyncio.Event()
    flip_seen: list[float] = []

    async def load() -> None:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    async with session.get(k.url + "/load") as answer:
                        backend = (await answer.json())["backend"] if answer.status == 200 else "-"
                        results.append((started, answer.status, backend))
                except aiohttp.ClientError as exc:
                    results.append((started, 0, repr(exc)))

    workers = [asyncio.create_task(load()) for _ in range(6)]
    try:
        await asyncio.sleep(0)  # let the workers start before the edit
        while len(results) < 50:
            await asyncio.sleep(0.01)
        k.write("route.yaml", split_route({"blue": 0, "green": 100}))
        await asyncio.to_thread(k.wait_for_new_version, old)
        flip_seen.append(time.monotonic())
        count = len(results)
        while len(results) < count + 100:
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.gather(*workers)
    failed = [r for r in results if r[1] != 200]
    assert failed == []
    after = [r for r in results if r[0] > flip_seen[0]]
    assert after and all(r[2] == "green" for r in after), collections.Counter(r[2] for r in after)
    before = [r for r in results if r[2] == "blue"]
    assert len(before) >= 50

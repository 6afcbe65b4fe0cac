"""Scenario: editing manifests under a running `kanal run`.

An edit applies within a second; what is in flight (a slow request, an open WebSocket)
carries on; a bad edit keeps the last good version of what it broke, applies
everything else, and says in the log which file and field were wrong.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from tests.conftest import async_wait_until, upstream_yaml


def route(name: str, host: str | None, upstream: str, weight: int = 1) -> str:
    hostnames = f"[{host}]" if host else "[]"
    return f"""\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {{name: {name}}}
spec:
  hostnames: {hostnames}
  rules: [{{backends: [{{upstream: {upstream}, weight: {weight}}}]}}]
"""


async def backend_of(session: aiohttp.ClientSession, url: str, host: str = "app.test") -> str:
    async with session.get(url, headers={"Host": host}) as answer:
        assert answer.status == 200, await answer.text()
        return str((await answer.json())["backend"])


@pytest.fixture
async def two(kanal, backends):
    v1, v2 = await backends("v1"), await backends("v2")
    ups = upstream_yaml("v1", v1) + "---\n" + upstream_yaml("v2", v2)
    return v1, v2, ups


async def test_an_edit_applies_within_one_second(kanal, two):
    _, _, ups = two
    k = kanal({"up.yaml": ups, "route.yaml": route("app", None, "v1")})
    async with aiohttp.ClientSession() as session:
        assert await backend_of(session, k.url + "/") == "v1"
        for target in ("v2", "v1"):
            written = time.monotonic()
            k.write("route.yaml", route("app", None, target))

            async def switched(target: str = target) -> bool:
                return await backend_of(session, k.url + "/") == target

            await async_wait_until(switched, timeout=5, interval=0.01)
            elapsed = time.monotonic() - written
            assert elapsed < 1.0, f"the edit took {elapsed:.2f}s to apply"


async def test_in_flight_request_survives_a_reload(kanal, two):
    v1, _, ups = two
    k = kanal({"up.yaml": ups, "route.yaml": route("app", None, "v1")})
    version = k.version()
    async with aiohttp.ClientSession() as session:

        async def slow() -> tuple[int, dict]:
            async with session.get(k.url + "/sleep/1") as answer:
                return answer.status, await answer.json()

        in_flight = asyncio.create_task(slow())

        async def arrived() -> bool:
            return any(r["path"] == "/sleep/1" for r in v1.received)

        await async_wait_until(arrived, timeout=5)
        k.write("route.yaml", route("app", None, "v2"))
        await asyncio.to_thread(k.wait_for_new_version, version)
        assert await backend_of(session, k.url + "/") == "v2"
        assert not in_flight.done()  # the reload did not cut it short
        status, body = await in_flight
        assert status == 200 and body["backend"] == "v1"


async def test_open_websocket_survives_a_reload(kanal, two):
    _, _, ups = two
    k = kanal({"up.yaml": ups, "route.yaml": route("app", None, "v1")})
    version = k.version()
    async with aiohttp.ClientSession() as session, session.ws_connect(k.url + "/ws") as ws:
        await ws.send_str("before")
        assert await ws.receive_str(timeout=5) == "v1:before"
        k.write("route.yaml", route("app", None, "v2"))
        await asyncio.to_thread(k.wait_for_new_version, version)
        assert await backend_of(session, k.url + "/") == "v2"
        # the WebSocket opened before the reload still talks to v1, both ways
        for word in ("after", "still"):
            await ws.send_str(word)
            assert await ws.receive_str(timeout=5) == f"v1:{word}"


WEIGHT_ROUTES_GOOD = route("a", "a.test", "v1") + "---\n" + route("c", "c.test", "v1")
WEIGHT_ROUTES_BAD = route("a", "a.test", "v2", weight=-1) + "---\n" + route("c", "c.test", "v2")


async def test_a_bad_edit_keeps_the_last_good_version_of_that_object_only(kanal, two):
    _, _, ups = two
    k = kanal({"up.yaml": ups, "a.yaml": WEIGHT_ROUTES_GOOD, "b.yaml": route("b", "b.test", "v1")})
    version = k.version()
    async with aiohttp.ClientSession() as session:
        # One file: Route a gets an invalid weight, Route c a valid edit; another file, b, too.
        k.write("a.yaml", WEIGHT_ROUTES_BAD)
        k.write("b.yaml", route("b", "b.test", "v2"))

        async def edited() -> bool:
            return (
                await backend_of(session, k.url + "/", "b.test") == "v2"
                and await backend_of(session, k.url + "/", "c.test") == "v2"
            )

        await async_wait_until(edited, timeout=5)
        assert await backend_of(session, k.url + "/", "a.test") == "v1"  # last good version
        log = k.log()
        assert any(
            "a.yaml" in ln and "backends[0].weight" in ln and "Route default/a" in ln
            for ln in log.splitlines()
        ), log

        # A YAML syntax error: every object of the file keeps its last good version.
        version = k.version()
        k.write("a.yaml", WEIGHT_ROUTES_GOOD.replace("rules: [{", "rules: [{{{", 1))
        k.write("b.yaml", route("b", "b.test", "v1"))
        version = await asyncio.to_thread(k.wait_for_new_version, version)
        assert await backend_of(session, k.url + "/", "b.test") == "v1"
        assert await backend_of(session, k.url + "/", "a.test") == "v1"
        assert await backend_of(session, k.url + "/", "c.test") == "v2"
        assert any(
            "a.yaml" in ln and "line 6" in ln
            for ln in k.log().splitlines()[len(log.splitlines()) :]
        ), k.log()


async def test_a_bad_upstream_edit_keeps_its_endpoints_and_a_deleted_file_removes_its_route(
    kanal, two
):
    v1, v2, _ = two
    k = kanal(
        {
            "app.yaml": upstream_yaml("app", v1),
            "route.yaml": route("app", "app.test", "app"),
            "gone.yaml": route("gone", "gone.test", "app"),
        }
    )
    async with aiohttp.ClientSession() as session:
        assert await backend_of(session, k.url + "/", "gone.test") == "v1"
        version = k.version()
        # The Upstream now points at v2 with an impossible port next to it: it is rejected.
        k.write(
            "app.yaml",
            upstream_yaml("app", v2).replace(
                "endpoints: [", "endpoints: [{address: 127.0.0.1, port: 70000}, "
            ),
        )
        (k.folder / "gone.yaml").unlink()
        await asyncio.to_thread(k.wait_for_new_version, version)
        async with session.get(k.url + "/", headers={"Host": "gone.test"}) as answer:
            assert answer.status == 404
        assert await backend_of(session, k.url + "/", "app.test") == "v1"
        assert any("app.yaml" in ln and "port" in ln for ln in k.log().splitlines()), k.log()

"""Resilience with real failing backends on 127.0.0.1, behind a real `kanal run`.

The failing backends are small asyncio servers that fail the way real ones do:
refusing connections, accepting and never answering, resetting mid-answer, answering
5xx, flapping. Each test configures Kanal through api.md's fields only.
"""

from __future__ import annotations

import asyncio
import collections
import re
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from tests.conftest import Backend, async_wait_until, free_port

pytestmark = pytest.mark.timeout(120)


def upstream(name: str, ports: list[int], extra: str = "") -> str:
    endpoints = ", ".join(f"{{address: 127.0.0.1, port: {port}}}" for port in ports)
    return (
        "apiVersion: kanal.dev/v1alpha1\nkind: Upstream\n"
        f"metadata: {{name: {name}}}\nspec:\n  endpoints: [{endpoints}]\n{extra}"
    )


def route(upstream_name: str, rule_extra: str = "") -> str:
    return (
        "apiVersion: kanal.dev/v1alpha1\nkind: Route\nmetadata: {name: web}\nspec:\n"
        f"  rules:\n    - backends: [{{upstream: {upstream_name}}}]\n{rule_extra}"
    )


class RawServer:
    """An asyncio server whose connection handler misbehaves on purpose."""

    def __init__(self, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]) -> None:
        self.handler = handler
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.connections = 0

    async def start(self) -> RawServer:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass

        self.server = await asyncio.start_server(handle, "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


@pytest.fixture
async def raw_servers() -> AsyncIterator[Callable[..., Any]]:
    started: list[RawServer] = []

    async def start(handler: Callable[..., Any]) -> RawServer:
        server = await RawServer(handler).start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    await asyncio.sleep(3600)


async def reset_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
    await writer.drain()
    writer.transport.abort()


async def get_json(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as answer:
        body = await answer.read()
        try:
            return answer.status, await answer.json(content_type=None)
        except ValueError:
            return answer.status, body.decode(errors="replace")


def endpoint_states(k: Any, upstream_key: str = "default/pool") -> dict[str, tuple[str, str]]:
    for item in k.config()["upstreams"]:
        if item["key"] == upstream_key:
            return {f"{e['address']}:{e['port']}": (e["health"], e["circuit"]) for e in item["endpoints"]}
    raise AssertionError(f"{upstream_key} not in /config")


async def test_a_refused_endpoint_costs_no_request_and_its_circuit_opens(kanal, backends):
    good = await backends("good")
    dead_port = free_port()  # nothing listens here
    k = kanal({
        "up.yaml": upstream("pool", [good.port, dead_port],
                            "  circuitBreaker: {consecutiveFailures: 2, openDuration: 30s}\n"),
        "route.yaml": route("pool"),
    })
    async with aiohttp.ClientSession() as session:
        for _ in range(20):
            status, body = await get_json(session, k.url + "/")
            assert status == 200 and body["backend"] == "good"
    states = endpoint_states(k)
    assert states[f"127.0.0.1:{dead_port}"][1] == "open"
    assert states[f"127.0.0.1:{good.port}"] == ("healthy", "closed")


async def test_every_endpoint_down_answers_503_at_once_naming_the_upstream(kanal):
    ports = [free_port(), free_port()]
    k = kanal({
        "up.yaml": upstream("pool", ports,
                            "  circuitBreaker: {consecutiveFailures: 1, openDuration: 60s}\n"),
        "route.yaml": route("pool"),
    })
    async with aiohttp.ClientSession() as session:
        for _ in range(3):  # the connect failures open both circuits
            await get_json(session, k.url + "/")
        started = time.monotonic()
        status, body = await get_json(session, k.url + "/")
        elapsed = time.monotonic() - started
    assert status == 503
    assert "default/pool" in body
    assert elapsed < 0.5


async def test_health_checks_take_an_endpoint_out_and_bring_it_back(kanal, backends):
    health = {"ok": True}
    # A backend whose every answer, /healthz included, follows `health`.

    async def healthz(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        status = b"200 OK" if health["ok"] else b"500 Internal Server Error"
        writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    checked = await RawServer(healthz).start()
    other = await backends("other")
    try:
        k = kanal({
            "up.yaml": upstream(
                "pool", [checked.port, other.port],
                "  healthCheck: {path: /healthz, interval: 100ms, timeout: 100ms,"
                " healthyThreshold: 2, unhealthyThreshold: 2}\n"),
            "route.yaml": route("pool"),
        })
        key = f"127.0.0.1:{checked.port}"

        async def health_is(value: str) -> bool:
            return endpoint_states(k)[key][0] == value

        health["ok"] = False
        await async_wait_until(lambda: health_is("unhealthy"), timeout=10)
        async with aiohttp.ClientSession() as session:
            answers = [await get_json(session, k.url + "/") for _ in range(10)]
        assert all(status == 200 and body["backend"] == "other" for status, body in answers)
        health["ok"] = True
        await async_wait_until(lambda: health_is("healthy"), timeout=10)
    finally:
        await checked.stop()


async def answer_503(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 7\r\n"
                 b"Connection: close\r\n\r\nfailing")
    await writer.drain()
    writer.close()


async def test_retries_go_to_another_endpoint_for_idempotent_requests_only(kanal, backends, raw_servers):
    good = await backends("good")
    failing = await raw_servers(answer_503)
    k = kanal({
        "up.yaml": upstream("pool", [failing.port, good.port],
                            "  circuitBreaker: {consecutiveFailures: 1000}\n"),
        "route.yaml": route("pool", "      retries: {attempts: 2, retryOn: [\"503\"]}\n"),
    })
    async with aiohttp.ClientSession() as session:
        for _ in range(10):
            async with session.get(k.url + "/") as answer:
                assert answer.status == 200, await answer.text()
        posts: collections.Counter[int] = collections.Counter()
        for _ in range(10):
            async with session.post(k.url + "/", data=b"x") as answer:
                posts[answer.status] += 1
    assert failing.connections >= 5, "round robin sent GETs to the failing endpoint too"
    assert posts[503] > 0, "a POST that reached a backend must not be retried"
    assert posts[200] > 0


async def test_per_try_timeout_moves_on_and_route_timeout_bounds_everything(kanal, backends, raw_servers):
    hanging = await raw_servers(never_answer)
    good = await backends("good")
    k = kanal({
        "up.yaml": upstream("pool", [hanging.port, good.port],
                            "  circuitBreaker: {consecutiveFailures: 1000}\n"),
        "route.yaml": route("pool", "      timeout: 3s\n"
                                    "      retries: {attempts: 2, perTryTimeout: 200ms}\n"),
    })
    async with aiohttp.ClientSession() as session:
        for _ in range(6):
            started = time.monotonic()
            status, body = await get_json(session, k.url + "/")
            assert status == 200 and body["backend"] == "good"
            assert time.monotonic() - started < 1.5

    both_hang = await raw_servers(never_answer)
    k2 = kanal({
        "up.yaml": upstream("pool", [hanging.port, both_hang.port],
                            "  circuitBreaker: {consecutiveFailures: 1000}\n"),
        "route.yaml": route("pool", "      timeout: 700ms\n"
                                    "      retries: {attempts: 5, perTryTimeout: 300ms}\n"),
    })
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        status, body = await get_json(session, k2.url + "/")
        elapsed = time.monotonic() - started
    assert status == 504, body
    assert 0.6 < elapsed < 1.5


async def test_a_backend_dying_mid_answer_cuts_the_client_off(kanal, raw_servers):
    dying = await raw_servers(reset_mid_body)
    k = kanal({
        "up.yaml": upstream("pool", [dying.port]),
        "route.yaml": route("pool", "      retries: {attempts: 2}\n"),
    })
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with session.get(k.url + "/") as answer:
                assert answer.status == 200
                await answer.read()
    assert dying.connections == 1, "an answer that had started must not be retried"


async def test_limits_answer_503_overloaded_at_once(kanal, raw_servers):
    hanging = await raw_servers(never_answer)
    k = kanal({
        "up.yaml": upstream("pool", [hanging.port],
                            "  circuitBreaker: {maxConnections: 1, maxPendingRequests: 1,"
                            " consecutiveFailures: 1000}\n"),
        "route.yaml": route("pool", "      timeout: 5s\n"),
    })
    async with aiohttp.ClientSession() as session:
        first = asyncio.ensure_future(session.get(k.url + "/"))
        second = asyncio.ensure_future(session.get(k.url + "/"))
        # Both are routed (one on the connection, one waiting for it) before the third
        # is sent: otherwise the third could take the waiting place and time out.
        await async_wait_until(lambda: _true_after(in_flight(k) >= 2), timeout=5)
        started = time.monotonic()
        async with session.get(k.url + "/") as third:
            assert third.status == 503
            assert third.headers.get("X-Kanal-Overloaded") == "true"
            assert "overloaded" in await third.text()
        assert time.monotonic() - started < 0.5
        for task in (first, second):
            task.cancel()
    await asyncio.sleep(0)


async def _true_after(value: bool) -> bool:
    return value


def in_flight(k: Any) -> float:
    """Requests the proxy has routed and not yet answered, over every route."""
    with urllib.request.urlopen(k.admin + "/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return sum(float(value) for value in
               re.findall(r"^kanal_route_requests_in_flight\{[^}]*\} (\S+)$", text, re.MULTILINE))


async def test_soak_one_of_three_endpoints_killed_and_restarted_twice(kanal, backends):
    pool = [await backends(f"b{i}") for i in range(3)]
    victim_port = pool[0].port
    k = kanal({
        "up.yaml": upstream("pool", [b.port for b in pool],
                            "  circuitBreaker: {consecutiveFailures: 3, openDuration: 1s}\n"
                            "  healthCheck: {path: /healthz, interval: 200ms, timeout: 200ms,"
                            " healthyThreshold: 1, unhealthyThreshold: 2}\n"),
        "route.yaml": route("pool", "      timeout: 5s\n"
                                    "      retries: {attempts: 2, perTryTimeout: 1s}\n"),
    })
    failures: list[str] = []
    served: collections.Counter[str] = collections.Counter()
    circuits_seen: set[str] = set()
    stop = asyncio.Event()

    async def load() -> None:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                try:
                    status, body = await get_json(session, k.url + "/")
                except aiohttp.ClientError as exc:
                    failures.append(repr(exc))
                    continue
                if status != 200:
                    failures.append(f"{status} {body}")
                else:
                    served[body["backend"]] += 1

    loaders = [asyncio.ensure_future(load()) for _ in range(4)]
    deadline = time.monotonic() + 24
    try:
        for _ in range(2):
            await asyncio.sleep(3)
            await pool[0].stop()  # killed: connections refused, open ones reset
            await async_wait_until(
                lambda: _true_after(endpoint_states(k)[f"127.0.0.1:{victim_port}"] != ("healthy", "closed")),
                timeout=10,
            )
            circuits_seen.add(str(endpoint_states(k)[f"127.0.0.1:{victim_port}"]))
            await asyncio.sleep(3)
            from aiohttp import web

            from tests.conftest import backend_app

            restarted = Backend(name="b0", port=victim_port)
            runner = web.AppRunner(backend_app(restarted), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", victim_port).start()
            restarted.runner = runner
            pool[0] = restarted
            await async_wait_until(
                lambda: _true_after(endpoint_states(k)[f"127.0.0.1:{victim_port}"] == ("healthy", "closed")),
                timeout=10,
            )
        while time.monotonic() < deadline and sum(served.values()) < 200:
            await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.gather(*loaders)
        await pool[0].stop()
    assert not failures, failures[:5]
    assert sum(served.values()) > 200
    assert set(served) == {"b0", "b1", "b2"}
    assert circuits_seen, "the victim's state was visible in /config while it was down"


async def test_a_retried_put_sends_its_whole_body_again(kanal, backends, raw_servers):
    good = await backends("good")
    failing = await raw_servers(answer_503)
    k = kanal({
        "up.yaml": upstream("pool", [failing.port, good.port],
                            "  circuitBreaker: {consecutiveFailures: 1000}\n"),
        "route.yaml": route("pool", "      retries: {attempts: 1, retryOn: [\"503\"]}\n"),
    })
    body = bytes(range(256)) * 400  # 100 KiB, within the retry buffer
    async with aiohttp.ClientSession() as session:
        for _ in range(6):
            async with session.put(k.url + "/upload", data=body) as answer:
                assert answer.status == 200, await answer.text()
                assert (await answer.json())["body_size"] == len(body)
    assert failing.connections >= 2
    assert all(r["body_size"] == len(body) for r in good.received)

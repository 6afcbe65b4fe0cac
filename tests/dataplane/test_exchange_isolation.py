"""Nothing of one exchange carries into the next on a keep-alive connection.

Through a real `kanal run`: one client connection goes from a rule that sets a
session affinity cookie, caches, rate-limits, retries or had to resend its request on
a fresh upstream connection to a rule that does none of these, and the later answer
shows nothing of the earlier exchange (no cookie, no X-Cache, no RateLimit fields, no
retry, a stale pooled connection resent again).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from tests.conftest import Backend, Kanal, RawResponse, read_response, upstream_yaml


class KeepAlive:
    """One client connection, asked one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> KeepAlive:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def get(self, path: str, host: str = "app.test") -> RawResponse:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        async with asyncio.timeout(10):
            answer = await read_response(self.reader)
        assert not self.reader.at_eof(), f"the connection closed after {path}"
        return answer

    def close(self) -> None:
        self.writer.close()


class Origin:
    """A raw HTTP/1.1 server: `answer_once` answers only the first request of each
    connection (the next one finds the connection closed, as a server that closed an
    idle keep-alive connection at the moment it was reused); otherwise each request is
    answered with `status`. Counts the requests it read."""

    def __init__(self, status: int, *, answer_once: bool = False) -> None:
        self.status = status
        self.answer_once = answer_once
        self.requests = 0
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Origin:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        answered = 0
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                if self.answer_once and answered:
                    break  # closed without a byte of an answer
                body = b"origin %d" % self.status
                writer.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%b"
                             % (self.status, len(body), body))
                await writer.drain()
                answered += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def origins() -> AsyncIterator[Callable[..., Awaitable[Origin]]]:
    started: list[Origin] = []

    async def start(status: int, *, answer_once: bool = False) -> Origin:
        origin = await Origin(status, answer_once=answer_once).start()
        started.append(origin)
        return origin

    yield start
    for origin in started:
        await origin.stop()


def _upstream(name: str, *ports: int) -> str:
    endpoints = ", ".join(f"{{address: 127.0.0.1, port: {port}}}" for port in ports)
    return (f"apiVersion: kanal.dev/v1alpha1\nkind: Upstream\nmetadata: {{name: {name}}}\n"
            f"spec:\n  endpoints: [{endpoints}]\n")


ROUTE = """\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: app}
spec:
  hostnames: [app.test]
  rules:
    - matches: [{path: {type: PathPrefix, value: /sticky}}]
      backends: [{upstream: app, weight: 1}, {upstream: app-too, weight: 1}]
      sessionAffinity: {cookie: {name: kanal-affinity, ttl: 1h}}
    - matches: [{path: {type: PathPrefix, value: /limited-cached}}]
      backends: [{upstream: app}]
      policies:
        rateLimit: {type: Local, limits: [{name: burst, requests: 100, unit: Minute}]}
      cache: {defaultTTL: 1h}
    - matches: [{path: {type: PathPrefix, value: /retried}}]
      backends: [{upstream: mixed}]
      retries: {attempts: 1, retryOn: ["503"]}
    - matches: [{path: {type: PathPrefix, value: /failing}}]
      backends: [{upstream: failing}]
    - matches: [{path: {type: PathPrefix, value: /once}}]
      backends: [{upstream: once}]
    - backends: [{upstream: app}]
"""


@dataclass
class Setup:
    kanal: Kanal
    app: Backend
    unavailable: list[Origin]
    once: Origin


@pytest.fixture
async def proxy(kanal, backends, origins) -> Setup:
    app, app_too = await backends("app"), await backends("app-too")
    unavailable = [await origins(503), await origins(503)]
    once = await origins(200, answer_once=True)
    manifests = {
        "app.yaml": upstream_yaml("app", app) + "---\n" + upstream_yaml("app-too", app_too),
        "mixed.yaml": _upstream("mixed", unavailable[0].port, app.port),
        "failing.yaml": _upstream("failing", *(origin.port for origin in unavailable)),
        "once.yaml": _upstream("once", once.port),
        "route.yaml": ROUTE,
    }
    return Setup(kanal(manifests), app, unavailable, once)


async def test_an_affinity_cookie_a_cache_and_rate_limit_fields_stay_with_their_exchange(
    proxy: Setup,
) -> None:
    app = proxy.app
    client = await KeepAlive.open(proxy.kanal.port)
    try:
        sticky = await client.get("/sticky")
        assert sticky.status == 200
        assert (sticky.header("Set-Cookie") or "").startswith("kanal-affinity=")
        plain = await client.get("/plain")
        assert plain.status == 200 and plain.header("Set-Cookie") is None

        miss = await client.get("/limited-cached/page")
        assert miss.status == 200 and miss.header("X-Cache") == "MISS"
        assert miss.header("RateLimit") is not None
        hit = await client.get("/limited-cached/page")  # answered from the store
        assert hit.status == 200 and hit.header("X-Cache") == "HIT"
        after = await client.get("/plain")
        assert after.status == 200
        assert after.header("X-Cache") is None
        assert after.header("RateLimit") is None  # the policy is the other rule's
        assert after.header("Set-Cookie") is None
        assert [r["path"] for r in app.received].count("/limited-cached/page") == 1
    finally:
        client.close()


async def test_a_retry_policy_stays_with_its_exchange(
    proxy: Setup,
) -> None:
    unavailable = proxy.unavailable
    client = await KeepAlive.open(proxy.kanal.port)
    try:
        # One of the two tries lands on the endpoint that answers 503: it is retried.
        for _ in range(2):
            assert (await client.get("/retried")).status == 200
        assert unavailable[0].requests >= 1
        before = sum(origin.requests for origin in unavailable)
        # A rule without retries, over two endpoints that both answer 503: one try.
        failed = await client.get("/failing")
        assert failed.status == 503 and failed.body == b"origin 503"
        assert sum(origin.requests for origin in unavailable) == before + 1
    finally:
        client.close()


async def test_each_request_may_be_resent_once_after_a_stale_pooled_connection(
    proxy: Setup,
) -> None:
    """An upstream connection taken from the pool that the server closed unanswered is
    resent once on a new connection; that allowance is the exchange's, not the client
    connection's, so every request of the client gets it."""
    once = proxy.once
    client = await KeepAlive.open(proxy.kanal.port)
    try:
        answers = [await client.get("/once") for _ in range(4)]
        assert [answer.status for answer in answers] == [200] * 4
        assert once.connections == 4  # the last three each found their pooled one closed
    finally:
        client.close()

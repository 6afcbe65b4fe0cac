"""The forward proxy's connections to origins are the reverse proxy's upstream pool.

Origins here are raw asyncio servers on 127.0.0.1 that count the connections they
accept and see closed, and answer with exactly the bytes a test gives them, so what
the upstream side does with an odd answer shows on the forward listener as it does on
the reverse one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from kanal.contract.snapshot import Backend as RouteBackend
from kanal.contract.snapshot import EgressPolicy, Endpoint, Route, Rule, Upstream
from kanal.dataplane.server import bind_socket, start_listener
from tests.conftest import async_wait_until, read_response
from tests.dataplane import test_forward
from tests.dataplane.test_forward import allow, local

forward = test_forward.forward  # the fixture that starts a forward proxy in this process

Answer = Callable[[bytes, list[bytes]], Awaitable[bytes]]
"""The bytes to write for a request head, given the heads before it on its connection."""


@dataclass
class Origin:
    """A raw HTTP/1.1 origin: `answer(head, before)` gives the bytes to write for each
    request (`before`: the heads of the requests before it on the same connection; no
    bytes: the connection is closed unanswered)."""

    answer: Answer
    port: int = 0
    accepted: int = 0
    closed: int = 0
    heads: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        before: list[bytes] = []
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                length = _content_length(head)
                if length:
                    await reader.readexactly(length)
                answer = await self.answer(head, list(before))
                if not answer:
                    break  # drop the connection without answering
                writer.write(answer)
                before.append(head)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed += 1
            writer.close()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


@pytest.fixture
async def origin() -> AsyncIterator[Callable[[Answer], Awaitable[Origin]]]:
    started: list[Origin] = []

    async def start(answer: Answer) -> Origin:
        made = Origin(answer)
        made.server = await asyncio.start_server(made.serve, "127.0.0.1", 0)
        made.port = made.server.sockets[0].getsockname()[1]
        started.append(made)
        return made

    yield start
    for made in started:
        assert made.server is not None
        made.server.close()


def ok(body: bytes = b"hello") -> Answer:
    async def answer(head: bytes, before: list[bytes]) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
    return answer


async def exchange(port: int, request: bytes, *, head_request: bool = False):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        return await asyncio.wait_for(read_response(reader, head_request=head_request), 5)
    finally:
        writer.close()


def get(port: int, path: str = "/", method: str = "GET") -> bytes:
    return f"{method} http://localhost:{port}{path} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode()


async def test_two_clients_to_one_origin_share_one_connection(forward, origin):
    app = await origin(ok())
    fwd = await forward(allow(local(app.port)))
    for _ in range(3):  # each on a client connection of its own, one after the other
        answer = await exchange(fwd.port, get(app.port))
        assert answer.status == 200 and answer.body == b"hello"
    assert app.accepted == 1 and len(app.heads) == 3


async def test_a_head_answer_that_announces_a_body_does_not_poison_the_next_answer(forward, origin):
    """An origin answers HEAD with a Content-Length and no body, and then (as some do)
    writes that body after all, in front of its next answer: the connection a HEAD
    answer announcing a body came on is not used again, so a GET on the same client
    connection gets its own answer."""

    async def answer(head: bytes, before: list[bytes]) -> bytes:
        if head.startswith(b"HEAD"):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n"
        late = b"late-body" if before and before[-1].startswith(b"HEAD") else b""
        return late + b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nget"

    app = await origin(answer)
    fwd = await forward(allow(local(app.port)))
    reader, writer = await asyncio.open_connection("127.0.0.1", fwd.port)
    try:
        writer.write(get(app.port, "/h", "HEAD"))
        head = await asyncio.wait_for(read_response(reader, head_request=True), 5)
        assert head.status == 200 and head.header("content-length") == "9"
        writer.write(get(app.port, "/g"))
        after = await asyncio.wait_for(read_response(reader), 5)
        assert after.status == 200 and after.body == b"get"
    finally:
        writer.close()


async def test_a_response_head_over_the_limit_is_a_502_on_both_listeners(forward, origin):
    async def answer(head: bytes, before: list[bytes]) -> bytes:
        return (b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * 1000 + b"\r\n") + (
            b"".join(b"X-%d: %b\r\n" % (i, b"b" * 1000) for i in range(100))
            + b"Content-Length: 0\r\n\r\n")

    app = await origin(answer)
    route = Route(key="default/app", hostnames=("app.test",),
                  rules=(Rule(index=0, backends=(RouteBackend("default/app"),)),))
    upstream = Upstream(key="default/app", endpoints=(Endpoint("127.0.0.1", app.port),))
    fwd = await forward(allow(local(app.port)), routes=(route,), upstreams=(upstream,))
    forwarded = await exchange(fwd.port, get(app.port))
    reverse_sock = bind_socket("127.0.0.1", 0)
    server = await start_listener(fwd.runtime.context(), reverse_sock)
    try:
        routed = await exchange(reverse_sock.getsockname()[1],
                                b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
    finally:
        server.close()
    for answer_ in (forwarded, routed):
        assert answer_.status == 502, answer_.body
        assert b"invalid response from upstream" in answer_.body


async def test_a_request_on_a_pooled_connection_the_origin_dropped_is_sent_again(forward, origin):
    """The origin closes a kept-alive connection as the next request arrives on it (an
    idle timeout racing the request): nothing came back, so the request goes out again
    on a new connection instead of failing with 502."""
    async def answer(head: bytes, before: list[bytes]) -> bytes:
        return b"" if before else b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    app = await origin(answer)
    fwd = await forward(allow(local(app.port)))
    reader, writer = await asyncio.open_connection("127.0.0.1", fwd.port)
    try:
        for _ in range(2):  # one client connection: the second request reuses the first's
            writer.write(get(app.port))
            answer_ = await asyncio.wait_for(read_response(reader), 5)
            assert answer_.status == 200 and answer_.body == b"ok"
    finally:
        writer.close()
    assert app.accepted == 2 and len(app.heads) == 3


async def test_informational_answers_are_relayed(forward, origin):
    async def answer(head: bytes, before: list[bytes]) -> bytes:
        return (b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    app = await origin(answer)
    fwd = await forward(allow(local(app.port)))
    reader, writer = await asyncio.open_connection("127.0.0.1", fwd.port)
    try:
        writer.write(get(app.port))
        early = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert early.startswith(b"HTTP/1.1 103 ")
        final = await asyncio.wait_for(read_response(reader), 5)
        assert final.status == 200 and final.body == b"ok"
    finally:
        writer.close()


async def test_pooled_connections_close_when_their_policy_is_gone(forward, origin):
    app = await origin(ok())
    other = await origin(ok())
    kept = allow(local(other.port), key="default/kept")
    fwd = await forward(allow(local(app.port)), kept)
    for port in (app.port, other.port):
        assert (await exchange(fwd.port, get(port))).status == 200
    assert app.accepted == 1 and other.accepted == 1 and app.closed == 0

    fwd.apply(kept)  # the EgressPolicy that allowed the first origin is gone

    async def closed() -> bool:
        return app.closed == 1

    await async_wait_until(closed, timeout=5)
    assert other.closed == 0  # still allowed: still pooled, and used again
    assert (await exchange(fwd.port, get(other.port))).status == 200
    assert other.accepted == 1
    assert (await exchange(fwd.port, get(app.port))).status == 403


async def test_connections_past_the_total_close_instead_of_idling(forward, origin):
    release = asyncio.Event()

    async def answer(head: bytes, before: list[bytes]) -> bytes:
        await release.wait()
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    app = await origin(answer)
    fwd = await forward(allow(local(app.port)), max_upstream_connections=1)
    pending = [asyncio.create_task(exchange(fwd.port, get(app.port))) for _ in range(2)]

    async def both_arrived() -> bool:
        return len(app.heads) == 2

    await async_wait_until(both_arrived, timeout=5)
    release.set()
    assert [a.status for a in await asyncio.gather(*pending)] == [200, 200]
    assert app.accepted == 2

    async def one_closed() -> bool:
        return app.closed == 1

    await async_wait_until(one_closed, timeout=5)
    assert fwd.proxy.destinations.open == 1


async def test_mesh_requests_keep_their_client_connection(forward, backends):
    app = await backends("orders")
    route = Route(key="default/orders", hostnames=("orders.mesh",), gateways=("mesh",),
                  rules=(Rule(index=0, backends=(RouteBackend("default/orders"),)),))
    upstream = Upstream(key="default/orders", endpoints=(Endpoint("127.0.0.1", app.port),))
    fwd = await forward(EgressPolicy(key="default/none"), routes=(route,), upstreams=(upstream,))
    reader, writer = await asyncio.open_connection("127.0.0.1", fwd.port)
    try:
        writer.write(b"POST http://orders.mesh/one HTTP/1.1\r\nHost: orders.mesh\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n")
        first = await asyncio.wait_for(read_response(reader), 5)
        assert first.status == 200 and first.json()["body_size"] == 4
        assert (first.header("connection") or "").lower() != "close"
        writer.write(b"GET http://orders.mesh/two HTTP/1.1\r\nHost: orders.mesh\r\n\r\n")
        second = await asyncio.wait_for(read_response(reader), 5)
        assert second.status == 200 and second.json()["path"] == "/two"
        # The same connection goes on with a request the egress policy decides.
        writer.write(b"GET http://elsewhere.test/ HTTP/1.1\r\nHost: elsewhere.test\r\n\r\n")
        third = await asyncio.wait_for(read_response(reader), 5)
        assert third.status == 403
        writer.write(b"GET http://orders.mesh/four HTTP/1.1\r\nHost: orders.mesh\r\n\r\n")
        fourth = await asyncio.wait_for(read_response(reader), 5)
        assert fourth.status == 200 and fourth.json()["path"] == "/four"
    finally:
        writer.close()
    assert [r["path"] for r in app.received] == ["/one", "/two", "/four"]
    assert len(fwd.proxy.connections) <= 1

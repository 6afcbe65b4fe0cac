"""Scenario: upstreams that misbehave at the byte level.

Hand-written servers close pooled connections behind the proxy's back, cut answers
short, or hang up without answering. A user must never get a truncated answer that
looks complete, and must not see an error for a connection the server closed while
it sat idle in the pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Self

import aiohttp
import pytest

from tests.conftest import async_wait_until, free_port, raw_request

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """A hand-written upstream on a fixed port, for one test."""

    def __init__(self, port: int, handler: Handler) -> None:
        self.port = port
        self.handler = handler
        self.connections = 0
        self.closed = 0
        self.server: asyncio.Server | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.closed += 1

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture(scope="module")
def setup(module_kanal):
    port = free_port()
    files = {
        "faulty.yaml": f"""\
apiVersion: kanal.dev/v1alpha1
kind: Upstream
metadata: {{name: faulty}}
spec:
  endpoints: [{{address: 127.0.0.1, port: {port}}}]
  circuitBreaker: {{consecutiveFailures: 1000}}
---
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {{name: faulty}}
spec:
  rules: [{{backends: [{{upstream: faulty}}]}}]
""",
    }
    return module_kanal(files), port


async def test_a_pooled_connection_the_server_closed_is_not_an_error(setup):
    k, port = setup

    async def one_answer_then_close(reader, writer):
        # HTTP/1.1 keep-alive by default; the server closes shortly after (an idle timeout)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)

    async with Server(port, one_answer_then_close) as server:
        async with aiohttp.ClientSession() as session:
            for i in range(3):
                async with session.get(k.url + f"/{i}") as answer:
                    assert answer.status == 200, await answer.text()
                    assert await answer.read() == b"ok"

                async def idle_closed(i: int = i) -> bool:
                    return server.closed >= i + 1

                await async_wait_until(idle_closed, timeout=5)
        assert server.connections == 3


async def test_an_answer_cut_short_is_never_delivered_as_complete(setup):
    k, port = setup

    async def short_body(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"z" * 1000)
        await writer.drain()

    async with Server(port, short_body), aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with session.get(k.url + "/short") as answer:
                await answer.read()


async def test_a_chunked_answer_cut_short_is_never_delivered_as_complete(setup):
    k, port = setup

    async def short_chunked(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()

    async with Server(port, short_chunked), aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with session.get(k.url + "/short-chunked") as answer:
                await answer.read()


async def test_a_close_delimited_answer_cut_short_ends_in_a_reset(setup):
    k, port = setup

    async def short_chunked(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()

    async with Server(port, short_chunked):
        # An HTTP/1.0 client gets a close-delimited body: only a reset tells it the body is
        # incomplete; a clean close says "this is all of it".
        reader, writer = await asyncio.open_connection("127.0.0.1", k.port)
        try:
            writer.write(b"GET /short10 HTTP/1.0\r\nHost: a\r\n\r\n")
            await writer.drain()
            with pytest.raises(ConnectionResetError):
                async with asyncio.timeout(5):
                    while await reader.read(65536):
                        pass
        finally:
            writer.close()


async def test_an_upstream_that_hangs_up_without_answering_is_502(setup):
    k, port = setup

    async def hang_up(reader, writer):
        await reader.readuntil(b"\r\n\r\n")

    async with Server(port, hang_up):
        (answer,) = await raw_request(k.port, b"GET /hangup HTTP/1.1\r\nHost: a\r\n\r\n")
    assert answer.status == 502
    assert b"default/faulty" in answer.body


async def test_a_close_delimited_upstream_answer_is_relayed_whole(setup):
    k, port = setup
    body = b"".join(b"line %d\n" % i for i in range(20000))

    async def close_delimited(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: text/plain\r\n\r\n")
        for start in range(0, len(body), 30000):
            writer.write(body[start : start + 30000])
            await writer.drain()

    async with Server(port, close_delimited):
        async with aiohttp.ClientSession() as session, session.get(k.url + "/eof") as answer:
            assert answer.status == 200
            assert await answer.read() == body
        # and the client's connection stays usable: the proxy framed the body itself
        (first, second) = await raw_request(
            k.port,
            b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n",
            responses=2,
        )
        assert first.body == body and second.body == body

"""A client that reads slowly makes the proxy stop reading the upstream's answer (flow
control); the upstream connection must be reading again before it serves anyone else."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from kanal.dataplane.pool import EndpointPool, UpstreamConnection
from tests.conftest import read_response
from tests.dataplane.test_connection_caps import ROUTE

BIG = 8 * 1024 * 1024
ROUNDS = 8
"""Whether an answer ends in the very read that pauses the upstream's reading depends on
how the reads fall; each round has about an even chance of it."""


@dataclass
class Origin:
    """A keep-alive HTTP/1.1 origin: `/big` is answered with BIG bytes in one write, any
    other path with `ok`. It counts the connections it accepts."""

    port: int = 0
    accepted: int = 0
    written: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)  # paths answered
    server: asyncio.Server | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1]
                body = b"x" * BIG if path == b"/big" else b"ok"
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b"
                             % (len(body), body))
                self.written.put_nowait(path)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    made = Origin()
    made.server = await asyncio.start_server(made.serve, "127.0.0.1", 0)
    made.port = made.server.sockets[0].getsockname()[1]
    yield made
    made.server.close()


def upstream(port: int) -> str:
    return f"""\
apiVersion: kanal.dev/v1alpha1
kind: Upstream
metadata: {{name: web}}
spec:
  endpoints: [{{address: 127.0.0.1, port: {port}}}]
"""


async def slow_client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection with a small receive buffer: what it does not read piles up in the
    proxy's transport, past its high-water mark."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock, limit=1024)


async def test_an_answer_that_ends_while_the_client_lags_leaves_a_reading_connection(
        kanal, origin) -> None:
    k = kanal({"web.yaml": upstream(origin.port), "route.yaml": ROUTE})
    for _ in range(ROUNDS):
        reader, writer = await slow_client(k.port)
        try:
            writer.write(b"GET /big HTTP/1.1\r\nHost: a.test\r\n\r\n")
            await writer.drain()
            async with asyncio.timeout(10):
                # Nothing is read until the origin has written its whole answer.
                assert await origin.written.get() == b"/big"
                answer = await read_response(reader)
            assert answer.status == 200 and len(answer.body) == BIG
            # The next request takes the pooled connection that carried the answer.
            writer.write(b"GET /next HTTP/1.1\r\nHost: a.test\r\n\r\n")
            async with asyncio.timeout(5):
                answer = await read_response(reader)
            assert (answer.status, answer.body) == (200, b"ok")
            assert await origin.written.get() == b"/next"
        finally:
            writer.close()
    assert origin.accepted == 1  # one pooled connection carried every answer


class LaggingSink:
    """The client side of an exchange whose client lags: reading the answer is paused at
    its head (as a client transport asking to pause writing does), and the connection
    goes back to the pool when the answer ends."""

    batch: list[bytes] | None = None

    def __init__(self, lag: bool) -> None:
        self.lag = lag
        self.body = b""
        self.failed = ""
        self.done = asyncio.Event()

    def response_head(self, conn: UpstreamConnection) -> None:
        if self.lag:
            conn.pause_answers()

    def response_body(self, chunk: bytes) -> None:
        self.body += chunk

    def response_done(self, conn: UpstreamConnection) -> None:
        conn.release()
        self.done.set()

    def upstream_failed(self, conn: UpstreamConnection, reason: str,
                        exc: BaseException | None) -> None:
        self.failed = reason
        self.done.set()

    def upstream_upgraded(self, conn: UpstreamConnection, rest: bytes) -> None:
        conn.abort()

    def upstream_pause_writing(self) -> None:
        pass

    def upstream_resume_writing(self) -> None:
        pass

    def end_batch(self) -> None:
        self.batch = None

    def flush(self, batch: list[bytes]) -> None:
        pass


async def test_the_pool_keeps_only_connections_that_read(origin) -> None:
    pool = EndpointPool("127.0.0.1", origin.port)
    conn = await pool.connect()
    try:
        lagging = LaggingSink(lag=True)
        conn.start(lagging, b"GET /first HTTP/1.1\r\nHost: a.test\r\n\r\n", False)
        async with asyncio.timeout(5):
            await lagging.done.wait()  # the whole answer came in the read that paused it
        assert lagging.body == b"ok"
        assert pool.take_idle() is conn
        following = LaggingSink(lag=False)
        conn.start(following, b"GET /second HTTP/1.1\r\nHost: a.test\r\n\r\n", False)
        async with asyncio.timeout(5):
            await following.done.wait()
        assert (following.body, following.failed) == (b"ok", "")
    finally:
        pool.close_all()

"""Scenario: connections and bodies: keep-alive pools, streaming, chunked framing, WebSocket.

A hand-written HTTP/1.1 server (`CountingServer`) stands in where the test must count
upstream connections or control the response framing byte by byte.
"""

from __future__ import annotations

import asyncio
import time
from typing import ClassVar, Self

import aiohttp
import pytest

from tests.conftest import free_port, process_rss, raw_request, upstream_yaml

MiB = 1024 * 1024


class CountingServer:
    """A keep-alive HTTP/1.1 server that counts its connections.

    `/chunked` answers with a chunked body of `CHUNKS`; anything else answers `ok`
    with a Content-Length. Request bodies (Content-Length only) are read and dropped.
    """

    CHUNKS: ClassVar[list[bytes]] = [b"first-", b"second-", b"x" * 70000, b"-last"]

    def __init__(self, port: int) -> None:
        self.port = port
        self.connections = 0
        self.requests = 0
        self.body_bytes = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                if head.split(b" ")[1] == b"/slowread":
                    await asyncio.sleep(1.0)  # a slow application: the body must wait
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        left = int(line.split(b":")[1])
                        while left:
                            left -= len(await reader.read(min(left, MiB)))
                        self.body_bytes += int(line.split(b":")[1])
                if head.split(b" ")[1] == b"/chunked":
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    for chunk in self.CHUNKS:
                        writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                        await writer.drain()
                    writer.write(b"0\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture(scope="module")
def setup(module_kanal, module_backends):
    echo = module_backends("ws")
    counting_port = free_port()
    route = """\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: echo}
spec:
  rules: [{backends: [{upstream: echo}]}]
---
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: counting}
spec:
  hostnames: [counting.test]
  rules: [{backends: [{upstream: counting}]}]
"""
    counting = f"""\
apiVersion: kanal.dev/v1alpha1
kind: Upstream
metadata: {{name: counting}}
spec:
  endpoints: [{{address: 127.0.0.1, port: {counting_port}}}]
"""
    k = module_kanal(
        {"echo.yaml": upstream_yaml("echo", echo), "counting.yaml": counting, "route.yaml": route}
    )
    return k, echo, counting_port


async def test_keepalive_requests_reuse_few_upstream_connections(setup):
    k, _, port = setup
    async with CountingServer(port) as server:
        # 100 requests on one client connection
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(100):
                async with session.get(k.url + "/", headers={"Host": "counting.test"}) as answer:
                    assert answer.status == 200
                    assert await answer.read() == b"ok"
        assert server.requests == 100
        assert server.connections <= 2
        # 20 clients one after another share the pool too
        for _ in range(20):
            async with (
                aiohttp.ClientSession() as session,
                session.get(k.url + "/", headers={"Host": "counting.test"}) as answer,
            ):
                assert answer.status == 200
        assert server.connections <= 2


async def test_chunked_response_is_relayed_intact(setup):
    k, _, port = setup
    async with CountingServer(port) as server:
        (answer,) = await raw_request(
            k.port, b"GET /chunked HTTP/1.1\r\nHost: counting.test\r\n\r\n"
        )
        assert answer.status == 200
        assert answer.body == b"".join(server.CHUNKS)
        assert (answer.header("transfer-encoding") or "").lower() == "chunked"
        # An HTTP/1.0 client cannot read chunks: it gets the body delimited by the close.
        (answer,) = await raw_request(
            k.port, b"GET /chunked HTTP/1.0\r\nHost: counting.test\r\n\r\n"
        )
        assert answer.status == 200
        assert answer.header("transfer-encoding") is None
        assert answer.body == b"".join(server.CHUNKS)


async def test_chunked_request_body_is_streamed_to_the_backend(setup):
    k, _echo, _ = setup
    block = b"y" * 65536

    async def body():
        for _ in range(64):
            yield block

    async with (
        aiohttp.ClientSession() as session,
        session.post(k.url + "/upload-chunked", data=body()) as answer,
    ):
        assert answer.status == 200
        record = await answer.json()
    assert record["chunked"] is True
    assert record["body_size"] == 64 * 65536


async def test_expect_100_continue(setup):
    k, _, _ = setup
    reader, writer = await asyncio.open_connection("127.0.0.1", k.port)
    try:
        writer.write(
            b"POST /expect HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        await writer.drain()
        async with asyncio.timeout(5):
            interim = await reader.readuntil(b"\r\n\r\n")
            assert interim.startswith(b"HTTP/1.1 100")
            writer.write(b"hello")
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()


async def test_http10_and_pipelined_requests(setup):
    k, _, _ = setup
    (answer,) = await raw_request(k.port, b"GET /old HTTP/1.0\r\nHost: old.test\r\n\r\n")
    assert answer.status == 200
    assert answer.json()["path"] == "/old"
    pipelined = b"".join(b"GET /p%d HTTP/1.1\r\nHost: pipe.test\r\n\r\n" % i for i in range(5))
    answers = await raw_request(k.port, pipelined, responses=5)
    assert [a.json()["path"] for a in answers] == [f"/p{i}" for i in range(5)]


async def test_http10_request_without_host_is_served(setup):
    k, _, _ = setup
    (answer,) = await raw_request(k.port, b"GET /nohost HTTP/1.0\r\n\r\n")
    assert answer.status == 200, answer
    assert answer.json()["path"] == "/nohost"


async def test_websocket_is_relayed_both_ways(setup):
    k, _, _ = setup
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(k.url + "/ws") as ws:
            for i in range(3):
                await ws.send_str(f"hello-{i}")
                assert await ws.receive_str(timeout=5) == f"ws:hello-{i}"
            payload = bytes(range(256)) * 1000
            await ws.send_bytes(payload)
            assert await ws.receive_bytes(timeout=5) == payload
            await ws.close()
        assert ws.closed


async def test_large_upload_and_download_keep_proxy_memory_flat(setup):
    k, _echo, _ = setup
    pid = k.process.pid
    total = 256 * MiB
    before = process_rss(pid)
    peak = [before]
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process_rss(pid))
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    block = b"u" * MiB

    async def upload():
        for _ in range(total // MiB):
            yield block

    started = time.monotonic()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                k.url + "/upload", data=upload(), headers={"Content-Length": str(total)}
            ) as answer:
                assert answer.status == 200
                record = await answer.json()
            assert record["body_size"] == total
            assert record["chunked"] is False

            received = 0
            async with session.get(k.url + f"/bytes/{total}") as answer:
                assert answer.status == 200
                assert answer.headers["Content-Length"] == str(total)
                async for chunk in answer.content.iter_chunked(MiB):
                    received += len(chunk)
            assert received == total
    finally:
        done.set()
        await sampler
    after = process_rss(pid)
    peak[0] = max(peak[0], after)
    assert peak[0] - before < 64 * MiB, (before, peak[0], after, time.monotonic() - started)


class RssPeak:
    """Samples a process's VmRSS every 20 ms while in use; `growth` is peak minus start."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = process_rss(pid)
        self.peak = self.start
        self.done = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        async def sample() -> None:
            while not self.done.is_set():
                self.peak = max(self.peak, process_rss(self.pid))
                await asyncio.sleep(0.02)

        self.task = asyncio.create_task(sample())
        return self

    async def __aexit__(self, *_: object) -> None:
        self.done.set()
        assert self.task is not None
        await self.task
        self.peak = max(self.peak, process_rss(self.pid))

    @property
    def growth(self) -> int:
        return self.peak - self.start


async def test_slow_client_download_is_paced_not_buffered(setup):
    """The backend can write 256 MiB faster than this client reads: the proxy must wait."""
    k, _, _ = setup
    total = 256 * MiB
    async with RssPeak(k.process.pid) as rss:
        reader, writer = await asyncio.open_connection("127.0.0.1", k.port, limit=MiB)
        try:
            writer.write(b"GET /bytes/%d HTTP/1.1\r\nHost: dl.test\r\n\r\n" % total)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            await asyncio.sleep(1.0)  # the client reads nothing for a second
            stalled_growth = rss.growth
            received = 0
            async with asyncio.timeout(30):
                while received < total:
                    chunk = await reader.read(MiB)
                    assert chunk
                    received += len(chunk)
        finally:
            writer.close()
    assert received == total
    assert stalled_growth < 64 * MiB, stalled_growth
    assert rss.growth < 64 * MiB, rss.growth


async def test_upload_to_a_slow_upstream_is_paced_not_buffered(setup):
    """The upstream reads nothing for a second: the proxy must stop reading the client."""
    k, _, port = setup
    total = 256 * MiB
    block = b"s" * MiB

    async def upload():
        for _ in range(total // MiB):
            yield block

    async with (
        CountingServer(port) as server,
        RssPeak(k.process.pid) as rss,
        aiohttp.ClientSession() as session,
        session.post(
            k.url + "/slowread",
            data=upload(),
            headers={"Host": "counting.test", "Content-Length": str(total)},
        ) as answer,
    ):
        assert answer.status == 200
        assert await answer.read() == b"ok"
    assert server.body_bytes == total
    assert rss.growth < 64 * MiB, rss.growth

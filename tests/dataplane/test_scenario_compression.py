"""Scenario: the Compression filter through `kanal run`, checked on the wire.

A backend serves text of known bytes in every shape that matters (a length or a
stream, already encoded, `no-transform`, ranges, images, HEAD); the client sends raw
requests and decodes what comes back with the codings' own libraries, so "compressed"
means "decodes to the original bytes", and "not compressed" means byte-identical.
"""

from __future__ import annotations

import asyncio
import gzip
import zlib

import brotli
import pytest
import zstandard
from aiohttp import web

from tests.conftest import (
    BackendThread,
    free_port,
    process_rss,
    raw_request,
    read_response,
)

MiB = 1024 * 1024


def text(size: int) -> bytes:
    line = b"<p>kanal compresses answers chunk by chunk</p>\n"
    return (line * (size // len(line) + 1))[:size]


def backend_app() -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        kind = request.match_info["kind"]
        size = int(request.query.get("size", "4096"))
        body = text(size)
        if kind == "text":
            return web.Response(body=body, content_type="text/html",
                                headers={"ETag": '"v1"'})
        if kind == "image":
            return web.Response(body=body, content_type="image/png")
        if kind == "encoded":
            return web.Response(body=gzip.compress(body), content_type="text/html",
                                headers={"Content-Encoding": "gzip"})
        if kind == "notransform":
            return web.Response(body=body, content_type="text/html",
                                headers={"Cache-Control": "public, no-transform"})
        if kind == "range":
            if "Range" in request.headers:
                return web.Response(status=206, body=body[:100], content_type="text/html",
                                    headers={"Content-Range": f"bytes 0-99/{size}"})
            return web.Response(body=body, content_type="text/html")
        if kind == "stream":
            response = web.StreamResponse(headers={"Content-Type": "text/plain"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            left = size
            block = text(64 * 1024)
            while left > 0:
                piece = block[: min(left, len(block))]
                await response.write(piece)
                left -= len(piece)
            await response.write_eof()
            return response
        return web.Response(status=404)

    app = web.Application()
    app.router.add_route("*", "/{kind}", handle)
    return app


@pytest.fixture(scope="module")
def origin():
    pool = BackendThread()
    port = free_port()

    async def start() -> web.AppRunner:
        runner = web.AppRunner(backend_app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner

    runner = pool.run(start())
    yield port
    pool.run(runner.cleanup())
    pool.close()


def manifests(origin: int) -> str:
    return f"""
apiVersion: kanal.dev/v1alpha1
kind: Upstream
metadata: {{name: origin}}
spec:
  endpoints: [{{address: 127.0.0.1, port: {origin}}}]
---
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {{name: site}}
spec:
  hostnames: [compress.test]
  rules:
    - filters:
        - type: Compression
          compression: {{minSize: 1Ki}}
      backends: [{{upstream: origin}}]
---
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {{name: plain}}
spec:
  hostnames: [plain.test]
  rules: [{{backends: [{{upstream: origin}}]}}]
"""


@pytest.fixture(scope="module")
def k(module_kanal, origin):
    return module_kanal({"site.yaml": manifests(origin)})


@pytest.fixture(scope="module")
def k_all(module_kanal, origin):
    return module_kanal({"site.yaml": manifests(origin)}, "--compression")


async def get(k, path: str, accept: str | None = "gzip", *, host: str = "compress.test",
              extra: str = "", method: str = "GET", version: str = "1.1"):
    head = f"{method} {path} HTTP/{version}\r\nHost: {host}\r\n"
    if accept is not None:
        head += f"Accept-Encoding: {accept}\r\n"
    data = (head + extra + "\r\n").encode()
    if method == "HEAD":
        reader, writer = await asyncio.open_connection("127.0.0.1", k.port)
        try:
            writer.write(data)
            async with asyncio.timeout(10):
                return await read_response(reader, head_request=True)
        finally:
            writer.close()
    (answer,) = await raw_request(k.port, data, timeout=60)
    return answer


DECODE = {"gzip": gzip.decompress, "br": brotli.decompress,
          "zstd": lambda data: zstandard.ZstdDecompressor().decompressobj().decompress(data)}


@pytest.mark.parametrize(("accept", "coding"), [
    ("gzip", "gzip"),
    ("br", "br"),
    ("zstd", "zstd"),
    ("gzip;q=0.5, br;q=1.0", "br"),
    ("br;q=0, gzip", "gzip"),
    ("gzip, deflate, br, zstd", "br"),  # ties: the filter's order (br, zstd, gzip)
    ("zstd;q=0.9, gzip;q=0.8", "zstd"),
    ("*", "br"),
])
async def test_compressed_by_q_values_and_decodes_to_the_original(k, accept, coding) -> None:
    answer = await get(k, "/text?size=20000", accept)
    assert answer.status == 200
    assert answer.header("Content-Encoding") == coding
    assert answer.header("Content-Length") is None
    assert answer.header("Transfer-Encoding") == "chunked"
    assert answer.header("Vary") == "Accept-Encoding"
    assert answer.header("ETag") == 'W/"v1"'  # the bytes differ: only weakly the same
    assert len(answer.body) < 20000
    assert DECODE[coding](answer.body) == text(20000)


@pytest.mark.parametrize(("path", "accept", "extra", "why"), [
    ("/text?size=20000", None, "", "no Accept-Encoding"),
    ("/text?size=20000", "gzip;q=0, identity", "", "gzip refused"),
    ("/text?size=500", "gzip", "", "below minSize"),
    ("/image?size=20000", "gzip", "", "content type not listed"),
    ("/notransform?size=20000", "gzip", "", "Cache-Control: no-transform"),
    ("/range?size=20000", "gzip", "Range: bytes=0-99\r\n", "a 206 answer to Range"),
])
async def test_not_compressed(k, path, accept, extra, why) -> None:
    answer = await get(k, path, accept, extra=extra)
    assert answer.header("Content-Encoding") is None, why
    size = int(path.rsplit("=", 1)[1])
    expected = text(size)[:100] if "Range" in extra else text(size)
    assert answer.body == expected, why
    assert answer.header("Content-Length") == str(len(expected)), why


async def test_an_already_encoded_answer_passes_untouched(k) -> None:
    answer = await get(k, "/encoded?size=20000", "br, gzip")
    assert answer.header("Content-Encoding") == "gzip"
    assert gzip.decompress(answer.body) == text(20000)


async def test_head_and_http10_are_not_compressed(k) -> None:
    head = await get(k, "/text?size=20000", "gzip", method="HEAD")
    assert head.status == 200 and head.header("Content-Encoding") is None
    assert head.header("Content-Length") == "20000"
    old = await get(k, "/text?size=20000", "gzip", version="1.0")
    assert old.header("Content-Encoding") is None and old.body == text(20000)


async def test_routes_without_the_filter_are_untouched(k) -> None:
    answer = await get(k, "/text?size=20000", "gzip", host="plain.test")
    assert answer.header("Content-Encoding") is None and answer.header("Vary") is None
    assert answer.body == text(20000)


async def test_a_large_stream_compresses_with_bounded_memory(k) -> None:
    """64 MiB streamed through gzip: decoded as it arrives, memory stays near flat."""
    total = 64 * MiB
    pid = k.process.pid
    before = process_rss(pid)
    peak = before
    reader, writer = await asyncio.open_connection("127.0.0.1", k.port)
    decoder = zlib.decompressobj(31)
    decoded = 0
    try:
        writer.write(f"GET /stream?size={total} HTTP/1.1\r\nHost: compress.test\r\n"
                     "Accept-Encoding: gzip\r\nConnection: close\r\n\r\n".encode())
        async with asyncio.timeout(120):
            head = await reader.readuntil(b"\r\n\r\n")
            assert b"Content-Encoding: gzip" in head and b"Transfer-Encoding: chunked" in head
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                if size == 0:
                    break
                chunk = await reader.readexactly(size)
                await reader.readexactly(2)
                plain = decoder.decompress(chunk)
                expected = text(64 * 1024) * 8
                offset = decoded % (64 * 1024)
                assert plain == expected[offset:offset + len(plain)]
                decoded += len(plain)
                peak = max(peak, process_rss(pid))
        decoded += len(decoder.flush())
    finally:
        writer.close()
    assert decoded == total
    assert peak - before < 32 * MiB, f"proxy memory grew by {(peak - before) // MiB} MiB"


async def test_the_compression_flag_compresses_every_rule(k_all) -> None:
    answer = await get(k_all, "/text?size=20000", "gzip", host="plain.test")
    assert answer.header("Content-Encoding") == "gzip"
    assert gzip.decompress(answer.body) == text(20000)
    small = await get(k_all, "/text?size=100", "gzip", host="plain.test")
    assert small.header("Content-Encoding") is None and small.body == text(100)

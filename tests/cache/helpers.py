"""What the cache tests through `kanal run` share: a request on the proxy (`get`), a
query for the origin (`q`), an origin failing for a while (`failing`), and the Upstream
manifest of an origin."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from tests.cache.origin import Origin
from tests.conftest import Kanal, RawResponse, raw_request, read_response


async def get(proxy: Kanal, target: str, *headers: str, method: str = "GET",
              timeout: float = 10.0) -> RawResponse:
    lines = "".join(f"{h}\r\n" for h in headers)
    data = f"{method} {target} HTTP/1.1\r\nHost: site.test\r\n{lines}Connection: close\r\n\r\n"
    if method != "HEAD":
        [answer] = await raw_request(proxy.port, data.encode(), timeout=timeout)
        return answer
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(data.encode())
        async with asyncio.timeout(10):
            return await read_response(reader, head_request=True)
    finally:
        writer.close()


def q(**fields: str) -> str:
    return "&".join(f"{name}={quote(value)}" for name, value in fields.items())


@contextmanager
def failing(origin: Origin, path: str) -> Iterator[None]:
    """The origin answers `path` with 503 inside the block."""
    origin.failing.add(path)
    try:
        yield
    finally:
        origin.failing.discard(path)


def upstream(origin: Origin) -> str:
    return f"""\
        apiVersion: kanal.dev/v1alpha1
        kind: Upstream
        metadata: {{name: origin}}
        spec:
          endpoints: [{{address: 127.0.0.1, port: {origin.port}}}]
        """


async def read_fifo(fifo: Path) -> bytes:
    """Everything a cache's disk write puts into a FIFO standing in for its file: opening
    it lets the write (blocked until a reader comes) go on; read until the writer is done."""
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    os.set_blocking(reader, True)
    try:
        chunks = []
        while chunk := await asyncio.to_thread(os.read, reader, 65536):
            chunks.append(chunk)
    finally:
        os.close(reader)
    return b"".join(chunks)

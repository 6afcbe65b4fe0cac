"""A graceful stop lets an open CONNECT tunnel carry on until it ends (or the drain runs out)."""

from __future__ import annotations

import asyncio
import signal
import time

from tests.conftest import async_wait_until, free_port


async def refuses(port: int) -> bool:
    """Whether the listener on `port` is closed (a new connection is refused)."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True
    writer.close()
    return False


async def test_sigterm_drains_an_open_tunnel(kanal):
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    forward_port = free_port()
    policy = (
        "apiVersion: kanal.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {name: egress}\n"
        f"spec:\n  allow: [{{host: localhost, ports: [{port}]}}]\n  allowPrivateNetworks: true\n"
    )
    k = kanal({"policy.yaml": policy}, "--forward-listen", f"127.0.0.1:{forward_port}")
    reader, writer = await asyncio.open_connection("127.0.0.1", forward_port)
    try:
        target = f"localhost:{port}"
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200"), head
        writer.write(b"before")
        assert await asyncio.wait_for(reader.readexactly(6), 5) == b"before"

        assert k.process is not None
        k.process.send_signal(signal.SIGTERM)
        await async_wait_until(lambda: refuses(forward_port), timeout=5)  # the stop has begun
        assert k.process.poll() is None, "kanal stopped without draining the open tunnel"
        writer.write(b"during")
        assert await asyncio.wait_for(reader.readexactly(6), 5) == b"during"
    finally:
        writer.close()
        server.close()
    deadline = time.monotonic() + 10
    while k.process.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert k.process.poll() == 0, "kanal did not stop once the tunnel ended"

"""The sidecar's inbound listener is swept like the others: a stalled head gets its 408."""

from __future__ import annotations

import asyncio

from kanal.dataplane.process import DataplaneOptions, start_listeners
from kanal.dataplane.runtime import Runtime
from kanal.dataplane.server import housekeeping
from tests.conftest import free_port, read_response


async def test_a_stalled_head_on_the_inbound_listener_gets_408(backends) -> None:
    app = await backends("app")
    port = free_port()
    options = DataplaneOptions(listen=None, inbound_listen=("127.0.0.1", port),
                               app_port=app.port, admin=None, head_timeout=0.5)
    runtime = Runtime()
    servers = await start_listeners(runtime, options)
    try:
        async with housekeeping(runtime):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(b"GET / HTTP/1.1\r\nHost: app\r\n")  # and nothing more
                async with asyncio.timeout(10):
                    answer = await read_response(reader)
            finally:
                writer.close()
    finally:
        for server in servers:
            server.close()
        runtime.close()
    assert answer.status == 408
    assert b"head" in answer.body

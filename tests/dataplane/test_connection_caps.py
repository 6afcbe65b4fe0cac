"""Connection caps over real sockets: at a cap a listener stops accepting (the next
connection waits in the kernel's backlog, unanswered), and accepts again as soon as one
of the held connections closes; /metrics shows the pause."""

from __future__ import annotations

import asyncio
import contextlib
import re
import urllib.request
from collections.abc import AsyncIterator

import pytest

from tests.conftest import Kanal, free_port, read_response, upstream_yaml

ROUTE = """\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: r}
spec:
  rules: [{backends: [{upstream: web}]}]
"""
REQUEST = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
UNANSWERED_WAIT = 1.0  # how long a connection past the cap is watched for an answer


def metric(k: Kanal, name: str, **labels: str) -> float:
    """The value of one series of /metrics (0 when absent)."""
    with urllib.request.urlopen(k.admin + "/metrics", timeout=5) as answer:
        text = answer.read().decode()
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" (\S+)"
    found = re.search("^" + pattern + "$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


@contextlib.asynccontextmanager
async def held(port: int, count: int) -> AsyncIterator[list[asyncio.StreamWriter]]:
    """`count` keep-alive connections, each with one request answered, held open."""
    writers: list[asyncio.StreamWriter] = []
    try:
        for _ in range(count):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writers.append(writer)
            writer.write(REQUEST)
            async with asyncio.timeout(10):
                assert (await read_response(reader)).status == 200
        yield writers
    finally:
        for writer in writers:
            writer.close()


async def unanswered(port: int, request: bytes = REQUEST
                     ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect (the kernel completes the handshake) and send a request that gets no
    answer within UNANSWERED_WAIT; the connection, to read the late answer from."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(UNANSWERED_WAIT):
            await reader.read(1)
    return reader, writer


async def test_accept_pauses_at_the_listener_cap_and_resumes_on_a_close(kanal, backends) -> None:
    web = await backends("web")
    k = kanal({"web.yaml": upstream_yaml("web", web), "route.yaml": ROUTE},
              "--max-connections", "2")
    async with held(k.port, 2) as writers:
        waiting, late = await unanswered(k.port)
        assert metric(k, "kanal_listener_accept_paused", listener="http") == 1
        assert metric(k, "kanal_listener_connections", listener="http") == 2
        assert metric(k, "kanal_listener_accept_pauses_total", listener="http",
                      cap="listener") >= 1
        writers[0].close()  # room for one: the waiting connection is accepted and served
        async with asyncio.timeout(10):
            answer = await read_response(waiting)
        assert answer.status == 200
        late.close()
    # every held connection closed: accepting again, nothing counted as open
    async with asyncio.timeout(10):
        while metric(k, "kanal_listener_connections", listener="http"):
            await asyncio.sleep(0.05)
    assert metric(k, "kanal_listener_accept_paused", listener="http") == 0


async def test_the_process_cap_counts_every_listener(kanal, backends) -> None:
    web = await backends("web")
    forward_port = free_port()
    k = kanal({"web.yaml": upstream_yaml("web", web), "route.yaml": ROUTE},
              "--max-total-connections", "2", "--forward-listen", f"127.0.0.1:{forward_port}")
    async with held(k.port, 2) as writers:
        # the reverse listener holds the process's two: the forward listener waits too
        waiting, late = await unanswered(
            forward_port, b"GET http://127.0.0.1:%d/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                          % web.port)
        assert metric(k, "kanal_listener_accept_paused", listener="forward") == 1
        assert metric(k, "kanal_listener_accept_pauses_total", listener="forward",
                      cap="process") >= 1
        assert metric(k, "kanal_connections") == 2
        writers[1].close()
        async with asyncio.timeout(10):
            answer = await read_response(waiting)
        late.close()
        assert answer.status in (200, 403)  # served (or refused by egress policy): accepted


async def test_the_cap_holds_on_the_asyncio_loop_too(backends) -> None:
    # `kanal run` serves on uvloop; this runs the same listener on asyncio's own loop,
    # which lets go of an accepted socket differently (close, not detach).
    from kanal.dataplane.process import DataplaneOptions, start_listeners
    from kanal.dataplane.runtime import Runtime

    app = await backends("app")
    port = free_port()
    runtime = Runtime()
    servers = await start_listeners(runtime, DataplaneOptions(
        listen=None, inbound_listen=("127.0.0.1", port), app_port=app.port, admin=None,
        max_connections=1))
    try:
        async with held(port, 1) as writers:
            waiting, late = await unanswered(port)
            [listener] = runtime.connection_gate.listeners
            assert (listener.name, listener.open, listener.paused) == ("inbound", 1, "listener")
            writers[0].close()
            async with asyncio.timeout(10):
                assert (await read_response(waiting)).status == 200
            late.close()
        async with asyncio.timeout(10):
            while runtime.connection_gate.open:
                await asyncio.sleep(0.02)
    finally:
        for server in servers:
            server.close()
        runtime.close()

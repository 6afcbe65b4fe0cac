"""The forward listener's own requests (absolute-form and CONNECT) at the same edge as
the reverse listener's: request lines with runs of spaces are refused, an error answer
closes lingering, and `--overload-memory` refuses new requests. Raw bytes through a real
forward listener, to a raw origin that records what reached it."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from tests.conftest import answer_while_sending, free_port, raw_request, read_response
from tests.dataplane import test_forward, test_forward_pool
from tests.dataplane.test_connection_caps import metric
from tests.dataplane.test_forward import allow, local
from tests.dataplane.test_forward_pool import ok

forward = test_forward.forward  # a forward proxy in this process, on a real socket
origin = test_forward_pool.origin  # a raw origin that records the heads it gets


def reached(heads: list[bytes], marker: bytes) -> list[bytes]:
    return [head for head in heads if marker in head]


@pytest.mark.parametrize("line", [
    "GET  http://localhost:{port}/spaced-a HTTP/1.1",
    "GET http://localhost:{port}/spaced-b  HTTP/1.1",
    "\r\nGET  http://localhost:{port}/spaced-d HTTP/1.1",
    "CONNECT  localhost:{port} HTTP/1.1",
])
async def test_request_lines_with_runs_of_spaces_are_400_and_closed(forward, origin,
                                                                    line: str) -> None:
    web = await origin(ok())
    fwd = await forward(allow(local(web.port)))
    reader, writer = await asyncio.open_connection("127.0.0.1", fwd.port)
    try:
        writer.write(line.format(port=web.port).encode()
                     + f"\r\nHost: localhost:{web.port}\r\n\r\n".encode())
        async with asyncio.timeout(10):
            answer = await read_response(reader)
            assert await reader.read() == b""  # and the connection is closed
    finally:
        writer.close()
    assert answer.status == 400
    assert answer.body.startswith(b"kanal: 400 request line with more than one space")
    assert web.accepted == 0 and not web.heads  # nothing reached the origin


async def test_a_spaced_line_behind_a_valid_one_is_caught_after_its_answer(forward,
                                                                           origin) -> None:
    web = await origin(ok())
    fwd = await forward(allow(local(web.port)))
    host = f"Host: localhost:{web.port}\r\n\r\n".encode()
    target = f"http://localhost:{web.port}".encode()
    # valid lines pass, after empty lines and over three reads
    valid = b"\r\nGET " + target + b"/lead HTTP/1.1\r\n" + host
    reader, writer = await asyncio.open_connection("127.0.0.1", fwd.port)
    try:
        for piece in (valid[:9], valid[9:30], valid[30:] + valid):
            writer.write(piece)
            await writer.drain()
        async with asyncio.timeout(10):
            assert [(await read_response(reader)).status for _ in range(2)] == [200, 200]
    finally:
        writer.close()
    # in the same read as a valid request: the valid one is answered, then the 400
    answers = await raw_request(
        fwd.port, b"GET " + target + b"/piped-ok HTTP/1.1\r\n" + host
        + b"GET  " + target + b"/piped-bad HTTP/1.1\r\n" + host, responses=2)
    assert [(a.status, a.body[:5]) for a in answers] == [(200, b"hello"), (400, b"kanal")]
    # and split over two reads at the spaces
    reader, writer = await asyncio.open_connection("127.0.0.1", fwd.port)
    try:
        writer.write(b"GET " + target + b"/split-bad ")
        await writer.drain()
        writer.write(b" HTTP/1.1\r\n" + host)
        async with asyncio.timeout(10):
            assert (await read_response(reader)).status == 400
            assert await reader.read() == b""
    finally:
        writer.close()
    assert reached(web.heads, b"/piped-ok")
    assert not reached(web.heads, b"/piped-bad") and not reached(web.heads, b"/split-bad")


async def test_an_error_answer_survives_a_client_that_goes_on_sending(forward, origin) -> None:
    web = await origin(ok())
    fwd = await forward(allow(local(web.port)))
    # A client that writes its whole body before it reads, to a destination no policy
    # allows: the 403 goes out while the body keeps coming.
    answer = await answer_while_sending(
        fwd.port, b"POST http://denied.localhost/upload HTTP/1.1\r\n"
                  b"Host: denied.localhost\r\nContent-Length: %d\r\n\r\n" % (16 << 20), 16 << 20)
    assert answer.status == 403
    assert answer.header("Connection") == "close"
    assert not web.heads


async def test_a_mesh_error_answer_closes_lingering_too(forward, backends) -> None:
    app = await backends("orders")
    config = test_forward.mesh_config(app.port)
    [route, other] = config["routes"]
    rule = dataclasses.replace(route.rules[0], max_request_body_size=1024)
    config["routes"] = (dataclasses.replace(route, rules=(rule,)), other)
    fwd = await forward(**config)
    # The reverse proxy that routes mesh requests answers 413 at the head; the body keeps
    # coming and must be dropped, not parsed as requests, until the client is done.
    smuggled = b"GET http://orders.mesh/smuggled HTTP/1.1\r\nHost: orders.mesh\r\n\r\n"
    answer = await answer_while_sending(
        fwd.port, b"POST http://orders.mesh/upload HTTP/1.1\r\nHost: orders.mesh\r\n"
                  b"Content-Length: %d\r\n\r\n" % (16 << 20), 16 << 20,
        chunk=smuggled * (65536 // len(smuggled)))
    assert answer.status == 413
    assert not app.received


# --------------------------------------------------------------------------- overload


@pytest.fixture
def overloaded(kanal, backends):
    """`kanal run --forward-listen` with a memory threshold every process is above."""

    async def start():
        app = await backends("app")
        port = free_port()
        policy = f"""\
apiVersion: kanal.dev/v1alpha1
kind: EgressPolicy
metadata: {{name: egress}}
spec:
  allow: [{{host: localhost, ports: [{app.port}]}}]
  allowPrivateNetworks: true
"""
        k = kanal({"policy.yaml": policy}, "--forward-listen", f"127.0.0.1:{port}",
                  "--overload-memory", "1Mi")
        return k, port, app

    return start


async def test_overload_refuses_forward_requests_and_tunnels_503(overloaded) -> None:
    k, port, app = await overloaded()
    for request in (
        f"GET http://localhost:{app.port}/ HTTP/1.1\r\nHost: localhost:{app.port}\r\n\r\n",
        f"CONNECT localhost:{app.port} HTTP/1.1\r\nHost: localhost:{app.port}\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(request.encode())
            async with asyncio.timeout(10):
                answer = await read_response(reader)
                assert await reader.read() == b""  # the connection is closed
        finally:
            writer.close()
        assert answer.status == 503, request
        assert answer.header("Connection") == "close"
        assert answer.header("X-Kanal-Overloaded") == "true"
        assert answer.header("Retry-After") == "1"
        assert b"overloaded" in answer.body
    assert not app.received
    assert metric(k, "kanal_overload_refused_requests_total", resource="memory") == 2

"""Scenario: what the backend sees of the client's headers.

Hop-by-hop headers and the headers `Connection` names stop at the proxy; the
forwarding headers are the proxy's own unless `--trusted-hops` says to believe the
proxies in front; `Host` passes untouched. Requests are raw bytes, so exactly what the
client sent is known.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import free_port, header_values, raw_request, upstream_yaml

ROUTE = """\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: echo}
spec:
  rules: [{backends: [{upstream: echo}]}]
---
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: raw}
spec:
  hostnames: [raw.test]
  rules: [{backends: [{upstream: raw}]}]
"""


@pytest.fixture(scope="module")
def echo(module_backends):
    return module_backends("echo")


@pytest.fixture(scope="module")
def raw_port():
    """A port where a test starts a hand-written upstream."""
    return free_port()


def manifests(echo, raw_port) -> dict[str, str]:
    raw = f"""\
apiVersion: kanal.dev/v1alpha1
kind: Upstream
metadata: {{name: raw}}
spec:
  endpoints: [{{address: 127.0.0.1, port: {raw_port}}}]
"""
    return {"echo.yaml": upstream_yaml("echo", echo), "raw.yaml": raw, "route.yaml": ROUTE}


@pytest.fixture(scope="module")
def untrusting(module_kanal, echo, raw_port):
    return module_kanal(manifests(echo, raw_port))


@pytest.fixture(scope="module")
def trusting(module_kanal, echo, raw_port):
    return module_kanal(manifests(echo, raw_port), "--trusted-hops", "1")


async def seen_by_backend(k, head: bytes) -> dict:
    (answer,) = await raw_request(k.port, head)
    assert answer.status == 200, answer
    return answer.json()


async def test_hop_by_hop_and_connection_named_headers_are_removed(untrusting):
    record = await seen_by_backend(
        untrusting,
        b"GET /hop HTTP/1.1\r\n"
        b"Host: shop.example.com\r\n"
        b"Connection: keep-alive, X-Secret\r\n"
        b"X-Secret: 1\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"TE: trailers\r\n"
        b"Proxy-Authorization: Basic dXNlcjpwYXNz\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Trailer: X-Checksum\r\n"
        b"X-Kept: yes\r\n"
        b"\r\n",
    )
    names = {name.lower() for name, _ in record["headers"]}
    for dropped in (
        "x-secret",
        "keep-alive",
        "te",
        "proxy-authorization",
        "proxy-connection",
        "trailer",
    ):
        assert dropped not in names, (dropped, record["headers"])
    assert header_values(record, "connection") in ([], ["keep-alive"])
    assert header_values(record, "x-kept") == ["yes"]


async def test_hop_by_hop_headers_of_the_response_are_removed(untrusting, raw_port):
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\n"
            b"Connection: keep-alive, X-Internal\r\n"
            b"X-Internal: secret\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"Upgrade: h2c\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"X-Public: yes\r\n"
            b"Content-Length: 2\r\n\r\nok"
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", raw_port)
    try:
        (got,) = await raw_request(untrusting.port, b"GET / HTTP/1.1\r\nHost: raw.test\r\n\r\n")
    finally:
        server.close()
        await server.wait_closed()
    assert got.status == 200
    assert got.body == b"ok"
    assert got.header("x-public") == "yes"
    for dropped in ("x-internal", "keep-alive", "upgrade", "proxy-connection"):
        assert got.header(dropped) is None, (dropped, got.headers)


async def test_forwarding_headers_are_set_and_client_values_not_trusted(untrusting):
    record = await seen_by_backend(
        untrusting,
        b"GET /fwd HTTP/1.1\r\n"
        b"Host: Shop.Example.com:8443\r\n"
        b"X-Forwarded-For: 1.2.3.4\r\n"
        b"X-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: evil.test\r\n"
        b"X-Real-IP: 1.2.3.4\r\n"
        b"Forwarded: for=1.2.3.4;proto=https\r\n"
        b"\r\n",
    )
    assert header_values(record, "x-forwarded-for") == ["127.0.0.1"]
    assert header_values(record, "x-real-ip") == ["127.0.0.1"]
    assert header_values(record, "x-forwarded-proto") == ["http"]
    assert header_values(record, "x-forwarded-host") == ["Shop.Example.com:8443"]
    assert header_values(record, "forwarded") == [
        'for=127.0.0.1;proto=http;host="Shop.Example.com:8443"'
    ]
    # Host passes through unchanged, case and port included
    assert header_values(record, "host") == ["Shop.Example.com:8443"]
    assert "1.2.3.4" not in str(record["headers"])
    assert "evil.test" not in str(record["headers"])


async def test_forwarding_headers_without_client_values(untrusting):
    record = await seen_by_backend(untrusting, b"GET / HTTP/1.1\r\nHost: plain.test\r\n\r\n")
    assert header_values(record, "x-forwarded-for") == ["127.0.0.1"]
    assert header_values(record, "x-real-ip") == ["127.0.0.1"]
    assert header_values(record, "x-forwarded-host") == ["plain.test"]
    assert header_values(record, "forwarded") == ["for=127.0.0.1;proto=http;host=plain.test"]
    assert header_values(record, "host") == ["plain.test"]


async def test_trusted_hops_keep_and_extend_the_chain(trusting):
    record = await seen_by_backend(
        trusting,
        b"GET /fwd HTTP/1.1\r\n"
        b"Host: shop.example.com\r\n"
        b"X-Forwarded-For: 1.2.3.4\r\n"
        b"X-Forwarded-Proto: https\r\n"
        b"Forwarded: for=1.2.3.4;proto=https\r\n"
        b"\r\n",
    )
    assert header_values(record, "x-forwarded-for") == ["1.2.3.4, 127.0.0.1"]
    # one hop back from the trusted proxy (the peer 127.0.0.1) is the client
    assert header_values(record, "x-real-ip") == ["1.2.3.4"]
    assert header_values(record, "x-forwarded-proto") == ["https"]
    assert header_values(record, "forwarded") == [
        "for=1.2.3.4;proto=https, for=127.0.0.1;proto=http;host=shop.example.com"
    ]


async def test_trusted_hops_take_the_address_one_hop_back_in_a_longer_chain(trusting):
    record = await seen_by_backend(
        trusting,
        b"GET /fwd HTTP/1.1\r\nHost: shop.example.com\r\nX-Forwarded-For: 6.6.6.6, 5.6.7.8\r\n\r\n",
    )
    # 6.6.6.6 was written by someone nobody trusts; 5.6.7.8 by the trusted proxy's client
    assert header_values(record, "x-forwarded-for") == ["6.6.6.6, 5.6.7.8, 127.0.0.1"]
    assert header_values(record, "x-real-ip") == ["5.6.7.8"]


async def test_forwarding_headers_follow_each_request_on_a_keepalive_connection(trusting):
    """The proxy may cache the forwarding lines per connection; each request must get its own."""
    data = (
        b"GET /1 HTTP/1.1\r\nHost: one.test\r\nX-Forwarded-For: 1.1.1.1\r\n\r\n"
        b"GET /2 HTTP/1.1\r\nHost: two.test\r\n\r\n"
        b"GET /3 HTTP/1.1\r\nHost: two.test\r\nX-Forwarded-For: 3.3.3.3\r\n\r\n"
    )
    first, second, third = (a.json() for a in await raw_request(trusting.port, data, responses=3))
    assert header_values(first, "x-real-ip") == ["1.1.1.1"]
    assert header_values(second, "x-real-ip") == ["127.0.0.1"]
    assert header_values(second, "x-forwarded-host") == ["two.test"]
    assert header_values(third, "x-real-ip") == ["3.3.3.3"]


async def test_trusted_hops_ignore_a_client_address_that_is_not_an_address(trusting):
    record = await seen_by_backend(
        trusting,
        b"GET /fwd HTTP/1.1\r\nHost: shop.example.com\r\nX-Forwarded-For: <script>\r\n\r\n",
    )
    assert header_values(record, "x-real-ip") == ["127.0.0.1"]

"""Scenario: client connection behaviour at the byte level.

HEAD and bodiless answers on a kept-alive connection, HTTP/1.0 keep-alive, the client's
`Connection: close`, absolute-form targets, an error in the middle of a pipeline, and
a client that goes away while its request is in flight.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import (
    async_wait_until,
    header_values,
    raw_request,
    read_response,
    upstream_yaml,
)

ROUTE = """\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: app}
spec:
  hostnames: [app.test, shop.example.com]
  rules: [{backends: [{upstream: app}]}]
"""


@pytest.fixture(scope="module")
def setup(module_kanal, module_backends):
    app = module_backends("app")
    return module_kanal({"app.yaml": upstream_yaml("app", app), "route.yaml": ROUTE}), app


async def test_head_and_204_leave_the_connection_usable(setup):
    k, _ = setup
    reader, writer = await asyncio.open_connection("127.0.0.1", k.port)
    try:
        writer.write(b"HEAD /bytes/1000 HTTP/1.1\r\nHost: app.test\r\n\r\n")
        head = await asyncio.wait_for(read_response(reader, head_request=True), 5)
        assert head.status == 200
        assert head.header("content-length") == "1000"
        writer.write(b"GET /status/204 HTTP/1.1\r\nHost: app.test\r\n\r\n")
        empty = await asyncio.wait_for(read_response(reader), 5)
        assert empty.status == 204
        writer.write(b"GET /after HTTP/1.1\r\nHost: app.test\r\n\r\n")
        after = await asyncio.wait_for(read_response(reader), 5)
        assert after.status == 200 and after.json()["path"] == "/after"
    finally:
        writer.close()


async def test_http10_keepalive_is_honoured(setup):
    k, _ = setup
    reader, writer = await asyncio.open_connection("127.0.0.1", k.port)
    try:
        for i in range(2):
            writer.write(
                b"GET /ka%d HTTP/1.0\r\nHost: app.test\r\nConnection: keep-alive\r\n\r\n" % i
            )
            answer = await asyncio.wait_for(read_response(reader), 5)
            assert answer.status == 200
            assert answer.json()["path"] == f"/ka{i}"
            assert (answer.header("connection") or "").lower() == "keep-alive"
    finally:
        writer.close()


async def test_client_connection_close_is_obeyed_and_not_forwarded(setup):
    k, _ = setup
    reader, writer = await asyncio.open_connection("127.0.0.1", k.port)
    try:
        writer.write(b"GET /bye HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(read_response(reader), 5)
        assert answer.status == 200
        assert (answer.header("connection") or "").lower() == "close"
        assert header_values(answer.json(), "connection") in ([], ["keep-alive"])
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the proxy closed
    finally:
        writer.close()


async def test_absolute_form_target_routes_by_its_host(setup):
    k, _ = setup
    (answer,) = await raw_request(
        k.port, b"GET http://shop.example.com/abs?q=1 HTTP/1.1\r\nHost: shop.example.com\r\n\r\n"
    )
    assert answer.status == 200
    record = answer.json()
    assert record["path"] == "/abs?q=1"
    assert header_values(record, "host") == ["shop.example.com"]


async def test_an_error_inside_a_pipeline_does_not_break_the_others(setup):
    k, _ = setup
    data = (
        b"GET /one HTTP/1.1\r\nHost: app.test\r\n\r\n"
        b"GET /two HTTP/1.1\r\nHost: unknown.test\r\n\r\n"
        b"POST /three HTTP/1.1\r\nHost: app.test\r\nContent-Length: 3\r\n\r\nabc"
    )
    one, two, three = await raw_request(k.port, data, responses=3)
    assert one.json()["path"] == "/one"
    assert two.status == 404
    assert three.json()["path"] == "/three" and three.json()["body_size"] == 3


async def test_a_client_that_leaves_mid_request_frees_the_endpoint(setup):
    k, app = setup
    _reader, writer = await asyncio.open_connection("127.0.0.1", k.port)
    writer.write(b"GET /sleep/0.5 HTTP/1.1\r\nHost: app.test\r\n\r\n")
    await writer.drain()

    async def arrived() -> bool:
        return any(r["path"] == "/sleep/0.5" for r in app.received)

    await async_wait_until(arrived, timeout=5)
    writer.close()  # the client gives up

    def active() -> int:
        (upstream,) = [u for u in k.config()["upstreams"] if u["key"] == "default/app"]
        return sum(e["activeRequests"] for e in upstream["endpoints"])

    async def released() -> bool:
        return await asyncio.to_thread(active) == 0

    await async_wait_until(released, timeout=3)
    # and the proxy still serves
    (answer,) = await raw_request(k.port, b"GET /still HTTP/1.1\r\nHost: app.test\r\n\r\n")
    assert answer.status == 200

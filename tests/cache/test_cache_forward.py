"""The forward listener caches plain-HTTP absolute-form GETs under its EgressPolicy's
`cache` section, with the reverse proxy's engine; CONNECT tunnels are never cached."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tests.cache.helpers import failing, q
from tests.cache.origin import Origin
from tests.conftest import Kanal, RawResponse, free_port, raw_request, read_response


@pytest.fixture(scope="module")
def forward_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def proxy(origin: Origin, fragile: Origin, forward_port: int,
          module_kanal: Callable[..., Kanal]) -> Kanal:
    policy = f"""\
        apiVersion: kanal.dev/v1alpha1
        kind: EgressPolicy
        metadata: {{name: egress}}
        spec:
          allow: [{{host: localhost, ports: [{origin.port}, {fragile.port}]}}]
          allowPrivateNetworks: true
          cache: {{maxObjectSize: 64Ki}}
        """
    return module_kanal({"policy.yaml": policy}, "--forward-listen", f"127.0.0.1:{forward_port}")


async def fetch(port: int, origin: Origin, target: str, *headers: str,
                method: str = "GET") -> RawResponse:
    lines = "".join(f"{h}\r\n" for h in headers)
    url = f"http://localhost:{origin.port}{target}"
    data = f"{method} {url} HTTP/1.1\r\nHost: localhost:{origin.port}\r\n{lines}\r\n"
    [answer] = await raw_request(port, data.encode())
    return answer


async def test_plain_http_gets_are_cached(proxy: Kanal, origin: Origin, forward_port: int):
    target = "/fwd?" + q(cc="max-age=60")
    first = await fetch(forward_port, origin, target)
    second = await fetch(forward_port, origin, target)
    assert first.status == second.status == 200
    assert (first.header("X-Cache"), second.header("X-Cache")) == ("MISS", "HIT")
    assert second.body == first.body == b"/fwd #1 "
    assert origin.count("/fwd") == 1
    no_store = "/fwd-private?" + q(cc="private, max-age=60")
    await fetch(forward_port, origin, no_store)
    assert (await fetch(forward_port, origin, no_store)).header("X-Cache") == "MISS"
    assert origin.count("/fwd-private") == 2


async def test_revalidation_and_invalidation_on_the_forward_listener(proxy, origin, forward_port):
    target = "/fwd-etag?" + q(cc="no-cache", etag='"e"')
    await fetch(forward_port, origin, target)
    again = await fetch(forward_port, origin, target)
    assert again.header("X-Cache") == "REVALIDATED" and again.body == b"/fwd-etag #1 "
    item = "/fwd-item?" + q(cc="max-age=60")
    await fetch(forward_port, origin, item)
    await fetch(forward_port, origin, item, "Content-Length: 0", method="DELETE")
    assert (await fetch(forward_port, origin, item)).header("X-Cache") == "MISS"


async def test_connect_tunnels_are_never_cached(proxy, origin, forward_port):
    reader, writer = await asyncio.open_connection("127.0.0.1", forward_port)
    try:
        writer.write(f"CONNECT localhost:{origin.port} HTTP/1.1\r\n"
                     f"Host: localhost:{origin.port}\r\n\r\n".encode())
        async with asyncio.timeout(10):
            established = await reader.readuntil(b"\r\n\r\n")
            assert established.startswith(b"HTTP/1.1 200")
            for _ in (1, 2):
                writer.write(b"GET /tunnelled?cc=max-age%3D60 HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = await read_response(reader)
                assert answer.header("X-Cache") is None
    finally:
        writer.close()
    assert origin.count("/tunnelled") == 2


async def test_stale_if_error_on_the_forward_listener(proxy, origin, fragile, pool, forward_port):
    target = "/fwd-sie?" + q(cc="max-age=0, stale-if-error=600")
    first = await fetch(forward_port, origin, target)
    with failing(origin, "/fwd-sie"):
        stale = await fetch(forward_port, origin, target)
    assert stale.status == 200 and stale.header("X-Cache") == "STALE" and stale.body == first.body
    page = "/fwd-down?" + q(cc="max-age=0, stale-if-error=600")
    kept = await fetch(forward_port, fragile, page)
    assert fragile.runner is not None
    pool.run(fragile.runner.cleanup())
    down = await fetch(forward_port, fragile, page)
    assert down.status == 200 and down.header("X-Cache") == "STALE" and down.body == kept.body
    never = await fetch(forward_port, fragile, "/fwd-never")
    assert never.status == 502

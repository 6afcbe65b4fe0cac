"""The forward listener caches plain-HTTP absolute-form GETs under its EgressPolicy's
`cache` section, with the reverse proxy's engine; CONNECT tunnels are never cached."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from tests.cache.helpers import failing, q
from tests.cache.origin import Origin
from tests.cache.test_cache_admin import admin, metric
from tests.conftest import (
    Kanal,
    RawResponse,
    async_wait_until,
    free_port,
    raw_request,
    read_response,
)


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


async def test_only_if_cached_on_the_forward_listener(proxy, origin, forward_port):
    """`Cache-Control: only-if-cached`: a stored answer that may be served, else 504;
    the origin is never asked."""
    url = f"http://localhost:{origin.port}"
    ask = f"Host: localhost:{origin.port}\r\nCache-Control: only-if-cached\r\n\r\n"
    missing, after = await raw_request(forward_port, (
        f"GET {url}/fwd-oic-never HTTP/1.1\r\n{ask}"
        f"GET {url}/fwd-oic-next HTTP/1.1\r\nHost: localhost:{origin.port}\r\n\r\n"
    ).encode(), responses=2)
    assert missing.status == 504 and missing.header("X-Cache") == "MISS"
    assert origin.count("/fwd-oic-never") == 0
    assert after.status == 200  # the connection goes on after the 504
    stored = "/fwd-oic?" + q(cc="max-age=60")
    first = await fetch(forward_port, origin, stored)
    hit = await fetch(forward_port, origin, stored, "Cache-Control: only-if-cached")
    assert hit.status == 200 and hit.header("X-Cache") == "HIT" and hit.body == first.body
    stale = "/fwd-oic-stale?" + q(cc="max-age=0", etag='"o"')
    await fetch(forward_port, origin, stale)
    refused = await fetch(forward_port, origin, stale, "Cache-Control: only-if-cached")
    assert refused.status == 504 and refused.header("X-Cache") == "MISS"
    assert origin.count("/fwd-oic") == origin.count("/fwd-oic-stale") == 1


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


async def test_concurrent_misses_through_the_forward_listener_make_one_origin_request(
        proxy, origin, forward_port):
    target = "/fwd-collapse?" + q(cc="max-age=60", slow="0.5")
    answers = await asyncio.gather(*(fetch(forward_port, origin, target) for _ in range(6)))
    assert origin.count("/fwd-collapse") == 1
    assert {a.body for a in answers} == {b"/fwd-collapse #1 "}
    assert sorted(a.header("X-Cache") or "" for a in answers) == ["HIT"] * 5 + ["MISS"]


async def test_stale_while_revalidate_on_the_forward_listener(proxy, origin, forward_port):
    target = "/fwd-swr?" + q(cc="max-age=0, stale-while-revalidate=60", etag='"s"')
    first = await fetch(forward_port, origin, target)
    before = await revalidations(proxy)
    origin.delayed["/fwd-swr"] = 2.0  # the revalidation takes long: nobody waits for it
    try:
        started = time.monotonic()
        stale = [await fetch(forward_port, origin, target) for _ in range(3)]
        assert time.monotonic() - started < 1.5
        assert [a.header("X-Cache") for a in stale] == ["STALE"] * 3
        assert {a.body for a in stale} == {first.body} == {b"/fwd-swr #1 "}

        async def revalidated() -> bool:
            return await revalidations(proxy) == before + 1
        await async_wait_until(revalidated, timeout=10)
    finally:
        origin.delayed.pop("/fwd-swr", None)
    # One background request for the three stale answers, with the entry's validator,
    # sent by the listener like any request (its Via).
    assert origin.count("/fwd-swr") == 2
    revalidation = origin.requests[-1]["headers"]
    assert revalidation.get("If-None-Match") == '"s"'
    assert "kanal" in revalidation.get("Via", "")


async def revalidations(proxy: Kanal) -> float:
    """The forward listener's entries its origin confirmed (304), so far."""
    _, text = await admin(proxy, "GET", "/metrics")
    assert isinstance(text, str)
    return metric(text, "kanal_cache_events_total", event="revalidated", route="egress")

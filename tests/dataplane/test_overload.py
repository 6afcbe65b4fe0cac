"""--overload-memory: above the threshold new requests are answered 503 and closed, and
counted; below it again, service is normal."""

from __future__ import annotations

import asyncio

from kanal.dataplane.overload import resident_bytes
from kanal.dataplane.overloadstate import MemoryOverload
from tests.conftest import raw_request, read_response, upstream_yaml
from tests.dataplane.test_connection_caps import ROUTE, metric


async def test_requests_are_refused_503_while_memory_is_over_the_threshold(kanal,
                                                                           backends) -> None:
    web = await backends("web")
    # Any process is above 1 MiB resident: overloaded from the first sample on.
    k = kanal({"web.yaml": upstream_yaml("web", web), "route.yaml": ROUTE},
              "--overload-memory", "1Mi")
    reader, writer = await asyncio.open_connection("127.0.0.1", k.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        async with asyncio.timeout(10):
            answer = await read_response(reader)
            assert await reader.read() == b""  # the connection is closed
    finally:
        writer.close()
    assert answer.status == 503
    assert answer.header("Connection") == "close"
    assert answer.header("X-Kanal-Overloaded") == "true"
    assert answer.header("Retry-After") == "1"
    assert b"overloaded" in answer.body
    assert not web.received
    assert metric(k, "kanal_overload_active", resource="memory") == 1
    assert metric(k, "kanal_overload_refused_requests_total", resource="memory") == 1
    assert metric(k, "kanal_resident_memory_bytes") > 1024 * 1024


async def test_a_threshold_above_the_process_serves_normally(kanal, backends) -> None:
    web = await backends("web")
    k = kanal({"web.yaml": upstream_yaml("web", web), "route.yaml": ROUTE},
              "--overload-memory", "64Gi")
    [answer] = await raw_request(k.port, b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert answer.status == 200
    assert metric(k, "kanal_overload_active", resource="memory") == 0


def test_the_state_follows_each_sample_across_the_threshold() -> None:
    overload = MemoryOverload(100)
    assert overload.update(50) is False and not overload.active
    assert overload.update(101) is True and overload.active
    assert overload.update(200) is False and overload.active  # no change: nothing to tell
    assert overload.update(100) is True and not overload.active  # back at it: serving
    assert overload.episodes == 1
    resident = resident_bytes()
    assert resident is not None and resident > 1024 * 1024

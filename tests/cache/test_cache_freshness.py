"""Stale entries through `kanal run`: revalidation with ETag and Last-Modified,
stale-while-revalidate, stale-if-error when the origin fails, is down, or its circuit
is open; collapsed misses; invalidation by unsafe methods; ranges from stored entries."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from tests.cache.helpers import failing, get, q
from tests.cache.origin import Origin
from tests.conftest import Kanal, async_wait_until


@pytest.fixture(scope="module")
def proxy(origin: Origin, fragile: Origin, module_kanal: Callable[..., Kanal]) -> Kanal:
    manifests = {
        "origin.yaml": f"""\
            apiVersion: kanal.dev/v1alpha1
            kind: Upstream
            metadata: {{name: origin}}
            spec:
              endpoints: [{{address: 127.0.0.1, port: {origin.port}}}]
            ---
            apiVersion: kanal.dev/v1alpha1
            kind: Upstream
            metadata: {{name: fragile}}
            spec:
              endpoints: [{{address: 127.0.0.1, port: {fragile.port}}}]
              circuitBreaker: {{consecutiveFailures: 1, openDuration: 60s}}
            """,
        "route.yaml": """\
            apiVersion: kanal.dev/v1alpha1
            kind: Route
            metadata: {name: site}
            spec:
              rules:
                - matches: [{path: {type: PathPrefix, value: /fragile}}]
                  backends: [{upstream: fragile}]
                  cache: {}
                - backends: [{upstream: origin}]
                  cache: {}
            """,
    }
    return module_kanal(manifests)


async def test_a_stale_entry_is_revalidated_with_its_etag(proxy: Kanal, origin: Origin):
    target = "/etag?" + q(cc="max-age=0", etag='"v1"')
    first = await get(proxy, target)
    second = await get(proxy, target)
    assert first.header("X-Cache") == "MISS" and second.header("X-Cache") == "REVALIDATED"
    assert second.status == 200 and second.body == first.body == b"/etag #1 "
    assert origin.count("/etag") == 2
    assert origin.requests[-1]["headers"].get("If-None-Match") == '"v1"'
    # The client's own condition is answered by the cache.
    conditional = await get(proxy, target, 'If-None-Match: "v1"')
    assert conditional.status == 304 and conditional.body == b""


async def test_a_stale_entry_is_revalidated_with_its_date(proxy: Kanal, origin: Origin):
    modified = "Thu, 01 Jan 2015 00:00:00 GMT"
    target = "/dated?" + q(cc="no-cache", lm=modified)
    await get(proxy, target)
    again = await get(proxy, target)
    assert again.header("X-Cache") == "REVALIDATED" and again.body == b"/dated #1 "
    assert origin.requests[-1]["headers"].get("If-Modified-Since") == modified


async def test_a_changed_answer_replaces_the_entry(proxy: Kanal, origin: Origin):
    await get(proxy, "/changed?" + q(cc="max-age=0", etag='"a"'))
    fresh = await get(proxy, "/changed?" + q(cc="max-age=0", etag='"a"'), "Cache-Control: no-cache")
    assert fresh.header("X-Cache") == "REVALIDATED"
    newer = await get(proxy, "/changed?" + q(cc="max-age=0", etag='"b"'))
    assert newer.header("X-Cache") == "MISS"  # another URL (the query differs)


async def test_stale_while_revalidate_answers_at_once_and_refreshes(proxy, origin):
    target = "/swr?" + q(cc="max-age=0, stale-while-revalidate=60", etag='"s"')
    await get(proxy, target)
    stale = await get(proxy, target)
    assert stale.header("X-Cache") == "STALE" and stale.body == b"/swr #1 "

    async def refreshed() -> bool:
        return origin.count("/swr") == 2
    await async_wait_until(refreshed, timeout=5)
    assert origin.requests[-1]["headers"].get("If-None-Match") == '"s"'


async def test_stale_if_error_serves_the_entry_when_the_origin_answers_5xx(proxy, origin):
    target = "/sie?" + q(cc="max-age=0, stale-if-error=60")
    await get(proxy, target)
    with failing(origin, "/sie"):
        stale = await get(proxy, target)
    assert stale.status == 200 and stale.header("X-Cache") == "STALE"
    assert stale.body == b"/sie #1 "
    strict = "/strict?" + q(cc="max-age=0, stale-if-error=60, must-revalidate")
    await get(proxy, strict)
    with failing(origin, "/strict"):
        answer = await get(proxy, strict)
    assert answer.status == 503 and answer.header("X-Cache") == "MISS"


async def test_stale_if_error_covers_an_origin_that_is_down(proxy, fragile, pool):
    target = "/fragile/page?" + q(cc="max-age=0, stale-if-error=600")
    first = await get(proxy, target)
    assert first.header("X-Cache") == "MISS"
    assert fragile.runner is not None
    pool.run(fragile.runner.cleanup())
    down = await get(proxy, target)  # connect refused: 502 replaced by the entry
    assert down.status == 200 and down.header("X-Cache") == "STALE" and down.body == first.body
    open_circuit = await get(proxy, target)  # the circuit is open now: 503 replaced too
    assert open_circuit.status == 200 and open_circuit.header("X-Cache") == "STALE"
    missing = await get(proxy, "/fragile/never-stored")
    assert missing.status in (502, 503) and missing.header("X-Cache") == "MISS"


async def test_concurrent_misses_make_one_upstream_request(proxy: Kanal, origin: Origin):
    target = "/collapse?" + q(cc="max-age=60", slow="0.5")
    answers = await asyncio.gather(*(get(proxy, target) for _ in range(8)))
    assert origin.count("/collapse") == 1
    assert {a.body for a in answers} == {b"/collapse #1 "}
    assert sorted(a.header("X-Cache") or "" for a in answers) == ["HIT"] * 7 + ["MISS"]


async def test_a_slow_fill_lets_waiters_go_upstream_after_the_lock_timeout(proxy, origin):
    target = "/slowfill?" + q(cc="max-age=60", slow="5.5")
    started = time.monotonic()
    answers = await asyncio.gather(get(proxy, target, timeout=20), get(proxy, target, timeout=20))
    assert origin.count("/slowfill") == 2  # the waiter gave up after 5 s
    assert all(a.status == 200 for a in answers)
    assert time.monotonic() - started < 15


async def test_unsafe_methods_invalidate_the_url_and_its_location(proxy: Kanal, origin: Origin):
    item = "/items/7?" + q(cc="max-age=60")
    await get(proxy, item)
    await get(proxy, "/items?" + q(cc="max-age=60"))
    assert (await get(proxy, item)).header("X-Cache") == "HIT"
    posted = await get(proxy, "/items?" + q(location=item), method="POST")
    assert posted.status == 200 and posted.header("X-Cache") == "BYPASS"
    # The POST's own URL differs from the GETs' (its query), so only Location applies.
    after = await get(proxy, item)
    assert after.header("X-Cache") == "MISS" and after.body == b"/items/7 #2 "
    listing = "/list?" + q(cc="max-age=60")
    await get(proxy, listing)
    await get(proxy, listing, method="DELETE")
    assert (await get(proxy, listing)).header("X-Cache") == "MISS"


async def test_ranges_are_served_from_a_complete_entry(proxy: Kanal, origin: Origin):
    target = "/ranged?" + q(cc="max-age=60", size="100", etag='"r"')
    whole = await get(proxy, target, "Range: bytes=0-9")  # a miss: the whole answer
    assert whole.status == 200 and len(whole.body) == 100
    assert "Range" not in origin.requests[-1]["headers"]
    part = await get(proxy, target, "Range: bytes=10-19")
    assert part.status == 206 and part.body == whole.body[10:20]
    assert part.header("Content-Range") == "bytes 10-19/100"
    tail = await get(proxy, target, "Range: bytes=-5")
    assert tail.status == 206 and tail.body == whole.body[-5:]
    outside = await get(proxy, target, "Range: bytes=200-")
    assert outside.status == 416 and outside.header("Content-Range") == "bytes */100"
    other = await get(proxy, target, "Range: bytes=0-1", 'If-Range: "old"')
    assert other.status == 200 and len(other.body) == 100
    assert origin.count("/ranged") == 1

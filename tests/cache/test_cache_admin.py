"""Purges and metrics on the admin address, and the memory bound under a flood of
distinct URLs, through `kanal run` (one worker and several)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import aiohttp
import pytest

from tests.cache.helpers import get, q, upstream
from tests.cache.origin import Origin
from tests.conftest import Kanal

ROUTE = """\
    apiVersion: kanal.dev/v1alpha1
    kind: Route
    metadata: {name: site}
    spec:
      rules:
        - backends: [{upstream: origin}]
          cache: {}
    """


@pytest.fixture(scope="module")
def proxy(origin: Origin, module_kanal: Callable[..., Kanal]) -> Kanal:
    return module_kanal({"origin.yaml": upstream(origin), "route.yaml": ROUTE},
                        "--cache-size", "256Ki")


async def admin(proxy: Kanal, method: str, path: str) -> tuple[int, object]:
    async with aiohttp.ClientSession() as session, session.request(
            method, proxy.admin + path) as answer:
        if answer.content_type == "application/json":
            return answer.status, await answer.json()
        return answer.status, await answer.text()


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = "^" + re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "")
    match = re.search(pattern + r" (\S+)$", text, flags=re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_purge_by_url_and_by_prefix(proxy: Kanal, origin: Origin):
    page = "/p/one?" + q(cc="max-age=60")
    await get(proxy, page)
    await get(proxy, "/p/two?" + q(cc="max-age=60"))
    await get(proxy, "/other?" + q(cc="max-age=60"))
    url = q(u="http://SITE.test/p/one?cc=max-age%3D60")[2:]
    status, answer = await admin(proxy, "POST", "/cache/purge?url=" + url)
    assert status == 200 and answer == {"purged": 1, "url": "http://site.test/p/one?cc=max-age%3D60"}
    assert (await get(proxy, page)).header("X-Cache") == "MISS"
    status, answer = await admin(proxy, "POST", "/cache/purge?prefix=http://site.test/p/")
    assert status == 200 and answer["purged"] == 2  # type: ignore[index]
    assert (await get(proxy, "/p/two?" + q(cc="max-age=60"))).header("X-Cache") == "MISS"
    assert (await get(proxy, "/other?" + q(cc="max-age=60"))).header("X-Cache") == "HIT"
    status, answer = await admin(proxy, "DELETE", "/cache/purge?prefix=http://site.test/other")
    assert status == 200 and answer["purged"] == 1  # type: ignore[index]
    status, _ = await admin(proxy, "POST", "/cache/purge?url=/relative")
    assert status == 400
    status, _ = await admin(proxy, "POST", "/cache/purge")
    assert status == 400


async def test_metrics_count_hits_misses_stale_and_bytes(proxy: Kanal, origin: Origin):
    target = "/m?" + q(cc="max-age=60")
    await get(proxy, target)
    await get(proxy, target)
    status, text = await admin(proxy, "GET", "/metrics")
    assert status == 200 and isinstance(text, str)
    assert metric(text, "kanal_cache_events_total", event="hit", route="default/site") >= 1
    assert metric(text, "kanal_cache_events_total", event="miss", route="default/site") >= 1
    assert metric(text, "kanal_cache_stored_bytes", tier="memory") > 0
    assert metric(text, "kanal_cache_entries") >= 1


async def test_a_flood_of_distinct_urls_stays_within_the_memory_bound(proxy, origin):
    async def one(index: int) -> None:
        answer = await get(proxy, f"/flood/{index}?" + q(cc="max-age=60", size="4000"))
        assert answer.status == 200 and len(answer.body) == 4000
    for start in range(0, 300, 30):
        await asyncio.gather(*(one(i) for i in range(start, start + 30)))
    _, text = await admin(proxy, "GET", "/metrics")
    assert isinstance(text, str)
    assert 0 < metric(text, "kanal_cache_stored_bytes", tier="memory") <= 256 * 1024
    assert metric(text, "kanal_cache_events_total", event="eviction", route="") > 0
    # The most recent URLs are still there; the first ones were evicted.
    assert (await get(proxy, "/flood/299?" + q(cc="max-age=60", size="4000"))).header(
        "X-Cache") == "HIT"
    assert (await get(proxy, "/flood/0?" + q(cc="max-age=60", size="4000"))).header(
        "X-Cache") == "MISS"


async def test_purge_reaches_every_worker(origin: Origin, module_kanal: Callable[..., Kanal]):
    group = module_kanal({"origin.yaml": upstream(origin), "route.yaml": ROUTE},
                         "--workers", "2")
    for index in range(6):
        await get(group, f"/w/{index}?" + q(cc="max-age=60"))
    status, answer = await admin(group, "POST", "/cache/purge?prefix=http://site.test/w/")
    assert status == 200 and answer["purged"] == 6  # type: ignore[index]

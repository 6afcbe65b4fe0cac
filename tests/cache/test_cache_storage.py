"""Storage through `kanal run`: entries spill from memory to the disk folder and are
served from there; a folder that cannot be used costs entries, never answers (logged
once, counted); answers with a huge Vary are not stored."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from kanal.dataplane.cache.policy import url_key
from kanal.dataplane.cache.store import file_name
from tests.cache.helpers import get, q, read_fifo, upstream
from tests.cache.test_cache_admin import ROUTE, admin, metric


async def test_entries_spill_to_disk_and_are_served_from_it(origin, kanal, tmp_path: Path):
    folder = tmp_path / "cache"
    proxy = kanal({"origin.yaml": upstream(origin), "route.yaml": ROUTE},
                  "--cache-size", "64Ki", "--cache-dir", str(folder),
                  "--cache-disk-size", "100Ki")
    bodies = {}
    for index in range(40):
        answer = await get(proxy, f"/spill/{index}?" + q(cc="max-age=60", size="5000"))
        bodies[index] = answer.body
    _, text = await admin(proxy, "GET", "/metrics")
    assert isinstance(text, str)
    assert 0 < metric(text, "kanal_cache_stored_bytes", tier="memory") <= 64 * 1024
    assert 0 < metric(text, "kanal_cache_stored_bytes", tier="disk") <= 100 * 1024
    assert any(path.is_file() for path in folder.rglob("*"))
    # Newest first: the recent entries are in memory, older ones on disk (a hit moves
    # nothing), the oldest were evicted from both.
    hits = 0
    for index in reversed(range(40)):
        probe = await get(proxy, f"/spill/{index}?" + q(cc="max-age=60", size="5000"))
        if probe.header("X-Cache") != "HIT":
            break
        assert probe.body == bodies[index]
        hits += 1
    assert 64 * 1024 // 5000 < hits < 40  # more than memory holds: some came from disk


async def test_a_slow_disk_holds_up_no_request(origin, kanal, tmp_path: Path):
    """The file of a spilled entry is a FIFO nobody reads: its write never ends until
    the test reads it. Meanwhile every request is answered, the spilled one from memory."""
    folder = tmp_path / "cache"
    proxy = kanal({"origin.yaml": upstream(origin), "route.yaml": ROUTE},
                  "--cache-size", "100Ki", "--cache-dir", str(folder))
    [worker] = list(folder.glob("worker-*"))
    big = "/slow-disk/big?" + q(cc="max-age=60", size="60000")
    fifo = worker / (file_name(url_key("http", "site.test", big.encode()), (), 1) + ".tmp")
    os.mkfifo(fifo)
    first = await get(proxy, big)
    try:
        # Stored at its end, the next large answer makes the first one spill to disk.
        await get(proxy, "/slow-disk/next?" + q(cc="max-age=60", size="60000"))
        others = [get(proxy, f"/slow-disk/small/{i}?" + q(cc="max-age=60"), timeout=5)
                  for i in range(10)]
        *smalls, again = await asyncio.gather(*others, get(proxy, big, timeout=5))
        assert [a.status for a in smalls] == [200] * 10
        assert again.header("X-Cache") == "HIT" and again.body == first.body
    finally:
        on_disk = await read_fifo(fifo)  # the write goes on
    assert on_disk == first.body  # the write was under way all along


async def test_an_unusable_folder_costs_entries_not_answers(origin, kanal, tmp_path: Path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    proxy = kanal({"origin.yaml": upstream(origin), "route.yaml": ROUTE},
                  "--cache-size", "16Ki", "--cache-dir", str(blocker))
    for index in range(20):
        answer = await get(proxy, f"/blocked/{index}?" + q(cc="max-age=60", size="3000"))
        assert answer.status == 200 and len(answer.body) == 3000
    again = await get(proxy, "/blocked/19?" + q(cc="max-age=60", size="3000"))
    assert again.header("X-Cache") == "HIT"
    _, text = await admin(proxy, "GET", "/metrics")
    assert isinstance(text, str)
    assert metric(text, "kanal_cache_events_total", event="disk_error", route="") > 1
    assert metric(text, "kanal_cache_stored_bytes", tier="disk") == 0
    log = proxy.log()
    assert log.count("cannot take entries") == 1, log


async def test_a_huge_vary_is_not_stored_and_said_once(origin, kanal):
    proxy = kanal({"origin.yaml": upstream(origin), "route.yaml": ROUTE})
    vary = ", ".join(f"X-Field-{i}" for i in range(40))
    for number in (1, 2, 3):
        answer = await get(proxy, "/huge-vary?" + q(cc="max-age=60", vary=vary))
        assert answer.body.startswith(f"/huge-vary #{number}".encode())
    _, text = await admin(proxy, "GET", "/metrics")
    assert isinstance(text, str)
    assert metric(text, "kanal_cache_not_stored_total", reason="vary") == 3
    assert proxy.log().count("than the cache keeps is not stored") == 1

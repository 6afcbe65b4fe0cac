"""The store without sockets: byte bounds, LRU order, disk spill, fills that commit
only whole answers, purges, and concurrent misses meeting on a key."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from kanal.dataplane.cache.policy import NO_DIRECTIVES
from kanal.dataplane.cache.store import ENTRY_OVERHEAD, CacheStore, Entry, file_name, lookup
from tests.cache.helpers import read_fifo


def entry(key: str, size: int = 100, variant: tuple[str, ...] = ()) -> Entry:
    return Entry(key, ("x-v",) if variant else (), variant, 200, [(b"Content-Type", b"a/b")],
                 b"x" * size, response_cc=NO_DIRECTIVES, lifetime=60.0, initial_age=0.0,
                 response_time=0.0, etag=None, last_modified=None)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["put", "purge", "prefix"]),
                          st.integers(0, 30), st.integers(0, 3000)), max_size=80))
def test_accounting_holds_and_memory_stays_within_its_bound(ops) -> None:
    store = CacheStore(memory_bytes=10_000)
    for op, key, size in ops:
        url = f"http://h/{key}"
        if op == "put":
            store.insert(entry(url, size))
        elif op == "purge":
            store.purge(url)
        else:
            store.purge(f"http://h/{key % 3}", prefix=True)
        in_memory = sum(e.cost for e in store.memory)
        assert store.stats.memory_bytes == in_memory <= 10_000
        assert store.stats.entries == sum(len(v) for v in store.by_key.values()) == len(store.memory)


def test_least_recently_used_goes_first() -> None:
    cost = entry("http://h/x").cost
    store = CacheStore(memory_bytes=3 * cost)
    for name in "abc":
        store.insert(entry(f"http://h/{name}"))
    assert store.body(store.variants("http://h/a")[0]) is not None  # a is used again
    store.insert(entry("http://h/d"))
    assert [bool(store.variants(f"http://h/{n}")) for n in "abcd"] == [True, False, True, True]
    assert store.stats.events[("eviction", "")] == 1


async def written(store: CacheStore) -> None:
    """Until every spilled entry's file is complete (its body left memory)."""
    deadline = time.monotonic() + 10
    while any(e.body is not None for e in store.disk):
        assert time.monotonic() < deadline, "spilled entries not written within 10s"
        await asyncio.sleep(0.01)


async def test_evicted_entries_spill_to_disk_and_come_back(tmp_path: Path) -> None:
    cost = entry("http://h/x", 1000).cost
    store = CacheStore()
    store.configure(2 * cost, str(tmp_path), 2 * cost)
    for name in "abcd":
        store.insert(entry(f"http://h/{name}", 1000))
    on_disk = [e for e in store.disk]
    assert [e.key for e in on_disk] == ["http://h/a", "http://h/b"]
    # Being written (on a worker thread): still served from memory, never from its file.
    assert store.body(on_disk[0]) == b"x" * 1000
    await written(store)
    assert store.body(on_disk[0]) is None  # on disk only now: read off the loop
    assert await store.load(on_disk[0]) == b"x" * 1000 and store.stats.disk_bytes == 2 * cost
    store.insert(entry("http://h/e", 1000))  # c spills; b, least recently used on disk, goes
    assert not store.variants("http://h/b")
    assert store.variants("http://h/a") and store.variants("http://h/c")
    await written(store)
    store.purge("http://h/", prefix=True)
    assert store.stats.disk_bytes == store.stats.memory_bytes == 0
    deadline = time.monotonic() + 10
    while [p for p in tmp_path.iterdir() if p.is_file()]:  # removed on a worker thread
        assert time.monotonic() < deadline, list(tmp_path.iterdir())
        await asyncio.sleep(0.01)


async def test_a_missing_disk_file_is_a_miss_not_a_wrong_body(tmp_path: Path) -> None:
    cost = entry("http://h/x", 1000).cost
    store = CacheStore()
    store.configure(cost, str(tmp_path), 4 * cost)
    store.insert(entry("http://h/a", 1000))
    store.insert(entry("http://h/b", 1000))
    [spilled] = list(store.disk)
    await written(store)
    assert spilled.disk_path is not None
    spilled.disk_path.write_bytes(b"short")
    assert await store.load(spilled) is None and not store.variants("http://h/a")
    assert store.stats.events[("disk_error", "")] == 1


async def test_a_slow_disk_holds_up_nothing_and_the_entry_is_served_meanwhile(
        tmp_path: Path) -> None:
    """A write that never ends (a FIFO nobody reads, where the spilled entry's file
    goes) blocks a worker thread only: the store keeps answering, from memory."""
    cost = entry("http://h/big", 50_000).cost
    store = CacheStore()
    store.configure(cost + 100, str(tmp_path), 4 * cost)
    fifo = tmp_path / (file_name("http://h/big", (), 1) + ".tmp")
    os.mkfifo(fifo)
    store.insert(entry("http://h/big", 50_000))
    store.insert(entry("http://h/next", 50_000))  # big spills: its write blocks
    [spilled] = list(store.disk)
    try:
        for _ in range(20):  # the loop turns, the store answers
            await asyncio.sleep(0)
            assert store.body(spilled) == b"x" * 50_000
        assert spilled.body is not None and store.disk_io.pending_writes == 1
    finally:
        on_disk = await read_fifo(fifo)  # the write goes on
    assert on_disk == b"x" * 50_000  # the whole body went to the file
    await written(store)
    assert store.disk_io.pending_writes == 0


def test_fills_store_only_whole_answers() -> None:
    store = CacheStore()
    woken: list[bool] = []
    for expected, chunks, limit, stored in [
            (10, [b"x" * 4, b"y" * 6], 100, True),
            (12, [b"x" * 10], 100, False),          # the upstream lied about its length
            (None, [b"x" * 60, b"y" * 60], 100, False),  # over maxObjectSize
    ]:
        fill = store.start_fill("http://h/f")
        fill.waiters.append(woken.append)
        fill.start(entry("http://h/f", 0), limit=limit, expected=expected)
        for chunk in chunks:
            fill.feed(chunk)
        assert fill.finish() is stored
        assert bool(store.variants("http://h/f")) is stored
        store.purge("http://h/f")
    aborted = store.start_fill("http://h/g")
    aborted.start(entry("http://h/g", 0), limit=100, expected=None)
    aborted.feed(b"part")
    aborted.abort()
    assert not store.variants("http://h/g") and "http://h/g" not in store.filling
    assert woken == [True, False, False]
    assert store.stats.not_stored == {"length-mismatch": 1, "too-large": 1, "incomplete": 1}


def test_variants_by_vary() -> None:
    store = CacheStore()
    store.insert(entry("http://h/v", 1, ("a",)))
    store.insert(entry("http://h/v", 2, ("b",)))
    found = lookup(store, "http://h/v", [(b"X-V", b"b")])
    assert found is not None and found.size == 2
    assert lookup(store, "http://h/v", [(b"X-V", b"c")]) is None
    assert store.purge("http://h/v") == 2


def test_overhead_is_counted() -> None:
    assert entry("k", 0).cost >= ENTRY_OVERHEAD


def test_the_accounted_cost_covers_the_memory_small_entries_take() -> None:
    """A flood of small answers must not hold much more memory than --cache-size."""
    import tracemalloc

    from kanal.dataplane.cache.policy import parse_cache_control

    store = CacheStore(memory_bytes=10**9)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        accounted = 0
        for index in range(2000):
            fields = [(fresh(b"Cache-Control"), b"max-age=%d" % index),
                      (fresh(b"Content-Type"), fresh(b"text/plain; charset=utf-8")),
                      (fresh(b"Date"), fresh(b"Sat, 05 Dec 2026 22:58:36 GMT"))]
            item = Entry(f"http://site.test/flood/{index}", (), (), 200, fields, bytes(100),
                         response_cc=parse_cache_control([fields[0][1]]), lifetime=60.0,
                         initial_age=0.0, response_time=0.0, etag=None, last_modified=None)
            store.insert(item)
            accounted += item.cost
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert used <= accounted * 1.2, (used / 2000, accounted / 2000)


def fresh(text: bytes) -> bytes:
    """A new bytes object, as the parser makes for every answer."""
    return bytes(bytearray(text))

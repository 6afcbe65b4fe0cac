"""Stored answers: memory bounded in bytes (LRU), an optional disk spill bounded in bytes.

An answer enters through a `Fill`, fed as its body streams to the client; it becomes
an entry only when the upstream's answer ended intact (its length as announced, no
larger than the rule's maximum). Entries evicted from memory move to the disk folder
when one is set, and leave it in LRU order too. Files are written, read and removed on
worker threads (`disk.DiskIO`), never on the event loop: an entry being written keeps
its body in memory (and is served from there) until its file is complete; a disk hit
is read first (`load`), then answered. Anything that goes wrong with the folder (not
writable, full, a file gone or cut short) costs the entry, never an answer: it is
logged once per kind of error and counted.

One store serves a process (both listeners). Concurrent misses for one key meet here
too: the first `Fill` for a key is the one the others wait for (`wait_for`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from kanal.dataplane.cache.disk import DiskIO
from kanal.dataplane.cache.policy import CacheControl, HeaderList, variant_of

log = logging.getLogger("kanal.cache")

FILL_LOCK = 5.0
"""How long a fill in progress holds its key: misses meanwhile wait for it (at most this
long; nginx's proxy_cache_lock_timeout); after it, a miss starts a fill of its own."""
MAX_VARIANTS = 32
"""Stored variants (Vary) of one URL; the least recently used goes first."""
ENTRY_OVERHEAD = 800
"""Bytes counted per entry beside its body, key and fields: the Python objects that hold
it (the entry, its directives, the LRU and key index slots), measured with tracemalloc,
so the memory bound holds for floods of small answers too."""
FIELD_OVERHEAD = 140
"""Bytes per stored field beside its text: two bytes objects, a tuple, a list slot."""


class CacheStats:
    """The store's counters, read by /metrics (one set per process)."""

    __slots__ = ("disk_bytes", "entries", "events", "memory_bytes", "not_stored")

    def __init__(self) -> None:
        self.events: dict[tuple[str, str], int] = {}
        """(event, route) -> count: hit, miss, stale, revalidated, bypass, eviction..."""
        self.not_stored: dict[str, int] = {}
        """reason -> answers that were not stored."""
        self.memory_bytes = 0
        self.disk_bytes = 0
        self.entries = 0

    def count(self, event: str, route: str = "") -> None:
        key = (event, route)
        self.events[key] = self.events.get(key, 0) + 1

    def refused(self, reason: str) -> None:
        self.not_stored[reason] = self.not_stored.get(reason, 0) + 1


class Entry:
    """One stored answer (one variant of one key)."""

    __slots__ = ("body", "disk_path", "etag", "head_block", "headers", "initial_age", "key",
                 "last_modified", "lifetime", "response_cc", "response_time", "size",
                 "status", "variant", "vary")

    def __init__(
        self, key: str, vary: tuple[str, ...], variant: tuple[str, ...], status: int,
        headers: list[tuple[bytes, bytes]], body: bytes, *, response_cc: CacheControl,
        lifetime: float, initial_age: float, response_time: float, etag: bytes | None,
        last_modified: bytes | None,
    ) -> None:
        self.key = key
        self.vary = vary
        self.variant = variant
        self.status = status
        self.headers = headers
        self.head_block = block(headers)
        self.body: bytes | None = body
        """In memory; None once the entry's file on disk is complete (`disk_path`)."""
        self.disk_path: Path | None = None
        self.size = len(body)
        self.response_cc = response_cc
        self.lifetime = lifetime
        self.initial_age = initial_age
        self.response_time = response_time
        self.etag = etag
        self.last_modified = last_modified

    def age(self, now: float) -> float:
        """current_age of RFC 9111 4.2.3, in seconds."""
        return self.initial_age + max(0.0, now - self.response_time)

    @property
    def cost(self) -> int:
        # Fields count twice: as pairs (for merging 304s) and as the block written on hits.
        return (self.size + ENTRY_OVERHEAD + len(self.key)
                + sum(2 * (len(n) + len(v)) + FIELD_OVERHEAD for n, v in self.headers))


def block(headers: list[tuple[bytes, bytes]]) -> bytes:
    """Fields as they go on the wire, each line ended: written once per entry, not per hit."""
    return b"".join(name + b": " + value + b"\r\n" for name, value in headers)


def file_name(key: str, variant: tuple[str, ...], serial: int) -> str:
    """The name of an entry's file in the disk folder (the `serial`-th spilled by the
    store: a name is never reused, so a late removal cannot hit a newer file)."""
    digest = hashlib.sha256(f"{key}\0{variant}".encode()).hexdigest()
    return f"{digest}-{serial}"


Waiter = Callable[[bool], None]


class Fill:
    """An answer streaming into the store; committed only when it ended intact.

    Made when a miss goes upstream (so concurrent misses for the key wait for it),
    given its entry when the answer's head shows it may be stored (`start`).
    """

    __slots__ = ("chunks", "entry", "expected", "failed", "key", "limit", "size", "started",
                 "store", "waiters")

    def __init__(self, store: CacheStore, key: str) -> None:
        self.store = store
        self.key = key
        self.entry: Entry | None = None
        self.limit = 0
        self.expected: int | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.failed = False
        self.waiters: list[Waiter] = []
        self.started = time.monotonic()

    def start(self, entry: Entry, *, limit: int, expected: int | None) -> None:
        self.entry = entry
        self.limit = limit
        self.expected = expected

    def feed(self, chunk: bytes) -> None:
        if self.failed or self.entry is None:
            return
        self.size += len(chunk)
        if self.size > self.limit:
            self.give_up("too-large", f"{self.key}: answer larger than maxObjectSize "
                                      f"({self.limit} bytes) is not stored")
            return
        self.chunks.append(chunk)

    def finish(self) -> bool:
        """The upstream's answer ended cleanly: store it if it came whole."""
        entry = self.entry
        if self.failed or entry is None:
            self.abort(None)
            return False
        if self.expected is not None and self.size != self.expected:
            self.give_up("length-mismatch", f"{self.key}: answer of {self.size} bytes "
                                            f"announced {self.expected} bytes; not stored")
            return False
        entry.body = b"".join(self.chunks)
        entry.size = len(entry.body)
        self.chunks = []
        self.failed = True  # finished: nothing more is fed
        stored = self.store.insert(entry)
        self.store.fill_over(self, stored)
        return stored

    def abort(self, reason: str | None = "incomplete") -> None:
        """Not stored (cut short, its client left, or not storable): waiters go on."""
        if not self.failed:
            self.failed = True
            self.chunks = []
            if reason is not None:
                self.store.stats.refused(reason)
            self.store.fill_over(self, False)

    def give_up(self, reason: str, message: str) -> None:
        """Not stored for a reason worth a log line (once per reason) and a count."""
        if not self.failed:
            self.store.log_once(reason, message)
            self.abort(reason)


class CacheStore:
    """Entries by key and variant, in memory and optionally on disk, each LRU."""

    def __init__(self, memory_bytes: int = 64 * 1024 * 1024, disk_dir: str | None = None,
                 disk_bytes: int = 0) -> None:
        self.memory_limit = memory_bytes
        self.disk_limit = disk_bytes if disk_dir else 0
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self.by_key: dict[str, list[Entry]] = {}
        self.memory: OrderedDict[Entry, None] = OrderedDict()
        self.disk: OrderedDict[Entry, None] = OrderedDict()
        self.filling: dict[str, Fill] = {}
        self.stats = CacheStats()
        self.disk_io = DiskIO()
        self._logged: set[str] = set()
        self._files = 0

    def configure(self, memory_bytes: int, disk_dir: str | None, disk_bytes: int) -> None:
        """Set the bounds (the process's flags); entries over them leave at once."""
        self.memory_limit = memory_bytes
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self.disk_limit = disk_bytes if disk_dir else 0
        if self.disk_dir is not None:
            try:
                self.disk_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                self.log_once("disk", f"cache folder {self.disk_dir} cannot be used: {exc}")
        self._make_room(0)

    def log_once(self, kind: str, message: str) -> None:
        if kind not in self._logged:
            self._logged.add(kind)
            log.warning("%s (logged once)", message)

    # --- lookups ---------------------------------------------------------------------

    def variants(self, key: str) -> list[Entry]:
        return self.by_key.get(key) or []

    def body(self, entry: Entry) -> bytes | None:
        """An entry's body if it is in memory (an entry being written to disk still is),
        marked as used; None when it is on disk only (`load` reads it)."""
        body = entry.body
        if body is not None:
            if entry in self.memory:
                self.memory.move_to_end(entry)
            elif entry in self.disk:
                self.disk.move_to_end(entry)
        return body

    def load(self, entry: Entry) -> asyncio.Future[bytes | None]:
        """Read a spilled entry's body off the event loop; None when it cannot be read
        (the entry is then dropped, the error logged once and counted)."""
        loop = asyncio.get_running_loop()
        result: asyncio.Future[bytes | None] = loop.create_future()
        path = entry.disk_path
        if entry.body is not None or path is None:
            result.set_result(entry.body)
            return result

        def read(job: asyncio.Future[bytes]) -> None:
            error = job.exception()
            if error is None:
                data: bytes | None = job.result()
                if entry in self.disk:
                    self.disk.move_to_end(entry)
            else:
                data = None
                if entry in self.disk:  # (a purge meanwhile took it already)
                    self.log_once("disk-read", f"cache file {path} cannot be read: {error}")
                    self.stats.count("disk_error")
                    self.remove(entry)
            if not result.done():
                result.set_result(data)

        self.disk_io.read(path, entry.size).add_done_callback(read)
        return result

    # --- changes ---------------------------------------------------------------------

    def insert(self, entry: Entry) -> bool:
        """Store an entry, replacing the same variant of its key; False if it cannot fit."""
        cost = entry.cost
        if cost > self.memory_limit:
            self.stats.refused("too-large-for-memory")
            return False
        variants = self.by_key.setdefault(entry.key, [])
        for old in list(variants):
            if old.vary == entry.vary and old.variant == entry.variant or old.vary != entry.vary:
                # Same variant, or the answer now varies differently: the old one goes.
                self.remove(old)
        variants = self.by_key.setdefault(entry.key, [])
        if len(variants) >= MAX_VARIANTS:
            self._evict(variants[0])
        self._make_room(cost)
        variants.append(entry)
        self.memory[entry] = None
        self.stats.memory_bytes += cost
        self.stats.entries += 1
        return True

    def remove(self, entry: Entry) -> None:
        variants = self.by_key.get(entry.key)
        if variants is None or entry not in variants:
            return
        variants.remove(entry)
        if not variants:
            del self.by_key[entry.key]
        self.stats.entries -= 1
        if entry in self.memory:
            del self.memory[entry]
            self.stats.memory_bytes -= entry.cost
        elif entry in self.disk:
            del self.disk[entry]
            self.stats.disk_bytes -= entry.cost
            if entry.disk_path is not None and entry.body is None:
                self.disk_io.remove(entry.disk_path)
            # (An entry still being written: its file goes when the write is over.)

    def refresh(self, entry: Entry, headers: list[tuple[bytes, bytes]]) -> None:
        """New fields for a stored answer (a 304's), its size accounted again."""
        before = entry.cost
        entry.headers = headers
        entry.head_block = block(headers)
        delta = entry.cost - before
        if entry in self.memory:
            self.stats.memory_bytes += delta
        elif entry in self.disk:
            self.stats.disk_bytes += delta

    def purge(self, url: str, *, prefix: bool = False) -> int:
        """Drop the entries of a URL (every variant and extra key part), or of every URL
        that starts with `url`; how many were dropped."""
        if prefix:
            keys = [key for key in self.by_key if key.startswith(url)]
        else:
            keys = [key for key in self.by_key if key == url or key.startswith(url + "\n")]
        dropped = 0
        for key in keys:
            for entry in list(self.by_key.get(key, ())):
                self.remove(entry)
                dropped += 1
        return dropped

    def _make_room(self, cost: int) -> None:
        while self.memory and self.stats.memory_bytes + cost > self.memory_limit:
            oldest = next(iter(self.memory))
            if not self._spill(oldest):
                self._evict(oldest)

    def _evict(self, entry: Entry) -> None:
        self.remove(entry)
        self.stats.count("eviction")

    def _spill(self, entry: Entry) -> bool:
        """Move an entry from memory to the disk folder; False when it cannot go there
        (no folder, too large for it, or the queue of writes is full)."""
        folder = self.disk_dir
        cost = entry.cost
        body = entry.body
        if (folder is None or body is None or cost > self.disk_limit
                or not self.disk_io.can_write(len(body))):
            return False
        while self.disk and self.stats.disk_bytes + cost > self.disk_limit:
            self._evict(next(iter(self.disk)))
        self._files += 1
        path = folder / file_name(entry.key, entry.variant, self._files)
        del self.memory[entry]
        self.stats.memory_bytes -= cost
        entry.disk_path = path
        self.disk[entry] = None
        self.stats.disk_bytes += cost

        def written(job: asyncio.Future[None]) -> None:
            error = job.exception()
            if entry not in self.disk:  # dropped while it was being written
                if error is None:
                    self.disk_io.remove(path)
                return
            if error is None:
                entry.body = None  # served from its file from now on
                return
            self.stats.count("disk_error")
            errno = getattr(error, "errno", None)
            self.log_once(f"disk-write-{errno}",
                          f"cache folder {folder} cannot take entries: {error}")
            self.remove(entry)

        self.disk_io.write(path, body).add_done_callback(written)
        return True

    # --- concurrent misses -----------------------------------------------------------

    def active_fill(self, key: str) -> Fill | None:
        """The fill of `key` in progress, unless it has held the key past FILL_LOCK (its
        exchange is slow, or ended without a word): then nobody waits for it."""
        fill = self.filling.get(key)
        if fill is not None and time.monotonic() - fill.started > FILL_LOCK:
            return None
        return fill

    def start_fill(self, key: str) -> Fill:
        """The fill a miss for `key` makes; misses that come meanwhile wait for it."""
        fill = Fill(self, key)
        previous = self.filling.get(key)
        if previous is not None:
            # The one before took too long for its waiters: this one takes over.
            fill.waiters, previous.waiters = previous.waiters, []
        self.filling[key] = fill
        return fill

    def fill_over(self, fill: Fill, stored: bool) -> None:
        """A fill ended: whoever waited for it looks again (a hit) or goes upstream."""
        if self.filling.get(fill.key) is fill:
            del self.filling[fill.key]
        waiters, fill.waiters = fill.waiters, []
        for wake in waiters:
            wake(stored)


PROCESS_STORE = CacheStore()
"""The store of this process: both listeners, every rule and policy with a cache."""


def configure_cache(memory_bytes: int, disk_dir: str | None, disk_bytes: int) -> None:
    """Bound the process's store (the --cache-* flags). Each process (workers of one
    `kanal run` too) keeps its own store, in a folder of its own under `disk_dir`; the
    folders of processes that are gone are removed (their entries died with them)."""
    if disk_dir is not None:
        _remove_dead_folders(Path(disk_dir))
        disk_dir = os.path.join(disk_dir, f"worker-{os.getpid()}")
    PROCESS_STORE.configure(memory_bytes, disk_dir, disk_bytes)


def _remove_dead_folders(parent: Path) -> None:
    try:
        folders = list(parent.glob("worker-*"))
    except OSError:
        return
    for folder in folders:
        pid = folder.name.removeprefix("worker-")
        if not pid.isdigit():
            continue
        if int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
                continue  # alive: another worker's
            except ProcessLookupError:
                pass
            except OSError:
                continue
        shutil.rmtree(folder, ignore_errors=True)


def lookup(store: CacheStore, key: str, request_headers: HeaderList) -> Entry | None:
    """The stored variant of `key` that fits the request's fields, if any."""
    for entry in store.variants(key):
        if not entry.vary or variant_of(entry.vary, request_headers) == entry.variant:
            return entry
    return None


__all__ = ["PROCESS_STORE", "CacheStats", "CacheStore", "Entry", "Fill", "lookup"]

"""Where local rate-limit buckets live: one table per dataplane, shared by its workers.

`kanal run --workers N` calls `share_between_workers()` before starting them: it
creates a file of `SLOTS` bucket slots, unlinks it at once and names it to the workers
as `/proc/<supervisor>/fd/<fd>` (environment variable `KANAL_SHARED_LIMITS`). Each
worker maps it (`mmap`, MAP_SHARED), so all of them count in the same buckets, and
takes an exclusive `flock` on it around each decision: a limit of 10 per second is 10
per second for the whole dataplane, whatever worker a connection lands on. The file
disappears with the supervisor, even when it is killed. Without the variable (one
process, or a platform without /proc) the table is private memory.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import tempfile
from collections.abc import Sequence

from kanal.contract.access import RateLimit
from kanal.dataplane.access.ratelimit import SLOT, BucketTable

log = logging.getLogger("kanal.access")

SLOTS = 1 << 16
"""Buckets held at most (2 MiB): distinct keys beyond it evict idle or old ones."""
ENV = "KANAL_SHARED_LIMITS"


class LocalBuckets:
    """The process's bucket table, locked when it is shared between processes."""

    def __init__(self, path: str | None = None) -> None:
        self.fd = -1
        if path is None:
            self.table = BucketTable(bytearray(SLOTS * SLOT.size))
            return
        self.fd = os.open(path, os.O_RDWR)
        self.table = BucketTable(mmap.mmap(self.fd, SLOTS * SLOT.size))

    def take_all(self, keys: Sequence[bytes], limits: Sequence[RateLimit], now: float
                 ) -> tuple[bool, list[float]]:
        if self.fd < 0:
            return self.table.take_all(keys, limits, now)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            return self.table.take_all(keys, limits, now)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)


_buckets: LocalBuckets | None = None


def local_buckets() -> LocalBuckets:
    """The table of this process (made at first use)."""
    global _buckets
    if _buckets is None:
        path = os.environ.get(ENV)
        try:
            _buckets = LocalBuckets(path)
        except OSError as exc:
            log.error("the workers' shared rate-limit table %s cannot be opened (%s); this "
                      "worker counts alone", path, exc)
            _buckets = LocalBuckets()
    return _buckets


def share_between_workers() -> None:
    """Make the table workers started from now on share (Linux; elsewhere: per worker)."""
    if not os.path.isdir(f"/proc/{os.getpid()}/fd"):
        return
    folder = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    try:
        fd, path = tempfile.mkstemp(prefix="kanal-limits-", dir=folder)
        os.ftruncate(fd, SLOTS * SLOT.size)
        os.unlink(path)
    except OSError as exc:
        log.error("no shared rate-limit table for the workers (%s): each counts alone", exc)
        return
    os.environ[ENV] = f"/proc/{os.getpid()}/fd/{fd}"

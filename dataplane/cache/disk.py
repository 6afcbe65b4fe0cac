"""The disk tier's file work, done on worker threads so a slow disk never stalls the
event loop: writes (an entry spilled from memory), reads (a disk hit) and removals.

A write is queued only while the writes already waiting hold fewer than
`MAX_PENDING_BYTES` and `MAX_PENDING_WRITES`: past that, the store evicts instead of
spilling (the bodies waiting to be written are still in memory). Each job's outcome
comes back on the event loop, as a future the store adds its callback to.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

THREADS = 2
"""Worker threads: file work is short, and the dataplane's CPU is for requests."""
MAX_PENDING_WRITES = 64
MAX_PENDING_BYTES = 32 * 1024 * 1024
"""Bytes of spilled bodies waiting to be written (held in memory until they are)."""


class DiskIO:
    """A small thread pool for the disk tier, with a bounded queue of writes."""

    def __init__(self, *, threads: int = THREADS, max_writes: int = MAX_PENDING_WRITES,
                 max_bytes: int = MAX_PENDING_BYTES) -> None:
        self.threads = threads
        self.max_writes = max_writes
        self.max_bytes = max_bytes
        self.pending_writes = 0
        self.pending_bytes = 0
        self._executor: ThreadPoolExecutor | None = None

    def _run(self) -> tuple[asyncio.AbstractEventLoop, ThreadPoolExecutor]:
        loop = asyncio.get_running_loop()  # RuntimeError outside the event loop
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="kanal-cache-disk")
        return loop, self._executor

    def can_write(self, size: int) -> bool:
        """Whether a write of `size` bytes may be queued now (an event loop is running
        and the queue has room)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return (self.pending_writes < self.max_writes
                and self.pending_bytes + size <= self.max_bytes)

    def write(self, path: Path, data: bytes) -> asyncio.Future[None]:
        """Write `data` to `path` whole (through a temporary file, renamed once complete)."""
        loop, executor = self._run()
        self.pending_writes += 1
        self.pending_bytes += len(data)
        future = loop.run_in_executor(executor, _write, path, data)

        def written(_: asyncio.Future[None]) -> None:
            self.pending_writes -= 1
            self.pending_bytes -= len(data)

        future.add_done_callback(written)
        return future

    def read(self, path: Path, size: int) -> asyncio.Future[bytes]:
        """The file's bytes; OSError when it cannot be read or is not `size` bytes long."""
        loop, executor = self._run()
        return loop.run_in_executor(executor, _read, path, size)

    def remove(self, path: Path) -> None:
        """Remove a file, whenever a worker gets to it (a missing one is no error)."""
        try:
            _, executor = self._run()
        except RuntimeError:
            _remove(path)  # no event loop (shutting down, or a test): nothing to stall
            return
        executor.submit(_remove, path)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None


def _write(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def _read(path: Path, size: int) -> bytes:
    with path.open("rb") as file:
        data = file.read(size + 1)
    if len(data) != size:
        raise OSError(f"{path} holds {len(data)} bytes, not the {size} stored")
    return data


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


__all__ = ["DiskIO"]

"""Keeps a SplitWatch on the applied configuration of a Runtime, and its windows moving.

The watch follows every Config the Runtime publishes (through `Runtime.on_apply`), and
is read once a second, so the windows keep checkpoints even when nobody looks; a read
then covers the last requests rather than everything since the previous read.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from kanal.dataplane.runtime import Config, Runtime
from kanal.dataplane.splitwatch import SplitWatch

__all__ = ["TICK", "split_ticker", "watch_splits"]

TICK = 1.0
"""Seconds between two reads of the windows when nobody looks."""


def watch_splits(runtime: Runtime, watch: SplitWatch | None = None) -> SplitWatch:
    """A SplitWatch following `runtime`'s configuration from now on."""
    watch = watch or SplitWatch()
    if runtime.config is not None:
        watch.follow(runtime.config.table)

    def follow(config: Config) -> None:
        watch.follow(config.table)

    runtime.on_apply.append(follow)
    return watch


def split_ticker(watch: SplitWatch) -> Callable[[Any], AsyncIterator[None]]:
    """An aiohttp cleanup context that reads `watch` every `TICK` seconds while serving."""

    async def tick_forever() -> None:
        while True:
            await asyncio.sleep(TICK)
            watch.observations()

    async def context(_: Any) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(tick_forever())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return context

"""Tells the control plane what this dataplane's weighted splits did, for Route status.

In a cluster the Route's `SplitObserved` condition is written by the operator, which
sees no request: each dataplane posts its observations (`POST /v1/report`, the same
words as `/metrics` and `/explain`, `kanal.contract.splits`) every `interval` seconds,
and only when they changed, so an idle dataplane sends nothing. The operator sums the
windows of its dataplanes. A report that fails is simply sent again next time: the
numbers are a view of the moment, not a log.

This runs beside the Subscriber as part of the same feed (`SplitReporter.feed`), with
the Subscriber's control plane, identity and token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiohttp

from kanal.contract.protocol import REPORT_PATH
from kanal.dataplane.process import Feed
from kanal.dataplane.runtime import Runtime
from kanal.dataplane.splitfeed import watch_splits
from kanal.dataplane.subscriber import Subscriber

__all__ = ["REPORT_INTERVAL", "SplitReporter"]

log = logging.getLogger("kanal.splitreport")

REPORT_INTERVAL = 10.0
"""Seconds between two reports (`kanal dataplane --split-report-interval`)."""


class SplitReporter:
    """Posts this dataplane's split observations to the control plane now and then."""

    def __init__(self, subscriber: Subscriber, interval: float = REPORT_INTERVAL) -> None:
        if interval <= 0:
            raise ValueError("the split report interval must be above 0 seconds")
        self.subscriber = subscriber
        self.interval = interval
        self.sent = 0
        """Reports the control plane took."""

    def feed(self, inner: Feed) -> Feed:
        """`inner` (the Subscriber's feed) with reports sent while it runs."""

        async def both(runtime: Runtime, stop: asyncio.Event) -> None:
            task = asyncio.get_running_loop().create_task(self.run(runtime, stop))
            try:
                await inner(runtime, stop)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

        return both

    async def run(self, runtime: Runtime, stop: asyncio.Event) -> None:
        watch = watch_splits(runtime)
        last: list[dict[str, Any]] | None = None
        timeout = aiohttp.ClientTimeout(total=max(1.0, min(self.interval, 10.0)))
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.interval):
                        await stop.wait()
                splits = [observation.to_dict() for observation in watch.observations()]
                # Nothing to say, or the same as last time: stay quiet. (After weighted
                # rules go away, one empty report clears what the operator kept.)
                if splits == last or (not splits and last is None):
                    continue
                if await self.post(session, splits):
                    last = splits

    async def post(self, session: aiohttp.ClientSession, splits: list[dict[str, Any]]) -> bool:
        subscriber = self.subscriber
        token = subscriber.token()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        payload = {"dataplane": subscriber.dataplane_id, "version": subscriber.applied,
                   "splits": splits}
        try:
            async with session.post(subscriber.base + REPORT_PATH, json=payload,
                                    headers=headers) as answer:
                if answer.status >= 300:
                    log.debug("control plane answered %d to a split report", answer.status)
                    return False
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.debug("could not report splits: %s", exc)
            return False
        self.sent += 1
        return True

"""Admission control of one Upstream: connections open, requests waiting, retries in flight.

The counters outlive reloads (a Runtime keeps one UpstreamLimits per Upstream key), so
a configuration change neither forgets busy connections nor drops waiting requests.
`admit` is the decision, without I/O; `wake_one` hands a freed connection to the
longest-waiting request by scheduling it on the running loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Literal

Admission = Literal["connect", "wait", "refuse"]


class UpstreamLimits:
    """Counters of one Upstream that outlive reloads: connections, waiters, retries."""

    __slots__ = ("active_retries", "connections", "pending", "waiters")

    def __init__(self) -> None:
        self.connections = 0
        self.pending = 0
        # Made by the first request that waits: most Upstreams never reach their cap,
        # and an empty deque is 600 bytes for each of them.
        self.waiters: deque[Callable[[], None]] | None = None
        self.active_retries = 0

    def admit(self, max_connections: int, max_pending: int) -> Admission:
        """May a request needing a new connection open one, wait for one, or neither?"""
        if self.connections < max_connections:
            return "connect"
        if self.pending < max_pending:
            return "wait"
        return "refuse"

    def wait(self, waiter: Callable[[], None], *, first: bool = False) -> None:
        """Queue a request for the next freed connection (`first`: it had waited already)."""
        self.pending += 1
        waiters = self.waiters
        if waiters is None:
            waiters = self.waiters = deque()
        if first:
            waiters.appendleft(waiter)
        else:
            waiters.append(waiter)

    def connection_opened(self) -> None:
        self.connections += 1

    def connection_closed(self) -> None:
        self.connections = max(self.connections - 1, 0)
        self.wake_one()

    def wake_one(self) -> None:
        """Schedule the longest-waiting request to try again (a connection freed up)."""
        waiters = self.waiters
        if waiters:
            waiter = waiters.popleft()
            self.pending = max(self.pending - 1, 0)
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().call_soon(waiter)

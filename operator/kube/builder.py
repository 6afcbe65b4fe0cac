"""Debounced rebuilds: a burst of watch events costs one compile.

`Debouncer` runs an action some time after it is poked: `holdoff` after the last poke
(each new poke restarts the holdoff), but never later than `cap` after the first poke
of the burst, so a steady stream of events cannot starve the rebuild. Pokes that arrive
while the action runs make one more run afterwards. An action that fails is retried
after a backoff that doubles from `backoff_initial` to `backoff_cap` and resets after a
success. The retry comes right after its backoff and covers the pokes made meanwhile
(pokes do not shorten a backoff).

All timing is on the event loop's clock (`loop.time()`), so tests drive it on virtual
time with looptime.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("kanal.operator.builder")

DEFAULT_HOLDOFF = 0.05
DEFAULT_CAP = 0.5


class Debouncer:
    """Calls `action` once per burst of `poke()`s. Start `run()` as a task."""

    def __init__(
        self,
        action: Callable[[], Awaitable[None]],
        *,
        holdoff: float = DEFAULT_HOLDOFF,
        cap: float = DEFAULT_CAP,
        backoff_initial: float = 0.5,
        backoff_cap: float = 30.0,
        name: str = "rebuild",
    ) -> None:
        if holdoff < 0 or cap < holdoff:
            raise ValueError("need 0 <= holdoff <= cap")
        self.action = action
        self.holdoff = holdoff
        self.cap = cap
        self.backoff_initial = backoff_initial
        self.backoff_cap = backoff_cap
        self.name = name
        self.runs = 0
        """Completed runs of the action (successful or not)."""
        self.failures = 0
        self._poked = asyncio.Event()
        self._first: float | None = None
        self._last: float | None = None
        self._backoff = 0.0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def pending(self) -> bool:
        """A poke has not been acted on yet."""
        return self._first is not None

    def poke(self) -> None:
        """Something changed: run the action soon."""
        now = asyncio.get_running_loop().time()
        if self._first is None:
            self._first = now
        self._last = now
        self._idle.clear()
        self._poked.set()

    async def idle(self) -> None:
        """Wait until every poke so far has been acted on."""
        await self._idle.wait()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._poked.wait()
            # Hold off: until `holdoff` after the last poke, or `cap` after the first.
            while True:
                self._poked.clear()
                assert self._first is not None and self._last is not None
                deadline = min(self._last + self.holdoff, self._first + self.cap)
                delay = deadline - loop.time()
                if delay <= 0:
                    break
                try:
                    await asyncio.wait_for(self._poked.wait(), timeout=delay)
                except TimeoutError:
                    break
            while True:
                self._first = self._last = None
                self._poked.clear()
                try:
                    await self.action()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self.runs += 1
                    self.failures += 1
                    self._backoff = min(self.backoff_cap,
                                        max(self.backoff_initial, self._backoff * 2))
                    log.exception("%s failed; retrying in %.1f s", self.name, self._backoff)
                    # The retry reads the latest inputs: it covers pokes made meanwhile.
                    await asyncio.sleep(self._backoff)
                    continue
                self.runs += 1
                self._backoff = 0.0
                break
            if self._first is None:
                self._idle.set()

"""The debounced builder on virtual time (looptime): exact times of every run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from kanal.operator.kube.builder import Debouncer

pytestmark = pytest.mark.looptime


class Runs:
    """The action: records the loop time of each run; can be told to fail."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.fail_next = 0
        self.duration = 0.0

    async def __call__(self) -> None:
        self.times.append(asyncio.get_running_loop().time())
        if self.duration:
            await asyncio.sleep(self.duration)
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("the API server is away")


@pytest.fixture
async def debounced() -> AsyncIterator[Callable[..., tuple[Debouncer, Runs]]]:
    tasks: list[asyncio.Task[None]] = []

    def make(**options: float) -> tuple[Debouncer, Runs]:
        runs = Runs()
        debouncer = Debouncer(runs, **options)
        tasks.append(asyncio.create_task(debouncer.run()))
        return debouncer, runs

    yield make
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_burst_costs_one_run_after_the_holdoff(debounced: Callable[..., tuple[Debouncer, Runs]]) -> None:
    loop = asyncio.get_running_loop()
    debouncer, runs = debounced(holdoff=0.05, cap=0.5)
    start = loop.time()
    for _ in range(100):  # a burst within one instant
        debouncer.poke()
    await asyncio.sleep(1)
    assert [t - start for t in runs.times] == [pytest.approx(0.05)]
    assert debouncer.runs == 1


async def test_each_poke_restarts_the_holdoff(debounced: Callable[..., tuple[Debouncer, Runs]]) -> None:
    loop = asyncio.get_running_loop()
    debouncer, runs = debounced(holdoff=0.05, cap=0.5)
    start = loop.time()
    for _ in range(4):  # every 30 ms: the holdoff of 50 ms never runs out until the last
        debouncer.poke()
        await asyncio.sleep(0.03)
    await asyncio.sleep(1)
    assert [t - start for t in runs.times] == [pytest.approx(0.09 + 0.05)]


async def test_a_steady_stream_is_capped(debounced: Callable[..., tuple[Debouncer, Runs]]) -> None:
    loop = asyncio.get_running_loop()
    debouncer, runs = debounced(holdoff=0.05, cap=0.5)
    start = loop.time()
    for _ in range(50):  # every 20 ms for a second: the holdoff alone would starve it
        debouncer.poke()
        await asyncio.sleep(0.02)
    await asyncio.sleep(1)
    relative = [round(t - start, 3) for t in runs.times]
    # At the cap: 0.5 s after the first poke, then 0.5 s after the first poke that
    # followed that run (0.52), which is also 0.04 s after the last poke (0.98).
    assert relative == [pytest.approx(0.5), pytest.approx(1.02)]


async def test_pokes_during_a_run_make_one_more_run(debounced: Callable[..., tuple[Debouncer, Runs]]) -> None:
    loop = asyncio.get_running_loop()
    debouncer, runs = debounced(holdoff=0.05, cap=0.5)
    runs.duration = 0.2
    start = loop.time()
    debouncer.poke()
    await asyncio.sleep(0.1)  # the run started at 0.05 and lasts until 0.25
    debouncer.poke()
    debouncer.poke()
    await debouncer.idle()
    assert [t - start for t in runs.times] == [pytest.approx(0.05), pytest.approx(0.25)]
    assert loop.time() - start == pytest.approx(0.45)


async def test_failures_back_off_doubling_then_reset(debounced: Callable[..., tuple[Debouncer, Runs]]) -> None:
    loop = asyncio.get_running_loop()
    debouncer, runs = debounced(holdoff=0.05, cap=0.5, backoff_initial=0.5, backoff_cap=2.0)
    runs.fail_next = 4
    start = loop.time()
    debouncer.poke()
    await asyncio.sleep(0.2)
    debouncer.poke()  # a poke during the backoff does not shorten it
    await debouncer.idle()
    relative = [t - start for t in runs.times]
    # 0.05, then +0.5, +1.0, +2.0, +2.0 (capped), each retry right after its backoff.
    assert relative == [pytest.approx(x) for x in (0.05, 0.55, 1.55, 3.55, 5.55)]
    assert debouncer.failures == 4
    # After a success, the next failure starts from the initial backoff again.
    runs.fail_next = 1
    restart = loop.time()
    debouncer.poke()
    await debouncer.idle()
    assert [t - restart for t in runs.times[-2:]] == [pytest.approx(0.05), pytest.approx(0.55)]


async def test_idle_waits_for_pending_pokes_only(debounced: Callable[..., tuple[Debouncer, Runs]]) -> None:
    loop = asyncio.get_running_loop()
    debouncer, runs = debounced(holdoff=0.05, cap=0.5)
    start = loop.time()
    await debouncer.idle()  # nothing pending: at once
    assert loop.time() == start
    assert not debouncer.pending
    debouncer.poke()
    assert debouncer.pending
    await debouncer.idle()
    assert loop.time() - start == pytest.approx(0.05)
    assert runs.times and not debouncer.pending


def test_holdoff_must_not_exceed_cap() -> None:
    async def nothing() -> None:
        return None

    with pytest.raises(ValueError):
        Debouncer(nothing, holdoff=1.0, cap=0.5)

"""The circuit breaker state machine, on an injected clock, without sockets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kanal.contract.snapshot import CircuitBreaker, HealthCheck
from kanal.dataplane.breaker import MAX_OPEN_FACTOR, TRANSITIONS, Breaker
from kanal.dataplane.health import HealthState


def breaker(**settings: object) -> Breaker:
    defaults: dict[str, object] = {
        "consecutive_failures": 3, "failure_rate_percent": 50, "minimum_requests": 10,
        "open_duration": 10.0, "half_open_requests": 1,
    }
    defaults.update(settings)
    return Breaker(CircuitBreaker(**defaults))  # type: ignore[arg-type]


def test_the_table_names_every_transition() -> None:
    assert TRANSITIONS == {
        ("closed", "trip"): "open",
        ("open", "timer"): "half-open",
        ("half-open", "probe-ok"): "closed",
        ("half-open", "probe-failed"): "open",
    }


def test_consecutive_failures_open_the_circuit() -> None:
    b = breaker()
    assert b.record(False, 0.01, now=1.0) is None
    assert b.record(False, 0.01, now=1.1) is None
    assert b.record(False, 0.01, now=1.2) == "open"
    assert not b.admits(1.3) and not b.acquire(1.3)


def test_a_success_resets_the_consecutive_count() -> None:
    b = breaker()
    for now in (1.0, 1.1):
        b.record(False, 0.01, now)
    b.record(True, 0.01, 1.2)
    assert b.record(False, 0.01, 1.3) is None
    assert b.state == "closed"


def test_failure_rate_opens_once_minimum_requests_are_seen() -> None:
    b = breaker(consecutive_failures=100, failure_rate_percent=50, minimum_requests=10)
    # Alternate: never three failures in a row, but a 50% failure rate.
    changes = [b.record(i % 2 == 0, 0.01, now=1.0 + i * 0.01) for i in range(9)]
    assert all(change is None for change in changes)  # fewer than 10 calls: no verdict
    assert b.record(False, 0.01, now=1.2) == "open"


def test_failures_older_than_the_window_do_not_count() -> None:
    b = breaker(consecutive_failures=100, failure_rate_percent=50, minimum_requests=4)
    for i in range(3):
        b.record(False, 0.01, now=1.0 + i)
    # 30 seconds later the old failures have left the 10-second window.
    for i in range(3):
        assert b.record(True, 0.01, now=40.0 + i * 0.1) is None
    assert b.record(False, 0.01, now=41.0) is None
    assert b.state == "closed"


def test_slow_calls_count_as_failures() -> None:
    b = breaker(slow_call_duration=0.5)
    for now in (1.0, 2.0):
        assert b.record(True, 0.9, now) is None
    assert b.record(True, 0.9, 3.0) == "open"


def test_open_then_half_open_then_closed_on_a_good_probe() -> None:
    b = breaker()
    for now in (1.0, 1.1, 1.2):
        b.record(False, 0.01, now)
    assert b.state == "open" and b.open_until == pytest.approx(11.2)
    assert b.poll(11.1) is None
    assert b.acquire(11.3)  # the deadline passed: this request is the probe
    assert b.state == "half-open"
    assert not b.acquire(11.4)  # halfOpenRequests: 1
    assert b.record(True, 0.01, 11.5) == "closed"
    assert b.acquire(11.6)


def test_a_failed_probe_reopens_for_longer_up_to_a_cap() -> None:
    b = breaker()
    for now in (1.0, 1.1, 1.2):
        b.record(False, 0.01, now)
    durations = [b.open_until - 1.2]
    now = b.open_until
    for _ in range(6):
        assert b.acquire(now)
        assert b.record(False, 0.01, now) == "open"
        durations.append(b.open_until - now)
        now = b.open_until
    assert durations[:4] == pytest.approx([10.0, 20.0, 40.0, 80.0])
    assert max(durations) == pytest.approx(10.0 * MAX_OPEN_FACTOR)


def test_several_probes_must_all_succeed() -> None:
    b = breaker(half_open_requests=2)
    for now in (1.0, 1.1, 1.2):
        b.record(False, 0.01, now)
    assert b.acquire(20.0) and b.acquire(20.0) and not b.acquire(20.0)
    assert b.record(True, 0.01, 20.1) is None
    assert b.record(True, 0.01, 20.2) == "closed"


def test_may_open_false_keeps_the_circuit_closed() -> None:
    b = breaker()
    for now in (1.0, 1.1, 1.2, 1.3):
        assert b.record(False, 0.01, now, may_open=False) is None
    assert b.state == "closed"
    assert b.record(False, 0.01, 1.4) == "open"


@given(st.lists(st.tuples(st.booleans(), st.floats(0, 5)), max_size=200))
def test_states_are_always_one_of_three(events: list[tuple[bool, float]]) -> None:
    b = breaker(slow_call_duration=1.0)
    now = 0.0
    for ok, step in events:
        now += step
        if b.acquire(now):
            b.record(ok, step, now)
        assert b.state in ("closed", "open", "half-open")
        assert b.probes_in_flight <= b.settings.half_open_requests


def test_health_thresholds() -> None:
    health = HealthState(HealthCheck(healthy_threshold=2, unhealthy_threshold=3))
    assert [health.record(False) for _ in range(3)] == [None, None, False]
    assert health.record(True) is None
    assert health.record(True) is True

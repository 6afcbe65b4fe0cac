"""The circuit breaker of one endpoint: a pure state machine with an injected clock.

States and the events that move between them, as a table (h11's style):

    state       event                                   next state
    ---------   -------------------------------------   ----------
    closed      failure, consecutive >= threshold       open
    closed      failure, window rate >= threshold       open       (once minimumRequests seen)
    closed      slow call (counts as a failure)         (as failure)
    open        clock passes the open deadline          half-open
    half-open   probe succeeds (all probes done)        closed
    half-open   probe fails                             open       (for longer)

Rules stated once:
- A failure is a connect error, a reset, a timeout, a 5xx answer, or a call slower
  than `slowCallDuration`.
- Open means no traffic for the open duration, which doubles with each opening that
  follows another without a full recovery in between, up to `MAX_OPEN_FACTOR` times
  the configured duration.
- Half-open lets `halfOpenRequests` probes through, one at a time or together; any
  failure reopens, all of them succeeding closes (and resets the growth).
- Whether the breaker may open at all is the caller's question (an upstream allows
  only a bounded share of its endpoints open at once): `record` takes `may_open`.

Nothing here reads a clock or does I/O; `now` is passed in.
"""

from __future__ import annotations

from typing import Final, Literal

from kanal.contract.snapshot import CircuitBreaker

State = Literal["closed", "open", "half-open"]
Event = Literal["trip", "timer", "probe-ok", "probe-failed"]

TRANSITIONS: dict[tuple[State, Event], State] = {
    ("closed", "trip"): "open",
    ("open", "timer"): "half-open",
    ("half-open", "probe-ok"): "closed",
    ("half-open", "probe-failed"): "open",
}
"""Every allowed transition; any other (state, event) pair leaves the state as it is."""

WINDOW_SECONDS: Final = 10.0
"""The rolling window over which the failure rate is measured."""

BUCKETS: Final = 10
MAX_OPEN_FACTOR = 8
"""Repeated openings double the open time up to this many times the configured one."""


class Breaker:
    """The state of one endpoint's circuit."""

    __slots__ = (
        "settings", "state", "consecutive", "open_until", "openings", "probes_in_flight",
        "probes_ok", "_calls", "_failures", "_slot",
    )

    def __init__(self, settings: CircuitBreaker) -> None:
        self.settings = settings
        self.state: State = "closed"
        self.consecutive = 0
        self.open_until = 0.0
        self.openings = 0
        self.probes_in_flight = 0
        self.probes_ok = 0
        # Calls and failures per slice of the window; slot = the current slice's number
        # since the clock's epoch, so slice i lives at index i % BUCKETS.
        self._calls = [0] * BUCKETS
        self._failures = [0] * BUCKETS
        self._slot = -BUCKETS

    # --- questions ---------------------------------------------------------------------

    def admits(self, now: float) -> bool:
        """Whether a new request may go to this endpoint now (without taking a probe)."""
        if self.state == "closed":
            return True
        if self.state == "open":
            return now >= self.open_until
        return self.probes_in_flight < self.settings.half_open_requests

    def open_duration(self) -> float:
        factor: int = min(2 ** max(self.openings - 1, 0), MAX_OPEN_FACTOR)
        return float(self.settings.open_duration * factor)

    # --- events ------------------------------------------------------------------------

    def poll(self, now: float) -> State | None:
        """Let time pass: an open circuit whose deadline passed becomes half-open."""
        if self.state == "open" and now >= self.open_until:
            return self._move("timer", now)
        return None

    def acquire(self, now: float) -> bool:
        """Take the right to send one request; False when the circuit refuses it."""
        self.poll(now)
        if self.state == "closed":
            return True
        if self.state == "half-open" and self.probes_in_flight < self.settings.half_open_requests:
            self.probes_in_flight += 1
            return True
        return False

    def record(self, ok: bool, duration: float, now: float, *, may_open: bool = True) -> State | None:
        """The result of a call that `acquire` let through; returns the new state if it changed."""
        slow = self.settings.slow_call_duration
        if ok and slow is not None and duration > slow:
            ok = False
        if self.state == "half-open":
            self.probes_in_flight = max(self.probes_in_flight - 1, 0)
            if not ok:
                return self._move("probe-failed", now)
            self.probes_ok += 1
            if self.probes_ok >= self.settings.half_open_requests and self.probes_in_flight == 0:
                return self._move("probe-ok", now)
            return None
        if self.state != "closed":
            return None  # a call that started before the circuit opened
        self._count(ok, now)
        if ok:
            self.consecutive = 0
            return None
        self.consecutive += 1
        if not may_open:
            return None
        if self.consecutive >= self.settings.consecutive_failures or self._rate_exceeded(now):
            return self._move("trip", now)
        return None

    def count_success(self, now: float, duration: float) -> bool:
        """The hot path's shortcut for `record(True, ...)`: True when that is all it takes.

        Only a closed circuit with no failure streak and no slow-call limit qualifies;
        anything else returns False and the caller goes through `record`.
        """
        if self.state != "closed" or self.consecutive or self.settings.slow_call_duration is not None:
            return False
        slot = int(now * BUCKETS / WINDOW_SECONDS)
        if slot == self._slot:
            self._calls[slot % BUCKETS] += 1
        else:
            self._count(True, now)
        return True

    def release_probe(self) -> None:
        """A probe that ended without a verdict (the client went away)."""
        if self.state == "half-open":
            self.probes_in_flight = max(self.probes_in_flight - 1, 0)

    # --- internals ---------------------------------------------------------------------

    def _move(self, event: Event, now: float) -> State | None:
        target = TRANSITIONS.get((self.state, event))
        if target is None:
            return None
        self.state = target
        if target == "open":
            self.openings += 1
            self.open_until = now + self.open_duration()
            self.probes_in_flight = 0
            self.probes_ok = 0
        elif target == "half-open":
            self.probes_in_flight = 0
            self.probes_ok = 0
        elif target == "closed":
            self.openings = 0
            self.consecutive = 0
            self._calls = [0] * BUCKETS
            self._failures = [0] * BUCKETS
        return target

    def _count(self, ok: bool, now: float) -> None:
        slot = int(now * BUCKETS / WINDOW_SECONDS)
        calls, failures = self._calls, self._failures
        if slot != self._slot:
            # Clear the buckets the clock moved past (all of them after a long quiet).
            for passed in range(max(self._slot + 1, slot - BUCKETS + 1), slot + 1):
                calls[passed % BUCKETS] = 0
                failures[passed % BUCKETS] = 0
            self._slot = slot
        index = slot % BUCKETS
        calls[index] += 1
        if not ok:
            failures[index] += 1

    def _rate_exceeded(self, now: float) -> bool:
        self._count_nothing(now)
        calls = sum(self._calls)
        if calls < self.settings.minimum_requests or calls == 0:
            return False
        return sum(self._failures) * 100 >= self.settings.failure_rate_percent * calls

    def _count_nothing(self, now: float) -> None:
        """Age the window to `now` without counting a call."""
        slot = int(now * BUCKETS / WINDOW_SECONDS)
        if slot != self._slot:
            for passed in range(max(self._slot + 1, slot - BUCKETS + 1), slot + 1):
                self._calls[passed % BUCKETS] = 0
                self._failures[passed % BUCKETS] = 0
            self._slot = slot

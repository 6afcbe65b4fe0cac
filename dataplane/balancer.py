"""Choosing an endpoint inside one Upstream: the load-balancing policies.

Every policy picks only endpoints that are `available` (health checks and circuit
breakers flip that flag on the shared `EndpointState`) and have weight > 0, and skips
`exclude` (the endpoint a retry just failed on) while another one is available. When
nothing is available `pick` returns None and the caller answers 503 at once.

The structures are built once per Snapshot (schedules, cumulative weights, the hash
ring) so a pick costs a few hundred nanoseconds: an index step, a bisect, or two.
Randomness comes from an injected `random.Random`; hashing uses BLAKE2b so ring
positions agree across processes and restarts (Python's `hash` is salted per process).

Policies:
- RoundRobin: smooth weighted round robin over a precomputed cycle; an unavailable
  endpoint is skipped and the cursor moves past the endpoint actually chosen, so the
  others keep an even share instead of the next one taking double.
- LeastRequest: power of two choices. Two candidates are drawn in proportion to weight
  and the one with fewer active requests per unit weight wins (Envoy's idea), the first
  on ties, so under no load the split follows the weights exactly.
- Random: weighted random.
- RingHash: a consistent hash ring, 100 virtual nodes per unit of weight, scaled down
  so the ring never exceeds `MAX_RING` points. Adding or removing one endpoint of n
  moves about 1/n of the keys. Without a key it falls back to weighted random.
"""

from __future__ import annotations

import hashlib
import math
import random
import struct
from bisect import bisect_right
from collections.abc import Sequence
from functools import lru_cache, reduce
from itertools import accumulate
from typing import Any

from kanal.contract.snapshot import Endpoint, HashOn, LoadBalancerPolicy
from kanal.dataplane.split import smooth_weighted_order

__all__ = [
    "MAX_RING",
    "VNODES_PER_WEIGHT",
    "Balancer",
    "EndpointState",
    "LeastRequestBalancer",
    "RandomBalancer",
    "RingHashBalancer",
    "RoundRobinBalancer",
    "make_balancer",
    "stable_hash",
]

VNODES_PER_WEIGHT = 100
MAX_RING = 16_384
"""Ring points per upstream at most: bounds build time (~10 ms) and memory."""

_MAX_SCHEDULE = 10_000
"""Longest round-robin cycle precomputed; beyond it SWRR runs over the live endpoints."""

_SAMPLE_TRIES = 8
"""Weighted draws tried before falling back to a scan of the eligible endpoints."""


_HOME_CACHE_SIZE = 1024
"""Hash keys whose ring position a RingHash balancer remembers (cleared when full)."""


@lru_cache(maxsize=8192)
def _vnode_points(key: str, vnodes: int) -> tuple[int, ...]:
    """The ring points of an endpoint: eight 64-bit points per 512-bit BLAKE2b digest.

    Cached, so a reload with the same endpoints rebuilds rings without hashing.
    """
    points: list[int] = []
    for block in range((vnodes + 7) // 8):
        digest = hashlib.blake2b(f"{key}#{block}".encode(), digest_size=64).digest()
        points.extend(_EIGHT_WORDS.unpack(digest))
    return tuple(points[:vnodes])


_EIGHT_WORDS = struct.Struct(">8Q")


def stable_hash(text: str) -> int:
    """A 64-bit hash of text that is the same in every process (unlike `hash`)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class EndpointState:
    """The mutable runtime state of one endpoint, shared by balancer, breaker and pool.

    `available` is the one flag every policy consults; health checks and circuit
    breakers own it. `active` counts requests in flight (the caller increments it when
    a request starts and decrements it when it ends); LeastRequest reads it.
    """

    __slots__ = ("active", "available", "breaker", "endpoint", "healthy", "key", "weight")

    def __init__(self, endpoint: Endpoint, available: bool = True) -> None:
        self.endpoint = endpoint
        self.key = f"{endpoint.address}:{endpoint.port}"
        self.weight = endpoint.weight
        self.active = 0
        self.available = available
        # Set by the runtime: active health (True until a check says otherwise) and the
        # endpoint's circuit breaker (kanal.dataplane.breaker.Breaker), if any.
        self.healthy = True
        self.breaker: Any = None

    @property
    def health(self) -> str:
        return "healthy" if self.healthy else "unhealthy"

    @property
    def circuit(self) -> str:
        return "closed" if self.breaker is None else str(self.breaker.state)

    def refresh(self, now: float) -> None:
        """Recompute `available` from health and the circuit (call after either changes)."""
        breaker = self.breaker
        self.available = self.healthy and (breaker is None or breaker.admits(now))

    def __repr__(self) -> str:
        return (
            f"EndpointState({self.key}, weight={self.weight}, active={self.active}, "
            f"available={self.available})"
        )


class Balancer:
    """Base: the fast path for a single endpoint and the shared weighted sampler."""

    __slots__ = ("_cumulative", "_eligible", "_rng", "_single", "_total", "endpoints", "hash_on")

    policy: LoadBalancerPolicy = "RoundRobin"

    def __init__(
        self,
        endpoints: Sequence[EndpointState],
        rng: random.Random,
        hash_on: HashOn | None = None,
    ) -> None:
        self.endpoints: tuple[EndpointState, ...] = tuple(endpoints)
        self.hash_on = hash_on
        self._rng = rng
        self._eligible = tuple(s for s in self.endpoints if s.weight > 0)
        self._single = self._eligible[0] if len(self._eligible) == 1 else None
        self._cumulative = list(accumulate(s.weight for s in self._eligible))
        self._total = self._cumulative[-1] if self._cumulative else 0

    def pick(
        self, hash_key: str | None = None, exclude: object | None = None
    ) -> EndpointState | None:
        """An available endpoint, avoiding `exclude` if another is available; else None."""
        single = self._single
        if single is not None:
            return single if single.available else None
        if not self._eligible:
            return None
        return self._pick(hash_key, exclude)

    def _pick(self, hash_key: str | None, exclude: object | None) -> EndpointState | None:
        raise NotImplementedError

    def _sample(self, exclude: object | None) -> EndpointState | None:
        """A weighted random available endpoint other than `exclude` if possible."""
        state = self._eligible[bisect_right(self._cumulative, self._rng.random() * self._total)]
        if state.available and state is not exclude:
            return state
        return self._sample_retry(exclude)

    def _sample_retry(self, exclude: object | None) -> EndpointState | None:
        """A few more weighted draws (most endpoints are usually fine), then a scan."""
        cumulative = self._cumulative
        eligible = self._eligible
        total = self._total
        rand = self._rng.random
        for _ in range(_SAMPLE_TRIES):
            state = eligible[bisect_right(cumulative, rand() * total)]
            if state.available and state is not exclude:
                return state
        return self._sample_slow(exclude)

    def _sample_slow(self, exclude: object | None) -> EndpointState | None:
        """Weighted draw among the available endpoints when most are down or excluded."""
        live = [s for s in self._eligible if s.available and s is not exclude]
        if not live:
            return exclude if _is_available_state(exclude, self._eligible) else None  # type: ignore[return-value]
        cumulative = list(accumulate(s.weight for s in live))
        return live[bisect_right(cumulative, self._rng.random() * cumulative[-1])]


def _is_available_state(candidate: object | None, eligible: Sequence[EndpointState]) -> bool:
    """Whether `candidate` is one of ours, available and with weight > 0."""
    return isinstance(candidate, EndpointState) and candidate.available and candidate in eligible


class RoundRobinBalancer(Balancer):
    """Smooth weighted round robin over a cycle precomputed at build time."""

    __slots__ = ("_cursor", "_schedule")

    policy: LoadBalancerPolicy = "RoundRobin"

    def __init__(
        self,
        endpoints: Sequence[EndpointState],
        rng: random.Random,
        hash_on: HashOn | None = None,
    ) -> None:
        super().__init__(endpoints, rng, hash_on)
        weights = [s.weight for s in self._eligible]
        divisor = reduce(math.gcd, weights, 0) or 1
        reduced = [w // divisor for w in weights]
        total = sum(reduced)
        if total > _MAX_SCHEDULE:
            # Too long a cycle to keep: approximate with one slot per endpoint, spread by
            # SWRR on weights scaled into the budget (each endpoint keeps at least one).
            scale = _MAX_SCHEDULE / total
            reduced = [max(1, int(w * scale)) for w in reduced]
            total = sum(reduced)
        self._schedule = tuple(self._eligible[i] for i in smooth_weighted_order(reduced, total))
        self._cursor = rng.randrange(len(self._schedule)) if self._schedule else 0

    def _pick(self, hash_key: str | None, exclude: object | None) -> EndpointState | None:
        schedule = self._schedule
        length = len(schedule)
        cursor = self._cursor
        state = schedule[cursor]
        if state.available and state is not exclude:
            self._cursor = cursor + 1 if cursor + 1 < length else 0
            return state
        fallback: EndpointState | None = None
        for step in range(1, length + 1):
            index = (cursor + step) % length
            state = schedule[index]
            if not state.available:
                continue
            if state is exclude:
                fallback = state
                continue
            self._cursor = index + 1 if index + 1 < length else 0
            return state
        return fallback


class LeastRequestBalancer(Balancer):
    """Power of two choices on active requests per unit weight."""

    __slots__ = ()

    policy: LoadBalancerPolicy = "LeastRequest"

    def _pick(self, hash_key: str | None, exclude: object | None) -> EndpointState | None:
        eligible = self._eligible
        cumulative = self._cumulative
        total = self._total
        rand = self._rng.random
        first = eligible[bisect_right(cumulative, rand() * total)]
        second = eligible[bisect_right(cumulative, rand() * total)]
        if not first.available or first is exclude:
            first_or_none = self._sample_retry(exclude)
            if first_or_none is None or first_or_none is exclude:
                return first_or_none
            first = first_or_none
        if second is first or not second.available or second is exclude:
            return first
        # first.active / first.weight <= second.active / second.weight, without division
        if first.active * second.weight <= second.active * first.weight:
            return first
        return second


class RandomBalancer(Balancer):
    """Weighted random."""

    __slots__ = ()

    policy: LoadBalancerPolicy = "Random"

    def _pick(self, hash_key: str | None, exclude: object | None) -> EndpointState | None:
        return self._sample(exclude)


class RingHashBalancer(Balancer):
    """Consistent hashing on a ring built once; a key without a home walks clockwise."""

    __slots__ = ("_homes", "_owners", "_points")

    policy: LoadBalancerPolicy = "RingHash"

    def __init__(
        self,
        endpoints: Sequence[EndpointState],
        rng: random.Random,
        hash_on: HashOn | None = None,
    ) -> None:
        super().__init__(endpoints, rng, hash_on)
        total_weight = self._total
        scale = min(1.0, MAX_RING / (VNODES_PER_WEIGHT * total_weight)) if total_weight else 1.0
        points: list[int] = []
        owners: list[EndpointState] = []
        for state in self._eligible:
            vnodes = max(1, round(VNODES_PER_WEIGHT * state.weight * scale))
            points.extend(_vnode_points(state.key, vnodes))
            owners.extend([state] * vnodes)
        order = sorted(range(len(points)), key=points.__getitem__)
        self._points = [points[i] for i in order]
        self._owners = tuple(owners[i] for i in order)
        self._homes: dict[str, int] = {}

    def _pick(self, hash_key: str | None, exclude: object | None) -> EndpointState | None:
        if hash_key is None:
            return self._sample(exclude)
        index = self._homes.get(hash_key)
        if index is None:
            index = self._home(hash_key)
        state = self._owners[index]
        if state.available and state is not exclude:
            return state
        return self._walk(index, exclude)

    def _home(self, hash_key: str) -> int:
        """The ring index owning a key; remembered (bounded) since keys recur."""
        index = bisect_right(self._points, stable_hash(hash_key))
        if index == len(self._points):
            index = 0
        homes = self._homes
        if len(homes) >= _HOME_CACHE_SIZE:
            homes.clear()
        homes[hash_key] = index
        return index

    def _walk(self, start: int, exclude: object | None) -> EndpointState | None:
        """The next available endpoint clockwise; stops once every endpoint was seen."""
        owners = self._owners
        length = len(owners)
        distinct = len(self._eligible)
        seen: set[int] = set()
        fallback: EndpointState | None = None
        for step in range(length):
            state = owners[(start + step) % length]
            if state.available:
                if state is not exclude:
                    return state
                fallback = state
            seen.add(id(state))
            if len(seen) == distinct:
                break
        return fallback


_POLICIES: dict[str, type[Balancer]] = {
    "RoundRobin": RoundRobinBalancer,
    "LeastRequest": LeastRequestBalancer,
    "Random": RandomBalancer,
    "RingHash": RingHashBalancer,
}


def make_balancer(
    policy: LoadBalancerPolicy,
    endpoints: Sequence[EndpointState],
    rng: random.Random,
    hash_on: HashOn | None = None,
) -> Balancer:
    """The balancer for a policy; unknown policies are a ValueError (the snapshot is bad)."""
    try:
        kind = _POLICIES[policy]
    except KeyError:
        raise ValueError(f"unknown load balancer policy {policy!r}") from None
    return kind(endpoints, rng, hash_on)

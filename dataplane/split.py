"""Choosing among a rule's backends: weighted splits and cookie session affinity.

A rule names Upstreams with weights (a 95/5 canary, a 100/0 blue/green). The split
must be exact and smooth: over one cycle of the total weight every backend gets
exactly its share, interleaved, so a 5% canary sees one request in twenty rather than
a burst of five every hundred. That is nginx's smooth weighted round robin (SWRR).

Because a Split is rebuilt from every new Snapshot, its whole cycle is precomputed once
as a tuple (after dividing the weights by their gcd) and a pick is one index step. Very
large cycles (weights summing to more than `_MAX_SCHEDULE`) fall back to running SWRR
per pick, which yields the identical sequence.

Session affinity keeps a client on the backend it first got. The cookie carries a
token derived only from the Upstream key (the first 12 hex characters of its SHA-256),
so it is the same in every process and survives reloads, and does not spell out the
namespace and name. A token still naming a backend of the rule with weight > 0 is
honoured; otherwise the client is placed by SWRR and handed a new token. A weight
change therefore moves only new clients, and a flip to weight 0 drains old ones too.

Split verification: a rule with more than one distinct backend counts each choice
(`chosen`, one dict increment in `choose`) so `kanal.dataplane.splitwatch` can show the
observed share next to the declared weight, a 100/0 blue/green included. A rule with
one backend answers from `_single` before any of that, and counts nothing.

Pure: no I/O, no clocks; the only randomness (the starting offset in the cycle, so
that frequent reloads do not starve a small canary) comes from an injected rng.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable
from functools import lru_cache, reduce

from kanal.contract.snapshot import Backend, Rule, SessionAffinity

__all__ = ["Split", "affinity_token", "format_set_cookie", "smooth_weighted_order"]

_MAX_SCHEDULE = 10_000
"""Longest SWRR cycle precomputed; beyond this SWRR runs per pick (same sequence)."""

_TOKEN_LENGTH = 12


@lru_cache(maxsize=8192)
def affinity_token(upstream_key: str) -> str:
    """The cookie token for an Upstream key: stable across processes and reloads."""
    return hashlib.sha256(upstream_key.encode()).hexdigest()[:_TOKEN_LENGTH]


def format_set_cookie(name: str, token: str, ttl: float | None) -> str:
    """The value of a Set-Cookie header carrying an affinity token.

    A ttl of None or <= 0 gives a session cookie (no Max-Age): Max-Age=0 would tell the
    browser to delete the cookie at once, which is never what a user meant.
    """
    if ttl is None or ttl <= 0:
        return f"{name}={token}; Path=/; HttpOnly; SameSite=Lax"
    return f"{name}={token}; Max-Age={int(ttl)}; Path=/; HttpOnly; SameSite=Lax"


def smooth_weighted_order(weights: list[int], count: int) -> list[int]:
    """The first `count` indices chosen by nginx's smooth weighted round robin.

    Each step adds every weight to its running score, picks the highest score (the
    first on ties) and subtracts the total from it. Over `sum(weights)` steps every
    index is chosen exactly `weights[i]` times. Zero weights are never chosen.
    """
    total = sum(w for w in weights if w > 0)
    if total <= 0:
        return []
    current = [0] * len(weights)
    order: list[int] = []
    for _ in range(count):
        best = _swrr_step(weights, current, total)
        order.append(best)
    return order


@lru_cache(maxsize=1024)
def _reduced_weights(weights: tuple[int, ...]) -> tuple[int, ...]:
    """Weights divided by their gcd (negative as 0): the same SWRR sequence, shorter."""
    raw = [max(0, w) for w in weights]
    divisor = reduce(math.gcd, (w for w in raw if w > 0), 0) or 1
    return tuple(w // divisor for w in raw)


@lru_cache(maxsize=1024)
def _cycle(weights: tuple[int, ...]) -> tuple[int, ...]:
    """One full SWRR cycle; cached since rules share a few weight patterns (95/5, 50/50)."""
    return tuple(smooth_weighted_order(list(weights), sum(weights)))


def _swrr_step(weights: list[int], current: list[int], total: int) -> int:
    """One SWRR step over `current` (mutated); returns the chosen index."""
    best = -1
    best_score = 0
    for i, weight in enumerate(weights):
        if weight <= 0:
            continue
        score = current[i] + weight
        current[i] = score
        if best < 0 or score > best_score:
            best = i
            best_score = score
    current[best] -= total
    return best


class Split:
    """The backend choice of one rule: exact smooth weights, optional cookie affinity.

    Mutable only in its position in the cycle; one instance per rule per Snapshot,
    shared by every request the rule takes.
    """

    __slots__ = (
        "_by_token",
        "_cookie_header_of",
        "_current",
        "_keys",
        "_position",
        "_schedule",
        "_single",
        "_token_of",
        "_total",
        "_weights",
        "affinity",
        "backends",
        "chosen",
    )

    def __init__(
        self,
        backends: Iterable[Backend],
        affinity: SessionAffinity | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.backends: tuple[Backend, ...] = tuple(backends)
        self.affinity = affinity
        keys: list[str] = []
        raw: list[int] = []
        for backend in self.backends:
            keys.append(backend.upstream)
            raw.append(backend.weight)
        self._keys = keys
        # Choices per Upstream key since this Split was built, for split verification:
        # only kept where there is a choice to verify (more than one distinct backend).
        self.chosen: dict[str, int] | None = (
            dict.fromkeys(keys, 0) if len(set(keys)) > 1 else None
        )
        weights = _reduced_weights(tuple(raw))
        self._weights = list(weights)
        self._total = total = sum(weights)
        self._current = [0] * len(weights)
        self._position = 0
        live = [key for key, weight in zip(keys, weights, strict=True) if weight > 0]
        # The shortcut for a rule with one backend; a weighted rule whose weights leave
        # one live backend (100/0) goes through its one-step schedule, so it is counted.
        self._single: str | None = (
            live[0] if self.chosen is None and live and live.count(live[0]) == len(live)
            else None
        )
        self._schedule: tuple[str, ...] = ()
        if self._single is None and 0 < total <= _MAX_SCHEDULE:
            self._schedule = tuple(keys[i] for i in _cycle(weights))
            if rng is not None:
                self._position = rng.randrange(total)
        elif self._single is None and total and rng is not None:
            # Start somewhere inside the cycle, as the precomputed case does.
            for _ in range(rng.randrange(_MAX_SCHEDULE)):
                _swrr_step(self._weights, self._current, total)
        # Affinity lookups are only built for rules that use affinity.
        self._token_of: dict[str, str] = {}
        self._by_token: dict[str, str] = {}
        self._cookie_header_of: dict[str, str] = {}
        if affinity is not None:
            self._token_of = {key: affinity_token(key) for key in self._keys}
            self._by_token = {self._token_of[k]: k for k in live}
            self._cookie_header_of = {
                token: format_set_cookie(affinity.cookie_name, token, affinity.ttl)
                for token in self._by_token
            }

    @classmethod
    def from_rule(cls, rule: Rule, rng: random.Random | None = None) -> Split:
        """The Split of a Snapshot rule (its backends and session affinity)."""
        return cls(rule.backends, rule.session_affinity, rng)

    def next(self) -> str | None:
        """The next Upstream key by SWRR, or None when every weight is 0 (answer 503)."""
        single = self._single
        if single is not None:
            return single
        schedule = self._schedule
        if schedule:
            position = self._position
            self._position = position + 1 if position + 1 < len(schedule) else 0
            return schedule[position]
        if not self._total:
            return None
        return self._keys[_swrr_step(self._weights, self._current, self._total)]

    def choose(self, cookie_value: str | None = None) -> tuple[str | None, str | None]:
        """(upstream key or None, token to set or None) for a request.

        Without affinity the token is always None. With affinity, a cookie naming a
        live backend keeps it and sets nothing; otherwise SWRR decides and the token of
        its choice is returned for the caller to set (see `set_cookie_header`).
        """
        if self.affinity is None:
            single = self._single
            if single is not None:
                return single, None
            key = self.next()
            chosen = self.chosen
            if chosen is not None and key is not None:
                chosen[key] += 1
            return key, None
        chosen = self.chosen
        if cookie_value:
            kept = self._by_token.get(cookie_value)
            if kept is not None:
                if chosen is not None:
                    chosen[kept] += 1
                return kept, None
        key = self.next()
        if key is None:
            return None, None
        if chosen is not None:
            chosen[key] += 1
        return key, self._token_of[key]

    def token(self, upstream_key: str) -> str:
        """The affinity token of one of this rule's Upstream keys."""
        return self._token_of.get(upstream_key) or affinity_token(upstream_key)

    def set_cookie_header(self, token: str) -> str:
        """The Set-Cookie value for a token from `choose` (precomputed; no formatting)."""
        header = self._cookie_header_of.get(token)
        if header is not None:
            return header
        affinity = self.affinity or SessionAffinity()
        return format_set_cookie(affinity.cookie_name, token, affinity.ttl)

    def describe(self) -> list[dict[str, object]]:
        """The candidate backends with their weights and share, for explain and /config."""
        raw_total = sum(max(0, b.weight) for b in self.backends)
        return [
            {
                "upstream": b.upstream,
                "weight": b.weight,
                "share": (max(0, b.weight) / raw_total) if raw_total else 0.0,
            }
            for b in self.backends
        ]

"""What a weighted rule was told to do and what it did: the words of split verification.

A dataplane observes, for each rule with more than one backend, how many of its recent
requests each Upstream got. That observation is shown in three places that must say
the same thing: `/metrics`, `/explain` and the Route's status (the `SplitObserved`
condition: "declared 90/10, observed 89.7/10.3 over the last 1000 requests"). This
module is the one spelling of it, shared by the dataplane (which observes) and the
operator (which writes statuses), so it lives in the contract. Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kanal.contract.snapshot import Backend, Snapshot

__all__ = [
    "SPLIT_OBSERVED",
    "TOLERANCE_POINTS",
    "SplitObservation",
    "SplitShare",
    "declared_weights",
    "merge_observations",
    "route_conditions",
    "split_condition",
]

SPLIT_OBSERVED = "SplitObserved"
"""The Route condition that shows observed against declared shares."""

TOLERANCE_POINTS = 5.0
"""How far (in percentage points) an observed share may stray before the condition
says False. Smooth weighted round robin is exact, so only session affinity (clients
keep their backend) or a very short window move a share this far."""

REASON_MATCHES = "ObservedMatchesDeclared"
REASON_DEVIATES = "ObservedDeviates"
REASON_NO_TRAFFIC = "NoTraffic"


@dataclass(frozen=True, slots=True)
class SplitShare:
    """One Upstream of a weighted rule: its declared weight and its observed requests."""

    upstream: str
    weight: int
    observed: int


@dataclass(frozen=True, slots=True)
class SplitObservation:
    """The requests of one weighted rule over its recent window, per Upstream."""

    route: str
    rule: int
    name: str | None
    shares: tuple[SplitShare, ...]

    @property
    def window(self) -> int:
        """How many requests the observation covers."""
        return sum(share.observed for share in self.shares)

    def declared_share(self, share: SplitShare) -> float:
        """The share (0..1) the weights promise an Upstream."""
        total = sum(max(0, s.weight) for s in self.shares)
        return max(0, share.weight) / total if total else 0.0

    def observed_share(self, share: SplitShare) -> float | None:
        """The share (0..1) an Upstream got in the window; None before any request."""
        window = self.window
        return share.observed / window if window else None

    def deviation(self) -> float:
        """The largest gap between observed and declared, in percentage points."""
        worst = 0.0
        for share in self.shares:
            observed = self.observed_share(share)
            if observed is not None:
                worst = max(worst, abs(observed - self.declared_share(share)) * 100)
        return worst

    def message(self) -> str:
        """`declared 90/10, observed 89.7/10.3 over the last 1000 requests (a/b)`."""
        declared = "/".join(_percent(self.declared_share(s) * 100) for s in self.shares)
        names = "/".join(share.upstream for share in self.shares)
        window = self.window
        if not window:
            return f"declared {declared} ({names}), no requests observed yet"
        observed = "/".join(f"{(s.observed / window) * 100:.1f}" for s in self.shares)
        noun = "request" if window == 1 else "requests"
        return f"declared {declared}, observed {observed} over the last {window} {noun} ({names})"

    def to_dict(self) -> dict[str, Any]:
        """The wire and JSON form (camelCase, like the resources)."""
        window = self.window
        return {
            "route": self.route,
            "rule": self.rule,
            "name": self.name,
            "window": window,
            "backends": [
                {
                    "upstream": share.upstream,
                    "weight": share.weight,
                    "declaredShare": self.declared_share(share),
                    "observedShare": self.observed_share(share),
                    "observed": share.observed,
                }
                for share in self.shares
            ],
            "message": self.message(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SplitObservation:
        """Read `to_dict`'s form back; raises ValueError on anything else."""
        try:
            shares = tuple(
                SplitShare(str(b["upstream"]), int(b["weight"]), int(b["observed"]))
                for b in data["backends"]
            )
            name = data.get("name")
            return cls(str(data["route"]), int(data["rule"]),
                       None if name is None else str(name), shares)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a split observation: {exc}") from None


def _percent(value: float) -> str:
    """90 for 90.0, 33.3 for 33.333: declared shares as a user wrote them."""
    rounded = round(value, 1)
    return str(int(rounded)) if rounded == int(rounded) else f"{rounded:.1f}"


def declared_weights(backends: Iterable[Backend]) -> tuple[tuple[str, int], ...]:
    """(Upstream, weight) of a rule's backends, one entry per Upstream (weights summed,
    negative as 0): what an observation is compared with, on both planes."""
    weights: dict[str, int] = {}
    for backend in backends:
        weights[backend.upstream] = weights.get(backend.upstream, 0) + max(0, backend.weight)
    return tuple(weights.items())


def route_conditions(
    snapshot: Snapshot, reports: Iterable[tuple[str, Iterable[SplitObservation]]]
) -> dict[str, dict[str, Any]]:
    """The SplitObserved condition of each Route, from (dataplane, observations) reports.

    Only observations of a rule's current weights count (a dataplane still on the
    previous version reports another declaration); the windows of every dataplane that
    reported on a Route are summed, and the message says how many they were.
    """
    current: dict[tuple[str, int], tuple[tuple[str, int], ...]] = {}
    for route in snapshot.routes:
        for rule in route.rules:
            if len({backend.upstream for backend in rule.backends}) > 1:
                current[(route.key, rule.index)] = declared_weights(rule.backends)
    kept: list[SplitObservation] = []
    planes: dict[str, set[str]] = {}
    for dataplane, observations in reports:
        for observation in observations:
            declared = tuple((s.upstream, s.weight) for s in observation.shares)
            if current.get((observation.route, observation.rule)) == declared:
                kept.append(observation)
                planes.setdefault(observation.route, set()).add(dataplane)
    by_route: dict[str, list[SplitObservation]] = {}
    for observation in merge_observations(kept):
        by_route.setdefault(observation.route, []).append(observation)
    found: dict[str, dict[str, Any]] = {}
    for route_key, observations in by_route.items():
        condition = split_condition(observations, dataplanes=len(planes[route_key]))
        if condition is not None:
            found[route_key] = condition
    return found


def merge_observations(observations: Iterable[SplitObservation]) -> list[SplitObservation]:
    """The observations of several dataplanes, summed per rule and Upstream.

    Only observations of the same declaration add up (a dataplane still on the weights
    before a change reports another split), so each (route, rule, weights) is one entry.
    """
    merged: dict[tuple[str, int, tuple[tuple[str, int], ...]], dict[str, int]] = {}
    names: dict[tuple[str, int, tuple[tuple[str, int], ...]], str | None] = {}
    for observation in observations:
        declared = tuple((s.upstream, s.weight) for s in observation.shares)
        key = (observation.route, observation.rule, declared)
        counts = merged.setdefault(key, dict.fromkeys((up for up, _ in declared), 0))
        names[key] = observation.name
        for share in observation.shares:
            counts[share.upstream] += share.observed
    return [
        SplitObservation(route, rule, names[(route, rule, declared)],
                         tuple(SplitShare(up, weight, counts[up]) for up, weight in declared))
        for (route, rule, declared), counts in merged.items()
    ]


def split_condition(observations: Iterable[SplitObservation],
                    dataplanes: int | None = None) -> dict[str, Any] | None:
    """The `SplitObserved` condition of one Route (None: it has no weighted rule).

    True when every observed share is within `TOLERANCE_POINTS` of its declared share,
    False when one strays further, Unknown while no request was observed. With several
    weighted rules, the message names each one; `dataplanes` (the operator's count of
    reporting dataplanes whose windows were summed) is said at the end.
    """
    found = sorted(observations, key=lambda o: o.rule)
    if not found:
        return None
    parts = []
    for observation in found:
        label = f"rule {observation.rule}"
        if observation.name:
            label += f" ({observation.name})"
        parts.append(observation.message() if len(found) == 1
                     else f"{label}: {observation.message()}")
    message = "; ".join(parts)
    if dataplanes is not None:
        message += f" on {dataplanes} dataplane" + ("" if dataplanes == 1 else "s")
    if all(o.window == 0 for o in found):
        status, reason = "Unknown", REASON_NO_TRAFFIC
    elif any(o.window and o.deviation() > TOLERANCE_POINTS for o in found):
        status, reason = "False", REASON_DEVIATES
    else:
        status, reason = "True", REASON_MATCHES
    return {"type": SPLIT_OBSERVED, "status": status, "reason": reason, "message": message}

"""The dashboard over `kanal run --workers N`: the workers' views made one. Pure.

Each worker serves its own dashboard data (`/ui/state.json`, `kanal.dataplane.dashview`)
from its own requests, endpoints and split windows. The group's admin address shows
what the group does: request and error counts and rates summed, requests in flight
summed, split observations summed per Upstream (so a group share is weighted by the
workers' windows, as `splitmerge` does for `/metrics`), recent errors of every worker
merged newest first, and an endpoint or circuit that is bad in one worker shown bad
(with the number of workers that say so). Configuration and routes are the same in
every worker: they are taken from the first view.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from kanal.contract.splits import SplitObservation, merge_observations

__all__ = ["merge_views"]

RECENT_ERRORS = 50
"""Recent errors kept after the merge (as many as one worker keeps)."""

_HEALTH_ORDER = ("unhealthy", "unknown", "healthy")
_CIRCUIT_ORDER = ("open", "half-open", "closed")


def merge_views(views: Sequence[Mapping[str, Any]], workers: int) -> dict[str, Any]:
    """One dashboard view from the views of the workers that answered (`workers`: how
    many there are). The result has the form of one worker's view, plus `workers`:
    {"answered": n, "total": workers}."""
    if not views:
        return {"version": None, "appliedAt": None, "generatedAt": None, "routes": [],
                "upstreams": [], "splits": [], "recentErrors": [],
                "workers": {"answered": 0, "total": workers}}
    merged = copy.deepcopy(dict(views[0]))
    merged["generatedAt"] = max(str(view.get("generatedAt") or "") for view in views) or None
    merged["workers"] = {"answered": len(views), "total": workers}
    observations = _merged_splits(views)
    merged["splits"] = [o.to_dict() for o in observations]
    by_rule = {(o.route, o.rule, _declared_of(o)): o for o in observations}
    routes = {route["key"]: route for route in merged.get("routes") or []}
    for view in views[1:]:
        for route in view.get("routes") or []:
            mine = routes.get(route["key"])
            if mine is None:
                continue  # a route only another configuration version has
            for name in ("requests", "errors"):
                mine[name] = int(mine.get(name) or 0) + int(route.get(name) or 0)
            for name in ("requestRate", "errorRate"):
                mine[name] = _sum_rates(mine.get(name), route.get(name))
    for route in routes.values():
        for rule in route.get("rules") or []:
            declared = _declared(rule.get("backends") or [])
            observation = by_rule.get((route["key"], rule["index"], declared))
            if observation is None:
                continue
            shares = {share.upstream: share for share in observation.shares}
            for backend in rule["backends"]:
                share = shares.get(backend["upstream"])
                backend["observedShare"] = (observation.observed_share(share)
                                            if share is not None else None)
            rule["split"] = observation.message()
    merged["upstreams"] = _merged_upstreams(views)
    errors = [entry for view in views for entry in view.get("recentErrors") or []]
    errors.sort(key=lambda entry: str(entry.get("at", "")), reverse=True)  # stable: each
    merged["recentErrors"] = errors[:RECENT_ERRORS]  # worker's own order kept within a second
    return merged


def _sum_rates(mine: Any, theirs: Any) -> float | None:
    """A group rate is known once every worker's is (a worker's first read has none)."""
    if mine is None or theirs is None:
        return None
    return float(mine) + float(theirs)


def _declared(backends: Sequence[Mapping[str, Any]]) -> tuple[tuple[str, int], ...]:
    """A rule's (Upstream, weight) as observations declare them (`declared_weights`)."""
    weights: dict[str, int] = {}
    for backend in backends:
        upstream = str(backend["upstream"])
        weights[upstream] = weights.get(upstream, 0) + max(0, int(backend["weight"]))
    return tuple(weights.items())


def _declared_of(observation: SplitObservation) -> tuple[tuple[str, int], ...]:
    return tuple((share.upstream, share.weight) for share in observation.shares)


def _merged_splits(views: Sequence[Mapping[str, Any]]) -> list[SplitObservation]:
    found = []
    for view in views:
        for split in view.get("splits") or []:
            try:
                found.append(SplitObservation.from_dict(split))
            except ValueError:
                continue
    return merge_observations(found)


def _merged_upstreams(views: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    seen: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for view in views:
        for upstream in view.get("upstreams") or []:
            key = upstream["key"]
            if key not in merged:
                merged[key] = {**upstream, "endpoints": []}
            for endpoint in upstream.get("endpoints") or []:
                states = seen.setdefault((key, endpoint["address"]), [])
                if not states:
                    merged[key]["endpoints"].append(dict(endpoint))
                states.append(endpoint)
    for key, upstream in merged.items():
        for endpoint in upstream["endpoints"]:
            states = seen[(key, endpoint["address"])]
            endpoint["activeRequests"] = sum(int(s.get("activeRequests") or 0) for s in states)
            endpoint["health"] = _worst([str(s["health"]) for s in states], _HEALTH_ORDER)
            endpoint["circuit"] = _worst([str(s["circuit"]) for s in states], _CIRCUIT_ORDER)
            if len(states) > 1:
                endpoint["workers"] = {
                    "healthy": sum(1 for s in states if s["health"] == "healthy"),
                    "circuitClosed": sum(1 for s in states if s["circuit"] == "closed"),
                    "total": len(states)}
    return [merged[key] for key in sorted(merged)]


def _worst(values: Sequence[str], order: Sequence[str]) -> str:
    """The value earliest in `order` (unknown values first of all)."""
    rank = {value: position for position, value in enumerate(order)}
    return min(values, key=lambda value: rank.get(value, -1))

"""Split verification: the observed share of each backend of a weighted rule, over its
last requests, next to the declared weight.

The hot path only counts (`Split.chosen`, one dict increment per request of a rule
with more than one backend). Everything else happens here, when someone looks
(`/metrics`, `/explain`, `/config`, the dashboard) or on the admin's one-second tick:

- The window. Each read keeps a checkpoint of the cumulative counts (one per
  `window // 20` requests at most, so the list stays short); an observation is the
  difference between now and the newest checkpoint at least `window` requests back,
  or since the rule was first seen when it has had fewer. So it covers the last
  `window` requests give or take a twentieth (plus what arrived between two reads),
  and says how many it covers: the number shown is exact.
- Reloads. A Split is rebuilt with every Snapshot. A rule whose backends and weights
  are unchanged keeps its window across the rebuild (the counts of the old Split carry
  over); a rule whose weights change starts a new window, because the old shares
  answered another declaration.

Pure: no I/O, no clock. The admin app ticks it and reads it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from kanal.contract.splits import (
    SplitObservation,
    SplitShare,
    declared_weights,
    split_condition,
)
from kanal.dataplane.router import RouteTable, Selection
from kanal.dataplane.split import Split

if TYPE_CHECKING:
    from prometheus_client.core import Metric

__all__ = ["WINDOW", "SplitCollector", "SplitWatch"]

WINDOW = 1000
"""Requests per rule an observation covers (give or take `WINDOW // 20`)."""

Declared = tuple[tuple[str, int], ...]


def _declared(split: Split) -> Declared:
    """(Upstream, weight) of a Split's backends, one entry per Upstream (weights summed)."""
    return declared_weights(split.backends)


class _RuleWatch:
    """One weighted rule: its Split now, counts carried from earlier Splits, checkpoints."""

    __slots__ = ("base", "checkpoints", "declared", "name", "route", "rule", "split")

    def __init__(self, selection: Selection, declared: Declared) -> None:
        self.route = selection.route_key
        self.rule = selection.rule.index
        self.name = selection.rule.name
        self.declared = declared
        self.split = selection.split
        self.base: dict[str, int] = dict.fromkeys((up for up, _ in declared), 0)
        self.checkpoints: list[tuple[int, dict[str, int]]] = [(0, dict(self.base))]

    def totals(self) -> dict[str, int]:
        """Requests per Upstream since the rule was first seen with these weights."""
        chosen = self.split.chosen or {}
        return {up: self.base[up] + chosen.get(up, 0) for up, _ in self.declared}

    def adopt(self, selection: Selection) -> None:
        """Carry the counts over to the Split of a new Snapshot (same weights)."""
        if selection.split is self.split:
            return
        self.base = self.totals()
        self.split = selection.split
        self.name = selection.rule.name

    def observe(self, window: int) -> SplitObservation:
        now = self.totals()
        total = sum(now.values())
        checkpoints = self.checkpoints
        start = 0
        for index, (count, _) in enumerate(checkpoints):
            if total - count < window:
                break
            start = index
        if start:
            del checkpoints[:start]
        _, first = checkpoints[0]
        if total - checkpoints[-1][0] >= max(1, window // 20):
            checkpoints.append((total, now))
        shares = tuple(
            SplitShare(up, weight, now[up] - first.get(up, 0)) for up, weight in self.declared
        )
        return SplitObservation(self.route, self.rule, self.name, shares)


class SplitWatch:
    """The weighted rules of the applied configuration and their windows."""

    def __init__(self, window: int = WINDOW) -> None:
        if window < 1:
            raise ValueError("the split window must hold at least one request")
        self.window = window
        self._rules: dict[tuple[str, int], _RuleWatch] = {}

    def follow(self, table: RouteTable) -> None:
        """Watch the weighted rules of a newly applied route table."""
        rules: dict[tuple[str, int], _RuleWatch] = {}
        for selection in table.selections():
            split = selection.split
            if split.chosen is None:
                continue
            key = (selection.route_key, selection.rule.index)
            declared = _declared(split)
            watch = self._rules.get(key)
            if watch is not None and watch.declared == declared:
                watch.adopt(selection)
            else:
                watch = _RuleWatch(selection, declared)
            rules[key] = watch
        self._rules = rules

    def observations(self) -> list[SplitObservation]:
        """Every weighted rule's observation now (also keeps the windows moving)."""
        return [watch.observe(self.window) for watch in self._rules.values()]

    def observation(self, route: str, rule: int) -> SplitObservation | None:
        watch = self._rules.get((route, rule))
        return watch.observe(self.window) if watch is not None else None

    def totals(self) -> Iterator[tuple[str, int, str, int]]:
        """(route, rule, upstream, requests since first seen with these weights)."""
        for watch in self._rules.values():
            for upstream, count in watch.totals().items():
                yield watch.route, watch.rule, upstream, count

    def conditions(self) -> dict[str, dict[str, object]]:
        """The `SplitObserved` condition of each Route with a weighted rule."""
        by_route: dict[str, list[SplitObservation]] = {}
        for observation in self.observations():
            by_route.setdefault(observation.route, []).append(observation)
        found: dict[str, dict[str, object]] = {}
        for route, observations in by_route.items():
            condition = split_condition(observations)
            if condition is not None:
                found[route] = condition
        return found


class SplitCollector:
    """Prometheus families for split verification, read from a SplitWatch at scrape time."""

    def __init__(self, watch: SplitWatch) -> None:
        self.watch = watch

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        labels = ["route", "rule", "upstream"]
        declared = GaugeMetricFamily(
            "kanal_split_declared_weight", "The weight a weighted rule gives each upstream",
            labels=labels)
        declared_share = GaugeMetricFamily(
            "kanal_split_declared_share", "The share (0..1) the weights promise each upstream",
            labels=labels)
        observed = GaugeMetricFamily(
            "kanal_split_observed_share",
            "The share (0..1) each upstream got of the rule's last requests "
            "(kanal_split_window_requests of them)", labels=labels)
        window = GaugeMetricFamily(
            "kanal_split_window_requests",
            "How many of a weighted rule's last requests the observed shares cover",
            labels=["route", "rule"])
        for observation in self.watch.observations():
            rule = str(observation.rule)
            window.add_metric([observation.route, rule], observation.window)
            for share in observation.shares:
                key = [observation.route, rule, share.upstream]
                declared.add_metric(key, share.weight)
                declared_share.add_metric(key, observation.declared_share(share))
                seen = observation.observed_share(share)
                if seen is not None:
                    observed.add_metric(key, seen)
        choices = CounterMetricFamily(
            "kanal_split_choices",
            "Requests a weighted rule sent to each upstream since it has had these weights",
            labels=labels)
        for route, rule_index, upstream, count in self.watch.totals():
            choices.add_metric([route, str(rule_index), upstream], count)
        yield declared
        yield declared_share
        yield observed
        yield window
        yield choices


def explain_with_split(answer: dict[str, object], watch: SplitWatch) -> dict[str, object]:
    """An /explain answer with the chosen rule's observed shares beside its weights.

    Each candidate backend gets `observedShare` (None before any request) and
    `observed` (its requests in the window); `split` carries the whole observation
    and its sentence. Rules with one backend are left as they are.
    """
    route, rule = answer.get("route"), answer.get("rule")
    if not isinstance(route, str) or not isinstance(rule, dict):
        return answer
    index = rule.get("index")
    observation = watch.observation(route, index) if isinstance(index, int) else None
    if observation is None:
        return answer
    by_upstream = {share.upstream: share for share in observation.shares}
    backends = answer.get("backends")
    if isinstance(backends, list):
        for backend in backends:
            share = by_upstream.get(str(backend.get("upstream")))
            if share is not None:
                backend["observedShare"] = observation.observed_share(share)
                backend["observed"] = share.observed
    return {**answer, "split": observation.to_dict()}


def routes_with_status(routes: list[dict[str, object]], watch: SplitWatch) -> None:
    """Give each Route of a /config document with a weighted rule its `status`, as the
    operator writes it on the resource: the `SplitObserved` condition (in place)."""
    conditions = watch.conditions()
    for route in routes:
        condition = conditions.get(str(route.get("key")))
        if condition is not None:
            route["status"] = {"conditions": [condition]}

"""Refusals of access policies, counted by rule, policy and reason; shown on /metrics."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client.core import Metric

REFUSALS: dict[tuple[str, str, str], int] = {}
"""(rule's policy name, policy kind, reason) -> refusals, for this process."""


REDIS_FAILURES = [0]
"""Calls to the rate-limit Redis that failed (a one-cell list: mutable, no global)."""


def count_redis_failure() -> None:
    REDIS_FAILURES[0] += 1


def count_refusal(name: str, policy: str, cause: str) -> None:
    key = (name, policy, cause)
    REFUSALS[key] = REFUSALS.get(key, 0) + 1


class AccessCollector:
    """A prometheus_client collector of `REFUSALS`, read at scrape time."""

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(
            "kanal_access_refused", "Requests refused by access policies, by rule, policy "
            "and reason", labels=["rule", "policy", "reason"])
        for (name, policy, cause), count in sorted(REFUSALS.items()):
            family.add_metric([name, policy, cause], count)
        yield family
        failures = CounterMetricFamily(
            "kanal_ratelimit_redis_failures", "Calls to the rate-limit Redis that failed "
            "(failureMode applied)")
        failures.add_metric([], REDIS_FAILURES[0])
        yield failures

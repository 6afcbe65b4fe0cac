"""Split verification over `kanal run --workers N`: what the group's `/metrics` says.

Each worker observes its own requests. Counters (`kanal_split_choices_total`) and
window sizes add up over the workers like every other sample, but shares do not: the
group's observed share is the workers' shares weighted by their windows (which is the
share over all their windows together), and a declared weight or share is the same in
every worker, so it is said once.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["merged_split_samples"]

OBSERVED = "kanal_split_observed_share"
WINDOW = "kanal_split_window_requests"
DECLARED = frozenset({"kanal_split_declared_weight", "kanal_split_declared_share"})

SampleKey = tuple[str, str, tuple[tuple[str, str], ...]]


def merged_split_samples(texts: Iterable[str]) -> dict[SampleKey, float]:
    """The split samples of several workers' `/metrics` that must not be summed,
    keyed as `supervisor.merge_metrics` keys samples (family, sample, sorted labels)."""
    weighted: dict[SampleKey, float] = {}
    windows: dict[SampleKey, float] = {}
    found: dict[SampleKey, float] = {}
    for text in texts:
        families = list(text_string_to_metric_families(text))
        window_of: dict[tuple[str, str], float] = {}
        for family in families:
            if family.name == WINDOW:
                for sample in family.samples:
                    window_of[(sample.labels["route"], sample.labels["rule"])] = sample.value
        for family in families:
            if family.name != OBSERVED and family.name not in DECLARED:
                continue
            for sample in family.samples:
                key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                if family.name in DECLARED:
                    found[key] = sample.value
                    continue
                window = window_of.get((sample.labels["route"], sample.labels["rule"]), 0.0)
                weighted[key] = weighted.get(key, 0.0) + sample.value * window
                windows[key] = windows.get(key, 0.0) + window
    for key, total in windows.items():
        if total > 0:
            found[key] = weighted[key] / total
    return found

"""Overload on memory (`--overload-memory`): while the process's resident memory is
above the threshold, new requests are answered 503 with `Connection: close`, as by
Envoy's overload manager (`stop_accepting_requests`); below it again, service is normal.

The resident size is sampled once a second by the housekeeping task (`check`), from
`/proc/self/statm`; a request reads one bool (`ProxyContext.overloaded`), set on every
listener's context when the state changes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from kanal.dataplane.runtime import Runtime

log = logging.getLogger("kanal.overload")

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int | None:
    """This process's resident memory, or None where /proc cannot tell it."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            fields = statm.read().split()
        return int(fields[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


def check(runtime: Runtime) -> None:
    """Sample the resident memory and tell every listener of the process."""
    overload = runtime.overload
    if overload is None:
        return
    resident = resident_bytes()
    if resident is None or not overload.update(resident):
        return
    if overload.active:
        log.warning("resident memory %d MiB is above --overload-memory (%d MiB): new "
                    "requests are answered 503", resident >> 20, overload.threshold >> 20)
    else:
        log.info("resident memory %d MiB is below --overload-memory again: serving",
                 resident >> 20)
    for each in (runtime, *runtime.companions):
        for context in each.contexts:
            context.overloaded = overload.active


class OverloadCollector:
    """A prometheus_client collector: the overload state and the requests it refused."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        overload = self.runtime.overload
        active = GaugeMetricFamily(
            "kanal_overload_active",
            "1 while new requests are refused because of overload, by resource",
            labels=["resource"])
        refused = CounterMetricFamily(
            "kanal_overload_refused_requests",
            "Requests answered 503 because the process was overloaded, by resource",
            labels=["resource"])
        resident = GaugeMetricFamily(
            "kanal_resident_memory_bytes",
            "The process's resident memory at the last sample of --overload-memory")
        if overload is not None:
            active.add_metric(["memory"], 1 if overload.active else 0)
            refused.add_metric(["memory"], self.runtime.metrics.overload_refused)
            resident.add_metric([], overload.resident)
        yield active
        yield refused
        if overload is not None:
            yield resident

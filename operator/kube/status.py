"""The status writer: conditions from the compiler (and the Publisher) into the cluster.

For every Route, Upstream and EgressPolicy the store holds, the wanted `status` is the
compiler's conditions (`Accepted`, `ResolvedRefs`; rejected objects get
`conditions.rejected_status`), each with `observedGeneration`, plus `status.endpoints`
on Upstreams and `Programmed` on Routes ("N of M dataplanes at version V"), and
`SplitObserved` on accepted Routes with a weighted rule that dataplanes reported on
(`kanal.contract.splits`: "declared 90/10, observed 89.7/10.3 over the last N requests").

A condition keeps its `lastTransitionTime` while its `status` stays the same (a new
message or reason alone is not a transition). An object is patched only when what it
would show differs from what it shows (or what this writer last wrote, while the
watch has not brought that back yet), so a rebuild that changes nothing writes nothing.

A rejection (Accepted False) also raises a Warning Event on the object, once per
distinct message. The writer posts it itself: kopf's `kopf.warn` works only inside a
handler, and statuses are written by the debounced builder, outside any handler.
"""

from __future__ import annotations

import datetime
import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from kanal.operator.compiler import CompileResult
from kanal.operator.conditions import ACCEPTED, PROGRAMMED, REASON_NOT_ACCEPTED, ObjectStatus
from kanal.operator.kube.client import KubeClient, KubeError
from kanal.operator.kube.store import KanalEntry, Store
from kanal.operator.models import GROUP, RESOURCES, VERSION

log = logging.getLogger("kanal.operator.status")

REASON_PROGRAMMED = "Programmed"
REASON_PENDING = "Pending"

COMPONENT = "kanal-operator"


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


async def post_warning(client: KubeClient, ref: Mapping[str, Any], reason: str,
                       message: str) -> None:
    """A Warning Event on the object, as `kubectl describe` shows them."""
    meta = ref.get("metadata") or {}
    namespace, name = meta.get("namespace") or "default", meta.get("name")
    now = utc_now()
    involved = {"apiVersion": ref.get("apiVersion"), "kind": ref.get("kind"),
                "namespace": namespace, "name": name}
    if meta.get("uid"):
        involved["uid"] = meta["uid"]
    await client.post(f"/api/v1/namespaces/{namespace}/events", {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{name}.", "namespace": namespace},
        "involvedObject": involved,
        "type": "Warning", "reason": reason, "message": message[:1024],
        "source": {"component": COMPONENT}, "reportingComponent": COMPONENT,
        "reportingInstance": socket.gethostname(),
        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
    })


@dataclass(frozen=True, slots=True)
class Programmed:
    """What the Publisher says about the current version."""

    version: str
    acked: int
    total: int
    refused: tuple[tuple[str, str], ...] = ()
    """(dataplane, error) of the dataplanes that NACKed this version."""

    def condition(self, generation: int | None) -> dict[str, Any]:
        message = f"{self.acked} of {self.total} dataplanes at version {self.version}"
        if self.refused:
            dataplane, error = self.refused[0]
            message += f"; {len(self.refused)} refused it ({dataplane}: {error})"
        if self.total == 0:
            status, reason = "Unknown", REASON_PENDING
        elif self.acked >= self.total:
            status, reason = "True", REASON_PROGRAMMED
        else:
            status, reason = "False", REASON_PENDING
        return _condition(PROGRAMMED, status, reason, message, generation)


def _condition(type_: str, status: str, reason: str, message: str,
               generation: int | None) -> dict[str, Any]:
    data: dict[str, Any] = {"type": type_, "status": status, "reason": reason,
                            "message": message}
    if generation is not None:
        data["observedGeneration"] = generation
    return data


def wanted_status(status: ObjectStatus, programmed: Programmed | None,
                  generation: int | None,
                  split: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The `status` body for one object, without transition times (`split`: the
    Route's SplitObserved condition, if its dataplanes reported one)."""
    conditions = [condition.to_dict() for condition in status.conditions]
    if status.kind == "Route":
        accepted = status.condition(ACCEPTED)
        if accepted is None or accepted.status != "True":
            conditions.append(_condition(PROGRAMMED, "False", REASON_NOT_ACCEPTED,
                                         "the Route is not accepted", generation))
        elif programmed is not None:
            conditions.append(programmed.condition(generation))
        if split is not None and accepted is not None and accepted.status == "True":
            conditions.append(_condition(split["type"], split["status"], split["reason"],
                                         split["message"], generation))
    body: dict[str, Any] = {"conditions": conditions}
    if status.endpoints is not None:
        body["endpoints"] = status.endpoints.to_dict()
    return body


def with_transition_times(wanted: Mapping[str, Any], known: Mapping[str, Any] | None,
                          now: str) -> dict[str, Any]:
    """`wanted` with each condition's lastTransitionTime: kept unless its status changed."""
    before: dict[str, Mapping[str, Any]] = {}
    for condition in (known or {}).get("conditions") or ():
        if isinstance(condition, Mapping) and isinstance(condition.get("type"), str):
            before[condition["type"]] = condition
    conditions = []
    for condition in wanted["conditions"]:
        old = before.get(condition["type"])
        stamp = now
        if old is not None and old.get("status") == condition["status"] \
                and isinstance(old.get("lastTransitionTime"), str):
            stamp = old["lastTransitionTime"]
        conditions.append({**condition, "lastTransitionTime": stamp})
    return {**wanted, "conditions": conditions}


def _shown(status: Mapping[str, Any] | None) -> dict[str, Any]:
    """The part of a status this writer owns, for comparison."""
    status = status or {}
    shown: dict[str, Any] = {"conditions": list(status.get("conditions") or [])}
    if "endpoints" in status:
        shown["endpoints"] = status["endpoints"]
    return shown


def status_path(kind: str, namespace: str, name: str) -> str:
    plural = RESOURCES[kind].plural
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{plural}/{name}/status"


@dataclass
class StatusWriter:
    client: KubeClient
    store: Store
    now: Callable[[], str] = utc_now
    patches: int = 0
    _written: dict[tuple[str, str], tuple[str | None, dict[str, Any]]] = field(
        default_factory=dict)
    _warned: dict[tuple[str, str], tuple[str | None, str]] = field(default_factory=dict)

    def forget_written(self) -> None:
        """Compare with the statuses the watch shows, not with what this writer wrote."""
        self._written.clear()

    async def write(self, result: CompileResult, programmed: Programmed | None,
                    splits: Mapping[str, Mapping[str, Any]] | None = None) -> int:
        """Patch every object whose status differs; returns how many were patched.

        `splits`: the SplitObserved condition of each Route (by key) that has one.

        Objects deleted meanwhile are skipped. Other API errors are raised after every
        object has been tried, so the caller retries later.
        """
        failures: list[str] = []
        patched = 0
        live = set()
        for entry in list(self.store.entries()):
            identity = (entry.kind, entry.key)
            live.add(identity)
            status = result.status(entry.kind, entry.key)
            if status is None:
                continue
            await self._maybe_warn(entry, status)
            try:
                split = splits.get(entry.key) if splits and entry.kind == "Route" else None
                if await self._write_one(entry, status, programmed, split):
                    patched += 1
            except KubeError as exc:
                if exc.status == 404:
                    continue
                failures.append(f"{entry.kind} {entry.key}: {exc}")
        for gone in set(self._written) - live:
            del self._written[gone]
        for gone in set(self._warned) - live:
            del self._warned[gone]
        self.patches += patched
        if failures:
            raise RuntimeError("status patches failed: " + "; ".join(failures))
        return patched

    async def _write_one(self, entry: KanalEntry, status: ObjectStatus,
                         programmed: Programmed | None,
                         split: Mapping[str, Any] | None = None) -> bool:
        identity = (entry.kind, entry.key)
        uid = entry.ref.get("metadata", {}).get("uid")
        wanted = wanted_status(status, programmed, entry.generation, split)
        written = self._written.get(identity)
        known: Mapping[str, Any] | None = entry.status
        if written is not None and written[0] == uid:
            known = written[1]
        full = with_transition_times(wanted, known, self.now())
        if _shown(known) == full:
            return False
        namespace, name = entry.key.split("/", 1)
        await self.client.merge_patch(status_path(entry.kind, namespace, name),
                                      {"status": full})
        self._written[identity] = (uid, full)
        return True

    async def _maybe_warn(self, entry: KanalEntry, status: ObjectStatus) -> None:
        accepted = status.condition(ACCEPTED)
        if accepted is None or accepted.status == "True":
            self._warned.pop((entry.kind, entry.key), None)
            return
        uid = entry.ref.get("metadata", {}).get("uid")
        mark = (uid, accepted.message)
        if self._warned.get((entry.kind, entry.key)) == mark:
            return
        self._warned[(entry.kind, entry.key)] = mark
        log.warning("%s %s rejected: %s", entry.kind, entry.key, accepted.message)
        try:
            await post_warning(self.client, entry.ref, accepted.reason, accepted.message)
        except (KubeError, OSError, aiohttp.ClientError) as exc:
            log.warning("could not post an Event for %s %s: %s", entry.kind, entry.key, exc)

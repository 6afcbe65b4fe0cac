"""Replicas of `kanal operator`: one leader writes status, all count the same dataplanes.

Every replica lists, watches, compiles and publishes (the compiler is deterministic, so
replicas serve the same bytes and version) and serves any dataplane that subscribes to
it. Two things need one replica or all of them:

- **Status is written by one replica**, the holder of a coordination.k8s.io Lease
  (`LeaderElector`, the algorithm of client-go's leaderelection): a replica takes the
  Lease when it is free, or when its holder has not renewed it for `leaseDurationSeconds`
  as this replica observed it (monotonic time, so clocks need not agree). The leader
  renews every `retry_period`, and stops writing once it could not renew for two thirds
  of the lease duration, before anyone else may take over. A replica that stops cleanly
  hands the Lease back at once; a killed one is replaced after the lease duration.
- **`Programmed` and `SplitObserved` count every replica's dataplanes**
  (`DataplaneRecords`): each replica keeps one annotation on a second Lease
  (`<name>-dataplanes`) holding {dataplane id: acked version, refused version and
  error, last seen, last split report}, rewritten when an ACK arrives or (at most every
  `retry_period`) when a report changed it, and renewed every third of the lease
  duration. Every replica reads them
  every `retry_period` (so a new leader counts right at once); the leader drops a replica's records once they are older than the lease duration
  (by their wall-clock stamp or by this replica's own observation, whichever says so
  first), and counts each dataplane id once (its freshest record): "N of M" is the same
  whichever replica writes it. Dataplane ids must therefore be unique.

Both Leases live in the operator's namespace; the chart grants `create` on leases and
`get`, `update`, `patch` on those two names only.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import json
import logging
import math
import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from kanal.contract.splits import SplitObservation, SplitShare
from kanal.operator.kube.client import KubeClient, KubeError

log = logging.getLogger("kanal.operator.election")

LEASES = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
RECORD_PREFIX = "dataplanes.kanal.dev/"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
ERROR_CHARS = 200
"""A refused version's error is cut to this length in the shared records."""
SPLITS_PER_DATAPLANE = 100
"""Weighted rules of one dataplane carried in the shared records at most (those with
the largest windows): every replica's records share one object's 256 KiB of annotations."""

API_ERRORS = (KubeError, aiohttp.ClientError, OSError, asyncio.TimeoutError)


def _truthy(text: str | None) -> bool:
    return (text or "").strip().lower() in ("1", "true", "yes", "on")


def micro_time(wall: float) -> str:
    """A Kubernetes MicroTime: RFC 3339 with microseconds, UTC."""
    stamp = datetime.datetime.fromtimestamp(wall, datetime.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: Any) -> float | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class ElectionSettings:
    """Where the Leases are, who this replica is, and how long a lease lasts."""

    namespace: str
    name: str
    identity: str
    lease_duration: float = 6.0
    retry_period: float = 1.0

    def __post_init__(self) -> None:
        if self.lease_duration < 1 or self.retry_period <= 0 \
                or self.retry_period * 2 > self.lease_duration:
            raise ValueError("the lease duration must be at least 1 s and twice the retry "
                             f"period (got {self.lease_duration} s and {self.retry_period} s)")

    @property
    def records_name(self) -> str:
        return f"{self.name}-dataplanes"

    @property
    def renew_deadline(self) -> float:
        """A leader that could not renew for this long stops acting as one."""
        return self.lease_duration * 2 / 3

    @property
    def records_interval(self) -> float:
        return self.lease_duration / 3

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ElectionSettings | None:
        """KANAL_LEADER_ELECTION=true turns it on; None when it is off.

        KANAL_LEASE_NAME (default kanal-operator), KANAL_LEASE_NAMESPACE (default
        $POD_NAMESPACE, else the pod's service-account namespace, else `default`),
        KANAL_LEASE_DURATION in seconds (default 6; the retry period is a sixth of it),
        KANAL_IDENTITY (default $POD_NAME, else host name and process id).
        """
        env = os.environ if environ is None else environ
        if not _truthy(env.get("KANAL_LEADER_ELECTION")):
            return None
        namespace = env.get("KANAL_LEASE_NAMESPACE") or env.get("POD_NAMESPACE")
        if not namespace and SERVICE_ACCOUNT_NAMESPACE.is_file():
            namespace = SERVICE_ACCOUNT_NAMESPACE.read_text(encoding="utf-8").strip()
        identity = env.get("KANAL_IDENTITY") or env.get("POD_NAME") \
            or f"{socket.gethostname()}-{os.getpid()}"
        duration = float(env.get("KANAL_LEASE_DURATION") or 6.0)
        return cls(namespace=namespace or "default",
                   name=env.get("KANAL_LEASE_NAME") or "kanal-operator",
                   identity=identity, lease_duration=duration,
                   retry_period=duration / 6)


def _lease(settings: ElectionSettings, name: str, spec: Mapping[str, Any],
           resource_version: str | None = None,
           annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": settings.namespace,
                                "labels": {"app.kubernetes.io/managed-by": "kanal-operator"}}
    if resource_version is not None:
        metadata["resourceVersion"] = resource_version
    if annotations:
        metadata["annotations"] = dict(annotations)
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata,
            "spec": dict(spec)}


class LeaderElector:
    """Takes and renews the leader Lease; `is_leader` says whether to write status."""

    def __init__(self, client: KubeClient, settings: ElectionSettings, *,
                 on_change: Callable[[bool], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.settings = settings
        self.on_change = on_change
        self.clock = clock
        self.wall_clock = wall_clock
        self.holder: str | None = None
        """The holder last seen on the Lease."""
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._renewed_at: float | None = None
        self._leading = False
        self._told: bool | None = None

    @property
    def path(self) -> str:
        return f"{LEASES.format(namespace=self.settings.namespace)}/{self.settings.name}"

    @property
    def is_leader(self) -> bool:
        return (self._leading and self._renewed_at is not None
                and self.clock() - self._renewed_at < self.settings.renew_deadline)

    def _settle(self) -> bool:
        """Tell `on_change` when leadership came or went; return it."""
        leading = self.is_leader
        if leading != self._told:
            if leading:
                log.info("%s leads (Lease %s/%s)", self.settings.identity,
                         self.settings.namespace, self.settings.name)
            elif self._told:
                log.warning("%s no longer leads (Lease held by %s)", self.settings.identity,
                            self.holder or "nobody")
            self._told = leading
            if self.on_change is not None:
                self.on_change(leading)
        return leading

    def _observe(self, spec: Mapping[str, Any]) -> None:
        record = (spec.get("holderIdentity"), spec.get("renewTime"),
                  spec.get("leaseDurationSeconds"), spec.get("leaseTransitions"))
        if record != self._observed:
            self._observed, self._observed_at = record, self.clock()
        holder = spec.get("holderIdentity")
        self.holder = holder if isinstance(holder, str) and holder else None

    async def try_once(self) -> bool:
        """One round: take the Lease if it is free or expired, renew it if ours."""
        me = self.settings.identity
        wall = self.wall_clock()
        duration = math.ceil(self.settings.lease_duration)
        try:
            lease = await self.client.get(self.path)
        except KubeError as exc:
            if exc.status != 404:
                raise
            fresh = {"holderIdentity": me, "leaseDurationSeconds": duration,
                     "acquireTime": micro_time(wall), "renewTime": micro_time(wall),
                     "leaseTransitions": 0}
            try:
                created = await self.client.post(
                    LEASES.format(namespace=self.settings.namespace),
                    _lease(self.settings, self.settings.name, fresh))
            except KubeError as conflict:
                if conflict.status != 409:
                    raise
                return self._settle()  # another replica created it first
            self._observe(created.get("spec") or {})
            self._leading, self._renewed_at = True, self.clock()
            return self._settle()
        spec: dict[str, Any] = dict(lease.get("spec") or {})
        self._observe(spec)
        holder = self.holder
        if holder is not None and holder != me:
            held_for = float(spec.get("leaseDurationSeconds") or duration)
            renewed = parse_time(spec.get("renewTime"))
            # Expired as this replica saw it; or renewed long ago by any reasonable clock.
            expired = (self.clock() - self._observed_at >= held_for
                       or (renewed is not None and wall - renewed > 2 * held_for + 10))
            if not expired:
                self._leading = False
                return self._settle()
            log.info("the Lease of %s expired: %s takes over", holder, me)
        new_spec = {**spec, "holderIdentity": me, "leaseDurationSeconds": duration,
                    "renewTime": micro_time(wall)}
        if holder != me:
            new_spec["acquireTime"] = micro_time(wall)
            new_spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        body = _lease(self.settings, self.settings.name, new_spec,
                      resource_version=(lease.get("metadata") or {}).get("resourceVersion"))
        try:
            updated = await self.client.request("PUT", self.path, json=body)
        except KubeError as exc:
            if exc.status not in (404, 409):
                raise
            self._leading = False  # another replica wrote it first
            return self._settle()
        self._observe(updated.get("spec") or {})
        self._leading, self._renewed_at = True, self.clock()
        return self._settle()

    async def run(self) -> None:
        while True:
            try:
                await self.try_once()
            except API_ERRORS as exc:
                log.warning("leader election: %s", exc)
                self._settle()
            await asyncio.sleep(self.settings.retry_period)

    async def release(self) -> None:
        """Hand the Lease back (a clean stop): another replica takes it at once."""
        if not self._leading:
            return
        self._leading = False
        self._settle()
        try:
            lease = await self.client.get(self.path)
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") != self.settings.identity:
                return
            released = {key: value for key, value in spec.items() if key != "holderIdentity"}
            released.update(leaseDurationSeconds=1,
                            renewTime=micro_time(self.wall_clock()))
            await self.client.request("PUT", self.path, json=_lease(
                self.settings, self.settings.name, released,
                resource_version=(lease.get("metadata") or {}).get("resourceVersion")))
            log.info("%s released the Lease", self.settings.identity)
        except API_ERRORS as exc:
            log.warning("could not release the Lease: %s", exc)


@dataclass(frozen=True)
class DataplaneRecord:
    """What one replica knows about one dataplane, as the records carry it."""

    acked: str | None
    refused: tuple[str, str] | None
    """The last (version, error) the dataplane refused."""
    seen: float
    """Wall-clock time of its last request to that replica."""
    splits: tuple[SplitObservation, ...] = ()
    """Its last split report (what its weighted rules did lately)."""

    def to_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            "acked": self.acked, "refused": list(self.refused) if self.refused else None,
            "seen": self.seen}
        if self.splits:
            largest = sorted(self.splits, key=lambda o: -o.window)[:SPLITS_PER_DATAPLANE]
            found["splits"] = [
                [o.route, o.rule, o.name, [[s.upstream, s.weight, s.observed] for s in o.shares]]
                for o in largest]
        return found

    @classmethod
    def from_json(cls, data: Any) -> DataplaneRecord | None:
        if not isinstance(data, Mapping):
            return None
        acked, refused, seen = data.get("acked"), data.get("refused"), data.get("seen")
        if not (acked is None or isinstance(acked, str)) \
                or not isinstance(seen, int | float):
            return None
        pair: tuple[str, str] | None = None
        if isinstance(refused, list) and len(refused) == 2 \
                and all(isinstance(item, str) for item in refused):
            pair = (refused[0], refused[1])
        return cls(acked, pair, float(seen), _splits_from_json(data.get("splits")))


def _splits_from_json(data: Any) -> tuple[SplitObservation, ...]:
    """`DataplaneRecord.to_json`'s compact splits back; what does not parse is left out."""
    if not isinstance(data, list):
        return ()
    found = []
    for item in data:
        try:
            route, rule, name, shares = item
            found.append(SplitObservation(
                str(route), int(rule), None if name is None else str(name),
                tuple(SplitShare(str(up), int(weight), int(observed))
                      for up, weight, observed in shares)))
        except (TypeError, ValueError):
            continue
    return tuple(found)


def count(records: Mapping[str, DataplaneRecord], version: str
          ) -> tuple[int, int, tuple[tuple[str, str], ...]]:
    """(dataplanes at `version`, dataplanes, (id, error) of those that refused it)."""
    acked = sum(1 for record in records.values() if record.acked == version)
    refused = tuple(sorted(
        (dataplane, record.refused[1]) for dataplane, record in records.items()
        if record.refused is not None and record.refused[0] == version
        and record.acked != version))
    return acked, len(records), refused


def merge(views: Iterable[Mapping[str, DataplaneRecord]]) -> dict[str, DataplaneRecord]:
    """One record per dataplane id: the freshest (a dataplane that moved replicas)."""
    merged: dict[str, DataplaneRecord] = {}
    for view in views:
        for dataplane, record in view.items():
            known = merged.get(dataplane)
            if known is None or record.seen > known.seen:
                merged[dataplane] = record
    return dict(sorted(merged.items()))


def annotation_key(identity: str) -> str:
    """This replica's annotation: its identity when that is a valid name, else a hash."""
    if re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?", identity):
        return RECORD_PREFIX + identity
    return RECORD_PREFIX + hashlib.sha256(identity.encode()).hexdigest()[:32]


class DataplaneRecords:
    """This replica's dataplanes on the shared Lease; the other replicas' read back."""

    def __init__(self, client: KubeClient, settings: ElectionSettings,
                 local: Callable[[], Mapping[str, DataplaneRecord]], *,
                 should_prune: Callable[[], bool] = lambda: True,
                 on_change: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.settings = settings
        self.local = local
        self.should_prune = should_prune
        self.on_change = on_change
        self.clock = clock
        self.wall_clock = wall_clock
        self.key = annotation_key(settings.identity)
        self.remote: dict[str, dict[str, DataplaneRecord]] = {}
        """Fresh records of the other replicas, by annotation key."""
        self._observed: dict[str, tuple[str, float]] = {}
        self._stale: set[str] = set()
        self._written: dict[str, Any] | None = None
        self._written_at: float | None = None
        self._poked = asyncio.Event()

    @property
    def path(self) -> str:
        return f"{LEASES.format(namespace=self.settings.namespace)}/{self.settings.records_name}"

    def poke(self) -> None:
        """Write this replica's records soon (an ACK arrived, a dataplane left)."""
        self._poked.set()

    def merged(self) -> dict[str, DataplaneRecord]:
        return merge([*self.remote.values(), self.local()])

    async def _patch(self, annotations: Mapping[str, str | None]) -> None:
        patch = {"metadata": {"annotations": dict(annotations)}}
        try:
            await self.client.merge_patch(self.path, patch)
        except KubeError as exc:
            if exc.status != 404:
                raise
            try:
                await self.client.post(LEASES.format(namespace=self.settings.namespace),
                                       _lease(self.settings, self.settings.records_name, {}))
            except KubeError as conflict:
                if conflict.status != 409:
                    raise
            await self.client.merge_patch(self.path, patch)

    async def write(self, *, force: bool = False) -> bool:
        """Write this replica's records if they changed or are due for renewal."""
        records = {dataplane: record.to_json() for dataplane, record in self.local().items()}
        due = (self._written_at is None
               or self.clock() - self._written_at >= self.settings.records_interval)
        if not force and not due and records == self._written:
            return False
        value = json.dumps({"replica": self.settings.identity,
                            "renewed": self.wall_clock(), "dataplanes": records},
                           sort_keys=True, separators=(",", ":"))
        await self._patch({self.key: value})
        self._written, self._written_at = records, self.clock()
        return True

    async def read(self) -> bool:
        """Read the other replicas' records; True when what they say changed."""
        try:
            lease = await self.client.get(self.path)
        except KubeError as exc:
            if exc.status != 404:
                raise
            lease = {}
        annotations = (lease.get("metadata") or {}).get("annotations") or {}
        now, wall = self.clock(), self.wall_clock()
        ttl = self.settings.lease_duration
        fresh: dict[str, dict[str, DataplaneRecord]] = {}
        stale: set[str] = set()
        for key, text in annotations.items():
            if not key.startswith(RECORD_PREFIX) or key == self.key or not isinstance(text, str):
                continue
            observed = self._observed.get(key)
            if observed is None or observed[0] != text:
                observed = self._observed[key] = (text, now)
            try:
                data = json.loads(text)
                renewed = float(data["renewed"])
                planes = data["dataplanes"]
            except (ValueError, KeyError, TypeError):
                stale.add(key)
                continue
            if wall - renewed > ttl or now - observed[1] > ttl or not isinstance(planes, dict):
                stale.add(key)
                continue
            fresh[key] = {dataplane: record for dataplane, value in planes.items()
                          if (record := DataplaneRecord.from_json(value)) is not None}
        for key in set(self._observed) - set(annotations):
            del self._observed[key]
        changed = _without_seen(fresh) != _without_seen(self.remote)
        self.remote, self._stale = fresh, stale
        return changed

    async def prune(self) -> None:
        """Remove the annotations of replicas that stopped renewing (the leader does)."""
        if self._stale:
            log.info("dropping the dataplane records of gone replicas: %s",
                     ", ".join(sorted(self._stale)))
            await self._patch(dict.fromkeys(self._stale))
            for key in self._stale:
                self._observed.pop(key, None)
            self._stale = set()

    async def run(self) -> None:
        while True:
            try:
                await self.write()
                # Every replica reads, so one that comes to lead counts right at once.
                if await self.read() and self.on_change is not None:
                    self.on_change()
                if self.should_prune():
                    await self.prune()
            except API_ERRORS as exc:
                log.warning("dataplane records: %s", exc)
            self._poked.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._poked.wait(), self.settings.retry_period)

    async def withdraw(self) -> None:
        """Remove this replica's records (a clean stop)."""
        try:
            await self._patch({self.key: None})
        except API_ERRORS as exc:
            log.warning("could not remove this replica's dataplane records: %s", exc)


def _without_seen(view: Mapping[str, Mapping[str, DataplaneRecord]]
                  ) -> dict[str, dict[str, tuple[Any, ...]]]:
    return {key: {dataplane: (record.acked, record.refused, record.splits)
                  for dataplane, record in records.items()}
            for key, records in view.items()}

"""The operator's memory of the cluster: what the compiler needs, and whether an event changed it.

Every watch event goes through `Store.apply` or `Store.delete`, which answer True only
when the event changes what the compiler would be given. So these change nothing and
cost no rebuild:

- a status-only change (our own status patches come back as MODIFIED events), or
  a change of annotations, labels or managed fields of a Route, Upstream or EgressPolicy;
- a Secret that no Route, Upstream or EgressPolicy names (its data is not even kept:
  only its name, so that a later reference knows it exists and fetches it), and the
  same for a ConfigMap that no Route names (descriptor sets);
- a Service or EndpointSlice of a Service no Upstream names;
- the same object again (every new watch replays every object as ADDED).

Kanal objects are validated with the same pydantic models as `kanal validate`. One that
fails keeps its slot as a *rejection* (Accepted False, with the fields and messages)
and never reaches the compiler, so the others compile as if it were absent. An Upstream
whose static endpoints point at loopback, link-local (169.254/16, fe80::/10: the cloud
metadata service) or the node's own addresses is rejected the same way, unless the
operator runs with `--allow-loopback-endpoints`.

EndpointSlices are folded into `service_endpoints` for the compiler: the ready
endpoints of every slice of the Service, on the target port of the slice port that has
the Service port's name. Endpoints with `ready: false` or `terminating: true` are left
out, so they get no new requests (requests in flight on them finish: the dataplane
drains a removed endpoint's connections).

No method here does I/O; nothing here logs a Secret's data.
"""

from __future__ import annotations

import ipaddress
import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from kanal.contract import snapshot as snap
from kanal.operator.access import secret_names as policy_secret_names
from kanal.operator.compiler import CompileResult, ServiceKey, compile_snapshot
from kanal.operator.conditions import RESOLVED_REFS, Condition, ObjectStatus, rejected_status
from kanal.operator.manifests import describe_validation_error
from kanal.operator.models import (
    API_VERSION,
    RESOURCES,
    ConfigMap,
    EgressPolicy,
    KanalResource,
    Resource,
    Route,
    Secret,
    Upstream,
)

KANAL_KINDS = tuple(RESOURCES)
"""Route, Upstream, EgressPolicy."""

SERVICE_NAME_LABEL = "kubernetes.io/service-name"

NamespacedName = tuple[str, str]

_META_KEPT = ("name", "namespace", "generation", "creationTimestamp", "labels", "annotations")


def _meta(body: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = body.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def namespaced_name(body: Mapping[str, Any]) -> NamespacedName:
    meta = _meta(body)
    return str(meta.get("namespace") or "default"), str(meta.get("name") or "")


def object_ref(body: Mapping[str, Any]) -> dict[str, Any]:
    """What a Kubernetes Event needs to name an object (no spec, no data)."""
    meta = _meta(body)
    ref = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {key: meta[key] for key in ("name", "namespace", "uid") if key in meta},
    }
    return ref


# --------------------------------------------------------------------------- Kanal objects


@dataclass(slots=True)
class KanalEntry:
    """One Route, Upstream or EgressPolicy: its model, or why it was rejected."""

    kind: str
    key: str
    model: KanalResource | None
    error: str | None
    generation: int | None
    fingerprint: str
    ref: dict[str, Any]
    status: Mapping[str, Any] | None = None
    secret_refs: frozenset[NamespacedName] = frozenset()
    service_refs: frozenset[NamespacedName] = frozenset()
    config_map_refs: frozenset[NamespacedName] = frozenset()

    def rejection(self) -> ObjectStatus | None:
        if self.error is None:
            return None
        return rejected_status(self.kind, self.key, self.error, self.generation)


def _trimmed(body: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a cluster object the models read: no status, no server-side metadata."""
    meta = _meta(body)
    trimmed: dict[str, Any] = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {key: meta[key] for key in _META_KEPT if meta.get(key) is not None},
    }
    if "spec" in body:
        trimmed["spec"] = body["spec"]
    return trimmed


def _validation_message(exc: ValidationError) -> str:
    return "; ".join(f"{path}: {message}" if path else message
                     for path, message in describe_validation_error(exc))


def validate_kanal(kind: str, body: Mapping[str, Any], policy: EndpointPolicy
                   ) -> tuple[KanalResource | None, str | None]:
    """A cluster object's model, or why it is rejected: what the store (Accepted False)
    and the validating admission webhook both say."""
    model: KanalResource | None = None
    error: str | None = None
    try:
        model = RESOURCES[kind].model_validate(_trimmed(body))
    except ValidationError as exc:
        error = _validation_message(exc)
    if body.get("apiVersion") != API_VERSION and error is None:
        error = f"apiVersion: unknown version {body.get('apiVersion')}; expected {API_VERSION}"
        model = None
    if isinstance(model, Upstream):
        refused = policy.check(model)
        if refused is not None:
            model, error = None, refused
    return model, error


def _secret_refs(model: KanalResource) -> frozenset[NamespacedName]:
    namespace = model.metadata.namespace
    names: list[str] = []
    if isinstance(model, Route) and model.spec.tls is not None:
        names.append(model.spec.tls.secret_name)
    elif isinstance(model, Upstream) and model.spec.tls is not None:
        tls = model.spec.tls
        names.extend(name for name in (tls.ca_secret_name, tls.client_cert_secret_name) if name)
    elif isinstance(model, EgressPolicy) and model.spec.auth is not None:
        names.append(model.spec.auth.basic_secret_name)
    if isinstance(model, Route):
        names.extend(policy_secret_names(model.spec.policies,
                                         *(rule.policies for rule in model.spec.rules)))
        names.extend(rule.grpc_transcoder.descriptor_secret_name for rule in model.spec.rules
                     if rule.grpc_transcoder is not None
                     and rule.grpc_transcoder.descriptor_secret_name is not None)
    return frozenset((namespace, name) for name in names)


def _config_map_refs(model: KanalResource) -> frozenset[NamespacedName]:
    """The ConfigMaps a Route's rules take descriptor sets from."""
    if not isinstance(model, Route):
        return frozenset()
    return frozenset(
        (model.metadata.namespace, rule.grpc_transcoder.descriptor_config_map_name)
        for rule in model.spec.rules
        if rule.grpc_transcoder is not None
        and rule.grpc_transcoder.descriptor_config_map_name is not None)


def _service_refs(model: KanalResource) -> frozenset[NamespacedName]:
    if isinstance(model, Upstream) and model.spec.service is not None:
        return frozenset({(model.metadata.namespace, model.spec.service.name)})
    return frozenset()


@dataclass(frozen=True, slots=True)
class EndpointPolicy:
    """Which static endpoint addresses the operator refuses (cluster mode)."""

    allow_loopback: bool = False
    node_addresses: frozenset[str] = frozenset()

    def refusal(self, address: str) -> str | None:
        """Why `address` may not be a static endpoint, or None."""
        if self.allow_loopback:
            return None
        host = address.strip("[]").lower().rstrip(".")
        if host == "localhost" or host.endswith(".localhost"):
            return f"{address} is a loopback name"
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return None  # a DNS name: resolved by the dataplane when it connects
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_loopback:
            return f"{address} is a loopback address"
        if ip.is_link_local:
            return f"{address} is a link-local address (where cloud metadata services live)"
        if ip.is_unspecified:
            return f"{address} is the unspecified address"
        if str(ip) in self.node_addresses:
            return f"{address} is an address of the node"
        return None

    def check(self, upstream: Upstream) -> str | None:
        if upstream.spec.endpoints is None:
            return None
        problems = []
        for position, endpoint in enumerate(upstream.spec.endpoints):
            why = self.refusal(endpoint.address)
            if why is not None:
                problems.append(f"spec.endpoints[{position}].address: {why}")
        if not problems:
            return None
        return ("; ".join(problems) + ". In a cluster, static endpoints may not point at "
                "loopback, link-local (cloud metadata) or node addresses; start the "
                "operator with --allow-loopback-endpoints to allow them")


# --------------------------------------------------------------------------- Services


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """A Service as the compiler needs it: its ports by number, with their names."""

    ports: tuple[tuple[int, str], ...]

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> ServiceInfo:
        spec = body.get("spec") or {}
        ports = []
        for port in spec.get("ports") or ():
            if isinstance(port, Mapping) and isinstance(port.get("port"), int) \
                    and (port.get("protocol") or "TCP") == "TCP":
                ports.append((port["port"], str(port.get("name") or "")))
        return cls(tuple(sorted(ports)))


@dataclass(frozen=True, slots=True)
class SliceInfo:
    """An EndpointSlice: its Service, its ports by name, and its ready addresses."""

    service: str | None
    ports: tuple[tuple[str, int], ...]
    ready: tuple[str, ...]

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> SliceInfo:
        labels = _meta(body).get("labels") or {}
        service = labels.get(SERVICE_NAME_LABEL) if isinstance(labels, Mapping) else None
        if body.get("addressType", "IPv4") not in ("IPv4", "IPv6"):
            return cls(service, (), ())
        ports = []
        for port in body.get("ports") or ():
            if isinstance(port, Mapping) and isinstance(port.get("port"), int) \
                    and (port.get("protocol") or "TCP") == "TCP":
                ports.append((str(port.get("name") or ""), port["port"]))
        ready: set[str] = set()
        for endpoint in body.get("endpoints") or ():
            if not isinstance(endpoint, Mapping):
                continue
            conditions = endpoint.get("conditions") or {}
            # Kubernetes: a missing `ready` means unknown, to be taken as ready.
            if conditions.get("ready") is False or conditions.get("terminating") is True:
                continue
            ready.update(str(address) for address in endpoint.get("addresses") or ())
        return cls(service, tuple(sorted(ports)), tuple(sorted(ready)))


# --------------------------------------------------------------------------- the store


@dataclass(slots=True)
class Store:
    """Everything the compiler needs, indexed; `apply`/`delete` say whether it changed."""

    policy: EndpointPolicy = field(default_factory=EndpointPolicy)
    kanal: dict[tuple[str, str], KanalEntry] = field(default_factory=dict)
    services: dict[NamespacedName, ServiceInfo] = field(default_factory=dict)
    slices: dict[NamespacedName, SliceInfo] = field(default_factory=dict)
    secrets: dict[NamespacedName, Secret] = field(default_factory=dict)
    dormant_secrets: set[NamespacedName] = field(default_factory=set)
    config_maps: dict[NamespacedName, ConfigMap] = field(default_factory=dict)
    dormant_config_maps: set[NamespacedName] = field(default_factory=set)
    _secret_refs: Counter[NamespacedName] = field(default_factory=Counter)
    _service_refs: Counter[NamespacedName] = field(default_factory=Counter)
    _config_map_refs: Counter[NamespacedName] = field(default_factory=Counter)

    # ----------------------------------------------------------------- events

    def apply(self, body: Mapping[str, Any]) -> bool:
        """An object was added or modified. True when the compiler's input changed."""
        kind = body.get("kind")
        if kind in KANAL_KINDS:
            return self._apply_kanal(str(kind), body)
        if kind == "Secret":
            return self._apply_secret(body)
        if kind == "ConfigMap":
            return self._apply_config_map(body)
        if kind == "Service":
            return self._put(self.services, namespaced_name(body), ServiceInfo.from_body(body))
        if kind == "EndpointSlice":
            return self._apply_slice(body)
        return False

    def delete(self, body: Mapping[str, Any]) -> bool:
        """An object was deleted. True when the compiler's input changed."""
        kind = body.get("kind")
        name = namespaced_name(body)
        if kind in KANAL_KINDS:
            entry = self.kanal.pop((str(kind), f"{name[0]}/{name[1]}"), None)
            if entry is None:
                return False
            self._count_refs(entry, -1)
            return True
        if kind == "Secret":
            self.dormant_secrets.discard(name)
            return self.secrets.pop(name, None) is not None
        if kind == "ConfigMap":
            self.dormant_config_maps.discard(name)
            return self.config_maps.pop(name, None) is not None
        if kind == "Service":
            return self.services.pop(name, None) is not None and name in self._service_refs
        if kind == "EndpointSlice":
            old = self.slices.pop(name, None)
            return old is not None and (name[0], old.service or "") in self._service_refs
        return False

    def _apply_kanal(self, kind: str, body: Mapping[str, Any]) -> bool:
        namespace, name = namespaced_name(body)
        trimmed = _trimmed(body)
        model, error = validate_kanal(kind, body, self.policy)
        meta = trimmed["metadata"]
        fingerprint = json.dumps(
            [trimmed.get("spec"), meta.get("generation"), str(meta.get("creationTimestamp")),
             error], sort_keys=True, default=str)
        generation = meta.get("generation")
        key = (kind, f"{namespace}/{name}")
        old = self.kanal.get(key)
        status = body.get("status") if isinstance(body.get("status"), Mapping) else None
        if old is not None and old.fingerprint == fingerprint:
            old.status = status
            old.ref = object_ref(body)
            return False
        entry = KanalEntry(
            kind=kind, key=key[1], model=model, error=error,
            generation=generation if isinstance(generation, int) else None,
            fingerprint=fingerprint, ref=object_ref(body), status=status,
            secret_refs=_secret_refs(model) if model is not None else frozenset(),
            service_refs=_service_refs(model) if model is not None else frozenset(),
            config_map_refs=_config_map_refs(model) if model is not None else frozenset(),
        )
        if old is not None:
            self._count_refs(old, -1)
        self._count_refs(entry, +1)
        self.kanal[key] = entry
        return True

    def _count_refs(self, entry: KanalEntry, sign: int) -> None:
        for counter, refs in ((self._secret_refs, entry.secret_refs),
                              (self._service_refs, entry.service_refs),
                              (self._config_map_refs, entry.config_map_refs)):
            for ref in refs:
                counter[ref] += sign
                if counter[ref] <= 0:
                    del counter[ref]

    def _apply_secret(self, body: Mapping[str, Any]) -> bool:
        name = namespaced_name(body)
        if name not in self._secret_refs:
            # Nobody names it: remember that it exists, not what it holds.
            self.secrets.pop(name, None)
            self.dormant_secrets.add(name)
            return False
        self.dormant_secrets.discard(name)
        try:
            secret = Secret.model_validate({
                "apiVersion": "v1", "kind": "Secret", "metadata": _trimmed(body)["metadata"],
                "type": body.get("type") or "Opaque",
                "data": body.get("data") or {}, "stringData": body.get("stringData") or {},
            })
        except ValidationError:
            # Unusable (never reported with its content): the referrers say "invalid".
            secret = Secret.model_validate({"apiVersion": "v1", "kind": "Secret",
                                            "metadata": {"name": name[1], "namespace": name[0]}})
        old = self.secrets.get(name)
        self.secrets[name] = secret
        return old is None or old.values() != secret.values() or old.type != secret.type

    def _apply_config_map(self, body: Mapping[str, Any]) -> bool:
        name = namespaced_name(body)
        if name not in self._config_map_refs:
            # Nobody names it: remember that it exists, not what it holds.
            self.config_maps.pop(name, None)
            self.dormant_config_maps.add(name)
            return False
        self.dormant_config_maps.discard(name)
        try:
            config_map = ConfigMap.model_validate({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": name[1], "namespace": name[0]},
                "data": body.get("data") or {}, "binaryData": body.get("binaryData") or {},
            })
        except ValidationError:
            # Unusable: the referrers say what they miss.
            config_map = ConfigMap.model_validate({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": name[1], "namespace": name[0]}})
        old = self.config_maps.get(name)
        self.config_maps[name] = config_map
        return old is None or (old.data, old.binary_data) != (config_map.data,
                                                               config_map.binary_data)

    def _apply_slice(self, body: Mapping[str, Any]) -> bool:
        name = namespaced_name(body)
        new = SliceInfo.from_body(body)
        old = self.slices.get(name)
        self.slices[name] = new
        if old == new:
            return False
        services = {new.service} | ({old.service} if old is not None else set())
        return any((name[0], service or "") in self._service_refs for service in services)

    def _put(self, table: dict[NamespacedName, Any], name: NamespacedName, value: Any) -> bool:
        old = table.get(name)
        table[name] = value
        return old != value and name in self._service_refs

    # ----------------------------------------------------------------- references

    def referenced_secrets(self) -> set[NamespacedName]:
        return set(self._secret_refs)

    def referenced_services(self) -> set[NamespacedName]:
        return set(self._service_refs)

    def secrets_to_fetch(self) -> set[NamespacedName]:
        """Secrets someone names that exist but whose data was not kept: fetch them."""
        return self.dormant_secrets & set(self._secret_refs)

    def forget_unreferenced_secrets(self) -> None:
        """Drop the data of Secrets nobody names any more (they stay known by name)."""
        for name in [name for name in self.secrets if name not in self._secret_refs]:
            del self.secrets[name]
            self.dormant_secrets.add(name)

    def referenced_config_maps(self) -> set[NamespacedName]:
        return set(self._config_map_refs)

    def config_maps_to_fetch(self) -> set[NamespacedName]:
        """ConfigMaps someone names that exist but whose data was not kept: fetch them."""
        return self.dormant_config_maps & set(self._config_map_refs)

    def forget_unreferenced_config_maps(self) -> None:
        """Drop the data of ConfigMaps nobody names any more (they stay known by name)."""
        for name in [name for name in self.config_maps if name not in self._config_map_refs]:
            del self.config_maps[name]
            self.dormant_config_maps.add(name)

    # ----------------------------------------------------------------- compiling

    def service_endpoints(self) -> dict[ServiceKey, list[snap.Endpoint]]:
        """Ready endpoints of every named Service, by (namespace, Service, Service port)."""
        by_service: dict[NamespacedName, list[SliceInfo]] = {}
        for (namespace, _), info in self.slices.items():
            if info.service and (namespace, info.service) in self._service_refs:
                by_service.setdefault((namespace, info.service), []).append(info)
        result: dict[ServiceKey, list[snap.Endpoint]] = {}
        for name in self._service_refs:
            service = self.services.get(name)
            if service is None:
                continue
            for port, port_name in service.ports:
                found: set[tuple[str, int]] = set()
                for info in by_service.get(name, ()):
                    target = dict(info.ports).get(port_name)
                    if target is not None:
                        found.update((address, target) for address in info.ready)
                result[(name[0], name[1], port)] = [
                    snap.Endpoint(address, target) for address, target in sorted(found)]
        return result

    def resources(self) -> list[Resource]:
        models: list[Resource] = [entry.model for entry in self.kanal.values()
                                  if isinstance(entry.model, Route | Upstream | EgressPolicy)]
        models.extend(secret for name, secret in self.secrets.items()
                      if name in self._secret_refs)
        models.extend(config_map for name, config_map in self.config_maps.items()
                      if name in self._config_map_refs)
        return models

    def rejections(self) -> list[ObjectStatus]:
        return [status for entry in self.kanal.values()
                if (status := entry.rejection()) is not None]

    def compile(self) -> CompileResult:
        """The Snapshot and every object's status, the rejected ones included."""
        result = compile_snapshot(self.resources(), service_endpoints=self.service_endpoints())
        rejected = self.rejections()
        statuses = list(result.statuses)
        rejected_upstreams = {s.key for s in rejected if s.kind == "Upstream"}
        if rejected_upstreams:
            statuses = [_explain_rejected_backends(s, rejected_upstreams) for s in statuses]
        statuses.extend(rejected)
        return CompileResult(result.snapshot,
                             tuple(sorted(statuses, key=lambda s: (s.kind, s.key))))

    def entry(self, kind: str, key: str) -> KanalEntry | None:
        return self.kanal.get((kind, key))

    def entries(self) -> Iterable[KanalEntry]:
        return self.kanal.values()


def _explain_rejected_backends(status: ObjectStatus, rejected: set[str]) -> ObjectStatus:
    """A Route naming a rejected Upstream says so, not that the Upstream is missing."""
    if status.kind != "Route":
        return status
    condition = status.condition(RESOLVED_REFS)
    if condition is None or condition.status == "True":
        return status
    message = condition.message
    for key in rejected:
        message = message.replace(f"Upstream {key} not found", f"Upstream {key} is not accepted")
    if message == condition.message:
        return status
    conditions = tuple(
        Condition(c.type, c.status, c.reason, message, c.observed_generation)
        if c.type == RESOLVED_REFS else c for c in status.conditions)
    return ObjectStatus(status.kind, status.key, conditions, status.endpoints)

"""The compiler: validated Kanal objects in, one Snapshot and a status per object out.

Pure: no I/O, no clock, no randomness. The same objects, in any order, give the same
Snapshot and the same version, whichever replica or mode (`kanal run` or the operator)
compiles them. Work is linear in the input: Upstreams and Secrets are indexed by key
before Routes are looked at.

Semantics, in the order the builder applies them (after Contour's dag builder):

1. Index every object by `namespace/name`. Secrets are only looked up, never emitted.
2. Upstreams: endpoints (static, or from `service_endpoints` for `spec.service`),
   TLS Secrets resolved into PEM text, durations into seconds. An Upstream whose TLS
   Secrets are missing or incomplete fails closed: it is emitted without endpoints,
   so requests get a 503 naming it rather than a connection with the wrong trust.
3. Routes, oldest first (a missing `creationTimestamp` sorts before every timestamp;
   equal ones by key). Backends name Upstreams of the Route's namespace; a missing
   one leaves the Route accepted with ResolvedRefs False, and stays in the Snapshot
   so the dataplane answers 503 for that share. A missing TLS Secret: ResolvedRefs
   False and no TLS for that Route. Two Routes terminating TLS for the same host
   name with different Secrets: the newer one is rejected (Conflicted).
4. EgressPolicies: allow rules without ports mean 80 and 443 (written out, so the
   dataplane has no hidden default), deny rules without ports mean every port (an
   empty tuple). A missing basic-auth Secret fails closed: the policy allows nothing.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import Any, TypeVar

from kanal.contract import snapshot as snap
from kanal.operator.accesscompile import rules_with_access
from kanal.operator.conditions import (
    ACCEPTED,
    REASON_ACCEPTED,
    REASON_BACKEND_NOT_FOUND,
    REASON_CONFIG_MAP_NOT_FOUND,
    REASON_CONFLICTED,
    REASON_FILE_NOT_READ,
    REASON_INVALID,
    REASON_INVALID_CONFIG_MAP,
    REASON_INVALID_SECRET,
    REASON_NOT_ACCEPTED,
    REASON_RESOLVED_REFS,
    REASON_SECRET_NOT_FOUND,
    REASON_SERVICE_DISCOVERY_UNAVAILABLE,
    REASON_SERVICE_NOT_FOUND,
    RESOLVED_REFS,
    Condition,
    EndpointCounts,
    ObjectStatus,
)
from kanal.operator.durations import parse_duration
from kanal.operator.filtercompile import compile_filters, mirrored_upstreams
from kanal.operator.models import (
    CacheSpec,
    ConfigMap,
    EgressPolicy,
    EgressRuleSpec,
    KanalResource,
    MatchSpec,
    Resource,
    Route,
    RuleSpec,
    Secret,
    Upstream,
    UpstreamSpec,
    parse_byte_size,
)

SERVICE_DISCOVERY_UNAVAILABLE = REASON_SERVICE_DISCOVERY_UNAVAILABLE
"""The ResolvedRefs reason of an Upstream with `service` when nothing discovers Services."""

DEFAULT_EGRESS_PORTS = (80, 443)

ServiceKey = tuple[str, str, int]
"""(namespace, Service name, Service port)."""

ServiceEndpoints = Mapping[ServiceKey, Sequence[snap.Endpoint]]

DescriptorFiles = Mapping[str, bytes | str]
"""A `descriptorFile` path to the file's bytes, or to why it could not be read."""


@dataclass(frozen=True, slots=True)
class CompileResult:
    """The Snapshot (versioned) and the status of every Route, Upstream and EgressPolicy."""

    snapshot: snap.Snapshot
    statuses: tuple[ObjectStatus, ...]
    _by_identity: dict[tuple[str, str], ObjectStatus] = dataclasses.field(
        init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # A status writer asks once per object: a dict keeps that linear.
        object.__setattr__(self, "_by_identity", {(s.kind, s.key): s for s in self.statuses})

    def status(self, kind: str, key: str) -> ObjectStatus | None:
        """The status of one object (`kind`, `namespace/name`), if it was compiled."""
        return self._by_identity.get((kind, key))

    def to_dict(self) -> dict[str, Any]:
        return {
            "snapshot": self.snapshot.to_dict(),
            "statuses": [status.to_dict() for status in self.statuses],
        }


def compile_snapshot(
    resources: Iterable[Resource],
    *,
    service_endpoints: ServiceEndpoints | None = None,
    descriptor_files: DescriptorFiles | None = None,
) -> CompileResult:
    """Compile validated objects into a Snapshot and statuses.

    `service_endpoints` maps (namespace, Service, port) to the ready endpoints of
    Services that Upstreams name with `spec.service`; None means there is no service
    discovery (standalone mode), and such Upstreams get no endpoints.
    `descriptor_files` maps the `descriptorFile` paths of Routes (as they are written
    in the models) to the files' bytes, or to why a file could not be read; None means
    files are not read here (the operator), and such rules get no descriptor set.
    """
    index = _Index.build(resources, descriptor_files)
    statuses: list[ObjectStatus] = []

    upstreams: list[snap.Upstream] = []
    for upstream in index.upstreams.values():
        compiled, status = _compile_upstream(upstream, index, service_endpoints)
        statuses.append(status)
        if compiled is not None:
            upstreams.append(compiled)
    emitted = {upstream.key for upstream in upstreams}

    routes, route_statuses = _compile_routes(index, emitted)
    statuses.extend(route_statuses)

    policies: list[snap.EgressPolicy] = []
    for policy in index.egress_policies.values():
        compiled_policy, status = _compile_egress_policy(policy, index)
        statuses.append(status)
        if compiled_policy is not None:
            policies.append(compiled_policy)

    snapshot = snap.Snapshot(
        routes=tuple(routes),
        upstreams=tuple(sorted(upstreams, key=lambda u: u.key)),
        egress_policies=tuple(sorted(policies, key=lambda p: p.key)),
    ).with_version()
    return CompileResult(snapshot, tuple(sorted(statuses, key=lambda s: (s.kind, s.key))))


# --------------------------------------------------------------------------- index

_R = TypeVar("_R", bound=KanalResource | Secret | ConfigMap)


@dataclass(slots=True)
class _Index:
    """Objects by key. Duplicate keys keep one object, chosen by content (deterministic)."""

    routes: dict[str, Route]
    upstreams: dict[str, Upstream]
    egress_policies: dict[str, EgressPolicy]
    secrets: dict[str, Secret]
    config_maps: dict[str, ConfigMap]
    descriptor_files: DescriptorFiles | None = None

    @classmethod
    def build(cls, resources: Iterable[Resource],
              descriptor_files: DescriptorFiles | None = None) -> _Index:
        index = cls({}, {}, {}, {}, {}, descriptor_files)
        for resource in resources:
            if isinstance(resource, Route):
                _put(index.routes, resource)
            elif isinstance(resource, Upstream):
                _put(index.upstreams, resource)
            elif isinstance(resource, EgressPolicy):
                _put(index.egress_policies, resource)
            elif isinstance(resource, Secret):
                _put(index.secrets, resource)
            elif isinstance(resource, ConfigMap):
                _put(index.config_maps, resource)
            else:  # pragma: no cover - the type says this cannot happen
                raise TypeError(f"cannot compile {type(resource).__name__}")
        return index

    def secret(self, namespace: str, name: str) -> Secret | None:
        return self.secrets.get(f"{namespace}/{name}")


def _put(table: dict[str, _R], resource: _R) -> None:
    key = resource.key
    current = table.get(key)
    if current is None or _canonical(resource) < _canonical(current):
        table[key] = resource


def _canonical(resource: KanalResource | Secret | ConfigMap) -> str:
    return resource.model_dump_json(by_alias=True)


# --------------------------------------------------------------------------- conditions


def _accepted(generation: int | None) -> Condition:
    return Condition(ACCEPTED, "True", REASON_ACCEPTED, "the spec is valid", generation)


def _resolved(generation: int | None) -> Condition:
    return Condition(RESOLVED_REFS, "True", REASON_RESOLVED_REFS,
                     "every reference is resolved", generation)


def _rejected(kind: str, key: str, reason: str, message: str,
              generation: int | None) -> ObjectStatus:
    return ObjectStatus(kind, key, (
        Condition(ACCEPTED, "False", reason, message, generation),
        Condition(RESOLVED_REFS, "False", REASON_NOT_ACCEPTED,
                  "references are not checked until the object is accepted", generation),
    ))


@dataclass(slots=True)
class _Problems:
    """Unresolved references of one object: the first reason wins, every message counts."""

    reason: str | None = None
    messages: list[str] = dataclasses.field(default_factory=list)

    def add(self, reason: str, message: str) -> None:
        self.reason = self.reason or reason
        self.messages.append(message)

    def condition(self, generation: int | None) -> Condition:
        if self.reason is None:
            return _resolved(generation)
        return Condition(RESOLVED_REFS, "False", self.reason, "; ".join(self.messages),
                         generation)


# --------------------------------------------------------------------------- secrets

_CERTIFICATE = "-----BEGIN CERTIFICATE-----"
_PRIVATE_KEY = "PRIVATE KEY-----"


def _secret_values(
    index: _Index, namespace: str, name: str, wanted: Sequence[tuple[str, str | None]],
    problems: _Problems, purpose: str,
) -> tuple[str, ...] | None:
    """The values `wanted` ((key, PEM marker or None) pairs) of a Secret, or None.

    Every problem is added to `problems`; nothing of a Secret is used unless all of
    it is usable.
    """
    secret = index.secret(namespace, name)
    if secret is None:
        problems.add(REASON_SECRET_NOT_FOUND, f"{purpose} Secret {namespace}/{name} not found")
        return None
    values = secret.values()
    found: list[str] = []
    for key, marker in wanted:
        value = values.get(key)
        if not value:
            problems.add(REASON_INVALID_SECRET,
                         f"{purpose} Secret {namespace}/{name} has no {key}")
        elif marker is not None and marker not in value:
            problems.add(REASON_INVALID_SECRET,
                         f"{purpose} Secret {namespace}/{name}: {key} is not PEM")
        else:
            found.append(value)
    return tuple(found) if len(found) == len(wanted) else None


def _secret_data(index: _Index, namespace: str, name: str) -> dict[str, str] | None:
    secret = index.secret(namespace, name)
    return None if secret is None else secret.values()


# --------------------------------------------------------------------------- upstreams


def _compile_upstream(
    upstream: Upstream, index: _Index, service_endpoints: ServiceEndpoints | None
) -> tuple[snap.Upstream | None, ObjectStatus]:
    meta, spec = upstream.metadata, upstream.spec
    generation = meta.generation
    problems = _Problems()
    endpoints = _endpoints(upstream, service_endpoints, problems)
    tls = _upstream_tls(upstream, index, problems)
    configured = len(endpoints)
    if spec.protocol in ("HTTPS", "H2") and tls is None:
        endpoints = ()  # fail closed: never talk TLS with the wrong trust
    try:
        compiled = _upstream_value(upstream.key, spec, endpoints, tls)
    except ValueError as exc:
        return None, _rejected("Upstream", upstream.key, REASON_INVALID, str(exc), generation)
    status = ObjectStatus("Upstream", upstream.key,
                          (_accepted(generation), problems.condition(generation)),
                          EndpointCounts(total=configured, healthy=len(endpoints)))
    return compiled, status


def _endpoints(upstream: Upstream, service_endpoints: ServiceEndpoints | None,
               problems: _Problems) -> tuple[snap.Endpoint, ...]:
    spec = upstream.spec
    if spec.endpoints is not None:
        return tuple(snap.Endpoint(e.address, e.port, e.weight) for e in spec.endpoints)
    assert spec.service is not None  # the model holds exactly one of the two
    namespace = upstream.metadata.namespace
    service = f"Service {namespace}/{spec.service.name} port {spec.service.port}"
    if service_endpoints is None:
        problems.add(REASON_SERVICE_DISCOVERY_UNAVAILABLE,
                     f"{service}: service discovery needs the operator; "
                     "kanal run serves static endpoints only")
        return ()
    found = service_endpoints.get((namespace, spec.service.name, spec.service.port))
    if found is None:
        problems.add(REASON_SERVICE_NOT_FOUND, f"{service} not found")
        return ()
    # EndpointSlices come in no particular order; the Snapshot must not depend on it.
    return tuple(sorted(found, key=lambda e: (e.address, e.port, e.weight)))


def _upstream_tls(upstream: Upstream, index: _Index,
                  problems: _Problems) -> snap.UpstreamTLS | None:
    """The resolved TLS settings, or None when the protocol is HTTP or a Secret failed."""
    spec = upstream.spec
    if spec.protocol not in ("HTTPS", "H2"):
        return None
    tls = spec.tls
    if tls is None:
        return snap.UpstreamTLS()
    namespace = upstream.metadata.namespace
    usable = True
    ca_pem = cert_pem = key_pem = None
    if tls.ca_secret_name is not None:
        ca = _secret_values(index, namespace, tls.ca_secret_name, [("ca.crt", _CERTIFICATE)],
                            problems, "CA")
        usable = usable and ca is not None
        ca_pem = ca[0] if ca else None
    if tls.client_cert_secret_name is not None:
        pair = _secret_values(index, namespace, tls.client_cert_secret_name,
                              [("tls.crt", _CERTIFICATE), ("tls.key", _PRIVATE_KEY)],
                              problems, "client certificate")
        usable = usable and pair is not None
        cert_pem, key_pem = pair if pair else (None, None)
    if not usable:
        return None
    return snap.UpstreamTLS(sni=tls.sni, ca_pem=ca_pem, client_cert_pem=cert_pem,
                            client_key_pem=key_pem,
                            insecure_skip_verify=tls.insecure_skip_verify)


def _upstream_value(key: str, spec: UpstreamSpec, endpoints: tuple[snap.Endpoint, ...],
                    tls: snap.UpstreamTLS | None) -> snap.Upstream:
    balancer = spec.load_balancer
    hash_on = None
    if balancer.policy == "RingHash":
        chosen = balancer.hash_on
        if chosen is None or chosen.source_ip:
            hash_on = snap.HashOn(source_ip=True)
        elif chosen.header is not None:
            hash_on = snap.HashOn(header=chosen.header.lower())
        else:
            hash_on = snap.HashOn(cookie=chosen.cookie)
    check = spec.health_check
    health = None if check is None else snap.HealthCheck(
        path=check.path,
        interval=parse_duration(check.interval),
        timeout=parse_duration(check.timeout),
        healthy_threshold=check.healthy_threshold,
        unhealthy_threshold=check.unhealthy_threshold,
        grpc_service=None if check.grpc is None else check.grpc.service,
    )
    breaker = spec.circuit_breaker
    return snap.Upstream(
        key=key,
        endpoints=endpoints,
        protocol=spec.protocol,
        tls=tls,
        policy=balancer.policy,
        hash_on=hash_on,
        health_check=health,
        circuit_breaker=snap.CircuitBreaker(
            max_connections=breaker.max_connections,
            max_pending_requests=breaker.max_pending_requests,
            consecutive_failures=breaker.consecutive_failures,
            failure_rate_percent=breaker.failure_rate_percent,
            minimum_requests=breaker.minimum_requests,
            slow_call_duration=_optional_seconds(breaker.slow_call_duration),
            open_duration=parse_duration(breaker.open_duration),
            half_open_requests=breaker.half_open_requests,
        ),
        connect_timeout=parse_duration(spec.timeouts.connect),
        idle_timeout=parse_duration(spec.timeouts.idle),
    )


def _optional_seconds(text: str | None, *, zero_is_none: bool = False) -> float | None:
    if text is None:
        return None
    seconds = parse_duration(text)
    return None if zero_is_none and seconds == 0 else seconds


# --------------------------------------------------------------------------- routes


def _age_order(route: Route) -> tuple[int, float, str]:
    """Gateway API's tie-break: older first; no timestamp sorts first; then the key."""
    stamp = route.metadata.creation_timestamp
    if stamp is None:
        return (0, 0.0, route.key)
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return (1, stamp.timestamp(), route.key)


def _compile_routes(index: _Index, emitted_upstreams: set[str]
                    ) -> tuple[list[snap.Route], list[ObjectStatus]]:
    routes: list[snap.Route] = []
    statuses: list[ObjectStatus] = []
    tls_owners: dict[str, tuple[str, str]] = {}  # host name -> (Secret key, Route key)
    for route in sorted(index.routes.values(), key=_age_order):
        compiled, status = _compile_route(route, index, emitted_upstreams)
        if compiled is not None and compiled.tls is not None:
            conflict = _tls_conflict(compiled, tls_owners)
            if conflict is not None:
                compiled = None
                status = _rejected("Route", route.key, REASON_CONFLICTED, conflict,
                                   route.metadata.generation)
        statuses.append(status)
        if compiled is not None:
            routes.append(compiled)
    return routes, statuses


def _tls_conflict(route: snap.Route, owners: dict[str, tuple[str, str]]) -> str | None:
    """Claim the Route's TLS host names, or say which older Route holds one already."""
    assert route.tls is not None
    hosts = route.hostnames or ("",)
    for host in hosts:
        owner = owners.get(host)
        if owner is not None and owner[0] != route.tls.secret:
            shown = host or "every host (no hostnames)"
            return (f"{shown} already terminates TLS with Secret {owner[0]} "
                    f"(Route {owner[1]}, older)")
    for host in hosts:
        owners.setdefault(host, (route.tls.secret, route.key))
    return None


def _compile_route(route: Route, index: _Index, emitted_upstreams: set[str]
                   ) -> tuple[snap.Route | None, ObjectStatus]:
    meta, spec = route.metadata, route.spec
    namespace, generation = meta.namespace, meta.generation
    problems = _Problems()
    try:
        rules = tuple(_compile_rule(i, rule, namespace) for i, rule in enumerate(spec.rules))
    except ValueError as exc:
        return None, _rejected("Route", route.key, REASON_INVALID, str(exc), generation)
    rules = tuple(_with_descriptor_set(compiled, rule, index, namespace, problems)
                  for compiled, rule in zip(rules, spec.rules, strict=True))
    _check_backends(rules, index, emitted_upstreams, problems)
    if spec.policies is not None or any(rule.policies is not None for rule in spec.rules):
        rules = rules_with_access(route.key, spec.policies, list(zip(rules, (
            rule.policies for rule in spec.rules), strict=True)), namespace,
            lambda name: _secret_data(index, namespace, name), problems.add)
    tls = None
    if spec.tls is not None:
        pair = _secret_values(index, namespace, spec.tls.secret_name,
                              [("tls.crt", _CERTIFICATE), ("tls.key", _PRIVATE_KEY)],
                              problems, "TLS")
        if pair is not None:
            hsts = spec.tls.hsts
            tls = snap.RouteTLS(
                secret=f"{namespace}/{spec.tls.secret_name}",
                cert_pem=pair[0],
                key_pem=pair[1],
                redirect_http=spec.tls.redirect_http,
                hsts=None if hsts is None else snap.Hsts(hsts.max_age, hsts.include_sub_domains),
            )
    compiled = snap.Route(
        key=route.key,
        hostnames=_unique(host.lower() for host in spec.hostnames),
        gateways=_unique(spec.gateways),
        rules=rules,
        tls=tls,
    )
    status = ObjectStatus("Route", route.key,
                          (_accepted(generation), problems.condition(generation)))
    return compiled, status


def _check_backends(rules: Sequence[snap.Rule], index: _Index, emitted: set[str],
                    problems: _Problems) -> None:
    reported: set[str] = set()
    for rule in rules:
        parts = rule.aggregate.parts if rule.aggregate is not None else ()
        for key in ([b.upstream for b in rule.backends] + mirrored_upstreams(rule)
                    + [p.upstream for p in parts]):
            if key in emitted or key in reported:
                continue
            reported.add(key)
            if key in index.upstreams:
                problems.add(REASON_BACKEND_NOT_FOUND, f"Upstream {key} is not accepted")
            else:
                problems.add(REASON_BACKEND_NOT_FOUND, f"Upstream {key} not found")


def _compile_rule(position: int, rule: RuleSpec, namespace: str) -> snap.Rule:
    matches = tuple(_compile_match(match) for match in rule.matches) or (snap.Match(),)
    affinity = rule.session_affinity
    retries = rule.retries
    return snap.Rule(
        index=position,
        name=rule.name,
        matches=matches,
        backends=tuple(snap.Backend(f"{namespace}/{b.upstream}", b.weight,
                                    compile_filters(b.filters, namespace))
                       for b in rule.backends),
        session_affinity=None if affinity is None else snap.SessionAffinity(
            cookie_name=affinity.cookie.name, ttl=parse_duration(affinity.cookie.ttl)),
        timeout=_optional_seconds(rule.timeout, zero_is_none=True),
        retries=None if retries is None else snap.Retries(
            attempts=retries.attempts,
            per_try_timeout=_optional_seconds(retries.per_try_timeout, zero_is_none=True),
            retry_on=tuple(retries.retry_on),
        ),
        max_request_body_size=(None if rule.max_request_body_size is None
                               else parse_byte_size(rule.max_request_body_size)),
        allow_websocket=rule.allow_websocket,
        filters=compile_filters(rule.filters, namespace),
        cache=compile_cache(rule.cache),
        aggregate=None if rule.aggregate is None else snap.Aggregate(
            parts=tuple(snap.AggregatePart(
                name=part.name, upstream=f"{namespace}/{part.upstream}", method=part.method,
                path=part.path, timeout=parse_duration(part.timeout))
                for part in rule.aggregate.parts),
            on_error=rule.aggregate.on_error,
        ),
    )


def _with_descriptor_set(compiled: snap.Rule, rule: RuleSpec, index: _Index, namespace: str,
                         problems: _Problems) -> snap.Rule:
    """A transcoding rule's descriptor set, base64 (as a Secret's data and a ConfigMap's
    binaryData hold it), from whichever of the three sources the rule names; "" (and
    a problem) when it does not resolve."""
    settings = rule.grpc_transcoder
    if settings is None:
        return compiled
    key = settings.descriptor_key
    data: str | None = None
    if settings.descriptor_secret_name is not None:
        name = settings.descriptor_secret_name
        secret = index.secret(namespace, name)
        if secret is None:
            problems.add(REASON_SECRET_NOT_FOUND,
                         f"descriptor set Secret {namespace}/{name} not found")
        elif key in secret.string_data:
            data = base64.b64encode(secret.string_data[key].encode()).decode()
        elif key in secret.data:
            data = secret.data[key]
        else:
            problems.add(REASON_INVALID_SECRET,
                         f"descriptor set Secret {namespace}/{name} has no {key}")
    elif settings.descriptor_config_map_name is not None:
        name = settings.descriptor_config_map_name
        config_map = index.config_maps.get(f"{namespace}/{name}")
        if config_map is None:
            problems.add(REASON_CONFIG_MAP_NOT_FOUND,
                         f"descriptor set ConfigMap {namespace}/{name} not found")
        else:
            data = config_map.binary(key)
            if data is None:
                problems.add(REASON_INVALID_CONFIG_MAP,
                             f"descriptor set ConfigMap {namespace}/{name} has no {key}")
    else:
        data = _descriptor_file(settings.descriptor_file or "", index.descriptor_files, problems)
    return dataclasses.replace(compiled,
                               grpc_transcoder=snap.GrpcTranscoder(descriptor_set=data or ""))


def _descriptor_file(path: str, files: DescriptorFiles | None, problems: _Problems) -> str | None:
    if files is None:
        problems.add(REASON_FILE_NOT_READ,
                     f"descriptor set file {path}: files are read by kanal run only; in a "
                     "cluster, use descriptorConfigMapName or descriptorSecretName")
        return None
    found = files.get(path)
    if not isinstance(found, bytes):
        problems.add(REASON_FILE_NOT_READ,
                     f"descriptor set file {path} cannot be read: {found or 'not found'}")
        return None
    return base64.b64encode(found).decode()


def _compile_match(match: MatchSpec) -> snap.Match:
    path = snap.PathMatch() if match.path is None else snap.PathMatch(
        match.path.type, match.path.value)
    return snap.Match(
        path=path,
        method=match.method.upper() if match.method else None,
        headers=tuple(snap.ValueMatch(h.name.lower(), h.value, h.type) for h in match.headers),
        query_params=tuple(snap.ValueMatch(q.name, q.value, q.type)
                           for q in match.query_params),
    )


_T = TypeVar("_T")


def _unique(items: Iterable[_T]) -> tuple[_T, ...]:
    """Items in their first order, each once."""
    return tuple(dict.fromkeys(items))


# --------------------------------------------------------------------------- egress


def _compile_egress_policy(policy: EgressPolicy, index: _Index
                           ) -> tuple[snap.EgressPolicy | None, ObjectStatus]:
    meta, spec = policy.metadata, policy.spec
    problems = _Problems()
    allow = tuple(_egress_rule(rule, DEFAULT_EGRESS_PORTS) for rule in spec.allow)
    deny = tuple(_egress_rule(rule, ()) for rule in spec.deny)
    basic_auth: tuple[tuple[str, str], ...] = ()
    if spec.auth is not None:
        pair = _secret_values(index, meta.namespace, spec.auth.basic_secret_name,
                              [("username", None), ("password", None)], problems, "basic-auth")
        if pair is None:
            allow = ()  # fail closed: no credentials known, so nobody may pass
            problems.messages.append("the policy allows nothing until the Secret is usable")
        else:
            basic_auth = ((pair[0], pair[1]),)
    compiled = snap.EgressPolicy(
        key=policy.key,
        allow=allow,
        deny=deny,
        allow_private_networks=spec.allow_private_networks,
        basic_auth=basic_auth,
        anonymize=spec.anonymize,
        cache=compile_cache(spec.cache),
    )
    status = ObjectStatus("EgressPolicy", policy.key,
                          (_accepted(meta.generation), problems.condition(meta.generation)))
    return compiled, status


def _egress_rule(rule: EgressRuleSpec, default_ports: tuple[int, ...]) -> snap.EgressRule:
    ports = tuple(sorted(set(rule.ports))) if rule.ports else default_ports
    return snap.EgressRule(host=rule.host.lower(), ports=ports)


def compile_cache(spec: CacheSpec | None) -> snap.Cache | None:
    """A `cache` section as the dataplane reads it: seconds, bytes, lower-case names."""
    if spec is None:
        return None
    key = spec.key
    return snap.Cache(
        enabled=spec.enabled,
        default_ttl=_optional_seconds(spec.default_ttl, zero_is_none=False),
        statuses=tuple(sorted(set(spec.statuses))),
        key_headers=() if key is None else tuple(name.lower() for name in key.headers),
        key_cookies=() if key is None else tuple(key.cookies),
        max_object_size=parse_byte_size(spec.max_object_size),
        allow_set_cookie=spec.allow_set_cookie,
    )

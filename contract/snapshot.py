"""The Snapshot: the one configuration value a dataplane consumes.

This module is the contract between the control plane and the dataplane. A Snapshot
is plain, immutable and serialisable (JSON); its version is a hash of its content, so
the same inputs always give the same version, whichever operator replica compiled them.

Durations are float seconds here: the control plane parses the human forms (`400ms`,
`1m30s`) so the dataplane never has to. Names of Upstreams and Routes are keys of the
form `namespace/name`. Header names in matches are lower case.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from kanal.contract.access import AccessPolicy
from kanal.contract.plain import from_plain, to_plain

PathMatchType = Literal["Exact", "PathPrefix", "RegularExpression"]
ValueMatchType = Literal["Exact", "RegularExpression"]
LoadBalancerPolicy = Literal["RoundRobin", "LeastRequest", "Random", "RingHash"]
Protocol = Literal["HTTP", "HTTPS", "H2C", "H2"]
Gateway = Literal["ingress", "mesh"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str
    port: int
    weight: int = 1


@dataclass(frozen=True, slots=True)
class HashOn:
    """What RingHash hashes: exactly one of a header, a cookie or the client address."""

    header: str | None = None
    cookie: str | None = None
    source_ip: bool = False


@dataclass(frozen=True, slots=True)
class HealthCheck:
    path: str = "/healthz"
    interval: float = 5.0
    timeout: float = 1.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    grpc_service: str | None = None  # set: a grpc.health.v1 check of this service name


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    max_connections: int = 1024
    max_pending_requests: int = 1024
    consecutive_failures: int = 5
    failure_rate_percent: int = 50
    minimum_requests: int = 20
    slow_call_duration: float | None = None
    open_duration: float = 30.0
    half_open_requests: int = 1


@dataclass(frozen=True, slots=True)
class UpstreamTLS:
    """TLS towards the endpoints. PEM texts are resolved from Secrets by the compiler."""

    sni: str | None = None
    ca_pem: str | None = None
    client_cert_pem: str | None = None
    client_key_pem: str | None = None
    insecure_skip_verify: bool = False


@dataclass(frozen=True, slots=True)
class Upstream:
    key: str
    endpoints: tuple[Endpoint, ...] = ()
    protocol: Protocol = "HTTP"
    tls: UpstreamTLS | None = None
    policy: LoadBalancerPolicy = "RoundRobin"
    hash_on: HashOn | None = None
    health_check: HealthCheck | None = None
    circuit_breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    connect_timeout: float = 2.0
    idle_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class PathMatch:
    type: PathMatchType = "PathPrefix"
    value: str = "/"


@dataclass(frozen=True, slots=True)
class ValueMatch:
    """A header (name in lower case) or query parameter match."""

    name: str
    value: str
    type: ValueMatchType = "Exact"


@dataclass(frozen=True, slots=True)
class Match:
    path: PathMatch = field(default_factory=PathMatch)
    method: str | None = None
    headers: tuple[ValueMatch, ...] = ()
    query_params: tuple[ValueMatch, ...] = ()


@dataclass(frozen=True, slots=True)
class Backend:
    upstream: str
    weight: int = 1
    filters: tuple[Filter, ...] = ()


@dataclass(frozen=True, slots=True)
class Retries:
    attempts: int = 1
    per_try_timeout: float | None = None
    retry_on: tuple[str, ...] = ("connect-failure", "reset", "502", "503", "504")


@dataclass(frozen=True, slots=True)
class SessionAffinity:
    cookie_name: str = "kanal-affinity"
    ttl: float = 3600.0


DEFAULT_CACHEABLE_STATUSES = (200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501)
"""RFC 9110's heuristically cacheable status codes (15.1), less 206: a partial answer is
never stored (a complete entry answers Range requests instead)."""


@dataclass(frozen=True, slots=True)
class Cache:
    """A shared HTTP cache (RFC 9111) for a Route rule's or an EgressPolicy's answers.

    `default_ttl` (seconds) is the freshness given to answers without any freshness
    information; None keeps RFC 9111's rules (heuristic freshness only with
    Last-Modified). `key_headers` (lower case) and `key_cookies` add request values to
    the key; `allow_set_cookie` stores answers that set cookies (without the cookies).
    """

    enabled: bool = True
    default_ttl: float | None = None
    statuses: tuple[int, ...] = DEFAULT_CACHEABLE_STATUSES
    key_headers: tuple[str, ...] = ()
    key_cookies: tuple[str, ...] = ()
    max_object_size: int = 8 * 1024 * 1024
    allow_set_cookie: bool = False


@dataclass(frozen=True, slots=True)
class AggregatePart:
    """A sub-request of an aggregate rule (`path` is a template, see the Route model)."""

    name: str
    upstream: str
    method: str = "GET"
    path: str = "/"
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class Aggregate:
    parts: tuple[AggregatePart, ...] = ()
    on_error: str = "Fail"  # Fail | Partial


@dataclass(frozen=True, slots=True)
class GrpcTranscoder:
    """JSON requests of a rule made into gRPC calls to its backends."""

    descriptor_set: str = ""  # base64 of a FileDescriptorSet; "" when it did not resolve


@dataclass(frozen=True, slots=True)
class Rule:
    index: int
    name: str | None = None
    matches: tuple[Match, ...] = (Match(),)
    backends: tuple[Backend, ...] = ()
    session_affinity: SessionAffinity | None = None
    timeout: float | None = None
    retries: Retries | None = None
    max_request_body_size: int | None = None
    allow_websocket: bool = True
    access: AccessPolicy | None = None
    filters: tuple[Filter, ...] = ()
    cache: Cache | None = None
    aggregate: Aggregate | None = None  # set: answered by sub-requests, not backends
    grpc_transcoder: GrpcTranscoder | None = None


@dataclass(frozen=True, slots=True)
class Hsts:
    max_age: int = 31536000
    include_sub_domains: bool = False


@dataclass(frozen=True, slots=True)
class RouteTLS:
    """TLS termination for a Route's hostnames; the PEMs come from its Secret."""

    secret: str
    cert_pem: str | None = None
    key_pem: str | None = None
    redirect_http: bool = False
    hsts: Hsts | None = None


@dataclass(frozen=True, slots=True)
class Route:
    """A Route as the dataplane sees it.

    Routes are listed in the Snapshot in tie-break order (oldest first, then by key),
    so the router needs no timestamps: a route's position is its last word.
    """

    key: str
    hostnames: tuple[str, ...] = ()
    gateways: tuple[Gateway, ...] = ("ingress",)
    rules: tuple[Rule, ...] = ()
    tls: RouteTLS | None = None


@dataclass(frozen=True, slots=True)
class EgressRule:
    host: str
    ports: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    key: str
    allow: tuple[EgressRule, ...] = ()
    deny: tuple[EgressRule, ...] = ()
    allow_private_networks: bool = False
    basic_auth: tuple[tuple[str, str], ...] = ()
    anonymize: bool = False
    cache: Cache | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    routes: tuple[Route, ...] = ()
    upstreams: tuple[Upstream, ...] = ()
    egress_policies: tuple[EgressPolicy, ...] = ()
    version: str = ""

    def upstream(self, key: str) -> Upstream | None:
        for upstream in self.upstreams:
            if upstream.key == key:
                return upstream
        return None

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)  # type: ignore[no-any-return]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Snapshot:
        return from_plain(cls, data)

    @classmethod
    def from_json(cls, text: str | bytes) -> Snapshot:
        return cls.from_dict(json.loads(text))

    def with_version(self) -> Snapshot:
        """The same Snapshot, its version set to the hash of its content."""
        return dataclasses.replace(self, version=content_version(self))


def content_version(snapshot: Snapshot) -> str:
    content = dataclasses.replace(snapshot, version="").to_dict()
    text = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- filters
#
# `filters` on a rule or a backend, in Gateway API HTTPRoute's names and shapes (plus
# DirectResponse and Compression, where Gateway API stops). One `Filter` carries its
# type and the settings of that type; the dataplane compiles a rule's list once per
# Snapshot (dataplane/filters.py).

FilterType = Literal["RequestHeaderModifier", "ResponseHeaderModifier", "URLRewrite",
                     "RequestRedirect", "RequestMirror", "CORS", "DirectResponse", "Compression"]
PathModifierType = Literal["ReplaceFullPath", "ReplacePrefixMatch", "ReplaceRegexMatch"]


@dataclass(frozen=True, slots=True)
class HeaderValue:
    """A header to set or add; `value` may hold `${variable}`s (contract/templates.py)."""

    name: str
    value: str


@dataclass(frozen=True, slots=True)
class HeaderModifier:
    set: tuple[HeaderValue, ...] = ()
    add: tuple[HeaderValue, ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PathModifier:
    """`value` is the full path, the prefix's replacement, or the regex substitution."""

    type: PathModifierType
    value: str


@dataclass(frozen=True, slots=True)
class URLRewrite:
    hostname: str | None = None
    path: PathModifier | None = None


@dataclass(frozen=True, slots=True)
class RequestRedirect:
    scheme: str | None = None
    hostname: str | None = None
    port: int | None = None
    path: PathModifier | None = None
    status_code: int = 302
    keep_query: bool = True


@dataclass(frozen=True, slots=True)
class RequestMirror:
    upstream: str
    percent: int = 100
    max_body_size: int = 65536


@dataclass(frozen=True, slots=True)
class CORS:
    allow_origins: tuple[str, ...] = ()
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    allow_credentials: bool = False
    max_age: int = 5


@dataclass(frozen=True, slots=True)
class DirectResponse:
    status_code: int = 200
    headers: tuple[HeaderValue, ...] = ()
    body: str = ""


DEFAULT_COMPRESSIBLE = (
    "text/html", "text/plain", "text/css", "text/javascript", "text/xml", "text/csv",
    "application/javascript", "application/json", "application/xml", "application/wasm",
    "image/svg+xml",
)


@dataclass(frozen=True, slots=True)
class Compression:
    algorithms: tuple[str, ...] = ("br", "zstd", "gzip")
    content_types: tuple[str, ...] = DEFAULT_COMPRESSIBLE
    min_size: int = 1024


@dataclass(frozen=True, slots=True)
class Filter:
    """One filter: its type, and the settings of that type (the others are None)."""

    type: FilterType
    request_header_modifier: HeaderModifier | None = None
    response_header_modifier: HeaderModifier | None = None
    url_rewrite: URLRewrite | None = None
    request_redirect: RequestRedirect | None = None
    request_mirror: RequestMirror | None = None
    cors: CORS | None = None
    direct_response: DirectResponse | None = None
    compression: Compression | None = None

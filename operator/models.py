"""The custom resources users write (Route, Upstream, EgressPolicy) and the Secrets they name.

These pydantic models are the one definition of the API (group `kanal.dev`, version
`v1alpha1`, see docs/api.md): `kanal validate` and `kanal run` check manifests
with them, the operator parses watched objects with them, and the CRD generator turns
their JSON schema into the CRDs' structural OpenAPI schema, their `description`s into
`kubectl explain` text. Hence the rules this module keeps:

- field names are the camelCase names of api.md (aliases); unknown fields are errors,
  so a typo never silently becomes a default;
- no unions of objects, constraints as `Field(ge=, le=, pattern=)` where the schema can
  say them, and cross-field rules in validators with short messages;
- every field has a description that states its default and meaning.

The models validate one object at a time. What needs other objects (does the Upstream
exist? the Secret?) is the compiler's job, and ends up in status conditions.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from kanal.contract.grpc import RETRYABLE_NAMES as GRPC_RETRY_NAMES
from kanal.contract.names import wildcard_public_suffix
from kanal.contract.patterns import PatternError, compile_pattern, substitution_problem
from kanal.contract.snapshot import DEFAULT_CACHEABLE_STATUSES, DEFAULT_COMPRESSIBLE
from kanal.contract.templates import TemplateError, parse_template
from kanal.contract.validate import wire_safe
from kanal.operator.access import PoliciesSpec
from kanal.operator.durations import Duration, PositiveDuration, parse_duration

GROUP = "kanal.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
RETRY_CONDITIONS = ("connect-failure", "reset", "timeout", "5xx")
DEFAULT_RETRY_ON = ("connect-failure", "reset", "502", "503", "504")

# --------------------------------------------------------------------------- names

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS_SUBDOMAIN_PATTERN = rf"^{_LABEL}(\.{_LABEL})*$"
DNS_LABEL_PATTERN = rf"^{_LABEL}$"
SERVICE_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# Host names may be written in any case (they are lower-cased on the way in).
_ANY_CASE_LABEL = r"[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?"
HOSTNAME_PATTERN = rf"^(\*\.)?{_ANY_CASE_LABEL}(\.{_ANY_CASE_LABEL})*$"
HEADER_NAME_PATTERN = r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$"

_DNS_SUBDOMAIN = re.compile(DNS_SUBDOMAIN_PATTERN)
_DNS_LABEL = re.compile(DNS_LABEL_PATTERN)
_SERVICE_NAME = re.compile(SERVICE_NAME_PATTERN)
_HEADER_NAME = re.compile(HEADER_NAME_PATTERN)
_HOST_LABEL = re.compile(DNS_LABEL_PATTERN)


def _object_name(value: str) -> str:
    if len(value) > 253 or not _DNS_SUBDOMAIN.fullmatch(value):
        raise ValueError(
            f"must be a lower-case DNS name (a-z, 0-9, '-', '.'; at most 253 characters), "
            f"got {value!r}"
        )
    return value


def _namespace(value: str) -> str:
    if len(value) > 63 or not _DNS_LABEL.fullmatch(value):
        raise ValueError(
            f"must be a lower-case DNS label (a-z, 0-9, '-'; at most 63 characters), got {value!r}"
        )
    return value


def _service_name(value: str) -> str:
    if len(value) > 63 or not _SERVICE_NAME.fullmatch(value):
        raise ValueError(
            f"must be a Service name (a-z, 0-9, '-', starting with a letter), got {value!r}"
        )
    return value


def _hostname(value: str) -> str:
    """Lower-case a host name and check it is a DNS name or a `*.` wildcard."""
    host = value.lower()
    if host == "*":
        raise ValueError("a bare '*' is not a hostname; leave hostnames empty to match any host")
    if ":" in host and not _is_ip(host):
        raise ValueError(f"must not contain a port, got {value!r}")
    if _is_ip(host.strip("[]")):
        raise ValueError(f"must be a DNS name, not an IP address, got {value!r}")
    labels = host[2:].split(".") if host.startswith("*.") else host.split(".")
    if (
        len(host) > 253
        or not all(len(label) <= 63 and _HOST_LABEL.fullmatch(label) for label in labels)
    ):
        raise ValueError(
            f"must be a DNS name like shop.example.com or a wildcard like *.example.com, "
            f"got {value!r}"
        )
    return host


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _endpoint_address(value: str) -> str:
    if _is_ip(value):
        return value
    host = value.lower()
    if len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in host.split(".")):
        raise ValueError(f"must be an IP address or a DNS name, got {value!r}")
    return host


def _header_name(value: str) -> str:
    if not _HEADER_NAME.fullmatch(value):
        raise ValueError(f"must be an HTTP header name (a token: letters, digits, -), got {value!r}")
    return value


def _method(value: str) -> str:
    if value not in HTTP_METHODS:
        raise ValueError(f"must be one of {', '.join(HTTP_METHODS)}")
    return value


def _regex(value: str) -> str:
    try:
        compile_pattern(value)
    except PatternError as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    return value


def _retry_on(value: str) -> str:
    if (value in RETRY_CONDITIONS or re.fullmatch(r"5[0-9][0-9]", value)
            or value in GRPC_RETRY_NAMES):
        return value
    raise ValueError(
        f"must be one of {', '.join(RETRY_CONDITIONS)}, a 5xx status code like \"503\" "
        f"or a gRPC status name like unavailable, got {value!r}"
    )


def _no_bare_status_code(value: Any) -> Any:
    """YAML reads `503` as a number, which the API server's schema refuses: say how to write it."""
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(f'write status codes as strings: "{value}"')
    return value


def _string(pattern: str, max_length: int | None = None) -> WithJsonSchema:
    schema: dict[str, Any] = {"type": "string", "pattern": pattern}
    if max_length is not None:
        schema["maxLength"] = max_length
    return WithJsonSchema(schema)


_BYTE_UNITS = {"": 1, "k": 1000, "M": 1000**2, "G": 1000**3, "Ki": 1024, "Mi": 1024**2,
               "Gi": 1024**3}
BYTE_SIZE_PATTERN = r"^[0-9]{1,15}(k|Ki|M|Mi|G|Gi)?$"


def parse_byte_size(text: str) -> int:
    """Bytes in a size as users write it: `1048576`, `500k`, `1Mi`, `2G`."""
    match = re.fullmatch(BYTE_SIZE_PATTERN, text)
    if match is None:
        raise ValueError(f"{text!r} is not a size: digits with k, Ki, M, Mi, G or Gi")
    unit = match.group(1) or ""
    return int(text[: len(text) - len(unit)]) * _BYTE_UNITS[unit]


def _byte_size(value: str) -> str:
    parse_byte_size(value)
    return value


ByteSize = Annotated[str, AfterValidator(_byte_size), WithJsonSchema(
    {"type": "string", "pattern": BYTE_SIZE_PATTERN})]

ObjectName = Annotated[str, AfterValidator(_object_name), _string(DNS_SUBDOMAIN_PATTERN, 253)]
NamespaceName = Annotated[str, AfterValidator(_namespace), _string(DNS_LABEL_PATTERN, 63)]
ServiceName = Annotated[str, AfterValidator(_service_name), _string(SERVICE_NAME_PATTERN, 63)]
Hostname = Annotated[str, AfterValidator(_hostname), _string(HOSTNAME_PATTERN, 253)]
HeaderName = Annotated[str, AfterValidator(_header_name), _string(HEADER_NAME_PATTERN, 256)]
HttpMethod = Annotated[str, AfterValidator(_method), WithJsonSchema(
    {"type": "string", "enum": list(HTTP_METHODS)})]
RetryOn = Annotated[str, BeforeValidator(_no_bare_status_code), AfterValidator(_retry_on),
                    _string(r"^(connect-failure|reset|timeout|5xx|5[0-9][0-9]|"
                            + "|".join(GRPC_RETRY_NAMES) + ")$")]
EndpointAddress = Annotated[str, AfterValidator(_endpoint_address), WithJsonSchema(
    {"type": "string", "minLength": 1, "maxLength": 253})]
Port = Annotated[int, Field(ge=1, le=65535)]
Weight = Annotated[int, Field(ge=0, le=1_000_000)]


class KanalModel(BaseModel):
    """Base of every spec model: camelCase names, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        extra="forbid",
        frozen=True,
        # Strict types: `"8080"` is not a port and `yes` not a boolean, exactly as the
        # API server's schema says; what `kanal validate` accepts, `kubectl apply` does.
        strict=True,
        validate_default=False,
    )


# --------------------------------------------------------------------------- Upstream


class ServiceRef(KanalModel):
    """A Kubernetes Service whose ready EndpointSlice addresses are the endpoints."""

    name: ServiceName = Field(description="Name of the Service, in the Upstream's namespace.")
    port: Port = Field(
        description="The Service port (its `port`, not the target port) to send requests to."
    )


class StaticEndpoint(KanalModel):
    """One fixed endpoint: an address and a port."""

    address: EndpointAddress = Field(
        description="IP address or DNS name of the endpoint. A DNS name is resolved when "
        "connecting."
    )
    port: Port = Field(description="TCP port of the endpoint (1-65535).")
    weight: Weight = Field(
        default=1,
        description="Relative share of requests for this endpoint, 0-1000000 (default 1). "
        "Weight 0 keeps the endpoint configured but sends it no traffic.",
    )


class UpstreamTLSSpec(KanalModel):
    """How to speak TLS to the endpoints (for protocol HTTPS)."""

    sni: Hostname | None = Field(
        default=None,
        description="Server name sent in the TLS handshake (SNI); also the name the server's "
        "certificate must carry. Default: the endpoint's address when it is a DNS name.",
    )
    ca_secret_name: ObjectName | None = Field(
        default=None,
        description="Secret (in the Upstream's namespace) whose `ca.crt` holds the PEM CA "
        "bundle that signs the servers' certificates. Default: the system's trusted CAs.",
    )
    client_cert_secret_name: ObjectName | None = Field(
        default=None,
        description="kubernetes.io/tls Secret (in the Upstream's namespace) with the client "
        "certificate (`tls.crt`) and key (`tls.key`) to present: mutual TLS. Default: none.",
    )
    insecure_skip_verify: bool = Field(
        default=False,
        description="Do not verify the servers' certificates at all (default false). For "
        "tests only: it allows anyone on the path to read and change the traffic.",
    )


class HashOnSpec(KanalModel):
    """What RingHash hashes, so that the same key keeps reaching the same endpoint.

    Exactly one of `header`, `cookie` or `sourceIP`.
    """

    header: HeaderName | None = Field(
        default=None, description="Hash the value of this request header (case-insensitive)."
    )
    cookie: str | None = Field(
        default=None, min_length=1, description="Hash the value of this request cookie."
    )
    source_ip: bool | None = Field(
        default=None,
        alias="sourceIP",
        description="Hash the client's IP address (set to true).",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> HashOnSpec:
        chosen = [
            name
            for name, value in (("header", self.header), ("cookie", self.cookie),
                                ("sourceIP", self.source_ip))
            if value not in (None, False)
        ]
        if len(chosen) != 1:
            raise ValueError(
                "set exactly one of header, cookie or sourceIP: true"
                + (f" (got {', '.join(chosen)})" if chosen else "")
            )
        return self


class LoadBalancerSpec(KanalModel):
    """How a request picks an endpoint."""

    policy: Literal["RoundRobin", "LeastRequest", "Random", "RingHash"] = Field(
        default="RoundRobin",
        description="RoundRobin (default; weighted), LeastRequest (fewest requests in flight, "
        "of two random choices), Random (weighted), or RingHash (consistent hashing on "
        "`hashOn`).",
    )
    hash_on: HashOnSpec | None = Field(
        default=None,
        description="RingHash only: what to hash, one of `header`, `cookie` or `sourceIP`. "
        "Default for RingHash: the client's IP address.",
    )

    @model_validator(mode="after")
    def _hash_on_needs_ring_hash(self) -> LoadBalancerSpec:
        if self.hash_on is not None and self.policy != "RingHash":
            raise ValueError(f"hashOn is only valid with policy RingHash, not {self.policy}")
        return self


class GrpcHealthCheckSpec(KanalModel):
    """A check with the standard gRPC health protocol (grpc.health.v1)."""

    service: str = Field(
        default="",
        max_length=256,
        pattern=r"^[!-~]*$",
        description="The service name asked about (default empty: the server as a whole).",
    )


class HealthCheckSpec(KanalModel):
    """Active health checks: a GET to each endpoint every `interval`."""

    path: str = Field(
        default="/healthz",
        pattern=r"^/[!-~]*$",
        max_length=2048,
        description="Path requested on each endpoint (default /healthz): starts with / and "
        "holds only visible ASCII (no spaces or control characters; percent-encode the "
        "rest). A 2xx or 3xx answer within `timeout` is a success.",
    )
    interval: PositiveDuration = Field(
        default="5s", description="Time between two checks of one endpoint (default 5s)."
    )
    timeout: PositiveDuration = Field(
        default="1s",
        description="How long to wait for an answer before the check fails (default 1s); "
        "at most `interval`.",
    )
    healthy_threshold: int = Field(
        default=2,
        ge=1,
        description="Consecutive successes that make an unhealthy endpoint healthy (default 2).",
    )
    unhealthy_threshold: int = Field(
        default=3,
        ge=1,
        description="Consecutive failures that make a healthy endpoint unhealthy (default 3).",
    )
    grpc: GrpcHealthCheckSpec | None = Field(
        default=None,
        description="Check with the standard gRPC health protocol instead of a GET of `path`: "
        "grpc.health.v1.Health/Check must answer SERVING within `timeout`. Needs protocol H2C "
        "or H2.",
    )

    @model_validator(mode="after")
    def _timeout_within_interval(self) -> HealthCheckSpec:
        if parse_duration(self.timeout) > parse_duration(self.interval):
            raise ValueError(
                f"timeout ({self.timeout}) must not be longer than interval ({self.interval})"
            )
        return self


class CircuitBreakerSpec(KanalModel):
    """Limits and failure detection that stop traffic to an upstream or endpoint that fails.

    A failure is a connect error, a reset, a timeout or a 5xx answer.
    """

    max_connections: int = Field(
        default=1024, ge=1,
        description="Most connections each dataplane opens to this upstream (default 1024).",
    )
    max_pending_requests: int = Field(
        default=1024, ge=0,
        description="Most requests waiting for a connection; more get 503 at once "
        "(default 1024).",
    )
    consecutive_failures: int = Field(
        default=5, ge=1,
        description="Consecutive failures of one endpoint that open its circuit (default 5).",
    )
    failure_rate_percent: int = Field(
        default=50, ge=1, le=100,
        description="Failure rate of one endpoint, in percent over the recent window, that "
        "opens its circuit once the window holds `minimumRequests` (default 50).",
    )
    minimum_requests: int = Field(
        default=20, ge=1,
        description="Requests the window must hold before the failure rate counts "
        "(default 20).",
    )
    slow_call_duration: Duration | None = Field(
        default=None,
        description="A call slower than this counts as a failure. Default: no limit.",
    )
    open_duration: PositiveDuration = Field(
        default="30s",
        description="How long an open circuit fails fast before half-open probes (default 30s).",
    )
    half_open_requests: int = Field(
        default=1, ge=1,
        description="Requests let through while half-open; if they succeed the circuit closes "
        "(default 1).",
    )


class UpstreamTimeouts(KanalModel):
    """Connection timeouts towards the endpoints."""

    connect: PositiveDuration = Field(
        default="2s", description="Time allowed to open a connection (default 2s)."
    )
    idle: PositiveDuration = Field(
        default="60s", description="An unused pooled connection is closed after this (default 60s)."
    )


class UpstreamSpec(KanalModel):
    """A pool of endpoints and how to talk to them. Exactly one of `service` or `endpoints`."""

    service: ServiceRef | None = Field(
        default=None,
        description="Discover the endpoints from this Service's EndpointSlices (needs the "
        "operator; `kanal run` has no service discovery). Exactly one of service or endpoints.",
    )
    endpoints: list[StaticEndpoint] | None = Field(
        default=None,
        description="A static list of endpoints (standalone mode, hosts outside the cluster). "
        "An empty list is allowed: requests then get 503. Exactly one of service or endpoints.",
    )
    protocol: Literal["HTTP", "HTTPS", "H2C", "H2"] = Field(
        default="HTTP", description="HTTP (default: HTTP/1.1), HTTPS (HTTP/1.1 over TLS), H2C "
        "(HTTP/2 in the clear, as gRPC servers speak) or H2 (HTTP/2 over TLS, ALPN h2). "
        "HTTP/2 upstreams are reached over a few multiplexed connections per endpoint.",
    )
    tls: UpstreamTLSSpec | None = Field(
        default=None,
        description="TLS settings for protocol HTTPS or H2 (server name, CA, client "
        "certificate). Default with HTTPS or H2: verify against the system's CAs.",
    )
    load_balancer: LoadBalancerSpec = Field(
        default_factory=LoadBalancerSpec,
        description="How requests are spread over the endpoints (default RoundRobin).",
    )
    health_check: HealthCheckSpec | None = Field(
        default=None,
        description="Active health checks. Absent: passive only (the circuit breaker).",
    )
    circuit_breaker: CircuitBreakerSpec = Field(
        default_factory=CircuitBreakerSpec,
        description="Connection limits and failure detection; see its fields for defaults.",
    )
    timeouts: UpstreamTimeouts = Field(
        default_factory=UpstreamTimeouts,
        description="Connect (default 2s) and idle (default 60s) timeouts.",
    )

    @model_validator(mode="after")
    def _check(self) -> UpstreamSpec:
        if (self.service is None) == (self.endpoints is None):
            raise ValueError("set exactly one of service or endpoints")
        if self.tls is not None and self.protocol not in ("HTTPS", "H2"):
            raise ValueError("tls is only valid with protocol: HTTPS or H2")
        if (self.health_check is not None and self.health_check.grpc is not None
                and self.protocol not in ("H2C", "H2")):
            raise ValueError("healthCheck.grpc needs protocol: H2C or H2")
        seen: set[tuple[str, int]] = set()
        for endpoint in self.endpoints or ():
            where = (endpoint.address, endpoint.port)
            if where in seen:
                raise ValueError(f"duplicate endpoint {endpoint.address}:{endpoint.port}")
            seen.add(where)
        return self


# --------------------------------------------------------------------------- Route


class PathMatchSpec(KanalModel):
    """How the request path must look."""

    type: Literal["Exact", "PathPrefix", "RegularExpression"] = Field(
        default="PathPrefix",
        description="Exact (the whole path), PathPrefix (default; whole segments: /api "
        "matches /api and /api/x, not /apix) or RegularExpression (RE2 syntax, must "
        "match the whole path).",
    )
    value: str = Field(
        default="/",
        min_length=1,
        max_length=1024,
        description="The path, prefix or regular expression (default /). Exact and "
        "PathPrefix values start with /.",
    )

    @model_validator(mode="after")
    def _check(self) -> PathMatchSpec:
        if self.type == "RegularExpression":
            _regex(self.value)
        elif not self.value.startswith("/"):
            raise ValueError(f"{self.type} paths must start with '/', got {self.value!r}")
        return self


class HeaderMatchSpec(KanalModel):
    """A request header that must be present with a value."""

    name: HeaderName = Field(description="Header name; compared case-insensitively.")
    value: str = Field(max_length=4096, description="The value, or a regular expression.")
    type: Literal["Exact", "RegularExpression"] = Field(
        default="Exact",
        description="Exact (default) or RegularExpression (RE2 syntax, whole value).",
    )

    @model_validator(mode="after")
    def _check(self) -> HeaderMatchSpec:
        if self.type == "RegularExpression":
            _regex(self.value)
        return self


class QueryParamMatchSpec(KanalModel):
    """A query parameter that must be present with a value."""

    name: str = Field(
        min_length=1, max_length=256, description="Parameter name; compared case-sensitively."
    )
    value: str = Field(max_length=4096, description="The value, or a regular expression.")
    type: Literal["Exact", "RegularExpression"] = Field(
        default="Exact",
        description="Exact (default) or RegularExpression (RE2 syntax, whole value).",
    )

    @model_validator(mode="after")
    def _check(self) -> QueryParamMatchSpec:
        if self.type == "RegularExpression":
            _regex(self.value)
        return self


class MatchSpec(KanalModel):
    """Conditions a request must all meet (AND)."""

    path: PathMatchSpec | None = Field(
        default=None, description="Path condition. Default: PathPrefix / (every path)."
    )
    method: HttpMethod | None = Field(
        default=None,
        description="HTTP method, upper case (methods are case-sensitive): one of "
        + ", ".join(HTTP_METHODS) + ". Default: any method.",
    )
    headers: list[HeaderMatchSpec] = Field(
        default_factory=list, description="Header conditions, all of which must hold."
    )
    query_params: list[QueryParamMatchSpec] = Field(
        default_factory=list, description="Query parameter conditions, all of which must hold."
    )

    @model_validator(mode="after")
    def _no_duplicates(self) -> MatchSpec:
        names = [header.name.lower() for header in self.headers]
        for name in sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"header {name} is matched twice; use one regular expression")
        params = [param.name for param in self.query_params]
        for name in sorted({n for n in params if params.count(n) > 1}):
            raise ValueError(f"query parameter {name} is matched twice")
        return self


# --------------------------------------------------------------------------- filters
#
# `filters` on a rule or a backend, as Gateway API's HTTPRoute writes them: a `type`
# and the settings object named after it (`requestHeaderModifier`, `urlRewrite`, ...).
# DirectResponse and Compression go past Gateway API in the same shape.

FILTER_TYPES = ("RequestHeaderModifier", "ResponseHeaderModifier", "URLRewrite",
                "RequestRedirect", "RequestMirror", "CORS", "DirectResponse", "Compression")
_FILTER_FIELDS = {
    "RequestHeaderModifier": "request_header_modifier",
    "ResponseHeaderModifier": "response_header_modifier",
    "URLRewrite": "url_rewrite",
    "RequestRedirect": "request_redirect",
    "RequestMirror": "request_mirror",
    "CORS": "cors",
    "DirectResponse": "direct_response",
    "Compression": "compression",
}
BACKEND_FILTER_TYPES = ("RequestHeaderModifier", "ResponseHeaderModifier", "URLRewrite")

# Headers the proxy frames or sets itself: a filter that changed them would break the
# framing of a message or lie about the client.
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive",
                              "upgrade", "te", "trailer", "proxy-connection",
                              "proxy-authorization", "proxy-authenticate"})
_REQUEST_PROTECTED = _FRAMING_HEADERS | {"host", "x-forwarded-for", "x-forwarded-proto",
                                         "x-forwarded-host", "x-real-ip", "forwarded", "expect"}


def _header_value(value: str) -> str:
    if not wire_safe(value):
        raise ValueError("must not contain CR, LF or NUL (they would split the header)")
    if not all(" " <= char <= "~" or char == "\t" for char in value):
        raise ValueError("must hold only visible ASCII, spaces and tabs (percent-encode the "
                         "rest)")
    try:
        parse_template(value)
    except TemplateError as exc:
        raise ValueError(str(exc)) from None
    return value


HeaderValueText = Annotated[str, AfterValidator(_header_value), WithJsonSchema(
    {"type": "string", "maxLength": 4096})]


class HTTPHeaderSpec(KanalModel):
    """A header name and value."""

    name: HeaderName = Field(description="Header name (case-insensitive).")
    value: HeaderValueText = Field(
        max_length=4096,
        description="Header value. May use ${client_address}, ${request_id} (the request's "
        "X-Request-Id, or a fresh id), ${route_name} (namespace/name) and ${host} (the "
        "request's host without port); write $$ for a literal $.",
    )


class HeaderModifierSpec(KanalModel):
    """Header changes: `remove` first, then `set` (replaces), then `add` (appends)."""

    set: list[HTTPHeaderSpec] = Field(
        default_factory=list, max_length=32,
        description="Headers to set, replacing any value the message had.")
    add: list[HTTPHeaderSpec] = Field(
        default_factory=list, max_length=32,
        description="Headers to add, keeping values the message had: `foo` plus `bar` "
        "is `foo,bar` (Set-Cookie gets a line of its own).")
    remove: list[HeaderName] = Field(
        default_factory=list, max_length=32,
        description="Names of headers to remove (case-insensitive).")

    @model_validator(mode="after")
    def _check(self) -> HeaderModifierSpec:
        set_names = [h.name.lower() for h in self.set]
        for name in sorted({n for n in set_names if set_names.count(n) > 1}):
            raise ValueError(f"set: header {name} is set twice")
        removed = {name.lower() for name in self.remove}
        for name in sorted(removed & ({*set_names} | {h.name.lower() for h in self.add})):
            raise ValueError(f"header {name} is both removed and set or added")
        return self

    def protected(self, forbidden: frozenset[str]) -> str | None:
        for part, names in (("set", [h.name for h in self.set]),
                            ("add", [h.name for h in self.add]), ("remove", self.remove)):
            for name in names:
                if name.lower() in forbidden:
                    return (f"{part}: header {name} cannot be changed by a filter (the proxy "
                            "frames the message or sets it itself)")
        return None


_PATH_VALUE = r"^/[!-~]*$"


class PathModifierSpec(KanalModel):
    """How a URLRewrite or RequestRedirect changes the path (Gateway API's HTTPPathModifier)."""

    type: Literal["ReplaceFullPath", "ReplacePrefixMatch", "ReplaceRegexMatch"] = Field(
        description="ReplaceFullPath (the whole path), ReplacePrefixMatch (the matched "
        "PathPrefix, on whole segments) or ReplaceRegexMatch (the matched RegularExpression "
        "path, with \\1 or \\g<name> for its groups).")
    replace_full_path: str | None = Field(
        default=None, max_length=1024, pattern=_PATH_VALUE,
        description="For ReplaceFullPath: the new path.")
    replace_prefix_match: str | None = Field(
        default=None, max_length=1024, pattern=r"^(/[!-~]*)?$",
        description="For ReplacePrefixMatch: what replaces the matched prefix (/foo with /xyz "
        "makes /foo/bar /xyz/bar; empty or / makes it /bar).")
    replace_regex_match: str | None = Field(
        default=None, max_length=1024, pattern=_PATH_VALUE,
        description="For ReplaceRegexMatch: the new path, with \\1 or \\g<name> for the "
        "groups of the rule's RegularExpression path.")

    @model_validator(mode="after")
    def _check(self) -> PathModifierSpec:
        wanted = {"ReplaceFullPath": "replace_full_path",
                  "ReplacePrefixMatch": "replace_prefix_match",
                  "ReplaceRegexMatch": "replace_regex_match"}
        for kind, name in wanted.items():
            given = getattr(self, name) is not None
            alias = to_camel(name)
            if kind == self.type and not given:
                raise ValueError(f"type {kind} needs {alias}")
            if kind != self.type and given:
                raise ValueError(f"{alias} is only for type {kind}, not {self.type}")
        return self

    @property
    def value(self) -> str:
        return (self.replace_full_path or self.replace_prefix_match or self.replace_regex_match
                or "")


PlainHostname = Annotated[str, AfterValidator(lambda v: _no_wildcard(_hostname(v))),
                          _string(HOSTNAME_PATTERN, 253)]


def _no_wildcard(value: str) -> str:
    if value.startswith("*."):
        raise ValueError(f"must be a host name, not a wildcard, got {value!r}")
    return value


class URLRewriteSpec(KanalModel):
    """Change the request before it is forwarded (Gateway API's HTTPURLRewriteFilter)."""

    hostname: PlainHostname | None = Field(
        default=None, description="The Host the backend gets. Default: the client's.")
    path: PathModifierSpec | None = Field(
        default=None, description="How the path changes. Default: unchanged.")


class RequestRedirectSpec(KanalModel):
    """Answer with a redirect (Gateway API's HTTPRequestRedirectFilter)."""

    scheme: Literal["http", "https"] | None = Field(
        default=None, description="Scheme of the Location. Default: the request's.")
    hostname: PlainHostname | None = Field(
        default=None, description="Host of the Location. Default: the request's.")
    port: Port | None = Field(
        default=None,
        description="Port of the Location. Default: the scheme's well-known port when "
        "`scheme` is set, else the port the client used; a well-known port is left out.")
    path: PathModifierSpec | None = Field(
        default=None, description="How the path changes. Default: unchanged.")
    status_code: Literal[301, 302, 303, 307, 308] = Field(
        default=302, description="301, 302 (default), 303, 307 or 308.")
    keep_query: bool = Field(
        default=True, description="Keep the request's query string (default true).")


class RequestMirrorSpec(KanalModel):
    """Send a copy of requests to another Upstream; its answer is thrown away."""

    upstream: ObjectName = Field(description="Name of an Upstream in the Route's namespace.")
    percent: int = Field(
        default=100, ge=0, le=100,
        description="Share of requests mirrored, 0-100 (default 100).")
    max_body_size: ByteSize = Field(
        default="64Ki",
        description="Largest request body mirrored (default 64Ki); a request with a larger "
        "one is not mirrored.")


_ORIGIN = re.compile(r"^(\*|https?://(\*\.)?[A-Za-z0-9.\-]+(:[0-9]{1,5})?|[a-z][a-z0-9+.\-]*://"
                     r"[A-Za-z0-9.\-\[\]:]+)$")


def _origin(value: str) -> str:
    if not _ORIGIN.fullmatch(value):
        raise ValueError(f"must be *, an origin like https://shop.example.com[:port] or "
                         f"https://*.example.com, got {value!r}")
    return value


def _method_or_star(value: str) -> str:
    return value if value == "*" else _method(value)


def _header_or_star(value: str) -> str:
    return value if value == "*" else _header_name(value)


Origin = Annotated[str, AfterValidator(_origin), WithJsonSchema(
    {"type": "string", "maxLength": 253})]
MethodOrStar = Annotated[str, AfterValidator(_method_or_star), WithJsonSchema(
    {"type": "string", "enum": ["*", *HTTP_METHODS]})]
HeaderOrStar = Annotated[str, AfterValidator(_header_or_star), WithJsonSchema(
    {"type": "string", "maxLength": 256})]


class CORSSpec(KanalModel):
    """Cross-origin requests from browsers (Gateway API's HTTPCORSFilter)."""

    allow_origins: list[Origin] = Field(
        default_factory=list, max_length=64,
        description="Origins whose pages may read the answers: exact "
        "(https://shop.example.com), a subdomain wildcard (https://*.example.com) or *. "
        "Other origins get no CORS header.")
    allow_methods: list[MethodOrStar] = Field(
        default_factory=list, description="Methods allowed in a preflight, or *.")
    allow_headers: list[HeaderOrStar] = Field(
        default_factory=list, description="Request headers allowed in a preflight, or *.")
    expose_headers: list[HeaderOrStar] = Field(
        default_factory=list, description="Answer headers the page may read.")
    allow_credentials: bool = Field(
        default=False,
        description="Allow cookies and credentials (default false); the origin is then "
        "echoed, never *.")
    max_age: int = Field(
        default=5, ge=0, le=86400,
        description="Seconds a browser may cache a preflight answer (default 5).")


class DirectResponseSpec(KanalModel):
    """Answer from the proxy: maintenance pages, /robots.txt, health stubs."""

    status_code: int = Field(default=200, ge=200, le=599,
                             description="Status code, 200-599 (default 200).")
    headers: list[HTTPHeaderSpec] = Field(
        default_factory=list, max_length=32,
        description="Headers of the answer. Default Content-Type: text/plain; charset=utf-8.")
    body: str = Field(default="", max_length=65536,
                      description="The body (UTF-8 text, at most 64 KiB). Default: empty.")

    @model_validator(mode="after")
    def _check(self) -> DirectResponseSpec:
        for header in self.headers:
            if header.name.lower() in _FRAMING_HEADERS | {"host"}:
                raise ValueError(f"headers: {header.name} is set by the proxy")
        return self


def _default_algorithms() -> list[Literal["br", "zstd", "gzip"]]:
    return ["br", "zstd", "gzip"]


class CompressionSpec(KanalModel):
    """Compress answers for clients that accept it (gzip, brotli, zstd)."""

    algorithms: list[Literal["br", "zstd", "gzip"]] = Field(
        default_factory=_default_algorithms, min_length=1,
        description="Codings offered, preferred first when the client's q-values tie "
        "(default br, zstd, gzip).")
    content_types: list[str] = Field(
        default_factory=lambda: list(DEFAULT_COMPRESSIBLE), max_length=64,
        description="Media types compressed (default: text, JSON, JavaScript, XML, SVG, "
        "wasm).")
    min_size: ByteSize = Field(
        default="1Ki", description="Smallest answer compressed, when its length is known "
        "(default 1Ki).")

    @model_validator(mode="after")
    def _check(self) -> CompressionSpec:
        if len(set(self.algorithms)) != len(self.algorithms):
            raise ValueError("algorithms: each at most once")
        for media in self.content_types:
            if not re.fullmatch(r"[A-Za-z0-9!#$&^_.+\-]+/[A-Za-z0-9!#$&^_.+\-]+", media):
                raise ValueError(f"contentTypes: {media!r} is not a media type like text/html")
        return self


class FilterSpec(KanalModel):
    """One filter: `type`, and the settings object of that type."""

    type: Literal["RequestHeaderModifier", "ResponseHeaderModifier", "URLRewrite",
                  "RequestRedirect", "RequestMirror", "CORS", "DirectResponse",
                  "Compression"] = Field(
        description="RequestHeaderModifier, ResponseHeaderModifier, URLRewrite, "
        "RequestRedirect, RequestMirror, CORS, DirectResponse or Compression.")
    request_header_modifier: HeaderModifierSpec | None = Field(
        default=None, description="For RequestHeaderModifier: changes to the request's headers.")
    response_header_modifier: HeaderModifierSpec | None = Field(
        default=None, description="For ResponseHeaderModifier: changes to the answer's headers.")
    url_rewrite: URLRewriteSpec | None = Field(
        default=None, alias="urlRewrite",
        description="For URLRewrite: change the request before it is forwarded (its Host "
        "and path).")
    request_redirect: RequestRedirectSpec | None = Field(
        default=None,
        description="For RequestRedirect: answer with a redirect instead of forwarding.")
    request_mirror: RequestMirrorSpec | None = Field(
        default=None,
        description="For RequestMirror: send a copy of requests to another Upstream, "
        "fire-and-forget.")
    cors: CORSSpec | None = Field(
        default=None,
        description="For CORS: which browser origins may read the answers; preflights are "
        "answered by the proxy.")
    direct_response: DirectResponseSpec | None = Field(
        default=None,
        description="For DirectResponse: a fixed answer from the proxy.")
    compression: CompressionSpec | None = Field(
        default=None,
        description="For Compression (optional): compress answers (br, zstd, gzip) for "
        "clients that accept it.")

    @model_validator(mode="after")
    def _check(self) -> FilterSpec:
        wanted = _FILTER_FIELDS[self.type]
        for kind, name in _FILTER_FIELDS.items():
            given = getattr(self, name) is not None
            alias = "urlRewrite" if name == "url_rewrite" else to_camel(name)
            if name == wanted and not given and kind != "Compression":
                raise ValueError(f"type {kind} needs {alias}")
            if name != wanted and given:
                raise ValueError(f"{alias} is only for type {kind}, not {self.type}")
        problem = None
        if self.request_header_modifier is not None:
            problem = self.request_header_modifier.protected(_REQUEST_PROTECTED)
        elif self.response_header_modifier is not None:
            problem = self.response_header_modifier.protected(_FRAMING_HEADERS | {"host"})
        if problem is not None:
            raise ValueError(problem)
        return self


def check_filters(filters: list[FilterSpec], *, backend: bool) -> None:
    """Rules a filter list keeps as a whole (Gateway API's, and the same for backends)."""
    types: list[str] = [f.type for f in filters]
    for kind in sorted({t for t in types if types.count(t) > 1 and t != "RequestMirror"}):
        raise ValueError(f"filters: {kind} appears twice (at most once, except RequestMirror)")
    if "RequestRedirect" in types and "URLRewrite" in types:
        raise ValueError("filters: RequestRedirect and URLRewrite cannot be used together")
    if "RequestRedirect" in types and "DirectResponse" in types:
        raise ValueError("filters: RequestRedirect and DirectResponse cannot be used together")
    if backend:
        for name in types:
            if name not in BACKEND_FILTER_TYPES:
                raise ValueError(f"filters: {name} is not allowed on a backend, only "
                                 + ", ".join(BACKEND_FILTER_TYPES))



class BackendSpec(KanalModel):
    """An Upstream that takes a share of the rule's requests."""

    upstream: ObjectName = Field(description="Name of an Upstream in the Route's namespace.")
    weight: Weight = Field(
        default=1,
        description="Relative share of requests, 0-1000000 (default 1). Weight 0 is a standby "
        "(blue/green); when every backend has weight 0 the rule answers 503.",
    )
    filters: list[FilterSpec] = Field(
        default_factory=list, max_length=16,
        description="Filters applied when this backend is chosen, after the rule's: "
        "RequestHeaderModifier, ResponseHeaderModifier and URLRewrite.",
    )

    @model_validator(mode="after")
    def _check_filters(self) -> BackendSpec:
        check_filters(self.filters, backend=True)
        return self


class CookieAffinitySpec(KanalModel):
    """Keep a client on one backend with a cookie the proxy sets."""

    name: str = Field(
        default="kanal-affinity",
        pattern=r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$",
        description="Cookie name (default kanal-affinity).",
    )
    ttl: PositiveDuration = Field(default="1h", description="Cookie lifetime (default 1h).")


class SessionAffinitySpec(KanalModel):
    """Session affinity: a client keeps its backend across requests."""

    cookie: CookieAffinitySpec = Field(
        default_factory=CookieAffinitySpec,
        description="Affinity by a cookie the proxy sets (default name kanal-affinity, ttl 1h).",
    )


class RetriesSpec(KanalModel):
    """Retry failed attempts on another endpoint."""

    attempts: int = Field(
        default=1, ge=0, le=10,
        description="Retries after the first try, 0-10 (default 1).",
    )
    per_try_timeout: Duration | None = Field(
        default=None,
        description="Time limit of each try. Default: only the rule's `timeout` applies.",
    )
    retry_on: list[RetryOn] = Field(
        default_factory=lambda: list(DEFAULT_RETRY_ON),
        description="What is retried: connect-failure, reset, timeout, 5xx (any 5xx answer) "
        "or a status code such as \"503\". Default: connect-failure, reset, 502, 503, 504. "
        "Requests with a body that was already sent are not retried.",
    )


class CacheKeySpec(KanalModel):
    """Request values added to the cache key, beside method, scheme, host, path and query."""

    headers: list[HeaderName] = Field(
        default_factory=list, max_length=16,
        description="Request header names whose values are part of the key. Default: none.",
    )
    cookies: list[Annotated[str, Field(pattern=r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")]] = Field(
        default_factory=list, max_length=16,
        description="Cookie names whose values are part of the key. Default: none.",
    )


class CacheSpec(KanalModel):
    """A shared HTTP cache (RFC 9111) for GET and HEAD answers."""

    enabled: bool = Field(default=True, description="Whether answers are cached (default true).")
    default_ttl: Duration | None = Field(
        default=None,
        alias="defaultTTL",
        description="Freshness given to answers that carry no Cache-Control max-age, "
        "s-maxage or Expires. Default: none (such answers are fresh only heuristically, "
        "by Last-Modified, as RFC 9111 allows).",
    )
    statuses: list[Annotated[int, Field(ge=200, le=599)]] = Field(
        default_factory=lambda: list(DEFAULT_CACHEABLE_STATUSES),
        max_length=32,
        description="Status codes that may be stored. Default: 200, 203, 204, 300, 301, "
        "308, 404, 405, 410, 414, 501.",
    )
    key: CacheKeySpec | None = Field(
        default=None, description="Extra parts of the cache key (headers, cookies).",
    )
    max_object_size: ByteSize = Field(
        default="8Mi",
        description="Largest answer body stored, in bytes or with a suffix (default 8Mi); "
        "larger answers are passed through and not stored.",
    )
    allow_set_cookie: bool = Field(
        default=False,
        description="Store answers that carry Set-Cookie (stored and served without their "
        "Set-Cookie fields). Default false: such answers are never stored.",
    )


class AggregatePartSpec(KanalModel):
    """One sub-request of an aggregate rule; its answer is the field `name` of the result."""

    name: str = Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_-]{0,62}$",
        description="The field of the merged JSON answer that holds this part's answer.",
    )
    upstream: ObjectName = Field(description="Name of an Upstream in the Route's namespace.")
    method: HttpMethod = Field(default="GET", description="Method of the sub-request (GET).")
    path: str = Field(
        pattern=r"^/[!-~]*$",
        max_length=2048,
        description="Path and query of the sub-request, a template: {path.NAME} is a named "
        "group of the rule's RegularExpression path match, {query.NAME} a query parameter, "
        "{header.NAME} a request header; values are percent-encoded.",
    )
    timeout: PositiveDuration = Field(
        default="5s", description="Time limit of this part, retries included (default 5s)."
    )


class AggregateSpec(KanalModel):
    """One request answered by several sub-requests, merged into one JSON object."""

    parts: list[AggregatePartSpec] = Field(
        min_length=1, max_length=16,
        description="Sub-requests sent at once, 1 to 16, with distinct names.",
    )
    on_error: Literal["Fail", "Partial"] = Field(
        default="Fail",
        description="A part that fails or is late: Fail (default) answers 502 naming it; "
        "Partial answers 200 with null for it and its reason under `errors`.",
    )

    @model_validator(mode="after")
    def _distinct_names(self) -> AggregateSpec:
        names = [part.name for part in self.parts]
        if len(set(names)) != len(names) or "errors" in names:
            raise ValueError("part names must be distinct and not \"errors\"")
        return self


class GrpcTranscoderSpec(KanalModel):
    """REST/JSON requests made into gRPC calls, from a protobuf descriptor set (made by
    `protoc --include_imports --descriptor_set_out`): methods with a google.api.http
    annotation are exposed, others are not. Set exactly one of descriptorSecretName,
    descriptorConfigMapName or descriptorFile."""

    descriptor_secret_name: ObjectName | None = Field(
        default=None,
        description="Secret (same namespace) whose key `descriptorKey` holds the "
        "descriptor set.",
    )
    descriptor_config_map_name: ObjectName | None = Field(
        default=None,
        description="ConfigMap (same namespace) whose binaryData key `descriptorKey` holds "
        "the descriptor set (`kubectl create configmap NAME --from-file=descriptors.pb`).",
    )
    descriptor_file: str | None = Field(
        default=None, min_length=1, max_length=4096,
        description="`kanal run` only: a descriptor set file, relative to the manifest's "
        "folder or absolute. In a cluster, use a ConfigMap or a Secret.",
    )
    descriptor_key: str = Field(
        default="descriptors.pb", pattern=r"^[-._a-zA-Z0-9]+$", max_length=253,
        description="The Secret's or ConfigMap's key holding the descriptor set (default "
        "descriptors.pb).",
    )

    @model_validator(mode="after")
    def _exactly_one_source(self) -> GrpcTranscoderSpec:
        chosen = [name for name, value in (
            ("descriptorSecretName", self.descriptor_secret_name),
            ("descriptorConfigMapName", self.descriptor_config_map_name),
            ("descriptorFile", self.descriptor_file)) if value is not None]
        if len(chosen) != 1:
            raise ValueError(
                "set exactly one of descriptorSecretName, descriptorConfigMapName or "
                "descriptorFile" + (f" (got {', '.join(chosen)})" if chosen else ""))
        return self


class RuleSpec(KanalModel):
    """Requests that meet any of `matches` go to `backends`."""

    name: ObjectName | None = Field(
        default=None,
        description="Optional name, unique in the Route; shown in status, metrics and "
        "/explain.",
    )
    matches: list[MatchSpec] = Field(
        default_factory=list, max_length=64,
        description="Any one of these matches selects the rule (OR), at most 64. Empty "
        "(default): every request, like a single PathPrefix / match.",
    )
    aggregate: AggregateSpec | None = Field(
        default=None,
        description="Answer with several sub-requests merged into one JSON object (instead "
        "of backends): each part's answer under its name. Default: none.",
    )
    backends: list[BackendSpec] = Field(
        default_factory=list,
        validate_default=True,
        description="Upstreams that share the requests by weight. At least one, unless "
        "the rule aggregates or a RequestRedirect or DirectResponse filter answers every "
        "request.",
    )
    session_affinity: SessionAffinitySpec | None = Field(
        default=None, description="Keep each client on the backend it first got. Default: none."
    )
    timeout: Duration | None = Field(
        default=None,
        description="Time limit of the whole request, retries included. Default or 0s: none.",
    )
    retries: RetriesSpec | None = Field(default=None, description="Retries. Default: none.")
    max_request_body_size: ByteSize | None = Field(
        default=None,
        description="Largest request body accepted, in bytes or with a binary or decimal "
        "suffix (1Mi, 500k, 2G); a larger one is answered 413 (a Content-Length before "
        "anything is forwarded). Default: no limit.",
    )
    grpc_transcoder: GrpcTranscoderSpec | None = Field(
        default=None,
        description="Translate JSON requests to gRPC calls to the backends (protocol H2C or "
        "H2) and their answers back to JSON, as the descriptor set's google.api.http "
        "annotations say. Default: none.",
    )
    allow_websocket: bool = Field(
        default=True,
        alias="allowWebSocket",
        description="Whether valid WebSocket upgrades open a tunnel to the backend (default "
        "true); false answers them 403. Other upgrades are never tunnelled.",
    )
    policies: PoliciesSpec | None = Field(
        default=None,
        description="Access policies of this rule; each kind set here replaces the Route's. "
        "Default: the Route's policies.",
    )
    filters: list[FilterSpec] = Field(
        default_factory=list, max_length=16,
        description="Filters, applied in the order written (Gateway API HTTPRoute filters): "
        "RequestHeaderModifier, ResponseHeaderModifier, URLRewrite, RequestRedirect, "
        "RequestMirror, CORS, DirectResponse, Compression.",
    )

    @model_validator(mode="after")
    def _check_filters(self) -> RuleSpec:
        check_filters(self.filters, backend=False)
        answers = {"RequestRedirect", "DirectResponse"} & {f.type for f in self.filters}
        if not self.backends and not answers and self.aggregate is None:
            raise ValueError("backends: at least one, unless the rule aggregates or a "
                             "RequestRedirect or DirectResponse filter answers")
        if self.aggregate is not None and {"URLRewrite", "RequestMirror"} & {
                f.type for f in self.filters}:
            # Each part's path, Host and upstream are its own: nothing to rewrite or copy.
            raise ValueError("an aggregate rule takes no URLRewrite or RequestMirror filter "
                             "(each part's path and upstream are its own)")
        for item in self.filters + [f for b in self.backends for f in b.filters]:
            modifier = (item.url_rewrite or item.request_redirect)
            path = modifier.path if modifier is not None else None
            if path is None:
                continue
            matches = [m.path or PathMatchSpec() for m in self.matches] or [PathMatchSpec()]
            if path.type == "ReplacePrefixMatch" and not all(
                    m.type == "PathPrefix" for m in matches):
                raise ValueError(f"{item.type}: ReplacePrefixMatch needs PathPrefix matches only")
            if path.type == "ReplaceRegexMatch":
                regexes = [m.value for m in matches if m.type == "RegularExpression"]
                if len(regexes) != len(matches):
                    raise ValueError(f"{item.type}: ReplaceRegexMatch needs RegularExpression "
                                     "path matches only")
                for pattern in regexes:
                    problem = substitution_problem(path.value, pattern)
                    if problem is not None:
                        raise ValueError(f"{item.type}: replaceRegexMatch: {problem}")
        return self
    cache: CacheSpec | None = Field(
        default=None,
        description="Cache GET and HEAD answers (RFC 9111 shared cache). Default: no caching.",
    )

    @field_validator("backends")
    @classmethod
    def _backends_unless_aggregate(cls, backends: list[BackendSpec],
                                   info: ValidationInfo) -> list[BackendSpec]:
        aggregate = info.data.get("aggregate")
        # (No backend at all is judged with the filters, which may answer instead.)
        if aggregate is not None and backends:
            raise ValueError("set backends or aggregate, not both")
        if aggregate is not None and info.data.get("grpc_transcoder") is not None:
            raise ValueError("an aggregate rule has no grpcTranscoder")
        return backends


class HstsSpec(KanalModel):
    """The Strict-Transport-Security header on TLS answers."""

    max_age: int = Field(
        default=31536000, ge=0,
        description="Seconds browsers remember to use HTTPS only (default 31536000, a year).",
    )
    include_sub_domains: bool = Field(
        default=False, description="Also for every subdomain (default false)."
    )


class RouteTLSSpec(KanalModel):
    """Terminate TLS for the Route's hostnames."""

    secret_name: ObjectName = Field(
        description="kubernetes.io/tls Secret (tls.crt, tls.key) in the Route's namespace."
    )
    redirect_http: bool = Field(
        default=False,
        alias="redirectHTTP",
        description="Answer plain HTTP requests for these hostnames with a 308 redirect to "
        "https (default false).",
    )
    hsts: HstsSpec | None = Field(
        default=None, description="Send Strict-Transport-Security. Default: not sent."
    )


def _default_gateways() -> list[Literal["ingress", "mesh"]]:
    return ["ingress"]


class RouteSpec(KanalModel):
    """Which requests go to which Upstreams (the shape of Gateway API's HTTPRoute)."""

    hostnames: list[Hostname] = Field(
        default_factory=list,
        description="Host names this Route serves: exact (shop.example.com) or a wildcard "
        "(*.example.com: one or more labels in front of example.com). Case-insensitive. "
        "Empty (default): any host.",
    )
    gateways: list[Literal["ingress", "mesh"]] = Field(
        default_factory=_default_gateways,
        min_length=1,
        description="Where the Route applies: ingress (the edge proxy) and/or mesh "
        "(sidecars). Default [ingress].",
    )
    tls: RouteTLSSpec | None = Field(
        default=None, description="Terminate TLS for the hostnames. Default: plain HTTP only."
    )
    rules: list[RuleSpec] = Field(
        # The bounds on rules and matches keep the CEL rules the API server runs on them
        # (unique rule names, paths starting with /) within its cost budget.
        min_length=1, max_length=64,
        description="The rules, at least one and at most 64. The most specific match wins "
        "(Gateway API precedence); ties go to the older Route, then to the name.",
    )
    policies: PoliciesSpec | None = Field(
        default=None,
        description="Access policies for every rule (IP rules, API keys, basic auth, JWT, "
        "external auth, rate limits); a rule's own `policies` replace them kind by kind. "
        "Default: none.",
    )

    @model_validator(mode="after")
    def _unique_rule_names(self) -> RouteSpec:
        names = [rule.name for rule in self.rules if rule.name is not None]
        for name in sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"rule name {name} is used twice")
        return self


# --------------------------------------------------------------------------- EgressPolicy


class EgressRuleSpec(KanalModel):
    """A destination host, and optionally ports."""

    host: Hostname = Field(
        description="A host name, or *.domain for every subdomain of domain (not domain "
        "itself). Allowing a name does not allow its addresses typed as literals."
    )
    ports: list[Port] = Field(
        default_factory=list,
        description="Ports. Empty (default): 80 and 443 in allow rules, every port in deny "
        "rules.",
    )


class EgressAuthSpec(KanalModel):
    """Who may use the forward proxy."""

    basic_secret_name: ObjectName = Field(
        description="kubernetes.io/basic-auth Secret (username, password) in the policy's "
        "namespace; clients must send Proxy-Authorization: Basic with them."
    )


class EgressPolicySpec(KanalModel):
    """What a forward proxy or sidecar may reach outside the mesh."""

    allow: list[EgressRuleSpec] = Field(
        default_factory=list, description="Destinations allowed. Default: none."
    )
    deny: list[EgressRuleSpec] = Field(
        default_factory=list, description="Destinations denied; deny wins over allow."
    )
    allow_private_networks: bool = Field(
        default=False,
        description="Allow destinations that resolve to loopback, RFC 1918, link-local "
        "(cloud metadata), CGNAT or IPv6 ULA addresses (default false).",
    )
    auth: EgressAuthSpec | None = Field(
        default=None, description="Require Proxy-Authorization: Basic. Default: no auth."
    )
    anonymize: bool = Field(
        default=False,
        description="Add no X-Forwarded-For, Forwarded or Via headers (default false).",
    )
    cache: CacheSpec | None = Field(
        default=None,
        description="Cache plain-HTTP GET and HEAD answers of the forward proxy (RFC 9111 "
        "shared cache); CONNECT tunnels are never cached. Default: no caching.",
    )

    @model_validator(mode="after")
    def _no_wildcard_across_a_public_suffix(self) -> EgressPolicySpec:
        # Mozilla's Public Suffix List (every TLD is a public suffix too).
        for index, rule in enumerate(self.allow):
            suffix = wildcard_public_suffix(rule.host)
            if suffix is not None:
                raise ValueError(
                    f"allow[{index}].host: {rule.host} is a wildcard across the public suffix "
                    f"{suffix}; allow the domains under it by name"
                )
        return self


# --------------------------------------------------------------------------- envelope


class ObjectMeta(KanalModel):
    """The part of Kubernetes' ObjectMeta Kanal reads; other known fields are accepted."""

    name: ObjectName = Field(description="Name of the object.")
    namespace: NamespaceName = Field(
        default="default", description="Namespace (default `default`)."
    )
    creation_timestamp: datetime | None = Field(
        default=None,
        strict=False,  # a string in JSON and quoted YAML, a datetime in plain YAML
        description="Set by the API server; the older Route wins ties.",
    )
    generation: int | None = Field(default=None, description="Set by the API server.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations.")
    # Known ObjectMeta fields that kubectl output carries; accepted and ignored.
    uid: str | None = None
    resource_version: str | None = None
    generate_name: str | None = None
    self_link: str | None = None
    deletion_timestamp: datetime | None = Field(default=None, strict=False)
    deletion_grace_period_seconds: int | None = None
    owner_references: list[dict[str, Any]] | None = None
    finalizers: list[str] | None = None
    managed_fields: list[dict[str, Any]] | None = None


class KanalResource(KanalModel):
    """The envelope every Kanal object shares."""

    kind_name: ClassVar[str]
    plural: ClassVar[str]
    short_names: ClassVar[tuple[str, ...]] = ()
    printer_columns: ClassVar[tuple[dict[str, str], ...]] = ()

    api_version: Literal["kanal.dev/v1alpha1"] = Field(description="kanal.dev/v1alpha1")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    status: dict[str, Any] | None = Field(
        default=None, description="Written by the operator; ignored in manifests."
    )

    @property
    def key(self) -> str:
        """`namespace/name`: the object's name in Snapshots and statuses."""
        return f"{self.metadata.namespace}/{self.metadata.name}"


_AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


class Upstream(KanalResource):
    """A pool of endpoints and how to talk to them."""

    kind_name = "Upstream"
    plural = "upstreams"
    short_names = ("ups",)
    printer_columns = (
        {"name": "Protocol", "type": "string", "jsonPath": ".spec.protocol"},
        {"name": "Policy", "type": "string", "jsonPath": ".spec.loadBalancer.policy"},
        {"name": "Healthy", "type": "integer", "jsonPath": ".status.endpoints.healthy"},
        {"name": "Total", "type": "integer", "jsonPath": ".status.endpoints.total"},
        {"name": "Accepted", "type": "string",
         "jsonPath": ".status.conditions[?(@.type==\"Accepted\")].status"},
        _AGE,
    )

    kind: Literal["Upstream"] = Field(description="Upstream")
    spec: UpstreamSpec = Field(description="The desired state.")


class Route(KanalResource):
    """Which requests go where."""

    kind_name = "Route"
    plural = "routes"
    short_names = ("rt",)
    printer_columns = (
        {"name": "Hosts", "type": "string", "jsonPath": ".spec.hostnames"},
        # The API server prints the first value a column's path finds, so a path over
        # every rule's upstreams showed only the first one: show the first rule's
        # backends with their weights (the canary split) instead.
        {"name": "Backends", "type": "string", "jsonPath": ".spec.rules[0].backends",
         "description": "The first rule's backends and their weights."},
        {"name": "Accepted", "type": "string",
         "jsonPath": ".status.conditions[?(@.type==\"Accepted\")].status"},
        {"name": "Programmed", "type": "string",
         "jsonPath": ".status.conditions[?(@.type==\"Programmed\")].status"},
        _AGE,
    )

    kind: Literal["Route"] = Field(description="Route")
    spec: RouteSpec = Field(description="The desired state.")


class EgressPolicy(KanalResource):
    """What forward proxies and sidecars in this namespace may reach outside the mesh."""

    kind_name = "EgressPolicy"
    plural = "egresspolicies"
    short_names = ("egp",)
    printer_columns = (
        {"name": "Private", "type": "boolean", "jsonPath": ".spec.allowPrivateNetworks"},
        {"name": "Accepted", "type": "string",
         "jsonPath": ".status.conditions[?(@.type==\"Accepted\")].status"},
        _AGE,
    )

    kind: Literal["EgressPolicy"] = Field(description="EgressPolicy")
    spec: EgressPolicySpec = Field(description="The desired state.")


RESOURCES: dict[str, type[KanalResource]] = {
    "Route": Route,
    "Upstream": Upstream,
    "EgressPolicy": EgressPolicy,
}
"""Kanal's custom resources by kind: what the CRD generator and the parsers iterate."""

SPECS: dict[str, type[KanalModel]] = {
    "Route": RouteSpec,
    "Upstream": UpstreamSpec,
    "EgressPolicy": EgressPolicySpec,
}


# --------------------------------------------------------------------------- Secret

SECRET_TYPE_TLS = "kubernetes.io/tls"
SECRET_TYPE_BASIC_AUTH = "kubernetes.io/basic-auth"
SECRET_TYPE_OPAQUE = "Opaque"


def _base64_values(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    for key, item in value.items():
        if not isinstance(item, str):
            continue
        try:
            base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{key}: not valid base64 (use stringData for plain text)") from None
    return value


class Secret(KanalModel):
    """A core v1 Secret, as `kanal run` reads it from a manifest.

    Only what Kanal needs: `data` (base64) and `stringData` (plain text; wins over
    `data` for the same key, as in Kubernetes).
    """

    api_version: Literal["v1"] = Field(description="v1")
    kind: Literal["Secret"] = Field(description="Secret")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    type: str = Field(default=SECRET_TYPE_OPAQUE, description="Secret type (default Opaque).")
    data: Annotated[dict[str, str], AfterValidator(_base64_values)] = Field(
        default_factory=dict, description="Values, base64-encoded."
    )
    string_data: dict[str, str] = Field(default_factory=dict, description="Values, plain text.")
    immutable: bool | None = None

    @property
    def key(self) -> str:
        return f"{self.metadata.namespace}/{self.metadata.name}"

    def values(self) -> dict[str, str]:
        """Every value as text: `data` decoded, then `stringData` on top."""
        decoded = {
            name: base64.b64decode(item).decode("utf-8", errors="replace")
            for name, item in self.data.items()
        }
        decoded.update(self.string_data)
        return decoded


def _binary_values(value: dict[str, str]) -> dict[str, str]:
    for key, item in value.items():
        try:
            base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{key}: not valid base64 (use data for plain text)") from None
    return value


class ConfigMap(KanalModel):
    """A core v1 ConfigMap, as `kanal run` reads it from a manifest: only what Kanal needs
    (`binaryData`, base64, for descriptor sets; `data`, text)."""

    api_version: Literal["v1"] = Field(description="v1")
    kind: Literal["ConfigMap"] = Field(description="ConfigMap")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    data: dict[str, str] = Field(default_factory=dict, description="Values, plain text.")
    binary_data: Annotated[dict[str, str], AfterValidator(_binary_values)] = Field(
        default_factory=dict, description="Values, base64-encoded."
    )
    immutable: bool | None = None

    @property
    def key(self) -> str:
        return f"{self.metadata.namespace}/{self.metadata.name}"

    def binary(self, name: str) -> str | None:
        """The value of `name`, base64: from binaryData, or data's text encoded."""
        if name in self.binary_data:
            return self.binary_data[name]
        if name in self.data:
            return base64.b64encode(self.data[name].encode()).decode()
        return None


Resource = Route | Upstream | EgressPolicy | Secret | ConfigMap
"""Anything a manifest may hold that Kanal reads."""

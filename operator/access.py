"""The `policies` of a Route and of its rules: access control (pydantic models).

A separate module so the resource models stay readable; the same rules hold as in
`models.py` (camelCase names, unknown fields rejected, strict types, a description on
every field: the CRDs and `kubectl explain` are generated from them). The shapes follow
Envoy Gateway's SecurityPolicy (`apiKeyAuth`, `basicAuth`, `jwt`), written inline on
the Route the way Kong attaches plugins to a route.

Merging: each kind set on a rule replaces the same kind set on the Route
(`spec.policies`); kinds the rule does not set are taken from the Route.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel

from kanal.operator.durations import Duration, PositiveDuration

_SECRET_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_HEADER = r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$"
_HEADER_RE = re.compile(_HEADER)

JWTAlgorithm = Literal["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
                       "ES512", "EdDSA", "HS256", "HS384", "HS512"]
"""What a policy may allow; `none` is never among them."""


def _cidr(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"must be an IP address or a CIDR like 10.0.0.0/8, got {value!r}"
                         ) from None
    return value


def _header(value: str) -> str:
    if not _HEADER_RE.fullmatch(value):
        raise ValueError(f"must be an HTTP header name, got {value!r}")
    return value


def _uri(value: str) -> str:
    if not value.startswith(("https://", "http://")) or any(ch in value for ch in " \r\n\0"):
        raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
    return value


SecretName = Annotated[str, Field(pattern=_SECRET_NAME, max_length=253)]
Cidr = Annotated[str, AfterValidator(_cidr), WithJsonSchema(
    {"type": "string", "minLength": 1, "maxLength": 64})]
Header = Annotated[str, AfterValidator(_header), WithJsonSchema(
    {"type": "string", "pattern": _HEADER, "maxLength": 256})]
Uri = Annotated[str, AfterValidator(_uri), WithJsonSchema(
    {"type": "string", "pattern": "^https?://", "maxLength": 2048})]


def _default_algorithms() -> list[JWTAlgorithm]:
    return ["RS256", "ES256"]


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, extra="forbid", frozen=True,
                              strict=True, validate_default=False)


class IPRulesSpec(_Model):
    """Allow and deny by client address (with --trusted-hops, the address the trusted
    proxies reported)."""

    allow: list[Cidr] = Field(
        default_factory=list, max_length=256,
        description="Addresses or CIDRs allowed. Empty (default): every address not denied.")
    deny: list[Cidr] = Field(
        default_factory=list, max_length=256,
        description="Addresses or CIDRs refused (403); deny wins over allow.")


class APIKeySpec(_Model):
    """API keys from Secrets: each data key of a Secret is a client id, its value that
    client's key (several keys: one per line)."""

    secret_names: list[SecretName] = Field(
        min_length=1, max_length=16,
        description="Secrets in the Route's namespace holding the clients and their keys.")
    headers: list[Header] = Field(
        default_factory=lambda: ["x-api-key"], max_length=8,
        description="Request headers read for the key, in order (default [x-api-key]). They "
        "are never forwarded.")
    query_params: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=list, max_length=8,
        description="Query parameters read for the key after the headers (default none); "
        "removed from the query string forwarded.")
    forward_client_id_header: Header | None = Field(
        default=None, alias="forwardClientIDHeader",
        description="Header that carries the client id to the backend (any such header the "
        "client sent is removed). Default: none.")

    @model_validator(mode="after")
    def _somewhere(self) -> APIKeySpec:
        if not self.headers and not self.query_params:
            raise ValueError("headers and queryParams cannot both be empty")
        return self


class BasicAuthSpec(_Model):
    """HTTP Basic authentication against an htpasswd file."""

    secret_name: SecretName = Field(
        description="Secret in the Route's namespace whose `.htpasswd` holds user:hash lines "
        "(bcrypt, as `htpasswd -B` writes, or {SHA}).")
    realm: str = Field(default="kanal", max_length=128, pattern=r'^[^"\r\n]*$',
                       description="The realm named in WWW-Authenticate (default kanal).")
    forward_username_header: Header | None = Field(
        default=None,
        description="Header that carries the user name to the backend. Default: none. The "
        "Authorization header is not forwarded.")


class LocalJWKSSpec(_Model):
    secret_name: SecretName = Field(
        description="Secret in the Route's namespace whose `jwks` holds a JWKS document.")


class RemoteJWKSSpec(_Model):
    uri: Uri = Field(description="URL of the issuer's JWKS document.")
    cache_duration: PositiveDuration = Field(
        default="5m", description="How long fetched keys are used before a refresh (default "
        "5m). A token with an unknown kid also triggers a refetch, at most once a second.")


class TokenHeaderSpec(_Model):
    name: Header = Field(description="Header that carries the token.")
    value_prefix: str = Field(default="", max_length=64,
                              description="Text before the token, e.g. \"Bearer \" (default "
                              "none; case-insensitive).")


class JWTExtractSpec(_Model):
    """Where the token is read, headers first, then cookies."""

    headers: list[TokenHeaderSpec] = Field(default_factory=list, max_length=8,
                                           description="Headers, in order.")
    cookies: list[Annotated[str, Field(pattern=_HEADER, max_length=256)]] = Field(
        default_factory=list, max_length=8, description="Cookie names, in order.")


class RequiredClaimSpec(_Model):
    name: str = Field(min_length=1, max_length=256, description="Claim name.")
    values: list[str] = Field(
        default_factory=list, max_length=64,
        description="Accepted values; a list claim or a space-separated scope passes when "
        "one item is accepted. Empty (default): the claim must only be present.")


class ClaimToHeaderSpec(_Model):
    claim: str = Field(min_length=1, max_length=256, description="Claim name.")
    header: Header = Field(description="Request header set to the claim's value (strings as "
                           "they are, other values as JSON); any such header the client "
                           "sent is removed.")


class JWTSpec(_Model):
    """JSON Web Tokens signed by a trusted issuer."""

    issuer: str | None = Field(default=None, max_length=1024,
                               description="Required `iss`. Default: not checked.")
    audiences: list[str] = Field(
        default_factory=list, max_length=32,
        description="Accepted `aud` values (one must match). Default: not checked.")
    algorithms: list[JWTAlgorithm] = Field(
        default_factory=_default_algorithms, min_length=1,
        description="Signature algorithms accepted (default RS256, ES256). `none` is never "
        "accepted, and a key verifies only algorithms of its own type (no RS/HS confusion).")
    clock_skew: Duration = Field(default="30s",
                                 description="Leeway on exp and nbf (default 30s).")
    local_jwks: LocalJWKSSpec | None = Field(
        default=None, alias="localJWKS", description="Keys from a Secret.")
    remote_jwks: RemoteJWKSSpec | None = Field(
        default=None, alias="remoteJWKS", description="Keys fetched from a URL and cached.")
    extract_from: JWTExtractSpec | None = Field(
        default=None, description="Where the token is read. Default: Authorization: Bearer.")
    required_claims: list[RequiredClaimSpec] = Field(
        default_factory=list, max_length=32, description="Claims the token must carry.")
    claim_to_headers: list[ClaimToHeaderSpec] = Field(
        default_factory=list, max_length=32, description="Claims copied to request headers.")
    strip_token: bool = Field(default=False, description="Remove the token (its header or "
                              "cookie) before forwarding (default false).")

    @model_validator(mode="after")
    def _one_key_source(self) -> JWTSpec:
        if (self.local_jwks is None) == (self.remote_jwks is None):
            raise ValueError("exactly one of localJWKS and remoteJWKS is required")
        if self.extract_from is not None and not (self.extract_from.headers
                                                  or self.extract_from.cookies):
            raise ValueError("extractFrom needs at least one header or cookie")
        return self


class RateLimitKeySpec(_Model):
    """What tells requests apart; each part set splits the buckets by its value."""

    client_address: bool = Field(
        default=False, description="One bucket per client address (--trusted-hops honoured).")
    header: Header | None = Field(
        default=None, description="One bucket per value of this request header (requests "
        "without it share one bucket).")
    claim: str | None = Field(
        default=None, max_length=256,
        description="One bucket per value of this claim of the verified JWT (needs `jwt`).")


_UNITS = {"Second": 1.0, "Minute": 60.0, "Hour": 3600.0, "Day": 86400.0}


class RateLimitRuleSpec(_Model):
    """One token bucket per key: `requests` per `unit`, bursts up to `burst`."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.]*$", max_length=64)] = Field(
        description="Name of the limit, shown in RateLimit headers and metrics.")
    requests: int = Field(ge=1, le=1_000_000_000, description="Requests allowed per unit.")
    unit: Literal["Second", "Minute", "Hour", "Day"] = Field(
        description="The unit of time: Second, Minute, Hour or Day.")
    burst: int | None = Field(
        default=None, ge=1, le=1_000_000_000,
        description="Requests allowed at once, after a quiet time (the bucket's size). "
        "Default: `requests`.")
    key: RateLimitKeySpec = Field(
        default_factory=RateLimitKeySpec,
        description="What tells requests apart. Default: nothing; one bucket for the rule.")

    @property
    def seconds(self) -> float:
        return _UNITS[self.unit]


class RateLimitSpec(_Model):
    """Rate limits: a request must fit every one; refused requests get 429."""

    type: Literal["Local", "Global"] = Field(
        default="Local",
        description="Local (default): counted by each dataplane, across its workers. Global: "
        "counted in Redis, shared by every dataplane.")
    failure_mode: Literal["Open", "Closed"] = Field(
        default="Open",
        description="Global only: what happens while Redis cannot be reached: Open (default) "
        "lets requests through, Closed refuses them (503).")
    limits: list[RateLimitRuleSpec] = Field(
        min_length=1, max_length=8, description="The limits, at least one.")

    @model_validator(mode="after")
    def _unique_names(self) -> RateLimitSpec:
        names = [limit.name for limit in self.limits]
        for name in sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"limit name {name} is used twice")
        return self


class ExtAuthBodySpec(_Model):
    max_request_bytes: int = Field(
        ge=1, le=262144,
        description="Body bytes sent to the service, at most 256 KiB; the request waits for "
        "them (or for its end). A longer body is cut there and the service gets "
        "X-Kanal-Auth-Partial-Body: true.")


class ExtAuthSpec(_Model):
    """Ask an HTTP authorization service about each request (Envoy's ext_authz)."""

    url: Uri = Field(
        description="The service. It gets the client's method, this URL's path followed by "
        "the client's path and query, the headers in headersToExtAuth and X-Forwarded-For, "
        "-Proto and -Host.")
    headers_to_ext_auth: list[Header] = Field(
        default_factory=lambda: ["Authorization", "Cookie"], max_length=32,
        alias="headersToExtAuth",
        description="Request headers sent to the service (default Authorization, Cookie).")
    headers_to_backend: list[Header] = Field(
        default_factory=list, max_length=32,
        description="Headers of a 2xx answer copied onto the request for the backend (any the "
        "client sent under these names are removed). Default: none.")
    timeout: PositiveDuration = Field(
        default="1s", description="Time the service has to answer (default 1s).")
    failure_mode: Literal["Open", "Closed"] = Field(
        default="Closed",
        description="When the service does not answer in time or cannot be reached: Closed "
        "(default) answers 503, Open lets the request through.")
    body_to_ext_auth: ExtAuthBodySpec | None = Field(
        default=None, description="Send the request body too (bounded). Default: no body.")


class PoliciesSpec(_Model):
    """Access policies: every one that is set must let a request through before any
    backend sees it. Checked in this order: ipRules, apiKey, basicAuth, jwt, extAuth,
    rateLimit."""

    ip_rules: IPRulesSpec | None = Field(default=None, alias="ipRules",
                                         description="Allow/deny by client address (403).")
    api_key: APIKeySpec | None = Field(default=None, description="API keys (401).")
    basic_auth: BasicAuthSpec | None = Field(default=None,
                                             description="HTTP Basic users (401).")
    jwt: JWTSpec | None = Field(default=None, description="JSON Web Tokens (401).")
    ext_auth: ExtAuthSpec | None = Field(
        default=None, description="An external authorization service; its refusals are "
        "returned as it sent them.")
    rate_limit: RateLimitSpec | None = Field(
        default=None, description="Rate limits (429), counted after the checks above.")


def secret_names(*policies: PoliciesSpec | None) -> list[str]:
    """The Secrets some policies name (for the operator's watch)."""
    names: list[str] = []
    for policy in policies:
        if policy is None:
            continue
        if policy.api_key is not None:
            names.extend(policy.api_key.secret_names)
        if policy.basic_auth is not None:
            names.append(policy.basic_auth.secret_name)
        if policy.jwt is not None and policy.jwt.local_jwks is not None:
            names.append(policy.jwt.local_jwks.secret_name)
    return names

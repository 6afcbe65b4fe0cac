"""Access policies as the dataplane receives them: one `AccessPolicy` per Route rule.

A Route's `spec.policies` and a rule's `spec.rules[].policies` are merged by the
compiler (the rule's setting of each kind wins over the Route's), so the dataplane sees
one effective policy per rule, or None. Secrets are resolved by the compiler too:
API keys travel as SHA-256 digests (a Snapshot kept on disk or served to dataplanes
never holds a usable key), htpasswd and JWKS documents as their text. A policy whose
Secret is missing arrives empty and refuses every request: it fails closed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class IPRules:
    """Allow and deny CIDR lists on the client address; deny wins, empty allow: all."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class APIKeyClient:
    """One client and the SHA-256 digests (hex) of the keys it may present."""

    client: str
    key_digests: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class APIKeyAuth:
    """Keys from request headers or query parameters; names of headers are lower case."""

    clients: tuple[APIKeyClient, ...] = ()
    headers: tuple[str, ...] = ("x-api-key",)
    params: tuple[str, ...] = ()
    forward_client_id_header: str | None = None


@dataclass(frozen=True, slots=True)
class BasicAuth:
    """Users of an htpasswd file (bcrypt or {SHA} lines)."""

    htpasswd: str = ""
    realm: str = "kanal"
    forward_username_header: str | None = None


@dataclass(frozen=True, slots=True)
class TokenSource:
    """Where a JWT is read: a header (after `value_prefix`) or a cookie."""

    header: str | None = None
    value_prefix: str = ""
    cookie: str | None = None


@dataclass(frozen=True, slots=True)
class RequiredClaim:
    """A claim the token must carry; with values, one of them (or one in a list claim)."""

    name: str
    values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ClaimToHeader:
    claim: str
    header: str


@dataclass(frozen=True, slots=True)
class JWTAuth:
    """JSON Web Tokens: who signs them, for whom, and where the keys come from."""

    issuer: str | None = None
    audiences: tuple[str, ...] = ()
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    clock_skew: float = 30.0
    jwks: str | None = None
    """The JWKS document's JSON (from a Secret); None with `jwks_uri`."""
    jwks_uri: str | None = None
    jwks_cache_duration: float = 300.0
    sources: tuple[TokenSource, ...] = (TokenSource(header="authorization",
                                                    value_prefix="Bearer "),)
    required_claims: tuple[RequiredClaim, ...] = ()
    claim_to_headers: tuple[ClaimToHeader, ...] = ()
    strip_token: bool = False


@dataclass(frozen=True, slots=True)
class RateLimitKey:
    """What tells requests apart: the parts set make one bucket per distinct value
    (none set: one bucket for the whole rule). Header names are lower case."""

    client_address: bool = False
    header: str | None = None
    claim: str | None = None


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket: `requests` per `per` seconds, holding at most `burst` tokens."""

    name: str
    requests: int
    per: float
    burst: int
    key: RateLimitKey = RateLimitKey()


@dataclass(frozen=True, slots=True)
class RateLimitPolicy:
    """Local: counted by this dataplane (all its workers); Global: in Redis, shared by
    every dataplane, with `failure_mode` deciding while Redis cannot be reached."""

    limits: tuple[RateLimit, ...] = ()
    type: Literal["Local", "Global"] = "Local"
    failure_mode: Literal["Open", "Closed"] = "Open"
    scope: str = ""
    """Who owns the buckets: the Route's key for `spec.policies` (its rules share them),
    the rule's policy name for a rule's own limits."""


@dataclass(frozen=True, slots=True)
class ExtAuth:
    """An HTTP authorization service asked about each request (Envoy's ext_authz, HTTP).

    The request to it has the client's method and the URL's path followed by the
    client's path and query; header names are lower case."""

    url: str
    headers_to_ext_auth: tuple[str, ...] = ("authorization", "cookie")
    headers_to_backend: tuple[str, ...] = ()
    timeout: float = 1.0
    failure_mode: Literal["Open", "Closed"] = "Closed"
    max_request_bytes: int = 0
    """Body bytes sent along (0: none); a longer body is cut there and marked partial."""


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """The effective access policy of one rule; `name` labels its metrics."""

    name: str
    ip_rules: IPRules | None = None
    api_key: APIKeyAuth | None = None
    basic_auth: BasicAuth | None = None
    jwt: JWTAuth | None = None
    rate_limit: RateLimitPolicy | None = None
    ext_auth: ExtAuth | None = None


def policy_problems(policy: AccessPolicy, wire_safe: Callable[[str], bool]) -> Iterator[str]:
    """What makes a policy unfit to run: names that reach the wire must be safe there,
    numbers must be positive. The compiler's output meets these by construction."""
    names: list[str] = []
    if policy.api_key is not None:
        names += [*policy.api_key.headers, policy.api_key.forward_client_id_header or "x"]
    if policy.basic_auth is not None:
        names.append(policy.basic_auth.forward_username_header or "x")
    if policy.jwt is not None:
        names += [mapping.header for mapping in policy.jwt.claim_to_headers]
    if policy.ext_auth is not None:
        names += [*policy.ext_auth.headers_to_ext_auth, *policy.ext_auth.headers_to_backend]
        if not wire_safe(policy.ext_auth.url) or policy.ext_auth.timeout <= 0:
            yield "external auth needs a URL and a positive timeout"
    for name in names:
        if not name or not wire_safe(name) or " " in name or ":" in name:
            yield f"header name {name!r} cannot be written"
    if policy.rate_limit is not None:
        for limit in policy.rate_limit.limits:
            if limit.requests < 1 or limit.per <= 0 or limit.burst < 1:
                yield f"rate limit {limit.name!r} needs positive requests, period and burst"
            if not limit.name or not wire_safe(limit.name) or '"' in limit.name:
                yield f"rate limit name {limit.name!r} cannot be written in a header"

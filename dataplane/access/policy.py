"""One rule's access policy, compiled once, judging one request head (pure).

`Access.check` runs the rule's checks in a fixed order, cheapest and least
trusting first: IP rules, API key, basic auth, JWT. All that are set must pass. Rate
limits come last (`Access.rate`, counted by the gate), so a limit can be keyed by a
verified claim and refused requests never use up anyone's tokens. The
answer is a `Refusal` (the proxy's own answer: status, reason, extra header lines), a
`Grant` (header changes for the backend: credentials removed, the client's identity
added), or `NeedKeys` (a JWKS URL has no keys yet, or not the token's `kid`: fetch and
check again).

Headers the policy sets for the backend (client id, user name, claims) are first
removed from what the client sent, so a client can never forge them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kanal.contract.access import AccessPolicy
from kanal.contract.snapshot import Rule
from kanal.contract.validate import wire_safe
from kanal.dataplane.access.apikeys import APIKeys
from kanal.dataplane.access.basicauth import BasicUsers, credentials
from kanal.dataplane.access.ipfilter import IPFilter
from kanal.dataplane.access.jwtauth import (
    JWTVerifier,
    KeySet,
    Rejected,
    UnknownKey,
    claim_text,
    token_from,
)
from kanal.dataplane.access.ratelimit import RateLimiter


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    reason: str
    policy: str  # apiKey, basicAuth, ipRules, jwt
    cause: str  # short label for metrics
    headers: bytes = b""  # extra answer header lines, each ending in CRLF


@dataclass(slots=True)
class Grant:
    """What a request that passed carries to the backend instead of what it was sent."""

    drop: set[bytes] = field(default_factory=set)
    add: list[tuple[bytes, bytes]] = field(default_factory=list)
    query: str | None = None  # the query without an API key parameter; None: unchanged
    drop_cookie: str | None = None  # a cookie that held the token
    claims: dict[str, Any] | None = None  # the verified token's, for rate-limit keys


@dataclass(frozen=True, slots=True)
class NeedKeys:
    uri: str
    kid: str | None


Decision = Refusal | Grant | NeedKeys
NO_KEYS = KeySet()


class Access:
    """The compiled policy of one rule, hung on its `Selection`."""

    __slots__ = ("api_keys", "basic", "ip", "jwt", "jwt_keys", "name", "rate", "spec")

    def __init__(self, spec: AccessPolicy) -> None:
        self.spec = spec
        self.name = spec.name
        self.ip = None if spec.ip_rules is None else IPFilter(spec.ip_rules.allow,
                                                              spec.ip_rules.deny)
        self.api_keys = None if spec.api_key is None else APIKeys(spec.api_key)
        basic = spec.basic_auth
        self.basic = None if basic is None else BasicUsers(basic.htpasswd, basic.realm,
                                                           basic.forward_username_header)
        self.jwt = None if spec.jwt is None else JWTVerifier(spec.jwt)
        self.rate = None if spec.rate_limit is None or not spec.rate_limit.limits else (
            RateLimiter(spec.name, spec.rate_limit))
        self.jwt_keys = NO_KEYS
        if spec.jwt is not None and spec.jwt.jwks is not None:
            self.jwt_keys = KeySet.parse(spec.jwt.jwks)

    @property
    def jwks_uri(self) -> str | None:
        return None if self.spec.jwt is None else self.spec.jwt.jwks_uri

    def check(self, headers: Sequence[tuple[bytes, bytes]], query: str, cookie: bytes | None,
              client: str, now: float, remote_keys: Mapping[str, KeySet]) -> Decision:
        """Judge one request head; `remote_keys` holds the keys fetched from JWKS URLs."""
        grant = Grant()
        if self.ip is not None:
            why = self.ip.refusal(client)
            if why is not None:
                return Refusal(403, why, "ipRules", "denied")
        if self.api_keys is not None:
            refused = self._api_key(headers, query, grant)
            if refused is not None:
                return refused
        if self.basic is not None:
            refused = self._basic(headers, grant)
            if refused is not None:
                return refused
        if self.jwt is not None:
            decided = self._jwt(headers, cookie, now, remote_keys, grant)
            if decided is not None:
                return decided
        return grant

    def _api_key(self, headers: Sequence[tuple[bytes, bytes]], query: str, grant: Grant
                 ) -> Refusal | None:
        keys = self.api_keys
        assert keys is not None
        key, param = keys.presented(headers, query)
        grant.drop.update(keys.headers)
        if keys.params and query:
            stripped = keys.strip_param(query, keys.params)
            if stripped != query:
                grant.query = stripped
        if key is None:
            return Refusal(401, "an API key is required", "apiKey", "missing")
        client = keys.client(key)
        if client is None:
            return Refusal(401, "the API key is not valid", "apiKey", "invalid")
        if keys.forward_header is not None:
            grant.drop.add(keys.forward_header.lower())
            if wire_safe(client):
                grant.add.append((keys.forward_header, client.encode("utf-8")))
        return None

    def _basic(self, headers: Sequence[tuple[bytes, bytes]], grant: Grant) -> Refusal | None:
        basic = self.basic
        assert basic is not None
        authorization = next((value for name, value in headers
                              if name.lower() == b"authorization"), None)
        found = None if authorization is None else credentials(authorization)
        if found is None:
            return Refusal(401, "basic authentication is required", "basicAuth", "missing",
                           basic.challenge)
        if not basic.check(*found):
            return Refusal(401, "the user name or password is not valid", "basicAuth",
                           "invalid", basic.challenge)
        grant.drop.add(b"authorization")
        if basic.forward_header is not None:
            grant.drop.add(basic.forward_header.lower())
            if wire_safe(found[0]):
                grant.add.append((basic.forward_header, found[0].encode("utf-8")))
        return None

    def _jwt(self, headers: Sequence[tuple[bytes, bytes]], cookie: bytes | None, now: float,
             remote_keys: Mapping[str, KeySet], grant: Grant) -> Refusal | NeedKeys | None:
        verifier = self.jwt
        spec = self.spec.jwt
        assert verifier is not None and spec is not None
        token, source = token_from(spec, headers, cookie)
        if token is None:
            return Refusal(401, "a bearer token is required", "jwt", "missing",
                           b'WWW-Authenticate: Bearer realm="kanal"\r\n')
        keys = self.jwt_keys
        uri = spec.jwks_uri
        if uri is not None:
            fetched = remote_keys.get(uri)
            if fetched is None:
                return NeedKeys(uri, None)
            keys = fetched
        outcome = verifier.verify(token, keys, now)
        if isinstance(outcome, UnknownKey):
            if uri is not None:
                return NeedKeys(uri, outcome.kid)
            outcome = Rejected("key", "the token's key is not known")
        if isinstance(outcome, Rejected):
            return Refusal(401, outcome.reason, "jwt", outcome.cause,
                           b'WWW-Authenticate: Bearer realm="kanal", error="invalid_token"\r\n')
        grant.claims = outcome.claims
        for mapping in spec.claim_to_headers:
            header = mapping.header.encode("latin-1")
            grant.drop.add(header.lower())
            value = outcome.claims.get(mapping.claim)
            if value is not None:
                text = claim_text(value)
                if wire_safe(text):
                    grant.add.append((header, text.encode("utf-8")))
        if spec.strip_token:
            used = spec.sources[source]
            if used.header is not None:
                grant.drop.add(used.header.lower().encode("latin-1"))
            elif used.cookie is not None:
                grant.drop_cookie = used.cookie
        return None

    def describe(self) -> list[str]:
        """The policies that apply, for /explain."""
        spec = self.spec
        names = [("ipRules", spec.ip_rules), ("apiKey", spec.api_key),
                 ("basicAuth", spec.basic_auth), ("jwt", spec.jwt),
                 ("extAuth", spec.ext_auth), ("rateLimit", spec.rate_limit)]
        return [name for name, value in names if value is not None]


def compile_access(route_key: str, rule: Rule) -> Access | None:
    """The rule's compiled policy, or None; raises ValueError naming the rule."""
    if rule.access is None:
        return None
    try:
        return Access(rule.access)
    except ValueError as exc:
        raise ValueError(f"route {route_key} rule {rule.name or rule.index}: access policy: "
                         f"{exc}") from None

"""Route and rule `policies` to the Snapshot's `AccessPolicy` (pure, part of the compiler).

The rule's kinds replace the Route's kind by kind. Secrets are resolved here: API keys
become SHA-256 digests, htpasswd and JWKS documents their text, each checked so that
what the dataplane builds cannot fail on them. A missing or unusable Secret is a
ResolvedRefs problem and the kind that names it is emitted empty: it refuses every
request (fails closed) until the Secret is fixed.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping, Sequence

from kanal.contract import access as acc
from kanal.contract import snapshot as snap
from kanal.operator.access import (
    APIKeySpec,
    BasicAuthSpec,
    JWTSpec,
    PoliciesSpec,
    RateLimitSpec,
)
from kanal.operator.conditions import REASON_INVALID_SECRET, REASON_SECRET_NOT_FOUND
from kanal.operator.durations import parse_duration

SecretLookup = Callable[[str], Mapping[str, str] | None]
Report = Callable[[str, str], None]


def rules_with_access(route_key: str, route: PoliciesSpec | None,
                      rules: Sequence[tuple[snap.Rule, PoliciesSpec | None]], namespace: str,
                      secrets: SecretLookup, report: Report) -> tuple[snap.Rule, ...]:
    """Each compiled rule with its effective policy (the rule unchanged when it has none)."""
    seen: set[str] = set()

    def once(reason: str, message: str) -> None:
        if message not in seen:
            seen.add(message)
            report(reason, message)

    out: list[snap.Rule] = []
    for rule, own in rules:
        name = f"{route_key}/{rule.name or rule.index}"
        policy = compile_policies(name, merged(route, own), namespace, secrets, once)
        if policy is not None and policy.rate_limit is not None:
            # A Route's limits hold for all its rules together; a rule's for itself.
            owned = own is not None and own.rate_limit is not None
            policy = dataclasses.replace(policy, rate_limit=dataclasses.replace(
                policy.rate_limit, scope=name if owned else route_key))
        out.append(rule if policy is None else dataclasses.replace(rule, access=policy))
    return tuple(out)


def merged(route: PoliciesSpec | None, rule: PoliciesSpec | None) -> PoliciesSpec | None:
    """The rule's policies over the Route's, kind by kind."""
    if rule is None:
        return route
    if route is None:
        return rule
    return PoliciesSpec.model_construct(
        ip_rules=rule.ip_rules or route.ip_rules,
        api_key=rule.api_key or route.api_key,
        basic_auth=rule.basic_auth or route.basic_auth,
        jwt=rule.jwt or route.jwt,
        rate_limit=rule.rate_limit or route.rate_limit,
        ext_auth=rule.ext_auth or route.ext_auth,
    )


def compile_policies(name: str, spec: PoliciesSpec | None, namespace: str,
                     secrets: SecretLookup, report: Report) -> acc.AccessPolicy | None:
    """The rule's effective policy; `name` labels its metrics (route key and rule)."""
    if spec is None or not any((spec.ip_rules, spec.api_key, spec.basic_auth, spec.jwt,
                                spec.rate_limit, spec.ext_auth)):
        return None

    def secret(secret_name: str, key: str, purpose: str) -> str | None:
        values = secrets(secret_name)
        if values is None:
            report(REASON_SECRET_NOT_FOUND,
                   f"{purpose} Secret {namespace}/{secret_name} not found")
            return None
        value = values.get(key)
        if not value:
            report(REASON_INVALID_SECRET,
                   f"{purpose} Secret {namespace}/{secret_name} has no {key}")
            return None
        return value

    ip = spec.ip_rules
    return acc.AccessPolicy(
        name=name,
        ip_rules=None if ip is None else acc.IPRules(tuple(ip.allow), tuple(ip.deny)),
        api_key=None if spec.api_key is None else _api_key(spec.api_key, secrets, namespace,
                                                           report),
        basic_auth=None if spec.basic_auth is None else _basic(spec.basic_auth, secret, report,
                                                               namespace),
        jwt=None if spec.jwt is None else _jwt(spec.jwt, secret, report, namespace),
        rate_limit=None if spec.rate_limit is None else _rate_limit(spec.rate_limit),
        ext_auth=None if spec.ext_auth is None else acc.ExtAuth(
            url=spec.ext_auth.url,
            headers_to_ext_auth=tuple(h.lower() for h in spec.ext_auth.headers_to_ext_auth),
            headers_to_backend=tuple(h.lower() for h in spec.ext_auth.headers_to_backend),
            timeout=parse_duration(spec.ext_auth.timeout),
            failure_mode=spec.ext_auth.failure_mode,
            max_request_bytes=(0 if spec.ext_auth.body_to_ext_auth is None
                               else spec.ext_auth.body_to_ext_auth.max_request_bytes)),
    )


def _rate_limit(spec: RateLimitSpec) -> acc.RateLimitPolicy:
    return acc.RateLimitPolicy(
        limits=tuple(acc.RateLimit(
            name=limit.name, requests=limit.requests, per=limit.seconds,
            burst=limit.burst or limit.requests,
            key=acc.RateLimitKey(client_address=limit.key.client_address,
                                 header=None if limit.key.header is None
                                 else limit.key.header.lower(),
                                 claim=limit.key.claim))
            for limit in spec.limits),
        type=spec.type,
        failure_mode=spec.failure_mode,
    )


def _api_key(spec: APIKeySpec, secrets: SecretLookup, namespace: str, report: Report
             ) -> acc.APIKeyAuth:
    clients: dict[str, list[str]] = {}
    for secret_name in spec.secret_names:
        values = secrets(secret_name)
        if values is None:
            report(REASON_SECRET_NOT_FOUND,
                   f"API key Secret {namespace}/{secret_name} not found")
            continue
        for client, text in sorted(values.items()):
            keys = [line.strip() for line in text.splitlines() if line.strip()]
            digests = clients.setdefault(client, [])
            digests.extend(hashlib.sha256(key.encode("utf-8")).hexdigest() for key in keys)
    return acc.APIKeyAuth(
        clients=tuple(acc.APIKeyClient(client, tuple(sorted(set(digests))))
                      for client, digests in sorted(clients.items())),
        headers=tuple(header.lower() for header in spec.headers),
        params=tuple(spec.query_params),
        forward_client_id_header=spec.forward_client_id_header,
    )


def _basic(spec: BasicAuthSpec, secret: Callable[[str, str, str], str | None], report: Report,
           namespace: str) -> acc.BasicAuth:
    text = secret(spec.secret_name, ".htpasswd", "basic-auth") or ""
    lines: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if sep and user and hashed.startswith(("$2y$", "$2b$", "$2a$", "{SHA}")):
            lines.append(line)
        else:
            report(REASON_INVALID_SECRET,
                   f"basic-auth Secret {namespace}/{spec.secret_name}: .htpasswd line {number} "
                   "is not user:hash with a bcrypt or {SHA} hash; that user cannot log in")
    return acc.BasicAuth(htpasswd="\n".join(lines), realm=spec.realm,
                         forward_username_header=spec.forward_username_header)


def _jwt(spec: JWTSpec, secret: Callable[[str, str, str], str | None], report: Report,
         namespace: str) -> acc.JWTAuth:
    jwks: str | None = None
    uri: str | None = None
    cache = 300.0
    if spec.local_jwks is not None:
        jwks = secret(spec.local_jwks.secret_name, "jwks", "JWKS")
        if jwks is not None and not _usable_jwks(jwks):
            report(REASON_INVALID_SECRET, f"JWKS Secret {namespace}/"
                   f"{spec.local_jwks.secret_name}: jwks holds no usable key")
            jwks = None
        jwks = jwks if jwks is not None else _EMPTY_JWKS
    elif spec.remote_jwks is not None:
        uri = spec.remote_jwks.uri
        cache = parse_duration(spec.remote_jwks.cache_duration)
    sources: tuple[acc.TokenSource, ...] = acc.JWTAuth().sources
    if spec.extract_from is not None:
        sources = tuple(acc.TokenSource(header=h.name.lower(), value_prefix=h.value_prefix)
                        for h in spec.extract_from.headers) + tuple(
            acc.TokenSource(cookie=cookie) for cookie in spec.extract_from.cookies)
    return acc.JWTAuth(
        issuer=spec.issuer,
        audiences=tuple(spec.audiences),
        algorithms=tuple(dict.fromkeys(spec.algorithms)),
        clock_skew=parse_duration(spec.clock_skew),
        jwks=jwks,
        jwks_uri=uri,
        jwks_cache_duration=cache,
        sources=sources,
        required_claims=tuple(acc.RequiredClaim(c.name, tuple(c.values))
                              for c in spec.required_claims),
        claim_to_headers=tuple(acc.ClaimToHeader(c.claim, c.header)
                               for c in spec.claim_to_headers),
        strip_token=spec.strip_token,
    )


_EMPTY_JWKS = '{"keys":[]}'
"""What a policy whose JWKS Secret is unusable verifies with: nothing passes."""


def _usable_jwks(text: str) -> bool:
    import jwt

    try:
        return bool(jwt.PyJWKSet.from_json(text).keys)
    except (jwt.PyJWTError, ValueError, TypeError, KeyError):
        return False

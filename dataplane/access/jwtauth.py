"""JSON Web Token checks (pure: the clock is passed in, keys are handed over).

PyJWT verifies signatures (in `jwtsignature`, loaded only when a JWT policy is
compiled or a JWKS document parsed); this module decides which key may verify which
token:

- the token's `alg` must be one the policy allows, and `none` never is;
- a key is tried only if its type fits the algorithm's family (RSA for RS*/PS*, EC for
  ES*, OKP for EdDSA, oct for HS*), so an RSA public key can never be used as an HMAC
  secret (the RS/HS confusion attack), whatever the token claims;
- a token with a `kid` is verified by that key only; an unknown `kid` is reported as
  such, so the caller may refetch a JWKS URL once (key rotation) before refusing.

Expiry (`exp`) and not-before (`nbf`) are checked against the given time with the
policy's clock skew; `iss`, `aud` and required claims after the signature.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kanal.contract.access import JWTAuth
from kanal.dataplane.headers import cookie_value

_FAMILIES = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP", "HS": "oct"}


def key_type_for(algorithm: str) -> str | None:
    """The JWK `kty` that may verify `algorithm`, or None for an unknown one."""
    return _FAMILIES.get(algorithm[:2])


@dataclass(frozen=True, slots=True)
class KeySet:
    """Usable keys of a JWKS document: (kid or None, kty, key object)."""

    keys: tuple[tuple[str | None, str, Any], ...] = ()

    @classmethod
    def parse(cls, text: str) -> KeySet:
        """Keys of a JWKS JSON document; raises ValueError if none is usable."""
        try:
            if json.loads(text) == {"keys": []}:
                return cls()  # a policy whose keys are unusable: nothing verifies
        except (ValueError, TypeError) as exc:
            raise ValueError(f"not a usable JWKS: {exc}") from None
        from kanal.dataplane.access import jwtsignature

        return cls(jwtsignature.parse_jwks(text))

    def kids(self) -> frozenset[str]:
        return frozenset(kid for kid, _, _ in self.keys if kid is not None)


@dataclass(frozen=True, slots=True)
class Verified:
    claims: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Rejected:
    cause: str  # the metrics label: missing, malformed, algorithm, signature, expired, ...
    reason: str  # said to the client: never the token or a key


@dataclass(frozen=True, slots=True)
class UnknownKey:
    kid: str


Outcome = Verified | Rejected | UnknownKey


VERIFIED_CACHE = 1024
"""Tokens whose signature, issuer and audience a rule remembers as verified."""


class JWTVerifier:
    """One rule's JWT settings, precomputed, and the tokens it verified lately.

    A signature check costs hundreds of microseconds in Python and clients send the
    same token with every request, so a verified token's claims are remembered (per
    rule, at most `VERIFIED_CACHE`, least recently used out) together with the key
    set that verified it: a hit skips the signature but not the clock (exp, nbf) nor
    the required claims, and new keys (a reload, a JWKS refetch) verify afresh.
    """

    __slots__ = ("_decode", "_header", "_verified", "audiences", "algorithms", "issuer",
                 "leeway", "required", "spec")

    def __init__(self, spec: JWTAuth) -> None:
        # PyJWT (and cryptography) load here, when a policy with `jwt` is compiled.
        from kanal.dataplane.access import jwtsignature

        self._header = jwtsignature.unverified_header
        self._decode = jwtsignature.decode
        self.spec = spec
        self.algorithms = frozenset(alg for alg in spec.algorithms if alg.lower() != "none")
        self.audiences = list(spec.audiences)
        self.issuer = spec.issuer
        self.leeway = spec.clock_skew
        self.required = spec.required_claims
        self._verified: OrderedDict[str, tuple[KeySet, dict[str, Any]]] = OrderedDict()

    def verify(self, token: str, keys: KeySet, now: float) -> Outcome:
        hit = self._verified.get(token)
        if hit is not None and hit[0] is keys:
            self._verified.move_to_end(token)
            return self._timely(hit[1], now)
        signed = self._signed(token, keys)
        if not isinstance(signed, Verified):
            return signed
        self._verified[token] = (keys, signed.claims)
        if len(self._verified) > VERIFIED_CACHE:
            self._verified.popitem(last=False)
        return self._timely(signed.claims, now)

    def _signed(self, token: str, keys: KeySet) -> Outcome:
        """The claims of a token whose signature, issuer and audience hold."""
        header = self._header(token)
        if header is None:
            return Rejected("malformed", "the bearer token is not a JWT")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            return Rejected("algorithm", f"the token's algorithm {alg!r} is not allowed")
        family = key_type_for(alg)
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            return Rejected("malformed", "the token's kid is not a string")
        candidates = [key for key_id, kty, key in keys.keys
                      if kty == family and (kid is None or key_id == kid)]
        if not candidates:
            if kid is not None and kid not in keys.kids():
                return UnknownKey(kid)
            return Rejected("key", "no key can verify the token")
        for key in candidates:
            decoded = self._decode(token, key, alg, self.audiences, self.issuer)
            if isinstance(decoded, dict):
                return Verified(decoded)
            if decoded[0] != "signature":
                return Rejected(*decoded)
        return Rejected("signature", "the token's signature does not verify")

    def _timely(self, claims: dict[str, Any], now: float) -> Outcome:
        exp = claims.get("exp")
        if exp is not None:
            if not isinstance(exp, int | float) or isinstance(exp, bool):
                return Rejected("malformed", "the token's exp is not a number")
            if now > exp + self.leeway:
                return Rejected("expired", "the token has expired")
        nbf = claims.get("nbf")
        if nbf is not None:
            if not isinstance(nbf, int | float) or isinstance(nbf, bool):
                return Rejected("malformed", "the token's nbf is not a number")
            if now + self.leeway < nbf:
                return Rejected("not-yet-valid", "the token is not valid yet")
        for required in self.required:
            if required.name not in claims:
                return Rejected("claims", f"the token has no {required.name} claim")
            if required.values and not _claim_has(claims[required.name], required.values):
                return Rejected("claims", f"the token's {required.name} claim is not accepted")
        return Verified(claims)


def _claim_has(value: Any, accepted: Sequence[str]) -> bool:
    """Whether a claim (a string, a space-separated scope, or a list) holds an accepted value."""
    if isinstance(value, list):
        return any(str(item) in accepted for item in value)
    if isinstance(value, str):
        return value in accepted or any(part in accepted for part in value.split(" "))
    return claim_text(value) in accepted


def claim_text(value: Any) -> str:
    """A claim as a header value: strings as they are, anything else as compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def token_from(spec: JWTAuth, headers: Sequence[tuple[bytes, bytes]], cookie: bytes | None
               ) -> tuple[str | None, int]:
    """The token and the index of the source it came from (-1: none found)."""
    for index, source in enumerate(spec.sources):
        if source.header is not None:
            wanted = source.header.lower().encode("latin-1")
            prefix = source.value_prefix.lower().encode("latin-1")
            for name, value in headers:
                if name.lower() == wanted:
                    if value[: len(prefix)].lower() != prefix:
                        continue
                    token = value[len(prefix):].strip()
                    if token:
                        return token.decode("latin-1"), index
        elif source.cookie is not None and cookie is not None:
            found = cookie_value(cookie, source.cookie)
            if found:
                return found, index
    return None, -1

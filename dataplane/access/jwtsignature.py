"""The part of JWT checks that needs PyJWT (and with it `cryptography`): JWKS documents,
token headers and signatures (pure).

`kanal.dataplane.access.jwtauth` decides which key may verify which token, and loads
this module only when a policy with `jwt` is compiled (or a JWKS document parsed): a
configuration without JWT policies never loads PyJWT and its cryptography bindings.
"""

from __future__ import annotations

from typing import Any

import jwt

Key = tuple[str | None, str, Any]
"""(kid or None, kty, key object)"""


def parse_jwks(text: str) -> tuple[Key, ...]:
    """The usable keys of a JWKS document; raises ValueError."""
    try:
        jwks = jwt.PyJWKSet.from_json(text)
    except (jwt.PyJWKSetError, jwt.InvalidKeyError, ValueError, TypeError) as exc:
        raise ValueError(f"not a usable JWKS: {exc}") from None
    return tuple((key.key_id, str(key.key_type), key.key) for key in jwks.keys)


def unverified_header(token: str) -> dict[str, Any] | None:
    """A token's header, not verified; None when the token is not a JWT."""
    try:
        return dict(jwt.get_unverified_header(token))
    except jwt.DecodeError:
        return None


def decode(token: str, key: Any, algorithm: str, audiences: list[str],
           issuer: str | None) -> dict[str, Any] | tuple[str, str]:
    """The claims of a token whose signature (by `key`), issuer and audience hold, or
    (cause, reason) of the failure; cause `signature` when `key` did not sign it."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token, key=key, algorithms=[algorithm],
            audience=audiences or None, issuer=issuer,
            options={"verify_exp": False, "verify_nbf": False, "verify_iat": False,
                     "verify_aud": bool(audiences), "verify_iss": issuer is not None},
        )
    except jwt.InvalidAudienceError:
        return "audience", "the token is not for this audience"
    except jwt.InvalidIssuerError:
        return "issuer", "the token's issuer is not trusted"
    except jwt.MissingRequiredClaimError as exc:
        return "claims", f"the token has no {exc.claim} claim"
    except jwt.InvalidSignatureError:
        return "signature", "the token's signature does not verify"
    except jwt.PyJWTError:
        return "malformed", "the token cannot be verified"
    return claims

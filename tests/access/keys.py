"""Real keys and tokens for the access tests: RSA and EC keys made per run, tokens
signed with them by PyJWT, JWKS documents as issuers publish them."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import bcrypt
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa


@dataclass
class SigningKey:
    kid: str
    private: Any
    algorithm: str

    def jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        if self.algorithm.startswith("ES"):
            data = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public))
        else:
            data = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public))
        return {**data, "kid": self.kid, "use": "sig", "alg": self.algorithm}

    def sign(self, claims: dict[str, Any], **header: Any) -> str:
        return jwt.encode(claims, self.private, algorithm=self.algorithm,
                          headers={"kid": self.kid, **header})


def rsa_key(kid: str) -> SigningKey:
    return SigningKey(kid, rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")


def ec_key(kid: str) -> SigningKey:
    return SigningKey(kid, ec.generate_private_key(ec.SECP256R1()), "ES256")


def jwks(*keys: SigningKey) -> str:
    return json.dumps({"keys": [key.jwk() for key in keys]})


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": "https://issuer.test", "aud": "shop", "sub": "user-1", "iat": now,
            "exp": now + 86400, **extra}  # made at collection: valid all through a run


def unsigned_token(payload: dict[str, Any]) -> str:
    """A token with `alg: none` and no signature, as an attacker forges it."""
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(payload)}."


def hs_confusion_token(key: SigningKey, payload: dict[str, Any]) -> str:
    """HS256 signed with the issuer's RSA public key (PEM) as the HMAC secret: the
    algorithm-confusion attack."""
    import hmac

    from cryptography.hazmat.primitives import serialization

    pem = key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    def part(value: dict[str, Any]) -> bytes:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=")
    signing_input = part({"alg": "HS256", "typ": "JWT", "kid": key.kid}) + b"." + part(payload)
    signature = base64.urlsafe_b64encode(
        hmac.new(pem, signing_input, hashlib.sha256).digest()).rstrip(b"=")
    return (signing_input + b"." + signature).decode()


def bcrypt_line(user: str, password: str) -> str:
    return f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}"


def sha_line(user: str, password: str) -> str:
    digest = base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()
    return f"{user}:{{SHA}}{digest}"

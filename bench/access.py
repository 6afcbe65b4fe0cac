"""Per-request cost of access policies: a JWT check and a local rate limit.

Measures the work the dataplane adds to a request whose rule has the policy, in the
process, without sockets (what `kanal.dataplane.access.gate` calls): the JWT check
(find the token, pick the key, verify the signature, check the claims) for RS256 and
ES256, for a token seen for the first time and for one the rule verified before (its
claims are remembered; only the clock and required claims are checked again), and a local rate limit (bucket keys, the shared table, the RateLimit headers).
A rule without policies pays one attribute test (`selection.access is None`) and is
not measured here; `bench/run.py` measures the whole proxy.

    python bench/access.py [--seconds 2]

A tool for people, never a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kanal.contract.access import (
    AccessPolicy,
    JWTAuth,
    RateLimit,
    RateLimitKey,
    RateLimitPolicy,
)
from kanal.dataplane.access.policy import Access, Grant
from kanal.dataplane.access.ratelimit import RateLimiter
from kanal.dataplane.access.sharedlimits import LocalBuckets


def per_call(fn: Callable[[], object], seconds: float) -> float:
    """Microseconds per call, over about `seconds`."""
    fn()
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        for _ in range(100):
            fn()
        calls += 100
    return elapsed / calls * 1e6


def jwt_case(algorithm: str, *, remembered: bool) -> Callable[[], object]:
    key = (rsa.generate_private_key(public_exponent=65537, key_size=2048)
           if algorithm == "RS256" else ec.generate_private_key(ec.SECP256R1()))
    algo = jwt.algorithms.RSAAlgorithm if algorithm == "RS256" else jwt.algorithms.ECAlgorithm
    jwk = {**json.loads(algo.to_jwk(key.public_key())), "kid": "k1", "alg": algorithm}
    policy = Access(AccessPolicy("bench", jwt=JWTAuth(
        issuer="https://issuer", audiences=("shop",), algorithms=(algorithm,),
        jwks=json.dumps({"keys": [jwk]}))))
    now = int(time.time())
    token = jwt.encode({"iss": "https://issuer", "aud": "shop", "sub": "u", "exp": now + 3600},
                       key, algorithm=algorithm, headers={"kid": "k1"})
    headers = [(b"Host", b"shop"), (b"Authorization", b"Bearer " + token.encode()),
               (b"Accept", b"*/*")]

    verifier = policy.jwt
    assert verifier is not None

    def check() -> object:
        if not remembered:
            verifier._verified.clear()  # a token seen for the first time
        decision = policy.check(headers, "", None, "10.0.0.1", time.time(), {})
        assert isinstance(decision, Grant)
        return decision
    return check


def rate_case(limits: int) -> Callable[[], object]:
    spec = RateLimitPolicy(limits=tuple(
        RateLimit(f"l{i}", 1_000_000_000, 1.0, 1_000_000_000,
                  RateLimitKey(client_address=i == 0)) for i in range(limits)))
    limiter = RateLimiter("bench", spec)
    buckets = LocalBuckets()
    headers = [(b"Host", b"shop")]

    def take() -> object:
        keys = limiter.keys("10.0.0.1", headers, None)
        allowed, levels = buckets.take_all(keys, limiter.limits, time.monotonic())
        return limiter.verdict(allowed, levels)
    return take


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    cases = {"jwt RS256, first sight": jwt_case("RS256", remembered=False),
             "jwt ES256, first sight": jwt_case("ES256", remembered=False),
             "jwt RS256, token seen before": jwt_case("RS256", remembered=True),
             "local rate limit, 1 limit": rate_case(1),
             "local rate limit, 2 limits": rate_case(2)}
    for name, fn in cases.items():
        print(f"{name:30} {per_call(fn, args.seconds):8.1f} µs per request")


if __name__ == "__main__":
    main()

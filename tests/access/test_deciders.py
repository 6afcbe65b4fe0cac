"""The access deciders without sockets: IP rules, API keys, basic auth, JWT, and the
composed rule policy, judged from request heads with real keys and hashes."""

from __future__ import annotations

import time

import pytest

from kanal.contract.access import (
    AccessPolicy,
    APIKeyAuth,
    APIKeyClient,
    BasicAuth,
    ClaimToHeader,
    IPRules,
    JWTAuth,
    RequiredClaim,
    TokenSource,
)
from kanal.dataplane.access.apikeys import key_digest
from kanal.dataplane.access.basicauth import parse_htpasswd
from kanal.dataplane.access.ipfilter import IPFilter
from kanal.dataplane.access.jwtauth import JWTVerifier, KeySet, Rejected, UnknownKey, Verified
from kanal.dataplane.access.policy import Access, Grant, NeedKeys, Refusal
from tests.access.keys import (
    bcrypt_line,
    claims,
    ec_key,
    hs_confusion_token,
    jwks,
    rsa_key,
    sha_line,
    unsigned_token,
)

RSA = rsa_key("rsa-1")
EC = ec_key("ec-1")
OTHER = rsa_key("rsa-1")  # same kid, another key: a forger's


def check(policy: AccessPolicy, headers: list[tuple[bytes, bytes]] | None = None, *,
          query: str = "", cookie: bytes | None = None, client: str = "127.0.0.1",
          now: float | None = None, remote: dict[str, KeySet] | None = None
          ) -> Refusal | Grant | NeedKeys:
    return Access(policy).check(headers or [], query, cookie, client,
                                time.time() if now is None else now, remote or {})


# --------------------------------------------------------------------------- IP rules


def test_deny_wins_and_allow_lists_bound_the_rest() -> None:
    rules = IPFilter(["10.0.0.0/8", "2001:db8::/32"], ["10.0.0.66"])
    assert rules.refusal("10.1.2.3") is None
    assert rules.refusal("2001:db8::1") is None
    assert rules.refusal("::ffff:10.9.9.9") is None  # a mapped address is the IPv4 one
    assert "denied" in (rules.refusal("10.0.0.66") or "")
    assert "not allowed" in (rules.refusal("192.168.1.1") or "")
    assert rules.refusal("not-an-address") is not None


def test_deny_only_lets_everyone_else_through() -> None:
    rules = IPFilter([], ["192.0.2.0/24"])
    assert rules.refusal("198.51.100.7") is None
    assert rules.refusal("192.0.2.10") is not None
    assert rules.refusal("garbage") is None


def test_ip_refusal_is_403() -> None:
    refused = check(AccessPolicy("r", ip_rules=IPRules(allow=("10.0.0.0/8",))), client="1.2.3.4")
    assert isinstance(refused, Refusal) and refused.status == 403 and refused.policy == "ipRules"


# --------------------------------------------------------------------------- API keys

KEYS = APIKeyAuth(
    clients=(APIKeyClient("alice", (key_digest("k-alice-1"), key_digest("k-alice-2"))),
             APIKeyClient("bob", (key_digest("k-bob"),))),
    headers=("x-api-key",), params=("api_key",), forward_client_id_header="X-Client-Id")


@pytest.mark.parametrize("key", ["k-alice-1", "k-alice-2"])
def test_each_key_of_a_client_names_the_client(key: str) -> None:
    grant = check(AccessPolicy("r", api_key=KEYS), [(b"X-Api-Key", key.encode())])
    assert isinstance(grant, Grant)
    assert (b"X-Client-Id", b"alice") in grant.add
    assert b"x-api-key" in grant.drop and b"x-client-id" in grant.drop


def test_missing_and_wrong_keys_are_401_without_the_key_in_the_reason() -> None:
    missing = check(AccessPolicy("r", api_key=KEYS))
    wrong = check(AccessPolicy("r", api_key=KEYS), [(b"x-api-key", b"k-alice-3")])
    assert isinstance(missing, Refusal) and (missing.status, missing.cause) == (401, "missing")
    assert isinstance(wrong, Refusal) and (wrong.status, wrong.cause) == (401, "invalid")
    assert "k-alice-3" not in wrong.reason


def test_a_key_in_the_query_is_removed_from_it() -> None:
    grant = check(AccessPolicy("r", api_key=KEYS), query="a=1&api_key=k-bob&b=2")
    assert isinstance(grant, Grant) and grant.query == "a=1&b=2"
    assert (b"X-Client-Id", b"bob") in grant.add


def test_a_header_key_is_judged_before_a_query_key() -> None:
    refused = check(AccessPolicy("r", api_key=KEYS), [(b"x-api-key", b"wrong")],
                    query="api_key=k-bob")
    assert isinstance(refused, Refusal)


# --------------------------------------------------------------------------- basic auth

HTPASSWD = "\n".join([bcrypt_line("ann", "s3cret"), sha_line("sam", "p@ss:word"), "# comment"])


def basic(user: str, password: str) -> list[tuple[bytes, bytes]]:
    import base64

    return [(b"Authorization", b"Basic " + base64.b64encode(f"{user}:{password}".encode()))]


@pytest.mark.parametrize(("user", "password"), [("ann", "s3cret"), ("sam", "p@ss:word")])
def test_bcrypt_and_sha_users_pass(user: str, password: str) -> None:
    policy = AccessPolicy("r", basic_auth=BasicAuth(HTPASSWD, "shop", "X-User"))
    grant = check(policy, basic(user, password))
    assert isinstance(grant, Grant)
    assert (b"X-User", user.encode()) in grant.add and b"authorization" in grant.drop
    assert isinstance(check(policy, basic(user, password)), Grant)  # remembered: same answer


@pytest.mark.parametrize(("user", "password"), [("ann", "wrong"), ("nobody", "s3cret"),
                                                ("sam", "p@ss")])
def test_wrong_users_and_passwords_are_401_with_a_challenge(user: str, password: str) -> None:
    refused = check(AccessPolicy("r", basic_auth=BasicAuth(HTPASSWD, "shop")), basic(user, password))
    assert isinstance(refused, Refusal) and refused.status == 401
    assert refused.headers == b'WWW-Authenticate: Basic realm="shop", charset="UTF-8"\r\n'


def test_no_credentials_is_401_with_a_challenge() -> None:
    refused = check(AccessPolicy("r", basic_auth=BasicAuth(HTPASSWD)),
                    [(b"authorization", b"Bearer x")])
    assert isinstance(refused, Refusal) and refused.cause == "missing"
    assert refused.headers.startswith(b"WWW-Authenticate: Basic")


def test_unsupported_htpasswd_lines_are_refused_at_build() -> None:
    with pytest.raises(ValueError, match="line 1"):
        parse_htpasswd("joe:$apr1$abc$def")


# --------------------------------------------------------------------------- JWT


def verifier(**settings: object) -> JWTVerifier:
    return JWTVerifier(JWTAuth(issuer="https://issuer.test", audiences=("shop",),
                               algorithms=("RS256", "ES256"), **settings))  # type: ignore[arg-type]


KEYSET = KeySet.parse(jwks(RSA, EC))


@pytest.mark.parametrize("key", [RSA, EC])
def test_tokens_of_keys_in_the_jwks_verify(key: object) -> None:
    token = key.sign(claims())  # type: ignore[attr-defined]
    outcome = verifier().verify(token, KEYSET, time.time())
    assert isinstance(outcome, Verified) and outcome.claims["sub"] == "user-1"


@pytest.mark.parametrize(("token", "cause"), [
    (OTHER.sign(claims()), "signature"),
    (RSA.sign(claims(exp=int(time.time()) - 120)), "expired"),
    (RSA.sign(claims(nbf=int(time.time()) + 86400)), "not-yet-valid"),  # made at collection
    (RSA.sign(claims(aud="other")), "audience"),
    (RSA.sign(claims(iss="https://evil.test")), "issuer"),
    (unsigned_token(claims()), "algorithm"),
    (hs_confusion_token(RSA, claims()), "algorithm"),
    ("not.a.token", "malformed"),
])
def test_bad_tokens_are_rejected(token: str, cause: str) -> None:
    outcome = verifier().verify(token, KEYSET, time.time())
    assert isinstance(outcome, Rejected) and outcome.cause == cause


def test_hs_confusion_fails_even_when_hs256_is_allowed() -> None:
    """An RSA key is never an HMAC secret: HS256 tokens find no `oct` key to verify."""
    allowing = JWTVerifier(JWTAuth(algorithms=("RS256", "HS256")))
    outcome = allowing.verify(hs_confusion_token(RSA, claims()), KEYSET, time.time())
    assert isinstance(outcome, Rejected)


def test_clock_skew_is_the_leeway_on_expiry() -> None:
    token = RSA.sign(claims(exp=1000))
    assert isinstance(verifier(clock_skew=30.0).verify(token, KEYSET, 1020.0), Verified)
    assert isinstance(verifier(clock_skew=30.0).verify(token, KEYSET, 1040.0), Rejected)


def test_a_remembered_token_is_verified_again_with_new_keys() -> None:
    checker = verifier()
    token = RSA.sign(claims())
    assert isinstance(checker.verify(token, KEYSET, time.time()), Verified)
    assert isinstance(checker.verify(token, KEYSET, time.time()), Verified)  # remembered
    without_rsa = KeySet.parse(jwks(EC))  # the issuer dropped the key
    assert not isinstance(checker.verify(token, without_rsa, time.time()), Verified)


def test_an_unknown_kid_is_reported_for_a_refetch() -> None:
    token = rsa_key("rotated").sign(claims())
    outcome = verifier().verify(token, KEYSET, time.time())
    assert outcome == UnknownKey("rotated")


def test_required_claims_and_claims_to_headers() -> None:
    spec = JWTAuth(jwks=jwks(RSA), audiences=("shop",),
                   required_claims=(RequiredClaim("scope", ("orders:read",)),),
                   claim_to_headers=(ClaimToHeader("sub", "X-User"),
                                     ClaimToHeader("groups", "X-Groups")),
                   strip_token=True)
    policy = AccessPolicy("r", jwt=spec)
    good = RSA.sign(claims(scope="profile orders:read", groups=["a", "b"]))
    grant = check(policy, [(b"Authorization", f"Bearer {good}".encode()),
                           (b"X-User", b"forged")])
    assert isinstance(grant, Grant)
    assert (b"X-User", b"user-1") in grant.add and (b"X-Groups", b'["a","b"]') in grant.add
    assert {b"x-user", b"x-groups", b"authorization"} <= grant.drop
    lacking = RSA.sign(claims(scope="profile"))
    refused = check(policy, [(b"authorization", f"Bearer {lacking}".encode())])
    assert isinstance(refused, Refusal) and refused.cause == "claims"


def test_tokens_from_a_cookie_and_the_cookie_stripped() -> None:
    spec = JWTAuth(jwks=jwks(RSA), sources=(TokenSource(cookie="session"),), strip_token=True)
    token = RSA.sign(claims())
    grant = check(AccessPolicy("r", jwt=spec), cookie=f"a=1; session={token}".encode())
    assert isinstance(grant, Grant) and grant.drop_cookie == "session"
    missing = check(AccessPolicy("r", jwt=spec), [(b"authorization", f"Bearer {token}".encode())])
    assert isinstance(missing, Refusal) and missing.cause == "missing"
    assert missing.headers.startswith(b"WWW-Authenticate: Bearer")


def test_remote_keys_not_yet_fetched_ask_for_them() -> None:
    spec = JWTAuth(jwks_uri="http://127.0.0.1:1/jwks")
    token = RSA.sign(claims())
    headers = [(b"authorization", f"Bearer {token}".encode())]
    assert check(AccessPolicy("r", jwt=spec), headers) == NeedKeys("http://127.0.0.1:1/jwks", None)
    remote = {"http://127.0.0.1:1/jwks": KeySet.parse(jwks(EC))}
    assert check(AccessPolicy("r", jwt=spec), headers, remote=remote) == NeedKeys(
        "http://127.0.0.1:1/jwks", "rsa-1")
    remote = {"http://127.0.0.1:1/jwks": KeySet.parse(jwks(EC, RSA))}
    assert isinstance(check(AccessPolicy("r", jwt=spec), headers, remote=remote), Grant)


def test_an_empty_jwks_refuses_everything() -> None:
    policy = AccessPolicy("r", jwt=JWTAuth(jwks='{"keys":[]}'))
    token = RSA.sign(claims())
    refused = check(policy, [(b"authorization", f"Bearer {token}".encode())])
    assert isinstance(refused, Refusal) and refused.status == 401


# --------------------------------------------------------------------------- composed


def test_every_policy_set_must_pass_in_order() -> None:
    policy = AccessPolicy("r", ip_rules=IPRules(deny=("10.0.0.0/8",)), api_key=KEYS,
                          basic_auth=BasicAuth(HTPASSWD))
    from_denied = check(policy, [(b"x-api-key", b"k-bob"), *basic("ann", "s3cret")],
                        client="10.1.1.1")
    assert isinstance(from_denied, Refusal) and from_denied.policy == "ipRules"
    no_password = check(policy, [(b"x-api-key", b"k-bob")])
    assert isinstance(no_password, Refusal) and no_password.policy == "basicAuth"
    both = check(policy, [(b"x-api-key", b"k-bob"), *basic("ann", "s3cret")])
    assert isinstance(both, Grant)

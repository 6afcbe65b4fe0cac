"""Scenario: access policies in front of real backends, through a real `kanal run`.

Each protected route has a backend of its own that records what reaches it, so every
test can say both what the client got (raw bytes) and whether the backend ever saw a
refused request. `--trusted-hops 1` lets a test speak for a client address through
X-Forwarded-For, as a load balancer in front would.
"""

from __future__ import annotations

import base64
import json
import textwrap
import urllib.request

import pytest

from tests.access.keys import bcrypt_line, claims, ec_key, jwks, rsa_key, sha_line
from tests.conftest import header_values, raw_request, upstream_yaml

ISSUER = rsa_key("issuer-1")
STRANGER = rsa_key("issuer-1")


def route(name: str, host: str, policies: str, *, rule_policies: str = "") -> str:
    text = f"""\
        apiVersion: kanal.dev/v1alpha1
        kind: Route
        metadata: {{name: {name}}}
        spec:
          hostnames: [{host}]
          policies: {policies}
          rules:
            - backends: [{{upstream: {name}}}]
        """
    text = textwrap.dedent(text)
    if rule_policies:
        text += (f"    - matches: [{{path: {{type: PathPrefix, value: /open}}}}]\n"
                 f"      policies: {rule_policies}\n"
                 f"      backends: [{{upstream: {name}}}]\n")
    return text


def secret(name: str, data: dict[str, str]) -> str:
    return (f"apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}}}\n"
            f"stringData: {json.dumps(data)}\n")


@pytest.fixture(scope="module")
def site(module_backends, module_kanal):
    names = ("ip", "keys", "basic", "jwt")
    backends = {name: module_backends(name) for name in names}
    files = {f"{name}-upstream.yaml": upstream_yaml(name, backend)
             for name, backend in backends.items()}
    files["ip.yaml"] = route(
        "ip", "ip.test", "{ipRules: {allow: [10.0.0.0/8], deny: [10.0.0.66]}}",
        rule_policies="{ipRules: {allow: [0.0.0.0/0]}}")
    files["keys.yaml"] = route(
        "keys", "keys.test", "{apiKey: {secretNames: [shop-keys], headers: [x-api-key], "
        "queryParams: [api_key], forwardClientIDHeader: X-Client-Id}}")
    files["keys-secret.yaml"] = secret("shop-keys", {"alice": "k-alice-1\nk-alice-2",
                                                     "bob": "k-bob"})
    files["basic.yaml"] = route(
        "basic", "basic.test", "{basicAuth: {secretName: shop-users, realm: shop, "
        "forwardUsernameHeader: X-User}}")
    files["basic-secret.yaml"] = secret("shop-users", {".htpasswd": "\n".join(
        [bcrypt_line("ann", "s3cret"), sha_line("sam", "p4ss")])})
    files["jwt.yaml"] = route(
        "jwt", "jwt.test", "{jwt: {issuer: 'https://issuer.test', audiences: [shop], "
        "localJWKS: {secretName: issuer-keys}, claimToHeaders: [{claim: sub, header: X-User}], "
        "stripToken: true}}")
    files["jwt-secret.yaml"] = secret("issuer-keys", {"jwks": jwks(ISSUER, ec_key("ec"))})
    k = module_kanal(files, "--trusted-hops", "1")
    return k, backends


async def get(k, host: str, path: str = "/", headers: dict[str, str] | None = None):
    lines = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    (answer,) = await raw_request(
        k.port, f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{lines}\r\n".encode())
    return answer


def count(backend) -> int:
    return len(backend.received)


# --------------------------------------------------------------------------- IP rules


async def test_ip_rules_judge_the_address_the_trusted_hop_reported(site) -> None:
    k, backends = site
    before = count(backends["ip"])
    allowed = await get(k, "ip.test", headers={"X-Forwarded-For": "10.1.2.3"})
    assert allowed.status == 200
    for address in ("10.0.0.66", "192.168.1.1"):
        refused = await get(k, "ip.test", headers={"X-Forwarded-For": address})
        assert refused.status == 403
        assert address.encode() in refused.body
    direct = await get(k, "ip.test")  # no hop in front: the peer, 127.0.0.1
    assert direct.status == 403
    assert count(backends["ip"]) == before + 1


async def test_a_rule_policy_replaces_the_routes_of_its_kind(site) -> None:
    k, _ = site
    answer = await get(k, "ip.test", "/open/x", headers={"X-Forwarded-For": "192.168.1.1"})
    assert answer.status == 200


# --------------------------------------------------------------------------- API keys


async def test_api_keys_name_the_client_and_never_reach_the_backend(site) -> None:
    k, backends = site
    answer = await get(k, "keys.test", "/a", headers={"X-Api-Key": "k-alice-2",
                                                     "X-Client-Id": "forged"})
    assert answer.status == 200
    record = answer.json()
    assert header_values(record, "X-Client-Id") == ["alice"]
    assert header_values(record, "X-Api-Key") == []
    by_query = await get(k, "keys.test", "/b?x=1&api_key=k-bob")
    assert by_query.status == 200
    assert by_query.json()["path"] == "/b?x=1"
    assert header_values(by_query.json(), "X-Client-Id") == ["bob"]


async def test_missing_and_wrong_api_keys_are_401_and_not_forwarded(site) -> None:
    k, backends = site
    before = count(backends["keys"])
    missing = await get(k, "keys.test")
    wrong = await get(k, "keys.test", headers={"X-Api-Key": "k-guess"})
    assert (missing.status, wrong.status) == (401, 401)
    assert b"k-guess" not in wrong.body
    assert count(backends["keys"]) == before
    assert "k-guess" not in k.log()


# --------------------------------------------------------------------------- basic auth


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.mark.parametrize(("user", "password"), [("ann", "s3cret"), ("sam", "p4ss")])
async def test_htpasswd_users_pass_with_their_name(site, user: str, password: str) -> None:
    k, _ = site
    answer = await get(k, "basic.test", headers=basic(user, password))
    assert answer.status == 200
    assert header_values(answer.json(), "X-User") == [user]
    assert header_values(answer.json(), "Authorization") == []


async def test_wrong_passwords_get_401_with_a_challenge(site) -> None:
    k, backends = site
    before = count(backends["basic"])
    for headers in (basic("ann", "nope"), basic("eve", "s3cret"), {}):
        answer = await get(k, "basic.test", headers=headers)
        assert answer.status == 401
        assert answer.header("WWW-Authenticate") == 'Basic realm="shop", charset="UTF-8"'
    assert count(backends["basic"]) == before


# --------------------------------------------------------------------------- JWT


async def test_a_valid_token_passes_with_its_claims_and_without_itself(site) -> None:
    k, _ = site
    token = ISSUER.sign(claims(sub="u-42"))
    answer = await get(k, "jwt.test", headers={"Authorization": f"Bearer {token}",
                                               "X-User": "forged"})
    assert answer.status == 200
    assert header_values(answer.json(), "X-User") == ["u-42"]
    assert header_values(answer.json(), "Authorization") == []


async def test_bad_tokens_are_401_and_never_forwarded(site) -> None:
    k, backends = site
    before = count(backends["jwt"])
    bad = [STRANGER.sign(claims()), ISSUER.sign(claims(aud="other")),
           ISSUER.sign(claims(exp=1)), "garbage"]
    for token in bad:
        answer = await get(k, "jwt.test", headers={"Authorization": f"Bearer {token}"})
        assert answer.status == 401
        assert "invalid_token" in (answer.header("WWW-Authenticate") or "")
    assert (await get(k, "jwt.test")).status == 401
    assert count(backends["jwt"]) == before


# --------------------------------------------------------------------------- visibility


async def test_refusals_are_counted_by_rule_policy_and_reason(site) -> None:
    k, _ = site
    await get(k, "keys.test", headers={"X-Api-Key": "wrong"})
    with urllib.request.urlopen(k.admin + "/metrics", timeout=5) as answer:
        text = answer.read().decode()
    assert 'kanal_access_refused_total{policy="apiKey",reason="invalid",rule="default/keys/0"}' \
        in text


def test_explain_shows_the_policies_and_their_decisions(site) -> None:
    k, _ = site
    query = "url=http://keys.test/&header=X-Api-Key:k-bob"
    with urllib.request.urlopen(f"{k.admin}/explain?{query}", timeout=5) as answer:
        explained = json.loads(answer.read())
    assert explained["access"] == {"policies": ["apiKey"],
                                   "decisions": {"apiKey": {"decision": "allow"}}}


def test_config_shows_users_and_clients_but_no_secrets(site) -> None:
    k, _ = site
    text = json.dumps(k.config())
    assert "$2b$" not in text and "{SHA}" not in text
    assert '"ann"' in text and '"alice"' in text


# --------------------------------------------------------------------------- the example


async def test_the_access_example_serves_as_documented(module_backends, module_kanal) -> None:
    from tests.conftest import REPO

    shop = module_backends("shop-v1")
    example = (REPO / "examples" / "access.yaml").read_text()
    k = module_kanal({"access.yaml": example, "shop.yaml": upstream_yaml("shop-v1", shop)})
    partner = await get(k, "access.example.com", "/partners/x", {"x-api-key": "demo-key"})
    assert partner.status == 200
    assert header_values(partner.json(), "X-Partner") == ["partner-a"]
    person = await get(k, "access.example.com", "/", basic("ann", "demo-password"))
    assert person.status == 200
    assert header_values(person.json(), "X-User") == ["ann"]
    assert (await get(k, "access.example.com", "/")).status == 401
    assert (await get(k, "access.example.com", "/partners/x")).status == 401


def test_explain_judges_tokens_and_addresses_without_counting(site) -> None:
    from urllib.parse import quote

    k, _ = site

    def refusals() -> str:
        with urllib.request.urlopen(k.admin + "/metrics", timeout=5) as answer:
            return "\n".join(line for line in answer.read().decode().splitlines()
                             if line.startswith("kanal_access_refused_total"))

    before = refusals()
    bad = ISSUER.sign(claims(aud="other"))
    query = f"url=http://jwt.test/&header={quote('Authorization:Bearer ' + bad)}"
    with urllib.request.urlopen(f"{k.admin}/explain?{query}", timeout=5) as answer:
        explained = json.loads(answer.read())
    assert explained["access"]["decisions"]["jwt"] == {
        "decision": "refuse", "status": 401, "reason": "the token is not for this audience"}
    query = "url=http://ip.test/&header=X-Real-IP:10.0.0.66"
    with urllib.request.urlopen(f"{k.admin}/explain?{query}", timeout=5) as answer:
        explained = json.loads(answer.read())
    assert explained["access"]["decisions"]["ipRules"]["decision"] == "refuse"
    assert refusals() == before  # explaining counts nothing


def test_bad_policies_are_named_by_file_and_field(tmp_path) -> None:
    import subprocess
    import sys

    (tmp_path / "r.yaml").write_text(textwrap.dedent("""\
        apiVersion: kanal.dev/v1alpha1
        kind: Route
        metadata: {name: r}
        spec:
          policies:
            ipRules: {allow: [10.0.0.0/33]}
            jwt: {algorithms: [none], localJWKS: {secretName: x}}
          rules: [{backends: [{upstream: x}], policies: {jwt: {issuer: a}}}]
        """))
    done = subprocess.run([sys.executable, "-m", "kanal", "validate", str(tmp_path / "r.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    out = done.stdout + done.stderr
    assert "spec.policies.ipRules.allow[0]" in out
    assert "spec.policies.jwt.algorithms[0]" in out
    assert "spec.rules[0].policies.jwt: exactly one of localJWKS and remoteJWKS" in out

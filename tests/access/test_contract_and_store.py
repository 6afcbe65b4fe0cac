"""Policies on the way between the planes: the operator's store follows the Secrets they
name, the Snapshot carries them through its codec, and validate() refuses forged ones."""

from __future__ import annotations

import copy
import dataclasses

from kanal.contract.access import (
    AccessPolicy,
    APIKeyAuth,
    ExtAuth,
    JWTAuth,
    RateLimit,
    RateLimitPolicy,
)
from kanal.contract.codec import parse_snapshot
from kanal.contract.snapshot import Backend, Route, Rule, Snapshot
from kanal.contract.validate import validate
from kanal.operator.kube.store import Store
from tests.operator.kube.conftest import PLURALS, route, secret


def body(manifest: dict) -> dict:
    full = copy.deepcopy(manifest)
    full.setdefault("apiVersion", PLURALS[full["kind"]][0])
    full["metadata"].update({"uid": f"uid-{full['metadata']['name']}", "generation": 1,
                             "resourceVersion": "1"})
    return full


def test_the_store_keeps_the_secrets_policies_name() -> None:
    store = Store()
    keys = body(secret("api-keys", alice="k1"))
    assert store.apply(keys) is False  # nobody names it yet
    policies = {"apiKey": {"secretNames": ["api-keys"]}}
    assert store.apply(body(route("shop", "web", policies=policies))) is True
    assert store.secrets_to_fetch() == {("default", "api-keys")}
    assert store.apply(keys) is True
    compiled = store.compile().snapshot.routes[0].rules[0].access
    assert compiled is not None and compiled.api_key is not None
    assert [client.client for client in compiled.api_key.clients] == ["alice"]


POLICY = AccessPolicy(
    "default/shop/0",
    api_key=APIKeyAuth(headers=("x-api-key",), forward_client_id_header="X-Client"),
    jwt=JWTAuth(jwks_uri="https://issuer.example/jwks"),
    rate_limit=RateLimitPolicy(limits=(RateLimit("all", 10, 1.0, 20),), type="Global"),
    ext_auth=ExtAuth(url="http://auth.example/check"),
)


def snapshot(policy: AccessPolicy) -> Snapshot:
    rule = Rule(index=0, backends=(Backend("default/app"),), access=policy)
    return Snapshot(routes=(Route(key="default/shop", rules=(rule,)),)).with_version()


def test_policies_travel_through_the_codec_unchanged() -> None:
    sent = snapshot(POLICY)
    assert parse_snapshot(sent.to_json()) == sent
    assert validate(sent) == []


def test_forged_policies_are_refused_with_the_reason() -> None:
    forged = dataclasses.replace(POLICY, api_key=APIKeyAuth(
        forward_client_id_header="X-Client\r\nX-Admin: yes"))
    problems = validate(snapshot(forged))
    assert any("cannot be written" in problem for problem in problems), problems
    zero = dataclasses.replace(POLICY, rate_limit=RateLimitPolicy(
        limits=(RateLimit("all", 0, 1.0, 1),)))
    assert any("positive" in problem for problem in validate(snapshot(zero)))

"""Features that meet on one rule: what each promises still holds with the others on.

Through a real `kanal run` in front of a recording backend: a cached rule behind an
API key never answers a client without a key from its cache; a rule with a header
filter and an access policy forwards the filtered request only when the policy passed.
"""

from __future__ import annotations

import json

from tests.conftest import raw_request, upstream_yaml


def _secret(name: str, data: dict[str, str]) -> str:
    return (f"apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}}}\n"
            f"stringData: {json.dumps(data)}\n")


ROUTE = """\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: guarded}
spec:
  hostnames: [guarded.test]
  policies: {apiKey: {secretNames: [guarded-keys], headers: [x-api-key]}}
  rules:
    - backends: [{upstream: guarded}]
      cache: {defaultTTL: 1h}
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: {set: [{name: X-Filtered, value: "yes"}]}
"""


async def _get(port: int, key: str | None):
    extra = f"x-api-key: {key}\r\n" if key is not None else ""
    (answer,) = await raw_request(
        port, f"GET /page HTTP/1.1\r\nHost: guarded.test\r\n{extra}\r\n".encode())
    return answer


async def test_a_cached_answer_is_never_served_past_the_access_policy(backends, kanal) -> None:
    backend = await backends("guarded")
    k = kanal({"upstream.yaml": upstream_yaml("guarded", backend), "route.yaml": ROUTE,
               "secret.yaml": _secret("guarded-keys", {"alice": "k-alice"})})
    first = await _get(k.port, "k-alice")
    assert first.status == 200
    assert first.header("x-cache") == "MISS"
    second = await _get(k.port, "k-alice")
    assert (second.status, second.header("x-cache")) == (200, "HIT")
    assert len(backend.received) == 1
    for key in (None, "k-wrong"):
        refused = await _get(k.port, key)
        assert refused.status == 401, refused
        assert refused.header("x-cache") != "HIT"
        assert refused.body != first.body  # the stored answer is not in it
    assert len(backend.received) == 1
    # The filtered request reached the backend, without the key.
    seen = backend.received[0]
    headers = {name.lower(): value for name, value in seen["headers"]}
    assert headers.get("x-filtered") == "yes"
    assert "x-api-key" not in headers


AGGREGATE = """\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: bff}
spec:
  hostnames: [bff.test]
  policies: {apiKey: {secretNames: [bff-keys], headers: [x-api-key]}}
  rules:
    - aggregate:
        parts:
          - {name: profile, upstream: profile, path: /profile}
"""


async def test_an_aggregate_rule_sends_no_part_before_its_policy_passed(backends, kanal) -> None:
    profile = await backends("profile")
    k = kanal({"upstream.yaml": upstream_yaml("profile", profile), "route.yaml": AGGREGATE,
               "secret.yaml": _secret("bff-keys", {"app": "k-app"})})
    (refused,) = await raw_request(k.port, b"GET / HTTP/1.1\r\nHost: bff.test\r\n\r\n")
    assert refused.status == 401
    assert profile.received == []
    (allowed,) = await raw_request(
        k.port, b"GET / HTTP/1.1\r\nHost: bff.test\r\nx-api-key: k-app\r\n\r\n")
    assert allowed.status == 200, allowed
    assert "profile" in allowed.json()
    assert len(profile.received) == 1

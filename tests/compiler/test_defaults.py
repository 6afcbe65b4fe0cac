"""One set of defaults: an API field left out compiles to the Snapshot type's own default.

The API models must spell their defaults for the CRD schemas ("5s", "1h"), and the
Snapshot types keep theirs for the dataplane's own use (`kanal dataplane` with a
hand-written snapshot, tests), so the two sets exist; this pins them together.
"""

from __future__ import annotations

from kanal.contract import snapshot as snap
from kanal.operator.compiler import compile_snapshot
from kanal.operator.models import Route, Upstream


def compiled(upstream_spec: dict[str, object], rule: dict[str, object]) -> snap.Snapshot:
    upstream = Upstream.model_validate({
        "apiVersion": "kanal.dev/v1alpha1", "kind": "Upstream",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"endpoints": [{"address": "10.0.0.1", "port": 80}], **upstream_spec},
    })
    route = Route.model_validate({
        "apiVersion": "kanal.dev/v1alpha1", "kind": "Route",
        "metadata": {"name": "r", "namespace": "shop"},
        "spec": {"rules": [{"backends": [{"upstream": "web"}], **rule}]},
    })
    result = compile_snapshot([upstream, route])
    assert all(s.ok for s in result.statuses), result.statuses
    return result.snapshot


def test_upstream_defaults_are_the_snapshot_defaults() -> None:
    snapshot = compiled({"healthCheck": {}}, {})
    upstream = snapshot.upstream("shop/web")
    assert upstream is not None
    default = snap.Upstream(key="shop/web")
    assert upstream.circuit_breaker == snap.CircuitBreaker() == default.circuit_breaker
    assert upstream.health_check == snap.HealthCheck()
    assert upstream.connect_timeout == default.connect_timeout
    assert upstream.idle_timeout == default.idle_timeout
    assert upstream.policy == default.policy
    assert upstream.protocol == default.protocol
    assert [e.weight for e in upstream.endpoints] == [snap.Endpoint("10.0.0.1", 80).weight]


def test_rule_defaults_are_the_snapshot_defaults() -> None:
    snapshot = compiled({}, {"retries": {}, "sessionAffinity": {}})
    [route] = snapshot.routes
    [rule] = route.rules
    assert rule.retries == snap.Retries()
    assert rule.session_affinity == snap.SessionAffinity()
    assert rule.matches == snap.Rule(index=0).matches
    assert [b.weight for b in rule.backends] == [snap.Backend(upstream="shop/web").weight]
    assert route.gateways == snap.Route(key="x").gateways


def test_filter_defaults_are_the_snapshot_defaults() -> None:
    snapshot = compiled({}, {"filters": [
        {"type": "RequestRedirect", "requestRedirect": {}},
        {"type": "RequestMirror", "requestMirror": {"upstream": "web"}},
        {"type": "CORS", "cors": {}},
        {"type": "Compression", "compression": {}},
        {"type": "ResponseHeaderModifier", "responseHeaderModifier": {}},
    ]})
    [route] = snapshot.routes
    [rule] = route.rules
    redirect, mirror, cors, compression, headers = rule.filters
    assert redirect.request_redirect == snap.RequestRedirect()
    assert mirror.request_mirror == snap.RequestMirror(upstream="shop/web")
    assert cors.cors == snap.CORS()
    assert compression.compression == snap.Compression()
    assert headers.response_header_modifier == snap.HeaderModifier()
    direct = compiled({}, {"filters": [{"type": "DirectResponse", "directResponse": {}}]})
    assert direct.routes[0].rules[0].filters[0].direct_response == snap.DirectResponse()
def test_cache_defaults_are_the_snapshot_defaults() -> None:
    snapshot = compiled({}, {"cache": {}})
    [route] = snapshot.routes
    [rule] = route.rules
    assert rule.cache == snap.Cache()

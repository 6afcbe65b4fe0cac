"""The API models: every validation rule, with the field path and message a user reads."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from pydantic import ValidationError

from kanal.operator.durations import DURATION_PATTERN, format_duration, parse_duration
from kanal.operator.manifests import describe_validation_error
from kanal.operator.models import RESOURCES, SPECS, EgressPolicy, Route, Secret, Upstream

API = "kanal.dev/v1alpha1"
GOOD_RULE = {"backends": [{"upstream": "orders"}]}


def doc(kind: str, spec: dict[str, Any], **metadata: Any) -> dict[str, Any]:
    metadata.setdefault("name", "x")
    return {"apiVersion": API, "kind": kind, "metadata": metadata, "spec": spec}


def errors(kind: str, spec: dict[str, Any], **metadata: Any) -> list[tuple[str, str]]:
    """The (field path, message) pairs `kanal validate` would print."""
    with pytest.raises(ValidationError) as caught:
        RESOURCES[kind].model_validate(doc(kind, spec, **metadata))
    return describe_validation_error(caught.value)


def route_errors(**spec: Any) -> list[tuple[str, str]]:
    spec.setdefault("rules", [GOOD_RULE])
    return errors("Route", spec)


def upstream_errors(**spec: Any) -> list[tuple[str, str]]:
    if "service" not in spec:
        spec.setdefault("endpoints", [{"address": "10.0.0.1", "port": 80}])
    return errors("Upstream", spec)


def route(**spec: Any) -> Route:
    spec.setdefault("rules", [GOOD_RULE])
    return Route.model_validate(doc("Route", spec))


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(("text", "seconds"), [
    ("400ms", 0.4), ("2s", 2.0), ("1m30s", 90.0), ("1h", 3600.0), ("1h30m", 5400.0),
    ("0s", 0.0), ("1500ms", 1.5), ("1h1m1s1ms", 3661.001), ("99999ms", 99.999),
])
def test_durations_parse_to_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", [
    "", "10", "-1s", "1.5s", "1d", "500us", "1 s", "s", "100000s", "1h1m1s1ms1h", "2S",
])
def test_malformed_durations_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="duration like"):
        parse_duration(text)


def test_durations_format_back_to_the_shortest_form() -> None:
    assert [format_duration(s) for s in (90, 0.4, 0, 3661.001)] == ["1m30s", "400ms", "0s",
                                                                     "1h1m1s1ms"]


def test_a_duration_field_keeps_the_users_text_and_names_the_field_when_wrong() -> None:
    upstream = Upstream.model_validate(doc("Upstream", {
        "endpoints": [], "timeouts": {"connect": "1m30s"}}))
    assert upstream.spec.timeouts.connect == "1m30s"
    assert upstream_errors(timeouts={"idle": "5 minutes"}) == [
        ("spec.timeouts.idle",
         "must be a duration like 400ms, 2s, 1m30s or 1h (units h, m, s, ms), got '5 minutes'")]
    assert upstream_errors(healthCheck={"interval": "0s"}) == [
        ("spec.healthCheck.interval", "must be longer than 0s, got '0s'")]


def test_health_check_timeout_may_not_exceed_the_interval() -> None:
    assert upstream_errors(healthCheck={"interval": "1s", "timeout": "2s"}) == [
        ("spec.healthCheck", "timeout (2s) must not be longer than interval (1s)")]


# --------------------------------------------------------------------------- Upstream


def test_the_api_md_upstream_example_validates_and_round_trips() -> None:
    spec = {
        "service": {"name": "orders-v1", "port": 8080},
        "protocol": "HTTPS",
        "tls": {"sni": "orders.internal", "caSecretName": "orders-ca",
                "clientCertSecretName": "orders-client", "insecureSkipVerify": False},
        "loadBalancer": {"policy": "RingHash", "hashOn": {"header": "x-user"}},
        "healthCheck": {"path": "/healthz", "interval": "5s", "timeout": "1s",
                        "healthyThreshold": 2, "unhealthyThreshold": 3},
        "circuitBreaker": {"maxConnections": 1024, "maxPendingRequests": 1024,
                           "consecutiveFailures": 5, "failureRatePercent": 50,
                           "minimumRequests": 20, "slowCallDuration": "2s",
                           "openDuration": "30s", "halfOpenRequests": 1},
        "timeouts": {"connect": "2s", "idle": "60s"},
    }
    upstream = Upstream.model_validate(doc("Upstream", spec, namespace="shop"))
    dumped = upstream.spec.model_dump(by_alias=True, exclude_unset=True)
    assert dumped == spec
    assert upstream.key == "shop/x"


def test_upstream_needs_exactly_one_of_service_or_endpoints() -> None:
    both = {"service": {"name": "orders", "port": 80}, "endpoints": []}
    assert errors("Upstream", both) == [("spec", "set exactly one of service or endpoints")]
    assert errors("Upstream", {}) == [("spec", "set exactly one of service or endpoints")]


def test_an_empty_endpoint_list_is_a_valid_upstream() -> None:
    assert Upstream.model_validate(doc("Upstream", {"endpoints": []})).spec.endpoints == []


@pytest.mark.parametrize(("port", "message"), [(0, "must be >= 1"), (65536, "must be <= 65535")])
def test_ports_are_between_1_and_65535(port: int, message: str) -> None:
    assert upstream_errors(endpoints=[{"address": "10.0.0.1", "port": port}]) == [
        ("spec.endpoints[0].port", message)]
    assert upstream_errors(service={"name": "orders", "port": port}) == [
        ("spec.service.port", message)]


def test_endpoint_weights_are_not_negative_and_zero_is_allowed() -> None:
    assert upstream_errors(endpoints=[{"address": "10.0.0.1", "port": 80, "weight": -1}]) == [
        ("spec.endpoints[0].weight", "must be >= 0")]
    Upstream.model_validate(doc("Upstream", {
        "endpoints": [{"address": "10.0.0.1", "port": 80, "weight": 0}]}))


def test_the_same_endpoint_twice_is_an_error() -> None:
    twice = [{"address": "10.0.0.1", "port": 80}, {"address": "10.0.0.1", "port": 80}]
    assert upstream_errors(endpoints=twice) == [("spec", "duplicate endpoint 10.0.0.1:80")]


def test_endpoint_addresses_are_ip_addresses_or_dns_names() -> None:
    Upstream.model_validate(doc("Upstream", {"endpoints": [
        {"address": "::1", "port": 80}, {"address": "api.example.net", "port": 443}]}))
    assert upstream_errors(endpoints=[{"address": "http://x", "port": 80}]) == [
        ("spec.endpoints[0].address", "must be an IP address or a DNS name, got 'http://x'")]


def test_load_balancer_policy_is_one_of_four() -> None:
    assert upstream_errors(loadBalancer={"policy": "LeastConn"}) == [
        ("spec.loadBalancer.policy", "must be one of RoundRobin, LeastRequest, Random, RingHash")]


def test_hash_on_only_with_ring_hash() -> None:
    assert upstream_errors(loadBalancer={"policy": "Random", "hashOn": {"cookie": "id"}}) == [
        ("spec.loadBalancer", "hashOn is only valid with policy RingHash, not Random")]


@pytest.mark.parametrize("hash_on", [{}, {"header": "x-user", "cookie": "id"},
                                     {"sourceIP": False}])
def test_hash_on_names_exactly_one_key(hash_on: dict[str, Any]) -> None:
    [(path, message)] = upstream_errors(loadBalancer={"policy": "RingHash", "hashOn": hash_on})
    assert path == "spec.loadBalancer.hashOn"
    assert message.startswith("set exactly one of header, cookie or sourceIP: true")


def test_hash_on_source_ip() -> None:
    upstream = Upstream.model_validate(doc("Upstream", {
        "endpoints": [], "loadBalancer": {"policy": "RingHash", "hashOn": {"sourceIP": True}}}))
    assert upstream.spec.load_balancer.hash_on is not None
    assert upstream.spec.load_balancer.hash_on.source_ip is True


def test_tls_only_with_protocol_https() -> None:
    assert upstream_errors(tls={"sni": "a.example.com"}) == [
        ("spec", "tls is only valid with protocol: HTTPS or H2")]


def test_grpc_health_check_needs_an_http2_protocol() -> None:
    check = {"grpc": {"service": "shop.Orders"}}
    assert upstream_errors(healthCheck=check) == [
        ("spec", "healthCheck.grpc needs protocol: H2C or H2")]
    upstream = Upstream.model_validate(doc("Upstream", {
        "endpoints": [], "protocol": "H2C", "healthCheck": check}))
    assert upstream.spec.health_check is not None
    assert upstream.spec.health_check.grpc is not None
    assert upstream.spec.health_check.grpc.service == "shop.Orders"


def test_circuit_breaker_limits() -> None:
    assert upstream_errors(circuitBreaker={"failureRatePercent": 101, "maxConnections": 0}) == [
        ("spec.circuitBreaker.maxConnections", "must be >= 1"),
        ("spec.circuitBreaker.failureRatePercent", "must be <= 100"),
    ]


# --------------------------------------------------------------------------- Route


def test_the_api_md_route_example_validates_and_round_trips() -> None:
    spec = {
        "hostnames": ["shop.example.com", "*.example.com"],
        "gateways": ["ingress"],
        "tls": {"secretName": "shop-tls", "redirectHTTP": True,
                "hsts": {"maxAge": 31536000, "includeSubDomains": False}},
        "rules": [
            {"name": "canary-by-header",
             "matches": [{"path": {"type": "PathPrefix", "value": "/api"}, "method": "GET",
                          "headers": [{"name": "x-canary", "value": "true"}],
                          "queryParams": [{"name": "beta", "value": "1"}]}],
             "backends": [{"upstream": "orders-v2", "weight": 1}]},
            {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
             "backends": [{"upstream": "orders-v1", "weight": 95},
                          {"upstream": "orders-v2", "weight": 5}],
             "sessionAffinity": {"cookie": {"name": "kanal-affinity", "ttl": "1h"}},
             "timeout": "15s",
             "retries": {"attempts": 2, "perTryTimeout": "400ms",
                         "retryOn": ["connect-failure", "reset", "502", "503", "504"]}},
        ],
    }
    parsed = Route.model_validate(doc("Route", spec))
    assert parsed.spec.model_dump(by_alias=True, exclude_unset=True) == spec


def test_defaults() -> None:
    parsed = route()
    assert parsed.metadata.namespace == "default"
    assert parsed.spec.gateways == ["ingress"]
    assert parsed.spec.hostnames == []
    assert parsed.spec.rules[0].matches == []
    assert parsed.spec.rules[0].backends[0].weight == 1


def test_backend_weight_must_not_be_negative_with_the_path_in_brackets() -> None:
    rules = [GOOD_RULE, {"backends": [{"upstream": "a", "weight": -5}]}]
    assert route_errors(rules=rules) == [("spec.rules[1].backends[0].weight", "must be >= 0")]


def test_all_backends_at_weight_zero_is_a_standby_not_an_error() -> None:
    parsed = route(rules=[{"backends": [{"upstream": "a", "weight": 0},
                                        {"upstream": "b", "weight": 0}]}])
    assert [b.weight for b in parsed.spec.rules[0].backends] == [0, 0]


def test_a_rule_needs_a_backend_and_a_route_a_rule() -> None:
    # Gateway API lets a rule whose filters answer (a redirect) go without backends;
    # an aggregate rule has none either.
    no_backend = [("spec.rules[0]", "backends: at least one, unless the rule aggregates "
                                    "or a RequestRedirect or DirectResponse filter answers")]
    assert route_errors(rules=[{"backends": []}]) == no_backend
    assert route_errors(rules=[{"matches": []}]) == no_backend
    assert route_errors(rules=[]) == [("spec.rules", "must have at least 1 item")]


def test_unknown_fields_are_errors_at_every_level() -> None:
    assert route_errors(rules=[{"backends": [{"upstream": "a", "wieght": 2}]}], hostname=[]) == [
        ("spec.rules[0].backends[0].wieght", "unknown field"),
        ("spec.hostname", "unknown field"),
    ]
    assert errors("Route", {"rules": [GOOD_RULE]}, name="x", namspace="shop") == [
        ("metadata.namspace", "unknown field")]


def test_known_metadata_fields_from_kubectl_output_are_accepted() -> None:
    Route.model_validate(doc("Route", {"rules": [GOOD_RULE]}, uid="1", resourceVersion="7",
                             managedFields=[{}], generation=2,
                             creationTimestamp="2024-01-01T00:00:00Z"))


def test_metadata_name_is_required_and_a_dns_name() -> None:
    with pytest.raises(ValidationError) as caught:
        Route.model_validate({"apiVersion": API, "kind": "Route", "metadata": {},
                              "spec": {"rules": [GOOD_RULE]}})
    assert describe_validation_error(caught.value) == [("metadata.name", "field required")]
    [(path, message)] = errors("Route", {"rules": [GOOD_RULE]}, name="Shop_1")
    assert path == "metadata.name" and message.startswith("must be a lower-case DNS name")


@pytest.mark.parametrize(("path", "message"), [
    ({"type": "PathPrefix", "value": "api"}, "PathPrefix paths must start with '/', got 'api'"),
    ({"type": "Exact", "value": "x/y"}, "Exact paths must start with '/', got 'x/y'"),
    ({"type": "RegularExpression", "value": "/a(["}, "not a valid regular expression"),
])
def test_path_values(path: dict[str, str], message: str) -> None:
    [(where, text)] = route_errors(rules=[{"matches": [{"path": path}], **GOOD_RULE}])
    assert where == "spec.rules[0].matches[0].path"
    assert text.startswith(message)


def test_path_type_is_one_of_three() -> None:
    assert route_errors(rules=[{"matches": [{"path": {"type": "Prefix"}}], **GOOD_RULE}]) == [
        ("spec.rules[0].matches[0].path.type",
         "must be one of Exact, PathPrefix, RegularExpression")]


def test_a_regular_expression_path_need_not_start_with_a_slash() -> None:
    route(rules=[{"matches": [{"path": {"type": "RegularExpression", "value": ".*\\.png"}}],
                  **GOOD_RULE}])


def test_header_names_are_tokens_and_regexes_compile() -> None:
    matches = [{"headers": [{"name": "x canary", "value": "1"},
                            {"name": "x-re", "value": "([", "type": "RegularExpression"}]}]
    found = route_errors(rules=[{"matches": matches, **GOOD_RULE}])
    assert [path for path, _ in found] == ["spec.rules[0].matches[0].headers[0].name",
                                           "spec.rules[0].matches[0].headers[1]"]
    assert found[0][1].startswith("must be an HTTP header name")
    assert found[1][1].startswith("not a valid regular expression")


def test_the_same_header_matched_twice_is_an_error() -> None:
    matches = [{"headers": [{"name": "X-A", "value": "1"}, {"name": "x-a", "value": "2"}]}]
    assert route_errors(rules=[{"matches": matches, **GOOD_RULE}]) == [
        ("spec.rules[0].matches[0]", "header x-a is matched twice; use one regular expression")]


def test_methods_are_upper_case_http_methods() -> None:
    for method in ("FETCH", "get"):
        assert route_errors(rules=[{"matches": [{"method": method}], **GOOD_RULE}]) == [
            ("spec.rules[0].matches[0].method",
             "must be one of GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH")]


def test_retry_on_takes_conditions_and_5xx_codes_as_strings() -> None:
    parsed = route(rules=[{**GOOD_RULE, "retries": {"retryOn": ["timeout", "5xx", "503"]}}])
    assert parsed.spec.rules[0].retries is not None
    assert parsed.spec.rules[0].retries.retry_on == ["timeout", "5xx", "503"]
    [(path, message)] = route_errors(rules=[{**GOOD_RULE, "retries": {"retryOn": ["404"]}}])
    assert path == "spec.rules[0].retries.retryOn[0]"
    assert message.startswith("must be one of connect-failure, reset, timeout, 5xx")


def test_retry_on_takes_grpc_status_names() -> None:
    parsed = route(rules=[{**GOOD_RULE, "retries": {"retryOn": ["unavailable", "resource-exhausted"]}}])
    assert parsed.spec.rules[0].retries is not None
    assert parsed.spec.rules[0].retries.retry_on == ["unavailable", "resource-exhausted"]
    [(_, message)] = route_errors(rules=[{**GOOD_RULE, "retries": {"retryOn": ["ok"]}}])
    assert "gRPC status name" in message


def test_an_unquoted_status_code_is_refused_with_a_hint() -> None:
    assert route_errors(rules=[{**GOOD_RULE, "retries": {"retryOn": [503]}}]) == [
        ("spec.rules[0].retries.retryOn[0]", 'write status codes as strings: "503"')]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("port", "8080", "must be an integer"),
    ("weight", 1.0, "must be an integer"),
    ("weight", True, "must be an integer"),
])
def test_types_are_strict_like_the_api_servers_schema(field: str, value: Any,
                                                      message: str) -> None:
    endpoint = {"address": "10.0.0.1", "port": 80, field: value}
    assert upstream_errors(endpoints=[endpoint]) == [(f"spec.endpoints[0].{field}", message)]
    assert route_errors(tls={"secretName": "s", "redirectHTTP": "yes"}) == [
        ("spec.tls.redirectHTTP", "must be true or false")]


def test_timestamps_may_be_strings_or_yaml_timestamps() -> None:
    import datetime

    stamp = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    for value in ("2024-01-01T00:00:00Z", stamp):
        parsed = Route.model_validate(doc("Route", {"rules": [GOOD_RULE]},
                                          creationTimestamp=value))
        assert parsed.metadata.creation_timestamp == stamp


def test_retry_attempts_are_bounded() -> None:
    assert route_errors(rules=[{**GOOD_RULE, "retries": {"attempts": 11}}]) == [
        ("spec.rules[0].retries.attempts", "must be <= 10")]


def test_rule_names_are_unique() -> None:
    rules = [{"name": "a", **GOOD_RULE}, {"name": "a", **GOOD_RULE}]
    assert route_errors(rules=rules) == [("spec", "rule name a is used twice")]


def test_hostnames_are_lower_cased() -> None:
    assert route(hostnames=["Shop.Example.COM", "*.Example.com"]).spec.hostnames == [
        "shop.example.com", "*.example.com"]


@pytest.mark.parametrize(("host", "message"), [
    ("shop.example.com:8080", "must not contain a port"),
    ("*", "a bare '*' is not a hostname"),
    ("10.0.0.1", "must be a DNS name, not an IP address"),
    ("shop..example.com", "must be a DNS name like shop.example.com"),
    ("*.*.example.com", "must be a DNS name like shop.example.com"),
    ("shop_1.example.com", "must be a DNS name like shop.example.com"),
    ("-shop.example.com", "must be a DNS name like shop.example.com"),
])
def test_bad_hostnames(host: str, message: str) -> None:
    [(path, text)] = route_errors(hostnames=["ok.example.com", host])
    assert path == "spec.hostnames[1]"
    assert text.startswith(message)


def test_gateways() -> None:
    assert route(gateways=["mesh"]).spec.gateways == ["mesh"]
    assert route_errors(gateways=["edge"]) == [("spec.gateways[0]", "must be one of ingress, mesh")]
    assert route_errors(gateways=[]) == [("spec.gateways", "must have at least 1 item")]


def test_route_tls_needs_a_secret_name() -> None:
    assert route_errors(tls={"redirectHTTP": True}) == [("spec.tls.secretName", "field required")]


def test_wrong_types_have_short_messages() -> None:
    assert route_errors(hostnames="shop.example.com",
                        rules=[{"backends": [{"upstream": "a", "weight": "lots"}]}],
                        tls={"secretName": "s", "redirectHTTP": "perhaps"}) == [
        ("spec.hostnames", "must be a list"),
        ("spec.tls.redirectHTTP", "must be true or false"),
        ("spec.rules[0].backends[0].weight", "must be an integer"),
    ]


# --------------------------------------------------------------------------- EgressPolicy


def test_the_api_md_egress_policy_example_round_trips() -> None:
    spec = {
        "allow": [{"host": "*.example.com", "ports": [443]}, {"host": "api.partner.net"}],
        "deny": [{"host": "ads.example.com"}],
        "allowPrivateNetworks": False,
        "auth": {"basicSecretName": "egress-users"},
        "anonymize": True,
    }
    parsed = EgressPolicy.model_validate(doc("EgressPolicy", spec, name="default"))
    assert parsed.spec.model_dump(by_alias=True, exclude_unset=True) == spec


def test_egress_rules_check_hosts_and_ports() -> None:
    assert errors("EgressPolicy", {"allow": [{"host": "*", "ports": [0]}]}) == [
        ("spec.allow[0].host",
         "a bare '*' is not a hostname; leave hostnames empty to match any host"),
        ("spec.allow[0].ports[0]", "must be >= 1"),
    ]


# --------------------------------------------------------------------------- Secret


def test_secret_values_decode_data_and_prefer_string_data() -> None:
    secret = Secret.model_validate({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
        "type": "kubernetes.io/basic-auth",
        "data": {"username": base64.b64encode(b"robot").decode(),
                 "password": base64.b64encode(b"old").decode()},
        "stringData": {"password": "new"},
    })
    assert secret.values() == {"username": "robot", "password": "new"}
    assert secret.key == "default/s"


def test_secret_data_must_be_base64() -> None:
    with pytest.raises(ValidationError) as caught:
        Secret.model_validate({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
                               "data": {"tls.crt": "-----BEGIN CERTIFICATE-----"}})
    assert describe_validation_error(caught.value) == [
        ("data", "tls.crt: not valid base64 (use stringData for plain text)")]


# --------------------------------------------------------------------------- schema


def _walk_properties(schema: dict[str, Any], defs: dict[str, Any], trail: str,
                     seen: set[str]) -> list[str]:
    """Every property path in the schema that has no description."""
    missing = []
    for name, prop in schema.get("properties", {}).items():
        path = f"{trail}.{name}"
        if "description" not in prop:
            missing.append(path)
        for ref in _refs(prop):
            if ref not in seen:
                missing += _walk_properties(defs[ref], defs, path, seen | {ref})
    return missing


def _refs(prop: Any) -> list[str]:
    if isinstance(prop, dict):
        found = [prop["$ref"].split("/")[-1]] if "$ref" in prop else []
        for value in prop.values():
            found += _refs(value)
        return found
    if isinstance(prop, list):
        return [ref for item in prop for ref in _refs(item)]
    return []


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_every_spec_field_has_a_description_for_kubectl_explain(kind: str) -> None:
    schema = SPECS[kind].model_json_schema(by_alias=True)
    assert _walk_properties(schema, schema.get("$defs", {}), "spec", set()) == []


def test_durations_appear_in_the_schema_as_strings_with_the_pattern() -> None:
    schema = Upstream.model_json_schema(by_alias=True)
    connect = schema["$defs"]["UpstreamTimeouts"]["properties"]["connect"]
    assert connect["type"] == "string" and connect["pattern"] == DURATION_PATTERN
    assert connect["default"] == "2s"


def test_resources_table() -> None:
    assert {kind: model.kind_name for kind, model in RESOURCES.items()} == {
        "Route": "Route", "Upstream": "Upstream", "EgressPolicy": "EgressPolicy"}
    assert {model.plural for model in RESOURCES.values()} == {"routes", "upstreams",
                                                               "egresspolicies"}


@pytest.mark.parametrize("kind", ["URLRewrite", "RequestMirror"])
def test_an_aggregate_rule_takes_no_rewrite_or_mirror(kind: str) -> None:
    # Its parts have their own paths and upstreams: there is no one request to rewrite
    # or copy, so such a filter would do nothing (or break `{path.NAME}`).
    field = {"URLRewrite": {"urlRewrite": {"hostname": "internal"}},
             "RequestMirror": {"requestMirror": {"upstream": "copy"}}}[kind]
    rule = {"aggregate": {"parts": [{"name": "p", "upstream": "a", "path": "/p"}]},
            "filters": [{"type": kind, **field}]}
    assert route_errors(rules=[rule]) == [(
        "spec.rules[0]", "an aggregate rule takes no URLRewrite or RequestMirror filter "
                         "(each part's path and upstream are its own)")]
    header = {"type": "RequestHeaderModifier",
              "requestHeaderModifier": {"set": [{"name": "x-a", "value": "1"}]}}
    route(rules=[{**rule, "filters": [header]}])  # header filters apply to the parts

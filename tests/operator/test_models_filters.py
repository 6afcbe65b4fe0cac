"""Route filters in the API models: what `kanal validate` refuses, with field and reason."""

from __future__ import annotations

from typing import Any

from kanal.contract import snapshot as snap
from kanal.operator.filtercompile import compile_filters
from tests.operator.test_models import route, route_errors

BACKENDS = [{"upstream": "orders"}]


def rule(*filters: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"backends": BACKENDS, "filters": list(filters), **extra}


def headers_filter(**modifier: Any) -> dict[str, Any]:
    return {"type": "RequestHeaderModifier", "requestHeaderModifier": modifier}


def test_an_unknown_variable_is_refused_naming_the_field() -> None:
    found = route_errors(rules=[rule(headers_filter(set=[{"name": "X-A", "value": "${client_ip}"}]))])
    assert len(found) == 1
    where, message = found[0]
    assert where == "spec.rules[0].filters[0].requestHeaderModifier.set[0].value"
    assert "unknown variable ${client_ip}" in message and "${client_address}" in message


def test_values_with_cr_lf_or_nul_are_refused() -> None:
    for bad in ("a\r\nX-Injected: 1", "a\nb", "a\x00"):
        found = route_errors(rules=[rule(headers_filter(add=[{"name": "X-A", "value": bad}]))])
        assert found == [("spec.rules[0].filters[0].requestHeaderModifier.add[0].value",
                          "must not contain CR, LF or NUL (they would split the header)")]


def test_headers_the_proxy_frames_or_sets_cannot_be_changed() -> None:
    found = route_errors(rules=[rule(headers_filter(set=[{"name": "Host", "value": "x"}]))])
    assert "Host cannot be changed by a filter" in found[0][1]
    found = route_errors(rules=[rule(headers_filter(remove=["X-Forwarded-For"]))])
    assert "X-Forwarded-For cannot be changed" in found[0][1]
    found = route_errors(rules=[rule({"type": "ResponseHeaderModifier",
                                      "responseHeaderModifier": {"remove": ["Content-Length"]}})])
    assert "Content-Length cannot be changed" in found[0][1]


def test_type_and_settings_must_agree() -> None:
    found = route_errors(rules=[rule({"type": "URLRewrite"})])
    assert found == [("spec.rules[0].filters[0]", "type URLRewrite needs urlRewrite")]
    found = route_errors(rules=[rule({"type": "CORS", "urlRewrite": {"hostname": "a.test"}})])
    assert found[0][1] == "urlRewrite is only for type URLRewrite, not CORS"


def test_gateway_api_combination_rules() -> None:
    redirect = {"type": "RequestRedirect", "requestRedirect": {"scheme": "https"}}
    rewrite = {"type": "URLRewrite", "urlRewrite": {"hostname": "a.test"}}
    assert "cannot be used together" in route_errors(rules=[rule(redirect, rewrite)])[0][1]
    assert "appears twice" in route_errors(rules=[rule(rewrite, rewrite)])[0][1]
    cors = {"type": "CORS", "cors": {"allowOrigins": ["*"]}}
    found = route_errors(rules=[{"backends": [{"upstream": "a", "filters": [cors]}]}])
    assert "CORS is not allowed on a backend" in found[0][1]


def test_a_redirect_or_direct_response_rule_needs_no_backend() -> None:
    parsed = route(rules=[{"filters": [{"type": "RequestRedirect",
                                        "requestRedirect": {"statusCode": 308}}]}])
    assert parsed.spec.rules[0].backends == []
    found = route_errors(rules=[{"filters": [headers_filter(remove=["X-A"])]}])
    assert "at least one" in found[0][1]


def test_redirect_status_codes() -> None:
    found = route_errors(rules=[rule({"type": "RequestRedirect",
                                      "requestRedirect": {"statusCode": 304}})])
    assert found[0][0] == "spec.rules[0].filters[0].requestRedirect.statusCode"


def test_path_modifiers_fit_the_rules_matches() -> None:
    prefix = {"type": "URLRewrite", "urlRewrite": {"path": {
        "type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2"}}}
    found = route_errors(rules=[rule(prefix, matches=[{"path": {"type": "Exact", "value": "/a"}}])])
    assert "ReplacePrefixMatch needs PathPrefix matches" in found[0][1]
    regex = {"type": "URLRewrite", "urlRewrite": {"path": {
        "type": "ReplaceRegexMatch", "replaceRegexMatch": "/p/\\2"}}}
    found = route_errors(rules=[rule(regex, matches=[
        {"path": {"type": "RegularExpression", "value": "/u/([0-9]+)"}}])])
    assert "\\2 names a group" in found[0][1]
    wrong = {"type": "URLRewrite", "urlRewrite": {"path": {
        "type": "ReplaceFullPath", "replacePrefixMatch": "/v2"}}}
    found = route_errors(rules=[rule(wrong)])
    assert "type ReplaceFullPath needs replaceFullPath" in found[0][1]


def test_cors_origins_and_compression_settings() -> None:
    found = route_errors(rules=[rule({"type": "CORS", "cors": {"allowOrigins": ["example.com"]}})])
    assert found[0][0] == "spec.rules[0].filters[0].cors.allowOrigins[0]"
    found = route_errors(rules=[rule({"type": "Compression",
                                      "compression": {"algorithms": ["lzma"]}})])
    assert found[0][0] == "spec.rules[0].filters[0].compression.algorithms[0]"


def test_filters_compile_to_the_snapshot() -> None:
    parsed = route(rules=[rule(
        headers_filter(set=[{"name": "X-A", "value": "${host}"}], remove=["X-B"]),
        {"type": "RequestMirror", "requestMirror": {"upstream": "shadow", "percent": 10}},
        {"type": "Compression"},
    )])
    compiled = compile_filters(parsed.spec.rules[0].filters, "shop")
    assert compiled[0] == snap.Filter("RequestHeaderModifier", request_header_modifier=snap.HeaderModifier(
        set=(snap.HeaderValue("X-A", "${host}"),), remove=("X-B",)))
    assert compiled[1].request_mirror == snap.RequestMirror("shop/shadow", 10, 65536)
    assert compiled[2].compression == snap.Compression()


def test_the_filters_example_is_valid() -> None:
    from pathlib import Path

    from kanal.operator.manifests import load_manifests

    examples = Path(__file__).resolve().parents[2] / "examples"
    manifests, problems = load_manifests([str(examples)])
    assert problems == []
    assert "Route default/shop-filters" in [m.subject for m in manifests]


def test_header_values_are_ascii() -> None:
    found = route_errors(rules=[rule(headers_filter(set=[{"name": "X-A", "value": "caf\u00e9 \u65e5"}]))])
    assert found[0][0] == "spec.rules[0].filters[0].requestHeaderModifier.set[0].value"
    assert "visible ASCII" in found[0][1]


def test_what_the_dataplane_refuses_the_models_refuse() -> None:
    """A manifest the models accept never makes a Snapshot the dataplane refuses."""
    for kind, settings in (
            ("ResponseHeaderModifier", {"responseHeaderModifier": {"set": [
                {"name": "Host", "value": "x"}]}}),
            ("DirectResponse", {"directResponse": {"headers": [
                {"name": "Transfer-Encoding", "value": "chunked"}]}})):
        assert route_errors(rules=[rule({"type": kind, **settings})]), kind

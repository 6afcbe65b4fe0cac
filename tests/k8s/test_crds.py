"""The CRDs in a real API server: what `kubectl` users see before any operator runs.

- `kubectl apply --server-side -f crds/` installs them, and applying again changes
  nothing; the examples of the README, the chart and the end-to-end tests apply.
- The API server itself refuses what the schemas forbid (types, bounds, patterns, enums)
  and what the CEL rules (`x-kubernetes-validations`) forbid (a duplicate rule name, both
  or neither of service and endpoints...), each with a message that names the field.
- Defaults are filled in by the server, printer columns show in `kubectl get`, and
  `kubectl explain` prints the models' descriptions.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

import pytest
import yaml

from tests.k8s.cluster import Cluster, wait_for
from tests.k8s.conftest import CRD_NAMES, REPO

README_ROUTE_YAML = re.compile(r"`route.yaml`.*?```yaml\n(.*?)```", re.DOTALL)


def test_crds_apply_server_side_and_again_without_change(cluster: Cluster) -> None:
    first = cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    for name in CRD_NAMES:
        assert f"customresourcedefinition.apiextensions.k8s.io/{name} serverside-applied" \
            in first.stdout
    cluster.wait_established(CRD_NAMES)
    again = cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    assert again.stdout.count("serverside-applied") == len(CRD_NAMES)
    dry = cluster.kubectl("diff", "--server-side", "-f", str(REPO / "crds"), check=False)
    assert dry.returncode == 0, f"crds/ differ from what is installed:\n{dry.stdout}"


def test_the_examples_apply(crds: Cluster) -> None:
    crds.create_namespace("shop")
    canary = crds.kubectl("apply", "--server-side", "-f",
                          str(REPO / "charts" / "kanal" / "examples" / "canary.yaml"))
    assert "route.kanal.dev/shop serverside-applied" in canary.stdout
    demo = crds.kubectl("apply", "--server-side", "-f",
                        str(REPO / "tests" / "e2e" / "manifests" / "demo.yaml"))
    assert "route.kanal.dev/shop-canary serverside-applied" in demo.stdout
    crds.create_namespace("readme")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    found = README_ROUTE_YAML.search(readme)
    assert found, "the README's route.yaml example is gone"
    manifest = found.group(1).replace("namespace: shop", "namespace: readme")
    applied = crds.kubectl("apply", "--server-side", "-f", "-", input=manifest)
    assert "route.kanal.dev/shop serverside-applied" in applied.stdout


def test_the_standalone_example_applies_with_defaults_filled_in(crds: Cluster,
                                                                namespace: str) -> None:
    crds.kubectl("apply", "--server-side", "-n", namespace, "-f",
                 str(REPO / "examples" / "shop.yaml"))
    upstream = crds.get(f"/apis/kanal.dev/v1alpha1/namespaces/{namespace}/upstreams/shop-v2")
    spec = upstream["spec"]
    assert spec["protocol"] == "HTTP"
    assert spec["endpoints"] == [{"address": "127.0.0.1", "port": 9002, "weight": 1}]
    route = crds.get(f"/apis/kanal.dev/v1alpha1/namespaces/{namespace}/routes/shop")
    assert route["spec"]["rules"][0]["matches"][0]["headers"] == [
        {"name": "x-canary", "value": "true", "type": "Exact"}]


def _route(name: str, spec: dict[str, Any]) -> str:
    return yaml.safe_dump({"apiVersion": "kanal.dev/v1alpha1", "kind": "Route",
                           "metadata": {"name": name}, "spec": spec})


def _upstream(name: str, spec: dict[str, Any]) -> str:
    return yaml.safe_dump({"apiVersion": "kanal.dev/v1alpha1", "kind": "Upstream",
                           "metadata": {"name": name}, "spec": spec})


BACKEND = {"upstream": "shop", "weight": 1}

REFUSED = {
    "negative-weight": (
        _route("r", {"rules": [{"backends": [{"upstream": "shop", "weight": -1}]}]}),
        ("spec.rules[0].backends[0].weight: Invalid value: -1: "
         "spec.rules[0].backends[0].weight in body should be greater than or equal to 0")),
    "no-rules": (
        _route("r", {"rules": []}),
        "spec.rules: Invalid value: 0: spec.rules in body should have at least 1 items"),
    "weight-as-string": (
        _route("r", {"rules": [{"backends": [{"upstream": "shop", "weight": "ten"}]}]}),
        # Server-side apply checks types before validation, in its own words.
        ".spec.rules[0].backends[0].weight: expected numeric (int or float), got string"),
    "unknown-method": (
        _route("r", {"rules": [{"matches": [{"method": "FETCH"}], "backends": [BACKEND]}]}),
        'spec.rules[0].matches[0].method: Unsupported value: "FETCH"'),
    "bad-hostname": (
        _route("r", {"hostnames": ["Shop_Example"], "rules": [{"backends": [BACKEND]}]}),
        "spec.hostnames[0]: Invalid value: \"Shop_Example\""),
    "duplicate-rule-name": (
        _route("r", {"rules": [{"name": "a", "backends": [BACKEND]},
                               {"name": "a", "backends": [BACKEND]}]}),
        "spec.rules: Invalid value: rule names must be unique within the Route"),
    "relative-path": (
        _route("r", {"rules": [{"matches": [{"path": {"type": "Exact", "value": "api"}}],
                                "backends": [BACKEND]}]}),
        ("spec.rules[0].matches[0].path.value: Invalid value: Exact and PathPrefix paths "
         "must start with '/'")),
    "header-matched-twice": (
        _route("r", {"rules": [{"matches": [{"headers": [{"name": "x-a", "value": "1"},
                                                         {"name": "x-a", "value": "2"}]}],
                                "backends": [BACKEND]}]}),
        '.spec.rules[0].matches[0].headers: duplicate entries for key [name="x-a"]'),
    "query-parameter-matched-twice": (
        _route("r", {"rules": [{"matches": [{"queryParams": [{"name": "v", "value": "1"},
                                                             {"name": "v", "value": "2"}]}],
                                "backends": [BACKEND]}]}),
        '.spec.rules[0].matches[0].queryParams: duplicate entries for key [name="v"]'),
    "service-and-endpoints": (
        _upstream("u", {"service": {"name": "shop", "port": 80},
                        "endpoints": [{"address": "10.0.0.1", "port": 80}]}),
        "spec: Invalid value: set exactly one of service or endpoints"),
    "neither-service-nor-endpoints": (
        _upstream("u", {"protocol": "HTTP"}),
        "spec: Invalid value: set exactly one of service or endpoints"),
    "tls-without-https": (
        _upstream("u", {"endpoints": [], "tls": {"sni": "shop.example.com"}}),
        "spec.tls: Forbidden: tls is only valid with protocol: HTTPS or H2"),
    "duplicate-endpoint": (
        _upstream("u", {"endpoints": [{"address": "10.0.0.1", "port": 80},
                                      {"address": "10.0.0.1", "port": 80}]}),
        '.spec.endpoints: duplicate entries for key [address="10.0.0.1",port=80]'),
    "hash-on-without-ring-hash": (
        _upstream("u", {"endpoints": [], "loadBalancer": {"policy": "Random",
                                                          "hashOn": {"sourceIP": True}}}),
        "spec.loadBalancer.hashOn: Forbidden: hashOn is only valid with policy RingHash"),
    "hash-on-two-keys": (
        _upstream("u", {"endpoints": [], "loadBalancer": {
            "policy": "RingHash", "hashOn": {"header": "x-user", "cookie": "session"}}}),
        ("spec.loadBalancer.hashOn: Invalid value: set exactly one of header, cookie or "
         "sourceIP: true")),
    "health-timeout-over-interval": (
        _upstream("u", {"endpoints": [], "healthCheck": {"interval": "1s", "timeout": "2s"}}),
        "spec.healthCheck.timeout: Invalid value: timeout must not be longer than interval"),
    "unknown-protocol": (
        _upstream("u", {"endpoints": [], "protocol": "GRPC"}),
        'spec.protocol: Unsupported value: "GRPC": supported values: "HTTP", "HTTPS"'),
    "no-backend-and-no-answering-filter": (
        _route("r", {"rules": [{"filters": [{"type": "RequestHeaderModifier",
                                             "requestHeaderModifier": {"remove": ["x-a"]}}]}]}),
        "spec.rules[0].backends: Invalid value: at least one backend, unless the rule "
        "aggregates or a RequestRedirect or DirectResponse filter answers"),
    "aggregate-beside-backends": (
        _route("r", {"rules": [{"aggregate": {"parts": [{"name": "a", "upstream": "u",
                                                          "path": "/a"}]},
                                "backends": [BACKEND]}]}),
        "a rule has backends or aggregate, not both"),
    "filter-settings-of-another-type": (
        _route("r", {"rules": [{"filters": [{"type": "CORS", "urlRewrite": {"hostname": "a.b"}}],
                                "backends": [BACKEND]}]}),
        "urlRewrite is set exactly when type is URLRewrite"),
    "redirect-status-code": (
        _route("r", {"rules": [{"filters": [{"type": "RequestRedirect",
                                             "requestRedirect": {"statusCode": 200}}]}]}),
        'spec.rules[0].filters[0].requestRedirect.statusCode: Unsupported value: 200'),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_the_api_server_refuses_what_the_schema_forbids(crds: Cluster, namespace: str,
                                                        case: str) -> None:
    manifest, message = REFUSED[case]
    done = crds.kubectl("apply", "--server-side", "-n", namespace, "-f", "-",
                        input=manifest, check=False)
    assert done.returncode != 0, f"{case} was accepted:\n{done.stdout}"
    assert message in done.stderr, done.stderr
    assert not crds.kubectl("get", "routes,upstreams", "-n", namespace,
                            "-o", "name").stdout.strip()


def test_kanal_validate_agrees_with_the_api_server(crds: Cluster, namespace: str,
                                                   tmp_path: Any) -> None:
    """Every manifest the server refuses above, `kanal validate` refuses too."""
    import subprocess
    import sys
    for case, (manifest, _) in REFUSED.items():
        path = tmp_path / f"{case}.yaml"
        path.write_text(manifest, encoding="utf-8")
        done = subprocess.run([sys.executable, "-m", "kanal", "validate", str(path)],
                              capture_output=True, text=True, check=False)
        assert done.returncode != 0, f"kanal validate accepts {case}:\n{done.stdout}"


def test_printer_columns_in_kubectl_get(crds: Cluster, namespace: str) -> None:
    crds.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=textwrap.dedent("""
        apiVersion: kanal.dev/v1alpha1
        kind: Upstream
        metadata: {name: shop-v1}
        spec: {service: {name: shop-v1, port: 8080}, loadBalancer: {policy: LeastRequest}}
        ---
        apiVersion: kanal.dev/v1alpha1
        kind: Route
        metadata: {name: shop}
        spec:
          hostnames: [shop.example.com]
          rules: [{backends: [{upstream: shop-v1, weight: 90}, {upstream: shop-v2, weight: 10}]}]
        """))
    shown = crds.kubectl("get", "routes,upstreams", "-n", namespace).stdout
    lines = [line.split() for line in shown.splitlines() if line.strip()]
    assert ["NAME", "HOSTS", "BACKENDS", "ACCEPTED", "PROGRAMMED", "AGE"] in lines
    assert ["NAME", "PROTOCOL", "POLICY", "HEALTHY", "TOTAL", "ACCEPTED", "AGE"] in lines
    route = next(line for line in lines if line[0] == "route.kanal.dev/shop")
    assert route[1:3] == ['["shop.example.com"]',
                          '[{"upstream":"shop-v1","weight":90},{"upstream":"shop-v2","weight":10}]']
    upstream = next(line for line in lines if line[0] == "upstream.kanal.dev/shop-v1")
    assert upstream[1:3] == ["HTTP", "LeastRequest"]
    short = crds.kubectl("get", "rt,ups", "-n", namespace, "-o", "name").stdout.split()
    assert short == ["route.kanal.dev/shop", "upstream.kanal.dev/shop-v1"]


def test_kubectl_explain_prints_the_descriptions(crds: Cluster) -> None:
    def explained() -> str:
        done = crds.kubectl("explain", "route.spec.rules", check=False)
        return done.stdout if done.returncode == 0 else ""
    text = wait_for("kubectl explain route.spec.rules", explained, timeout=30)
    flat = " ".join(text.split())
    assert "GROUP: kanal.dev" in flat
    assert "The rules, at least one and at most 64. The most specific match wins" in flat
    for field in ("backends", "matches", "retries", "sessionAffinity", "timeout", "name"):
        assert re.search(rf"^\s+{field}\s", text, re.MULTILINE), f"{field} missing:\n{text}"
    backends = " ".join(crds.kubectl("explain", "route.spec.rules.backends.weight")
                        .stdout.split())
    assert "Relative share of requests, 0-1000000 (default 1)" in backends
    filters = " ".join(crds.kubectl("explain", "route.spec.rules.filters.requestHeaderModifier.set.value")
                       .stdout.split())
    assert "${client_address}" in filters and "${request_id}" in filters
    redirect = " ".join(crds.kubectl("explain", "route.spec.rules.filters.requestRedirect")
                        .stdout.split())
    assert "statusCode" in redirect and "answer with a redirect" in redirect

"""The admission webhooks, called by the API server over TLS.

The chart's MutatingWebhookConfiguration and ValidatingWebhookConfiguration are applied
with their `service` replaced by `url: https://127.0.0.1:PORT/PATH` of a `kanal operator`
running with the chart's arguments and RBAC, and `caBundle` the CA that signed its
certificate. Then, as a user sees it:

- a Pod created in a namespace labelled `kanal.dev/inject: "true"` comes back with the
  native sidecar and the proxy variables;
- an Upstream the operator would reject is refused at `kubectl apply`, with the
  compiler's message;
- with the operator down, pods are still admitted (without a sidecar: failurePolicy
  Ignore) and writes of kanal.dev resources are refused (failurePolicy Fail), while
  deletes still go through.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from tests.k8s.cluster import Cluster
from tests.k8s.conftest import KANAL
from tests.k8s.kanal import OperatorProcess, Rendered, apply_docs, webhook_configurations


@pytest.fixture
def webhooks(crds: Cluster, chart: Rendered, operator: OperatorProcess
             ) -> Iterator[OperatorProcess]:
    configurations = webhook_configurations(chart, operator.webhook_port, crds.ca_pem)
    apply_docs(crds, configurations)
    try:
        yield operator
    finally:
        for doc in configurations:
            crds.kubectl("delete", doc["kind"].lower(), doc["metadata"]["name"],
                         "--ignore-not-found")


@pytest.fixture
def labelled_namespace(crds: Cluster, namespace: str) -> str:
    crds.kubectl("label", "namespace", namespace, "kanal.dev/inject=true")
    # No controller-manager here: the ServiceAccount admission plugin wants `default`.
    crds.create(f"/api/v1/namespaces/{namespace}/serviceaccounts", {
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}})
    return namespace


def pod(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels or {"app": name}},
            "spec": {"containers": [{"name": "app", "image": "registry.example.com/app:1",
                                     "env": [{"name": "NO_PROXY", "value": "internal"}]}]}}


def test_a_pod_in_a_labelled_namespace_gets_the_sidecar(
        crds: Cluster, labelled_namespace: str, webhooks: OperatorProcess) -> None:
    created = crds.create(f"/api/v1/namespaces/{labelled_namespace}/pods", pod("app"))
    init = created["spec"].get("initContainers") or []
    assert [c["name"] for c in init] == ["kanal-sidecar"]
    assert init[0]["restartPolicy"] == "Always"
    assert init[0]["args"][0] == "dataplane" and "--mode=sidecar" in init[0]["args"]
    env = {e["name"]: e.get("value") for e in created["spec"]["containers"][0]["env"]}
    assert env["HTTP_PROXY"] == env["http_proxy"] == "http://127.0.0.1:15002"
    assert env["NO_PROXY"] == "localhost,127.0.0.1,::1,internal"

    opted_out = crds.create(f"/api/v1/namespaces/{labelled_namespace}/pods",
                            pod("plain", {"kanal.dev/inject": "false"}))
    assert not opted_out["spec"].get("initContainers")


def test_an_invalid_upstream_is_refused_with_the_compilers_message(
        crds: Cluster, namespace: str, webhooks: OperatorProcess) -> None:
    manifest = textwrap.dedent("""
        apiVersion: kanal.dev/v1alpha1
        kind: Upstream
        metadata: {name: local}
        spec: {endpoints: [{address: 127.0.0.1, port: 8080}]}
        """)
    refused = crds.kubectl("apply", "-n", namespace, "-f", "-", input=manifest, check=False)
    assert refused.returncode != 0
    assert 'admission webhook "resources.validate.kanal.dev" denied the request' \
        in refused.stderr
    assert "spec.endpoints[0].address: 127.0.0.1 is a loopback address" in refused.stderr
    route = textwrap.dedent("""
        apiVersion: kanal.dev/v1alpha1
        kind: Route
        metadata: {name: bad-regex}
        spec:
          rules:
            - matches: [{path: {type: RegularExpression, value: "/(unclosed"}}]
              backends: [{upstream: shop}]
        """)
    refused = crds.kubectl("apply", "-n", namespace, "-f", "-", input=route, check=False)
    assert refused.returncode != 0 and "not a valid regular expression" in refused.stderr
    good = crds.kubectl("apply", "-n", namespace, "-f", "-",
                        input=manifest.replace("127.0.0.1", "10.2.0.1"))
    assert "upstream.kanal.dev/local created" in good.stdout


def test_with_the_operator_down_pods_start_and_kanal_writes_are_refused(
        crds: Cluster, labelled_namespace: str, webhooks: OperatorProcess) -> None:
    path = f"{KANAL}/{labelled_namespace}/upstreams"
    crds.create(path, {"apiVersion": "kanal.dev/v1alpha1", "kind": "Upstream",
                       "metadata": {"name": "kept"}, "spec": {"endpoints": []}})
    webhooks.stop()

    admitted = crds.create(f"/api/v1/namespaces/{labelled_namespace}/pods", pod("app"))
    assert not admitted["spec"].get("initContainers"), "injected with the operator down?"

    refused = crds.kubectl("apply", "-n", labelled_namespace, "-f", "-", check=False,
                           input=textwrap.dedent("""
                               apiVersion: kanal.dev/v1alpha1
                               kind: Upstream
                               metadata: {name: new}
                               spec: {endpoints: []}
                               """))
    assert refused.returncode != 0
    assert 'failed calling webhook "resources.validate.kanal.dev"' in refused.stderr
    deleted = crds.kubectl("delete", "upstream", "kept", "-n", labelled_namespace)
    assert 'upstream.kanal.dev "kept" deleted' in deleted.stdout

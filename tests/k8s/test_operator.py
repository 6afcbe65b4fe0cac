"""`kanal operator` against the real API server, with exactly the chart's RBAC.

The operator runs as the chart's ServiceAccount (a TokenRequest token, the ClusterRole
and bindings `helm template` renders), with the arguments of the chart's Deployment.
A real `kanal dataplane` subscribes with the chart's shared token. What users see:

- a Route and an Upstream (endpoints from a Service's EndpointSlice) are compiled and
  served, and their status says so: Accepted, ResolvedRefs, Programmed "1 of 1" with
  the object's generation; an edit moves observedGeneration;
- a rejected object gets Accepted=False and a Warning Event (`kubectl get events`);
- what the chart does not grant the operator, the API server refuses it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.k8s.cluster import ApiError, Cluster, free_port, stop_process, wait_for
from tests.k8s.conftest import KANAL, RELEASE_NAMESPACE
from tests.k8s.kanal import OperatorProcess, Rendered, condition, wait_for_status


@pytest.fixture
def dataplane(operator: OperatorProcess, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A real `kanal dataplane` subscribed to the operator with the chart's token."""
    admin, listen = free_port(), free_port()
    log = tmp_path / "dataplane.log"
    with open(log, "ab") as out:
        process = subprocess.Popen([
            sys.executable, "-m", "kanal", "dataplane",
            f"--control-plane={operator.config_url}",
            f"--token-file={operator.dataplane_token}",
            f"--listen=127.0.0.1:{listen}", f"--admin=127.0.0.1:{admin}",
            f"--state-dir={tmp_path / 'state'}", "--dataplane-id=test-dataplane",
        ], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        yield {"admin": admin, "listen": listen, "process": process, "log": log}
    finally:
        stop_process(process)


def admin_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
        return json.load(answer)


def create_service_with_endpoints(cluster: Cluster, namespace: str, name: str,
                                  addresses: list[str], port: int = 8080) -> None:
    """A Service and the EndpointSlice a controller-manager would write for it."""
    cluster.create(f"/api/v1/namespaces/{namespace}/services", {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
        "spec": {"ports": [{"name": "http", "port": port, "targetPort": port}],
                 "selector": {"app": name}}})
    cluster.create(f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices", {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{name}-1", "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [address], "conditions": {"ready": True}}
                      for address in addresses]})


def test_route_and_upstream_are_compiled_served_and_their_status_written(
        crds: Cluster, namespace: str, operator: OperatorProcess,
        dataplane: dict[str, Any]) -> None:
    create_service_with_endpoints(crds, namespace, "shop", ["10.1.0.1", "10.1.0.2"])
    crds.create(f"{KANAL}/{namespace}/upstreams", {
        "apiVersion": "kanal.dev/v1alpha1", "kind": "Upstream", "metadata": {"name": "shop"},
        "spec": {"service": {"name": "shop", "port": 8080}}})
    crds.create(f"{KANAL}/{namespace}/routes", {
        "apiVersion": "kanal.dev/v1alpha1", "kind": "Route", "metadata": {"name": "shop"},
        "spec": {"hostnames": ["shop.example.com"],
                 "rules": [{"name": "all", "backends": [{"upstream": "shop", "weight": 1}]}]}})

    def programmed(obj: dict[str, Any]) -> bool:
        generation = obj["metadata"]["generation"]
        wanted = condition(obj, "Programmed")
        return (condition(obj, "Accepted").get("status") == "True"
                and condition(obj, "ResolvedRefs").get("status") == "True"
                and wanted.get("status") == "True"
                and wanted.get("observedGeneration") == generation
                and wanted.get("message", "").startswith("1 of 1 dataplanes"))
    route = wait_for_status(crds, f"{KANAL}/{namespace}/routes/shop", programmed, 30)
    assert condition(route, "Accepted")["observedGeneration"] == 1
    upstream = wait_for_status(
        crds, f"{KANAL}/{namespace}/upstreams/shop",
        lambda obj: (obj.get("status") or {}).get("endpoints") == {"total": 2, "healthy": 2})
    assert condition(upstream, "Accepted")["status"] == "True"

    config = admin_json(dataplane["admin"], "/config")
    assert f"{namespace}/shop" in json.dumps(config)

    shown = crds.kubectl("get", "routes", "-n", namespace).stdout.split("\n")[1].split()
    assert shown[0] == "shop" and shown[3:5] == ["True", "True"], shown

    crds.merge_patch(f"{KANAL}/{namespace}/routes/shop",
                     {"spec": {"hostnames": ["shop.example.com", "www.shop.example.com"]}})
    route = wait_for_status(crds, f"{KANAL}/{namespace}/routes/shop",
                            lambda obj: obj["metadata"]["generation"] == 2 and programmed(obj))
    assert condition(route, "Accepted")["observedGeneration"] == 2


def test_a_rejected_object_gets_accepted_false_and_a_warning_event(
        crds: Cluster, namespace: str, operator: OperatorProcess) -> None:
    crds.create(f"{KANAL}/{namespace}/upstreams", {
        "apiVersion": "kanal.dev/v1alpha1", "kind": "Upstream", "metadata": {"name": "local"},
        "spec": {"endpoints": [{"address": "127.0.0.1", "port": 8080}]}})
    upstream = wait_for_status(
        crds, f"{KANAL}/{namespace}/upstreams/local",
        lambda obj: condition(obj, "Accepted").get("status") == "False")
    message = condition(upstream, "Accepted")["message"]
    assert "spec.endpoints[0].address: 127.0.0.1 is a loopback address" in message

    def warned() -> str:
        return crds.kubectl("get", "events", "-n", namespace,
                            "--field-selector", "involvedObject.name=local",
                            "-o", "custom-columns=TYPE:.type,MESSAGE:.message").stdout
    events = wait_for("a Warning Event on the Upstream",
                      lambda: "127.0.0.1 is a loopback address" in warned() and warned())
    assert "Warning" in events


def test_the_operator_has_the_charts_rights_and_no_more(
        crds: Cluster, chart: Rendered, operator_kubeconfig: Path) -> None:
    """What the operator's token may do is what the chart's RBAC says."""
    account = f"system:serviceaccount:{RELEASE_NAMESPACE}:{chart.operator_service_account}"

    def can(verb: str, resource: str, namespace: str = "default") -> bool:
        done = crds.kubectl("auth", "can-i", verb, resource, "-n", namespace, "--as", account,
                            check=False)
        return done.stdout.strip() == "yes"
    for verb, resource in [("watch", "routes.kanal.dev"), ("patch", "routes.kanal.dev"),
                           ("patch", "routes.kanal.dev/status"),
                           ("list", "endpointslices.discovery.k8s.io"),
                           ("watch", "secrets"), ("create", "events"),
                           ("create", "tokenreviews.authentication.k8s.io")]:
        assert can(verb, resource), f"the chart does not let the operator {verb} {resource}"
    for verb, resource in [("delete", "routes.kanal.dev"), ("create", "routes.kanal.dev"),
                           ("create", "secrets"), ("update", "secrets"), ("list", "pods"),
                           ("create", "mutatingwebhookconfigurations"),
                           ("list", "customresourcedefinitions"), ("create", "leases")]:
        assert not can(verb, resource), f"the operator may {verb} {resource}"

    env_kubeconfig = ["--kubeconfig", str(operator_kubeconfig)]
    refused = crds.kubectl(*env_kubeconfig, "delete", "route", "anything", "-n", "default",
                           check=False)
    assert refused.returncode != 0
    assert (f'User "{account}" cannot delete resource "routes" in API group "kanal.dev" '
            'in the namespace "default"') in refused.stderr
    secret = crds.kubectl(*env_kubeconfig, "create", "secret", "generic", "stolen",
                          "-n", "default", "--from-literal=a=b", check=False)
    assert secret.returncode != 0
    assert f'User "{account}" cannot create resource "secrets"' in secret.stderr
    allowed = crds.kubectl(*env_kubeconfig, "get", "routes", "-A", check=False)
    assert allowed.returncode == 0, allowed.stderr


def test_an_unknown_token_is_refused_by_the_api_server(crds: Cluster) -> None:
    with pytest.raises(ApiError) as refused:
        crds.get("/apis/kanal.dev/v1alpha1/routes", token="not-a-token")
    assert refused.value.status == 401

"""`kanal operator` against the real API server, with exactly the chart's RBAC.

The operator runs as the chart's ServiceAccount (a TokenRequest token, the ClusterRole
and bindings `helm template` renders), with the arguments of the chart's Deployment.
A real `kanal dataplane` subscribes with the chart's shared token. What users see:

- a Route and an Upstream (endpoints from a Service's EndpointSlice) are compiled and
  served, and their status says so: Accepted, ResolvedRefs, Programmed "1 of 1" with
  the object's generation; an edit moves observedGeneration;
- a rejected object gets Accepted=False and a Warning Event (`kubectl get events`);
- what the chart does not grant the operator, the API server refuses it;
- two replicas elect a leader with a Lease: Programmed counts both replicas' dataplanes,
  and a SIGKILLed leader is replaced within the lease duration.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.k8s.cluster import ApiError, Cluster, free_port, stop_process, wait_for
from tests.k8s.conftest import KANAL, RELEASE_NAMESPACE
from tests.k8s.kanal import (
    OperatorProcess,
    Rendered,
    condition,
    install_operator_identity,
    render_chart,
    wait_for_status,
)


def start_dataplane(operator: OperatorProcess, folder: Path,
                    dataplane_id: str = "test-dataplane") -> dict[str, Any]:
    """A real `kanal dataplane` subscribed to the operator with the chart's token."""
    admin, listen = free_port(), free_port()
    log = folder / "dataplane.log"
    with open(log, "ab") as out:
        process = subprocess.Popen([
            sys.executable, "-m", "kanal", "dataplane",
            f"--control-plane={operator.config_url}",
            f"--token-file={operator.dataplane_token}",
            f"--listen=127.0.0.1:{listen}", f"--admin=127.0.0.1:{admin}",
            f"--state-dir={folder / 'state'}", f"--dataplane-id={dataplane_id}",
        ], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    operator.cleanups.append(lambda: stop_process(process))
    return {"admin": admin, "listen": listen, "process": process, "log": log}


@pytest.fixture
def dataplane(operator: OperatorProcess, tmp_path: Path) -> dict[str, Any]:
    return start_dataplane(operator, tmp_path)


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
    for verb, resource in [("create", "leases.coordination.k8s.io"),
                           ("update", "leases.coordination.k8s.io/kanal-operator"),
                           ("patch", "leases.coordination.k8s.io/kanal-operator-dataplanes")]:
        assert can(verb, resource, RELEASE_NAMESPACE), f"no {verb} {resource}: no election"
    for verb, resource in [("update", "leases.coordination.k8s.io/kube-scheduler"),
                           ("list", "leases.coordination.k8s.io")]:
        assert not can(verb, resource, RELEASE_NAMESPACE), f"the operator may {verb} {resource}"
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


def test_edits_in_a_burst_end_with_the_last_generation_programmed(
        crds: Cluster, namespace: str, operator: OperatorProcess,
        dataplane: dict[str, Any]) -> None:
    """Users' spec writes and the operator's status writes never conflict: the status
    subresource is patched apart from the spec, and the last generation wins."""
    crds.create(f"{KANAL}/{namespace}/upstreams", {
        "apiVersion": "kanal.dev/v1alpha1", "kind": "Upstream", "metadata": {"name": "shop"},
        "spec": {"endpoints": [{"address": "10.3.0.1", "port": 8080}]}})
    path = f"{KANAL}/{namespace}/routes/shop"
    crds.create(f"{KANAL}/{namespace}/routes", {
        "apiVersion": "kanal.dev/v1alpha1", "kind": "Route", "metadata": {"name": "shop"},
        "spec": {"rules": [{"backends": [{"upstream": "shop", "weight": 1}]}]}})
    for weight in range(2, 12):
        crds.merge_patch(path, {"spec": {"rules": [{"backends": [
            {"upstream": "shop", "weight": weight}]}]}})
    stale = crds.get(path)
    crds.merge_patch(path, {"spec": {"hostnames": ["shop.example.com"]}})
    stale["spec"]["hostnames"] = ["stale.example.com"]
    with pytest.raises(ApiError) as conflict:
        crds.request("PUT", path, stale)
    assert conflict.value.status == 409
    assert "the object has been modified" in conflict.value.message

    route = wait_for_status(crds, path, lambda obj: (
        obj["metadata"]["generation"] == 12
        and condition(obj, "Programmed").get("observedGeneration") == 12
        and condition(obj, "Programmed").get("status") == "True"
        and condition(obj, "Accepted").get("observedGeneration") == 12))
    assert route["spec"]["hostnames"] == ["shop.example.com"]
    assert route["spec"]["rules"][0]["backends"][0]["weight"] == 11

    def served_weight() -> Any:
        text = json.dumps(admin_json(dataplane["admin"], "/config"))
        return "shop.example.com" in text and text
    wait_for("the dataplane serves the last edit", served_weight)


def test_a_deleted_route_leaves_the_dataplane_at_once(
        crds: Cluster, namespace: str, operator: OperatorProcess,
        dataplane: dict[str, Any]) -> None:
    """The operator adds no finalizer: a delete is not held up, and the route goes."""
    crds.create(f"{KANAL}/{namespace}/upstreams", {
        "apiVersion": "kanal.dev/v1alpha1", "kind": "Upstream", "metadata": {"name": "gone"},
        "spec": {"endpoints": [{"address": "10.4.0.1", "port": 8080}]}})
    crds.create(f"{KANAL}/{namespace}/routes", {
        "apiVersion": "kanal.dev/v1alpha1", "kind": "Route", "metadata": {"name": "gone"},
        "spec": {"hostnames": ["gone.example.com"],
                 "rules": [{"backends": [{"upstream": "gone"}]}]}})
    route = wait_for_status(crds, f"{KANAL}/{namespace}/routes/gone",
                            lambda obj: condition(obj, "Programmed").get("status") == "True")
    assert not route["metadata"].get("finalizers")
    wait_for("the route served",
             lambda: "gone.example.com" in json.dumps(admin_json(dataplane["admin"], "/config")))
    crds.kubectl("delete", "route", "gone", "-n", namespace, "--wait=true", "--timeout=10s")
    assert not crds.exists(f"{KANAL}/{namespace}/routes/gone")
    wait_for("the route no longer served", lambda: "gone.example.com" not in json.dumps(
        admin_json(dataplane["admin"], "/config")))


def test_the_namespaced_rbac_of_the_chart_is_enough(
        crds: Cluster, namespace: str, tmp_path: Path) -> None:
    """rbac.namespaced with watchNamespaces: a Role per namespace, `--namespaces`."""
    rendered = render_chart(crds, "scoped", "scoped-system", "--set", "rbac.namespaced=true",
                            "--set", f"watchNamespaces={{{namespace}}}")
    assert not [doc for doc in rendered.of_kind("ClusterRole")
                if not doc["metadata"]["name"].endswith("-tokenreviews")]
    kubeconfig = install_operator_identity(crds, rendered, tmp_path / "identity")
    process = OperatorProcess(crds, rendered, kubeconfig, tmp_path / "operator")
    try:
        process.start()
        crds.create(f"{KANAL}/{namespace}/upstreams", {
            "apiVersion": "kanal.dev/v1alpha1", "kind": "Upstream",
            "metadata": {"name": "shop"},
            "spec": {"endpoints": [{"address": "10.5.0.1", "port": 8080}]}})
        crds.create(f"{KANAL}/{namespace}/routes", {
            "apiVersion": "kanal.dev/v1alpha1", "kind": "Route", "metadata": {"name": "shop"},
            "spec": {"rules": [{"backends": [{"upstream": "shop"}]}]}})
        route = wait_for_status(
            crds, f"{KANAL}/{namespace}/routes/shop",
            lambda obj: condition(obj, "Accepted").get("status") == "True"
            and condition(obj, "Programmed").get("status") is not None)
        assert condition(route, "ResolvedRefs")["status"] == "True"
        assert "Forbidden" not in process.log() and " 403" not in process.log(), \
            process.log()[-3000:]
    finally:
        process.stop()


@pytest.fixture
def debug_operator(crds: Cluster, chart: Rendered, operator_kubeconfig: Path,
                   tmp_path: Path) -> Iterator[OperatorProcess]:
    process = OperatorProcess(crds, chart, operator_kubeconfig, tmp_path / "operator",
                              extra_args=["--log-level=debug"])
    try:
        yield process.start()
    finally:
        process.stop()


def test_changes_while_the_watch_is_gone_are_not_missed(
        crds: Cluster, namespace: str, debug_operator: OperatorProcess,
        tmp_path: Path) -> None:
    """The operator is frozen while objects are created, edited and deleted, etcd's
    history is compacted and the API server restarted: resuming its watches is
    answered 410 Gone, as after an expiry. Once it runs again, it serves exactly what
    exists."""
    operator = debug_operator
    dataplane = start_dataplane(operator, tmp_path)
    def served() -> str:
        try:
            return json.dumps(admin_json(dataplane["admin"], "/config"))
        except OSError:  # not listening yet
            return ""

    for name in ("kept", "deleted"):
        crds.create(f"{KANAL}/{namespace}/upstreams", {
            "apiVersion": "kanal.dev/v1alpha1", "kind": "Upstream", "metadata": {"name": name},
            "spec": {"endpoints": [{"address": "10.6.0.1", "port": 8080}]}})
        crds.create(f"{KANAL}/{namespace}/routes", {
            "apiVersion": "kanal.dev/v1alpha1", "kind": "Route", "metadata": {"name": name},
            "spec": {"hostnames": [f"{name}.example.com"],
                     "rules": [{"backends": [{"upstream": name}]}]}})
    wait_for("both routes served",
             lambda: "kept.example.com" in served() and "deleted.example.com" in served())

    assert operator.process is not None
    operator.process.send_signal(signal.SIGSTOP)
    try:
        crds.delete(f"{KANAL}/{namespace}/routes/deleted")
        crds.merge_patch(f"{KANAL}/{namespace}/routes/kept",
                         {"spec": {"hostnames": ["kept.example.com", "edited.example.com"]}})
        crds.compact_etcd()
        crds.restart_apiserver()
        crds.create(f"{KANAL}/{namespace}/routes", {
            "apiVersion": "kanal.dev/v1alpha1", "kind": "Route", "metadata": {"name": "new"},
            "spec": {"hostnames": ["new.example.com"],
                     "rules": [{"backends": [{"upstream": "kept"}]}]}})
    finally:
        operator.process.send_signal(signal.SIGCONT)

    def caught_up() -> bool:
        text = served()
        return ("edited.example.com" in text and "new.example.com" in text
                and "deleted.example.com" not in text)
    wait_for("the dataplane serves what exists after the watches resumed", caught_up, 60)
    wait_for_status(crds, f"{KANAL}/{namespace}/routes/new",
                    lambda obj: condition(obj, "Programmed").get("status") == "True", 30)
    # The premise held: kopf's watches were refused as expired and started over.
    assert "Restarting the watch-stream for routes.v1alpha1.kanal.dev" in operator.log()


LEASES = f"/apis/coordination.k8s.io/v1/namespaces/{RELEASE_NAMESPACE}/leases"


def metric(replica: OperatorProcess, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{replica.admin_port}/metrics",
                                timeout=5) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def test_two_replicas_count_every_dataplane_and_the_other_takes_over(
        crds: Cluster, chart: Rendered, operator_kubeconfig: Path, namespace: str,
        tmp_path: Path) -> None:
    """Two replicas with the chart's leader election, a dataplane on each: Programmed
    says "2 of 2" and only the Lease holder writes it. The leader SIGKILLed, the other
    takes the Lease once it expires and goes on writing statuses."""
    replicas = [OperatorProcess(crds, chart, operator_kubeconfig, tmp_path / f"operator-{i}")
                for i in range(2)]
    lease_duration = float(replicas[0].container_env()["KANAL_LEASE_DURATION"])
    leader_lease = f"{LEASES}/{chart.operator_deployment['metadata']['name']}"
    try:
        for index, replica in enumerate(replicas):
            replica.start()
            (tmp_path / f"dataplane-{index}").mkdir()
            start_dataplane(replica, tmp_path / f"dataplane-{index}", f"dataplane-{index}")
        crds.create(f"{KANAL}/{namespace}/upstreams", {
            "apiVersion": "kanal.dev/v1alpha1", "kind": "Upstream", "metadata": {"name": "u"},
            "spec": {"endpoints": [{"address": "10.7.0.1", "port": 8080}]}})
        crds.create(f"{KANAL}/{namespace}/routes", {
            "apiVersion": "kanal.dev/v1alpha1", "kind": "Route", "metadata": {"name": "r"},
            "spec": {"rules": [{"backends": [{"upstream": "u"}]}]}})
        route = wait_for_status(crds, f"{KANAL}/{namespace}/routes/r", lambda obj: condition(
            obj, "Programmed").get("message", "").startswith("2 of 2 dataplanes"), 10)
        assert condition(route, "Programmed")["status"] == "True"

        holder = crds.get(leader_lease)["spec"]["holderIdentity"]
        (leader,) = [replica for replica in replicas if replica.pod_name == holder]
        (follower,) = [replica for replica in replicas if replica is not leader]
        assert metric(leader, "kanal_operator_leader") == 1
        assert metric(follower, "kanal_operator_leader") == 0
        assert metric(follower, "kanal_operator_status_patches_total") == 0
        shared = crds.get(f"{leader_lease}-dataplanes")["metadata"]["annotations"]
        assert {f"dataplanes.kanal.dev/{replica.pod_name}" for replica in replicas} \
            <= shared.keys()

        assert leader.process is not None
        leader.process.kill()  # SIGKILL: no Lease handed back
        killed = time.monotonic()
        wait_for("the follower holds the Lease", lambda: crds.get(leader_lease)["spec"].get(
            "holderIdentity") == follower.pod_name, lease_duration + 10, interval=0.05)
        takeover = time.monotonic() - killed
        print(f"takeover after SIGKILL: {takeover:.1f} s (lease {lease_duration:.0f} s)")
        assert takeover < lease_duration + 3

        # The new leader writes: a new generation, and the killed replica's dataplane
        # no longer counted once that replica's records expired.
        crds.merge_patch(f"{KANAL}/{namespace}/routes/r",
                         {"spec": {"hostnames": ["r.example.com"]}})
        route = wait_for_status(crds, f"{KANAL}/{namespace}/routes/r", lambda obj: (
            condition(obj, "Programmed").get("observedGeneration") == 2
            and condition(obj, "Programmed").get("message", "").startswith(
                "1 of 1 dataplanes")), lease_duration + 10)
        assert condition(route, "Accepted")["observedGeneration"] == 2
        assert metric(follower, "kanal_operator_leader") == 1

        follower.stop()  # a clean stop hands the Lease back at once
        assert not crds.get(leader_lease)["spec"].get("holderIdentity")
    finally:
        for replica in replicas:
            replica.stop()

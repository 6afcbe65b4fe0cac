"""`helm install`, `helm upgrade` and `helm uninstall` of charts/kanal into the real API server.

No pod runs here (there is no kubelet), but everything the chart creates is created and
validated by the server: Deployments, Services, the webhook configurations, RBAC, the
PodDisruptionBudgets and the HorizontalPodAutoscaler. An upgrade with a changed value
changes what it should and keeps the generated secrets (the dataplane token, the
webhook CA); an uninstall leaves nothing of the release behind but the CRDs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.k8s.cluster import Cluster
from tests.k8s.conftest import CRD_NAMES
from tests.k8s.kanal import CHART

RELEASE = "kanal-helm"
NAMESPACE = "kanal-helm"
NAMESPACED = ("deployments,services,configmaps,secrets,serviceaccounts,roles,rolebindings,"
              "poddisruptionbudgets,horizontalpodautoscalers")
CLUSTER_SCOPED = ("clusterroles,clusterrolebindings,mutatingwebhookconfigurations,"
                  "validatingwebhookconfigurations")
SELECTOR = f"app.kubernetes.io/instance={RELEASE}"
WEBHOOKS = "webhookconfiguration.admissionregistration.k8s.io"


def release_objects(cluster: Cluster) -> list[str]:
    names = cluster.kubectl("get", NAMESPACED, "-n", NAMESPACE, "-l", SELECTOR,
                            "-o", "name").stdout.split()
    names += cluster.kubectl("get", CLUSTER_SCOPED, "-l", SELECTOR, "-o", "name").stdout.split()
    return sorted(names)


@pytest.fixture
def released(crds: Cluster) -> Iterator[Cluster]:
    try:
        yield crds
    finally:  # the chart's validating webhook (failurePolicy Fail) must not outlive the test
        crds.helm("uninstall", RELEASE, "-n", NAMESPACE, "--ignore-not-found", check=False)


def test_install_upgrade_uninstall(released: Cluster) -> None:
    cluster = released
    installed = cluster.helm("install", RELEASE, str(CHART), "-n", NAMESPACE,
                             "--create-namespace", "--set", "image.repository=registry.example.com/kanal")
    assert "STATUS: deployed" in installed.stdout
    objects = release_objects(cluster)
    for expected in (f"deployment.apps/{RELEASE}-operator", f"deployment.apps/{RELEASE}-dataplane",
                     f"service/{RELEASE}-webhook", f"service/{RELEASE}-config",
                     f"clusterrole.rbac.authorization.k8s.io/{RELEASE}-operator",
                     f"mutating{WEBHOOKS}/{RELEASE}-sidecar-injector",
                     f"validating{WEBHOOKS}/{RELEASE}-validator"):
        assert expected in objects, objects
    operator = cluster.get(f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{RELEASE}-operator")
    assert operator["spec"]["replicas"] == 2
    webhook = cluster.get("/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/"
                          f"{RELEASE}-validator")
    ca_bundle = webhook["webhooks"][0]["clientConfig"]["caBundle"]
    token = cluster.get(f"/api/v1/namespaces/{NAMESPACE}/secrets/{RELEASE}-token")["data"]

    upgraded = cluster.helm("upgrade", RELEASE, str(CHART), "-n", NAMESPACE, "--reuse-values",
                            "--set", "operator.replicas=3")
    assert "STATUS: deployed" in upgraded.stdout and "REVISION: 2" in upgraded.stdout
    operator = cluster.get(f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{RELEASE}-operator")
    assert operator["spec"]["replicas"] == 3
    assert operator["spec"]["template"]["spec"]["containers"][0]["image"] \
        .startswith("registry.example.com/kanal:")
    webhook = cluster.get("/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/"
                          f"{RELEASE}-validator")
    assert webhook["webhooks"][0]["clientConfig"]["caBundle"] == ca_bundle, "new CA on upgrade"
    assert cluster.get(f"/api/v1/namespaces/{NAMESPACE}/secrets/{RELEASE}-token")["data"] \
        == token, "new dataplane token on upgrade"
    history = json.loads(cluster.helm("history", RELEASE, "-n", NAMESPACE, "-o", "json").stdout)
    assert [entry["revision"] for entry in history] == [1, 2]

    uninstalled = cluster.helm("uninstall", RELEASE, "-n", NAMESPACE, "--wait")
    assert f'release "{RELEASE}" uninstalled' in uninstalled.stdout
    assert release_objects(cluster) == []
    left = cluster.kubectl("get", "all,secrets,configmaps,serviceaccounts,roles,rolebindings",
                           "-n", NAMESPACE, "-o", "name").stdout.split()
    # What the API server itself keeps in every namespace, and nothing of ours.
    assert [name for name in left if "kube-root-ca" not in name and "default" not in name] == []
    for name in CRD_NAMES:
        assert cluster.exists(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")


def test_the_chart_refuses_a_cluster_without_native_sidecars(crds: Cluster) -> None:
    """Native sidecars (restartPolicy Always on an init container) need Kubernetes 1.29."""
    old = crds.helm("template", RELEASE, str(CHART), "--kube-version", "1.28.9", check=False)
    assert old.returncode != 0
    assert "chart requires kubeVersion: >=1.29.0-0 which is incompatible with Kubernetes " \
        "v1.28.9" in old.stderr
    server = crds.get("/version")["gitVersion"]
    assert crds.helm("template", RELEASE, str(CHART), "--kube-version", server).returncode == 0

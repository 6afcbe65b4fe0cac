"""The admission webhooks as the API server calls them.

kopf runs Kanal's handlers for real against kmock's emulator (as in
test_kube_operator.py) with `--webhook-listen`, `--webhook-cert-dir` (a certificate
made by trustme) and `--sidecar-template`; each test POSTs an AdmissionReview v1 over
HTTPS to `/inject`, `/inject-namespace` or `/validate`, checks the answer, and applies
the JSON patch it carries as the API server would.
"""

from __future__ import annotations

import base64
import json
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import kmock
import pytest
import trustme

from tests.conftest import async_wait_until, free_port
from tests.operator.kube.conftest import Cluster, RunningOperator, route, upstream

Operator = Callable[..., Awaitable[RunningOperator]]

TEMPLATE = """\
initContainers:
  - name: kanal-sidecar
    image: kanal:test
    restartPolicy: Always
    args: [dataplane, --control-plane=http://kanal-operator.kanal:9000, --mode=sidecar,
           --listen=127.0.0.1:15001, --admin=0.0.0.0:15021, --forward-listen=127.0.0.1:15002]
    ports:
      - {name: kanal-admin, containerPort: 15021, protocol: TCP}
    volumeMounts:
      - {name: kanal-sidecar-state, mountPath: /var/lib/kanal}
volumes:
  - name: kanal-sidecar-state
    emptyDir: {sizeLimit: 64Mi}
appEnv:
  - {name: HTTP_PROXY, value: "http://127.0.0.1:15002"}
  - {name: HTTPS_PROXY, value: "http://127.0.0.1:15002"}
  - {name: NO_PROXY, value: "localhost,127.0.0.1,::1"}
inbound:
  port: 15006
"""


class Webhooks:
    def __init__(self, url: str, ssl_context: ssl.SSLContext, op: RunningOperator) -> None:
        self.url = url
        self.ssl = ssl_context
        self.op = op

    async def review(self, path: str, obj: dict[str, Any], *, resource: tuple[str, str, str],
                     operation: str = "CREATE", namespace: str = "shop") -> dict[str, Any]:
        group, version, plural = resource
        uid = str(uuid.uuid4())
        review = {
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": uid,
                "kind": {"group": group, "version": version, "kind": obj.get("kind", "Pod")},
                "resource": {"group": group, "version": version, "resource": plural},
                "requestKind": {"group": group, "version": version, "kind": obj.get("kind")},
                "requestResource": {"group": group, "version": version, "resource": plural},
                "name": obj["metadata"].get("name", ""), "namespace": namespace,
                "operation": operation,
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                             "groups": ["system:serviceaccounts"]},
                "object": obj, "oldObject": None, "dryRun": False,
                "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
            },
        }
        async with aiohttp.ClientSession() as session, session.post(
            self.url + path, json=review, ssl=self.ssl, timeout=aiohttp.ClientTimeout(total=10),
        ) as answer:
            assert answer.status == 200, await answer.text()
            body = await answer.json()
        assert body["apiVersion"] == "admission.k8s.io/v1"
        assert body["kind"] == "AdmissionReview"
        assert body["response"]["uid"] == uid
        return dict(body["response"])

    async def mutate(self, path: str, pod: dict[str, Any], namespace: str = "shop"
                     ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The pod as the API server would store it, and the JSON patch applied."""
        response = await self.review(path, pod, resource=("", "v1", "pods"), namespace=namespace)
        assert response["allowed"] is True, response
        if "patch" not in response:
            return pod, []
        assert response["patchType"] == "JSONPatch"
        ops = json.loads(base64.b64decode(response["patch"]))
        return jsonpatch.apply_patch(pod, ops), ops


@pytest.fixture
async def webhooks(cluster: Cluster, operator: Operator, tmp_path: Path
                   ) -> AsyncIterator[Webhooks]:
    cluster.emulator.resources["v1/pods"] = kmock.ResourceInfo(
        kind="Pod", singular="pod", namespaced=True, verbs={"list", "watch", "get", "create"})
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "kanal-webhook.kanal.svc")
    cert_dir = tmp_path / "webhook"
    cert_dir.mkdir()
    cert.cert_chain_pems[0].write_to_path(cert_dir / "tls.crt")
    cert.private_key_pem.write_to_path(cert_dir / "tls.key")
    ca.cert_pem.write_to_path(cert_dir / "ca.crt")
    template = tmp_path / "sidecar.yaml"
    template.write_text(TEMPLATE)
    port = free_port()
    op = await operator(webhook_listen=("127.0.0.1", port), webhook_cert_dir=cert_dir,
                        sidecar_template=template)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    hooks = Webhooks(f"https://127.0.0.1:{port}", client_context, op)

    async def serving() -> bool:
        try:
            await hooks.review("/inject", pod("probe"), resource=("", "v1", "pods"))
        except (aiohttp.ClientError, OSError, AssertionError):
            return False
        return True

    await async_wait_until(serving, timeout=20, interval=0.05)
    yield hooks


def pod(name: str, labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
        env: list[dict[str, str]] | None = None) -> dict[str, Any]:
    app: dict[str, Any] = {"name": "app", "image": "example/app:1"}
    if env is not None:
        app["env"] = env
    meta: dict[str, Any] = {"name": name, "namespace": "shop", "labels": labels or {}}
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"containers": [app], "volumes": [{"name": "data", "emptyDir": {}}]}}


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


async def test_an_opted_in_pod_gets_the_sidecar_and_the_proxy_env(webhooks: Webhooks) -> None:
    labelled = pod("web-1", {"kanal.dev/inject": "true"},
                   env=[{"name": "NO_PROXY", "value": "db.internal"},
                        {"name": "MODE", "value": "prod"}])
    injected, ops = await webhooks.mutate("/inject", labelled)
    assert ops and {op["op"] for op in ops} <= {"add", "replace"}
    spec = injected["spec"]
    # A native sidecar, first among the init containers: up before the app, down after.
    (sidecar,) = spec["initContainers"]
    assert sidecar["name"] == "kanal-sidecar" and sidecar["restartPolicy"] == "Always"
    assert "--inbound-listen=0.0.0.0:15006" not in sidecar["args"]
    assert [c["name"] for c in spec["containers"]] == ["app"]
    assert [v["name"] for v in spec["volumes"]] == ["data", "kanal-sidecar-state"]
    env = env_of(spec["containers"][0])
    assert env == {
        "MODE": "prod",
        "NO_PROXY": "localhost,127.0.0.1,::1,db.internal",
        "HTTP_PROXY": "http://127.0.0.1:15002", "HTTPS_PROXY": "http://127.0.0.1:15002",
        "http_proxy": "http://127.0.0.1:15002", "https_proxy": "http://127.0.0.1:15002",
        "no_proxy": "localhost,127.0.0.1,::1",
    }
    assert injected["metadata"] == labelled["metadata"]

    # Injected once: the same pod again is left alone (no second sidecar).
    again, ops = await webhooks.mutate("/inject", injected)
    assert ops == [] and again == injected


async def test_the_app_port_annotation_turns_the_inbound_listener_on(webhooks: Webhooks) -> None:
    annotated = pod("web-2", {"kanal.dev/inject": "true"}, {"kanal.dev/app-port": "8080"})
    injected, _ = await webhooks.mutate("/inject", annotated)
    (sidecar,) = injected["spec"]["initContainers"]
    assert sidecar["args"][-2:] == ["--inbound-listen=0.0.0.0:15006", "--app-port=8080"]
    assert {"name": "kanal-inbound", "containerPort": 15006, "protocol": "TCP"} in sidecar["ports"]


async def test_pods_that_did_not_opt_in_are_untouched(webhooks: Webhooks) -> None:
    for labels in ({}, {"kanal.dev/inject": "false"}, {"app": "web"}):
        plain = pod("plain", labels)
        assert await webhooks.mutate("/inject", plain) == (plain, [])
    # Through the namespace's webhook, a pod without the label is injected; "false" opts out.
    injected, ops = await webhooks.mutate("/inject-namespace", pod("in-ns"))
    assert ops and injected["spec"]["initContainers"][0]["name"] == "kanal-sidecar"
    opted_out = pod("out", {"kanal.dev/inject": "false"})
    assert await webhooks.mutate("/inject-namespace", opted_out) == (opted_out, [])


async def test_a_pod_without_namespace_or_name_is_injected(webhooks: Webhooks) -> None:
    """A ReplicaSet's pod: generateName, no name, namespace only in the request."""
    generated = pod("", {"kanal.dev/inject": "true"})
    del generated["metadata"]["name"], generated["metadata"]["namespace"]
    generated["metadata"]["generateName"] = "web-5d9c-"
    injected, _ = await webhooks.mutate("/inject", generated)
    assert injected["spec"]["initContainers"][0]["name"] == "kanal-sidecar"
    assert "namespace" not in injected["metadata"]


ROUTES = ("kanal.dev", "v1alpha1", "routes")


async def test_validation_denies_what_the_operator_rejects(webhooks: Webhooks,
                                                           cluster: Cluster) -> None:
    good = {"apiVersion": "kanal.dev/v1alpha1", **route("shop", "orders", namespace="shop")}
    response = await webhooks.review("/validate", good, resource=ROUTES)
    assert response["allowed"] is True and "patch" not in response

    bad = {"apiVersion": "kanal.dev/v1alpha1",
           **route("bad", "orders", namespace="shop", weights=(-1,))}
    response = await webhooks.review("/validate", bad, resource=ROUTES)
    assert response["allowed"] is False
    assert response["status"]["code"] == 422
    message = response["status"]["message"]
    assert "spec.rules[0].backends[0].weight" in message

    # The same object written past the webhook: the operator's Accepted=False says the same.
    await cluster.create(route("bad", "orders", namespace="shop", weights=(-1,)))

    async def rejected() -> bool:
        condition = cluster.condition("Route", "shop", "bad", "Accepted")
        return condition is not None and condition["status"] == "False"

    await async_wait_until(rejected, timeout=15, interval=0.05)
    condition = cluster.condition("Route", "shop", "bad", "Accepted")
    assert condition is not None and message in condition["message"]

    loopback = {"apiVersion": "kanal.dev/v1alpha1",
                **upstream("local", namespace="shop", endpoints=[("127.0.0.1", 80)])}
    response = await webhooks.review("/validate", loopback,
                                     resource=("kanal.dev", "v1alpha1", "upstreams"))
    assert response["allowed"] is False
    assert "127.0.0.1 is a loopback address" in response["status"]["message"]

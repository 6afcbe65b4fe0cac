"""Kanal in a real cluster (kind): the chart installed, a demo shop in two versions.

- the operator accepts the demo's Routes and programs the ingress dataplanes;
- a 90/10 canary measured through the ingress is 90/10;
- a blue/green flip (100/0 to 0/100) loses no request;
- a pod labelled kanal.dev/inject: "true" gets a sidecar, and reaches a mesh Route
  through it; pods without the label are left alone.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import DEMO_NAMESPACE, MANIFESTS, Cluster, eventually

pytestmark = pytest.mark.e2e

GROUP, VERSION = "kanal.dev", "v1alpha1"


def condition(obj: dict[str, Any], kind: str) -> str | None:
    for cond in obj.get("status", {}).get("conditions", []):
        if cond["type"] == kind:
            return str(cond["status"])
    return None


def test_routes_are_accepted_and_programmed(cluster: Cluster, api: Any) -> None:
    from kubernetes import client

    custom = client.CustomObjectsApi(api)

    def all_programmed() -> bool:
        routes = custom.list_namespaced_custom_object(GROUP, VERSION, DEMO_NAMESPACE, "routes")
        items = routes["items"]
        return len(items) == 3 and all(
            condition(r, "Accepted") == "True" and condition(r, "Programmed") == "True"
            for r in items)

    eventually(all_programmed, timeout=120, what="every demo Route Accepted and Programmed")


def test_canary_split_is_90_10_through_the_ingress(cluster: Cluster) -> None:
    eventually(lambda: cluster.get("canary.demo.test")[0] == 200, what="the canary Route serves")
    answers = Counter()
    for _ in range(1000):
        status, body = cluster.get("canary.demo.test")
        answers[(status, body)] += 1
    assert set(answers) <= {(200, "shop-v1"), (200, "shop-v2")}, answers
    share = answers[(200, "shop-v2")] / 1000
    # 10% of 1000 requests: a standard deviation of 0.95 points; allow four.
    assert 0.062 <= share <= 0.138, answers


def test_blue_green_flip_loses_no_request(cluster: Cluster, api: Any) -> None:
    from kubernetes import client

    custom = client.CustomObjectsApi(api)
    host = "bluegreen.demo.test"
    eventually(lambda: cluster.get(host) == (200, "shop-v1"), what="blue (v1) is live")

    results: list[tuple[float, int, str]] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                status, body = cluster.get(host)
            except OSError as exc:
                status, body = 0, repr(exc)
            results.append((time.monotonic(), status, body))

    def flip(v1: int, v2: int) -> None:
        rules = [{"name": "live", "backends": [{"upstream": "shop-v1", "weight": v1},
                                               {"upstream": "shop-v2", "weight": v2}]}]
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, DEMO_NAMESPACE, "routes", "shop-bluegreen", {"spec": {"rules": rules}})

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    try:
        time.sleep(2)
        flip(0, 100)

        def all_green() -> bool:
            recent = [body for _, _, body in results[-50:]]
            return len(recent) == 50 and set(recent) == {"shop-v2"}

        eventually(all_green, timeout=60, interval=0.2, what="every answer from green (v2)")
        flip(100, 0)
        eventually(lambda: {b for _, _, b in results[-50:]} == {"shop-v1"}, timeout=60,
                   interval=0.2, what="back to blue (v1)")
    finally:
        stop.set()
        worker.join(timeout=10)
        flip(100, 0)
    failures = [(status, body) for _, status, body in results
                if status != 200 or body not in ("shop-v1", "shop-v2")]
    assert len(results) > 100
    assert not failures, f"{len(failures)} of {len(results)} requests failed: {failures[:5]}"


def test_sidecar_is_injected_and_reaches_the_mesh(cluster: Cluster, api: Any) -> None:
    from kubernetes import client
    from kubernetes.client.rest import ApiException
    from kubernetes.stream import stream

    core = client.CoreV1Api(api)
    pod = yaml.safe_load((MANIFESTS / "client.yaml").read_text())
    name = pod["metadata"]["name"]
    try:
        core.delete_namespaced_pod(name, DEMO_NAMESPACE, grace_period_seconds=0)
        eventually(lambda: not pod_exists(core, name), timeout=60, what="the old client gone")
    except ApiException as exc:
        if exc.status != 404:
            raise
    core.create_namespaced_pod(DEMO_NAMESPACE, pod)

    def ready() -> Any:
        live = core.read_namespaced_pod(name, DEMO_NAMESPACE)
        statuses = (live.status.container_statuses or []) + (live.status.init_container_statuses or [])
        return live if statuses and all(s.ready for s in statuses) else None

    live = eventually(ready, timeout=180, what="the client pod ready")
    containers = [c.name for c in (live.spec.init_containers or []) + live.spec.containers]
    assert "kanal-sidecar" in containers, containers

    shop_pods = core.list_namespaced_pod(DEMO_NAMESPACE, label_selector="app=shop").items
    assert shop_pods
    for shop in shop_pods:
        names = [c.name for c in (shop.spec.init_containers or []) + shop.spec.containers]
        assert "kanal-sidecar" not in names, f"{shop.metadata.name} was injected without asking"

    call = ("import urllib.request as u; "
            "r = u.Request('http://127.0.0.1:15001/', headers={'Host': 'shop.demo.mesh'}); "
            "print(u.urlopen(r, timeout=5).read().decode().strip())")

    def through_the_mesh() -> bool:
        output = stream(core.connect_get_namespaced_pod_exec, name, DEMO_NAMESPACE,
                        container="client", command=["python", "-c", call],
                        stderr=True, stdout=True, stdin=False, tty=False)
        return "shop-v2" in str(output)

    eventually(through_the_mesh, timeout=90, interval=2, what="the client reaches shop-v2 via its sidecar")


def pod_exists(core: Any, name: str) -> bool:
    from kubernetes.client.rest import ApiException

    try:
        core.read_namespaced_pod(name, DEMO_NAMESPACE)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True

"""kopf running Kanal's handlers for real against kmock's KubernetesEmulator.

Objects are created, changed and deleted over the emulator's HTTP API; a real
`kanal dataplane` subprocess subscribes to the operator's configuration server; a real
HTTP client talks to it and real aiohttp backends answer. Statuses and Events are read
from the emulator's stored objects. Waits are bounded polls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from tests.conftest import async_wait_until
from tests.operator.kube.conftest import (
    TOKEN,
    Cluster,
    Dataplane,
    RunningOperator,
    config_map,
    endpoint_slice,
    route,
    secret,
    service,
    upstream,
)

Operator = Callable[..., Awaitable[RunningOperator]]
Dataplanes = Callable[..., Awaitable[Dataplane]]

CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
KEY = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"


async def eventually(check: Callable[[], Any], timeout: float = 10.0) -> None:
    """Until `check()` is truthy (it may also raise AssertionError meanwhile)."""
    last: list[str] = []

    async def holds() -> bool:
        try:
            ok = bool(check())
        except AssertionError as exc:
            last[:] = [str(exc)]
            return False
        return ok

    try:
        await async_wait_until(holds, timeout=timeout, interval=0.05)
    except AssertionError:
        raise AssertionError(f"not within {timeout}s: {last[0] if last else check}") from None


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")


async def admin(op: RunningOperator, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(op.admin_url + path) as answer:
        return answer.status, await answer.text()


def compiles(op: RunningOperator) -> float:
    assert op.control_plane.metrics is not None
    return op.control_plane.metrics.compiles._value.get()  # type: ignore[attr-defined,no-any-return]


async def test_objects_and_endpoints_reach_a_real_dataplane(
    cluster: Cluster, operator: Operator, dataplane: Dataplanes, backends: Any,
) -> None:
    v1, v2 = await backends("v1"), await backends("v2")
    op = await operator(allow_loopback_endpoints=True)
    await cluster.create(service("web", 80))
    await cluster.create(endpoint_slice("web-1", "web", v1.port, ["127.0.0.1"]))
    await cluster.create(upstream("web", service=("web", 80)))
    await cluster.create(route("shop", "web"))
    dp = await dataplane(op.config_url)
    await dp.wait_for({"v1"})

    # A second EndpointSlice (another target port): both backends take requests.
    await cluster.create(endpoint_slice("web-2", "web", v2.port, ["127.0.0.1"]))
    await dp.wait_for({"v1", "v2"}, tries=12)
    await eventually(lambda: (cluster.stored("Upstream", "default", "web") or {})
                     .get("status", {}).get("endpoints") == {"total": 2, "healthy": 2})

    # v1's endpoint starts terminating: no new requests for it.
    await cluster.patch("EndpointSlice", "default", "web-1", {"endpoints": [
        {"addresses": ["127.0.0.1"], "conditions": {"ready": False, "terminating": True}}]})
    await dp.wait_for({"v2"}, tries=8)

    # The Route now sends to a static Upstream; the status follows the new generation.
    await cluster.create(upstream("static", endpoints=[("127.0.0.1", v1.port)]))
    await cluster.patch("Route", "default", "shop",
                        {"spec": {"rules": [{"backends": [{"upstream": "static"}]}]}})
    await dp.wait_for({"v1"})
    version = op.control_plane.publisher.current.version  # type: ignore[union-attr]

    def programmed() -> bool:
        condition = cluster.condition("Route", "default", "shop", "Programmed")
        assert condition is not None
        assert condition["message"] == f"1 of 1 dataplanes at version {version}", condition
        assert (condition["status"], condition["observedGeneration"]) == ("True", 2)
        return True

    await eventually(programmed)
    accepted = cluster.condition("Route", "default", "shop", "Accepted")
    assert accepted is not None and accepted["observedGeneration"] == 2

    # The Route goes away: nothing routes there any more.
    await cluster.delete("Route", "default", "shop")
    await dp.wait_for({None})
    status, _ = await dp.get()
    assert status == 404


async def test_statuses_events_and_a_malformed_route_among_valid_ones(
    cluster: Cluster, operator: Operator,
) -> None:
    op = await operator()  # static endpoints on loopback are refused
    await cluster.create(upstream("public", endpoints=[("10.1.2.3", 80)]))
    await cluster.create(upstream("local", endpoints=[("127.0.0.1", 8080)]))
    await cluster.create(upstream("metadata", endpoints=[("169.254.169.254", 80)]))
    await cluster.create(route("good", "public"))
    bad = route("bad", "public", hostnames=("bad.example.com",))
    bad["spec"]["rules"][0]["backends"][0]["weight"] = -5
    await cluster.create(bad)
    await cluster.create(route("to-local", "local", hostnames=("local.example.com",)))

    def statuses() -> bool:
        accepted = cluster.condition("Route", "default", "bad", "Accepted")
        assert accepted is not None and accepted["status"] == "False", accepted
        assert accepted["reason"] == "Invalid"
        assert "spec.rules[0].backends[0].weight" in accepted["message"]
        good = cluster.condition("Route", "default", "good", "Accepted")
        assert good is not None and good["status"] == "True"
        local = cluster.condition("Upstream", "default", "local", "Accepted")
        assert local is not None and local["status"] == "False"
        assert "loopback" in local["message"] and "--allow-loopback-endpoints" in local["message"]
        meta = cluster.condition("Upstream", "default", "metadata", "Accepted")
        assert meta is not None and "link-local" in meta["message"]
        refs = cluster.condition("Route", "default", "to-local", "ResolvedRefs")
        assert refs is not None and "Upstream default/local is not accepted" in refs["message"]
        return True

    await eventually(statuses)
    snapshot = op.control_plane.publisher.current  # type: ignore[union-attr]
    assert snapshot is not None
    assert {r.key for r in snapshot.routes} == {"default/good", "default/to-local"}
    assert [u.key for u in snapshot.upstreams] == ["default/public"]

    # Rejections raise Warning Events on the objects (through kopf's poster).
    def warned() -> bool:
        reasons = {(e.get("involvedObject", {}).get("name"), e.get("type"), e.get("reason"))
                   for e in cluster.events()}
        assert {("bad", "Warning", "Invalid"), ("local", "Warning", "Invalid"),
                ("metadata", "Warning", "Invalid")} <= reasons, reasons
        return True

    await eventually(warned)

    # A spec change that leaves the conditions as they were keeps their transition times.
    await op.settled()
    before = cluster.condition("Route", "default", "good", "Accepted")
    assert before is not None and before["observedGeneration"] == 1
    await asyncio.sleep(1.1)  # so that a new timestamp would differ
    await cluster.patch("Route", "default", "good", {"spec": {"hostnames": ["good.example.com"]}})

    def new_generation() -> bool:
        after = cluster.condition("Route", "default", "good", "Accepted")
        assert after is not None and after["observedGeneration"] == 2, after
        assert after["lastTransitionTime"] == before["lastTransitionTime"]
        return True

    await eventually(new_generation)

    # Fixing the bad Route brings it in; its Accepted condition makes a transition.
    await cluster.patch("Route", "default", "bad",
                        {"spec": {"rules": [{"backends": [{"upstream": "public"}]}]}})
    await eventually(lambda: (cluster.condition("Route", "default", "bad", "Accepted")
                              or {}).get("status") == "True")
    await eventually(lambda: len(op.control_plane.publisher.current.routes) == 3)  # type: ignore[union-attr]


async def test_only_changes_that_matter_cost_a_compile(
    cluster: Cluster, operator: Operator,
) -> None:
    op = await operator()
    await cluster.create(upstream("web", service=("web", 80)))
    await cluster.create(service("web", 80))
    await cluster.create(secret("shop-tls", type_="kubernetes.io/tls", tls_crt=CERT, tls_key=KEY))
    await eventually(lambda: op.control_plane.publisher.current.upstreams)  # type: ignore[union-attr]
    await op.settled()
    await asyncio.sleep(0.3)
    await op.settled()
    baseline = compiles(op)

    # None of these touch what the compiler is given.
    await cluster.create(secret("unrelated", password="hunter2"))
    await cluster.create(service("other", 80))
    await cluster.create(endpoint_slice("other-1", "other", 8080, ["10.0.0.9"]))
    await cluster.patch("Upstream", "default", "web", {"metadata": {"annotations": {"a": "b"}}})
    await cluster.patch("Upstream", "default", "web", {"status": {"endpoints": {"total": 9}}})
    await asyncio.sleep(0.5)
    await op.settled()
    assert compiles(op) == baseline
    assert op.control_plane.store.secrets == {}  # unreferenced data is not kept

    # A burst of 20 objects costs one or two compiles, not 20.
    await asyncio.gather(*(cluster.create(route(f"r{i}", "web", hostnames=(f"h{i}.example",)))
                           for i in range(20)))
    await eventually(lambda: len(op.control_plane.publisher.current.routes) == 20)  # type: ignore[union-attr]
    await op.settled()
    assert 1 <= compiles(op) - baseline <= 3

    # A Route that names the Secret created earlier (whose data was dropped): it is
    # fetched, and the Route terminates TLS with it.
    await cluster.create(route("tls", "web", hostnames=("tls.example.com",),
                               tls={"secretName": "shop-tls"}))

    def with_tls() -> bool:
        snapshot = op.control_plane.publisher.current
        assert snapshot is not None
        found = [r for r in snapshot.routes if r.key == "default/tls"]
        assert found and found[0].tls is not None and found[0].tls.cert_pem == CERT
        return True

    await eventually(with_tls)
    await eventually(lambda: (cluster.condition("Route", "default", "tls", "ResolvedRefs")
                              or {}).get("status") == "True")
    assert set(op.control_plane.store.secrets) == {("default", "shop-tls")}

    # The events that changed nothing were counted as ignored.
    _, text = await admin(op, "/metrics")
    assert metric(text, 'kanal_operator_watch_events_total{effect="ignored",kind="Secret"}') >= 1


async def test_a_descriptor_set_config_map_is_watched_and_its_changes_rebuild(
    cluster: Cluster, operator: Operator,
) -> None:
    op = await operator()
    await cluster.create(upstream("books", endpoints=[("10.0.0.9", 50051)], protocol="H2C"))
    # Created before anything names it: its data is fetched once a Route does.
    await cluster.create(config_map("protos", descriptors_pb=b"\n\x05books"))
    await cluster.create(route("books", "books", rules=[{
        "backends": [{"upstream": "books"}],
        "grpcTranscoder": {"descriptorConfigMapName": "protos"}}]))

    def descriptor_set(expected: str) -> Callable[[], bool]:
        def check() -> bool:
            snapshot = op.control_plane.publisher.current
            assert snapshot is not None
            found = [r for r in snapshot.routes if r.key == "default/books"]
            assert found and found[0].rules[0].grpc_transcoder is not None
            assert found[0].rules[0].grpc_transcoder.descriptor_set == expected
            return True
        return check

    await eventually(descriptor_set("CgVib29rcw=="))
    await eventually(lambda: (cluster.condition("Route", "default", "books", "ResolvedRefs")
                              or {}).get("status") == "True")
    await cluster.patch("ConfigMap", "default", "protos",
                        {"binaryData": {"descriptors.pb": "CgRzaG9w"}})
    await eventually(descriptor_set("CgRzaG9w"))
    await cluster.delete("ConfigMap", "default", "protos")
    await eventually(lambda: (cluster.condition("Route", "default", "books", "ResolvedRefs")
                              or {}).get("reason") == "ConfigMapNotFound")


async def test_metrics_programmed_and_nacks(
    cluster: Cluster, operator: Operator, dataplane: Dataplanes, backends: Any,
) -> None:
    v1 = await backends("v1")
    op = await operator(allow_loopback_endpoints=True)
    assert (await admin(op, "/live"))[0] == 200
    assert (await admin(op, "/ready"))[0] == 200
    await cluster.create(upstream("web", endpoints=[("127.0.0.1", v1.port)]))
    await cluster.create(route("shop", "web"))
    dp = await dataplane(op.config_url)
    await dp.wait_for({"v1"})

    async def scraped() -> bool:
        _, text = await admin(op, "/metrics")
        return (metric(text, "kanal_operator_propagation_seconds_count") >= 1
                and metric(text, "kanal_operator_connected_dataplanes") == 1
                and metric(text, "kanal_operator_compiles_total") >= 1)

    await async_wait_until(scraped, timeout=10)

    # A dataplane that refuses the current version: counted, and the Routes say so.
    version = op.control_plane.publisher.current.version  # type: ignore[union-attr]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session, \
            session.post(op.config_url + "/v1/ack", json={
                "dataplane": "dp-other", "version": version, "ok": False,
                "error": "cannot bind"}) as answer:
        assert answer.status == 204

    def refused() -> bool:
        condition = cluster.condition("Route", "default", "shop", "Programmed")
        assert condition is not None
        assert condition["message"] == (f"1 of 2 dataplanes at version {version}; "
                                        "1 refused it (dp-other: cannot bind)"), condition
        assert condition["status"] == "False"
        return True

    await eventually(refused)
    _, text = await admin(op, "/metrics")
    assert metric(text, "kanal_operator_nacks_total") == 1

    # Without the token, no configuration.
    async with aiohttp.ClientSession() as session, \
            session.get(op.config_url + "/v1/snapshot?dataplane=x") as answer:
        assert answer.status == 401


async def test_namespaces_limit_what_is_watched(cluster: Cluster, operator: Operator) -> None:
    op = await operator(namespaces=["shop"])
    await cluster.create(upstream("web", namespace="shop", endpoints=[("10.0.0.1", 80)]))
    await cluster.create(route("shop", "web", namespace="shop"))
    await cluster.create(upstream("web", namespace="other", endpoints=[("10.0.0.2", 80)]))
    await cluster.create(route("other", "web", namespace="other"))
    await eventually(lambda: [r.key for r in op.control_plane.publisher.current.routes]  # type: ignore[union-attr]
                     == ["shop/shop"])
    await asyncio.sleep(0.3)
    await op.settled()
    assert [r.key for r in op.control_plane.publisher.current.routes] == ["shop/shop"]  # type: ignore[union-attr]
    assert cluster.condition("Route", "other", "other", "Accepted") is None


async def test_service_account_tokens_are_checked_with_a_token_review(
    cluster: Cluster, operator: Operator,
) -> None:
    reviews: list[str] = []

    async def review(request: Any) -> dict[str, Any]:
        token = request.data["spec"]["token"]
        reviews.append(token)
        users = {"sa-token": "system:serviceaccount:kanal:dataplane", "user-token": "alice"}
        if token not in users:
            return {"kind": "TokenReview", "status": {"authenticated": False}}
        return {"kind": "TokenReview",
                "status": {"authenticated": True, "user": {"username": users[token]}}}

    # kmock 0.8 stores a TokenReview like any object and answers it unreviewed: this
    # reaction plays the API server's authenticator.
    cluster.emulator["post /apis/authentication.k8s.io/v1/tokenreviews"] << review
    op = await operator(token_file=None)
    await cluster.create(upstream("web", endpoints=[("10.0.0.1", 80)]))
    await cluster.create(route("shop", "web"))
    await eventually(lambda: op.control_plane.publisher.current.routes)  # type: ignore[union-attr]

    async def poll(token: str) -> int:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s, \
                s.get(op.config_url + "/v1/snapshot?dataplane=dp") as answer:
            return answer.status

    assert await poll("sa-token") == 200
    assert await poll("sa-token") == 200  # cached: no second review
    assert await poll("user-token") == 401  # authenticated, but not a service account
    assert await poll("forged") == 401
    assert reviews == ["sa-token", "user-token", "forged"]

"""The operator's store: which watch events matter, and what the compiler is given.

Pure: bodies in, booleans and CompileResults out; no cluster needed.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kanal.contract.snapshot import Endpoint
from kanal.operator.kube.store import EndpointPolicy, Store
from tests.operator.kube.conftest import (
    PLURALS,
    config_map,
    endpoint_slice,
    route,
    secret,
    service,
    upstream,
)


def body(manifest: dict[str, Any], generation: int = 1, **meta: Any) -> dict[str, Any]:
    """A manifest as the API server would show it."""
    full = copy.deepcopy(manifest)
    full.setdefault("apiVersion", PLURALS[full["kind"]][0])
    full["metadata"].update({"uid": f"uid-{full['metadata']['name']}", "generation": generation,
                             "resourceVersion": "1", **meta})
    return full


def status_of(store: Store, kind: str, key: str) -> dict[str, tuple[str, str, str]]:
    found = store.compile().status(kind, key)
    assert found is not None
    return {c.type: (c.status, c.reason, c.message) for c in found.conditions}


def test_status_only_and_metadata_changes_do_not_matter() -> None:
    store = Store()
    shop = body(route("shop", "web"))
    assert store.apply(shop) is True
    assert store.apply(copy.deepcopy(shop)) is False  # a watch replaying it as ADDED
    with_status = copy.deepcopy(shop)
    with_status["status"] = {"conditions": [{"type": "Accepted", "status": "True"}]}
    with_status["metadata"]["resourceVersion"] = "2"
    with_status["metadata"]["annotations"] = {"note": "x"}
    with_status["metadata"]["managedFields"] = [{"manager": "kubectl"}]
    assert store.apply(with_status) is False
    assert store.entry("Route", "default/shop").status == with_status["status"]  # type: ignore[union-attr]
    changed = body(route("shop", "web", "api"), generation=2)
    assert store.apply(changed) is True
    assert store.delete(changed) is True
    assert store.delete(changed) is False


def test_unreferenced_secrets_change_nothing_and_their_data_is_not_kept() -> None:
    store = Store()
    tls = body(secret("shop-tls", type_="kubernetes.io/tls", tls_crt="CERT", tls_key="KEY"))
    other = body(secret("unrelated", password="hunter2"))
    assert store.apply(other) is False
    assert store.apply(tls) is False  # nobody names it yet
    assert store.secrets == {}
    assert store.dormant_secrets == {("default", "shop-tls"), ("default", "unrelated")}

    # A Route that names it: the Secret exists but its data was dropped, so fetch it.
    assert store.apply(body(route("shop", "web", tls={"secretName": "shop-tls"}))) is True
    assert store.secrets_to_fetch() == {("default", "shop-tls")}
    assert store.apply(tls) is True  # what the operator does with the fetched body
    assert store.secrets_to_fetch() == set()
    assert set(store.secrets) == {("default", "shop-tls")}
    assert store.apply(tls) is False  # the same data again
    assert store.apply(body(secret("unrelated", password="changed"))) is False
    assert store.delete(other) is False

    # The Route stops naming it: its data is forgotten at the next build.
    assert store.apply(body(route("shop", "web"), generation=2)) is True
    store.forget_unreferenced_secrets()
    assert store.secrets == {}
    assert ("default", "shop-tls") in store.dormant_secrets


def transcoding(name: str, **transcoder: str) -> dict[str, Any]:
    return route(name, "web", rules=[{"backends": [{"upstream": "web"}],
                                      "grpcTranscoder": transcoder}])


def descriptor_set_of(store: Store, key: str) -> str:
    [compiled] = [r for r in store.compile().snapshot.routes if r.key == key]
    assert compiled.rules[0].grpc_transcoder is not None
    return compiled.rules[0].grpc_transcoder.descriptor_set


def test_descriptor_set_config_maps_and_secrets_are_kept_only_when_a_route_names_them() -> None:
    store = Store()
    protos = body(config_map("protos", descriptors_pb=b"\n\x05books"))
    assert store.apply(body(upstream("web", endpoints=[("10.0.0.1", 80)]))) is True
    assert store.apply(protos) is False  # nobody names it yet: its data is not kept
    assert store.config_maps == {} and store.dormant_config_maps == {("default", "protos")}

    # A Route names it: the ConfigMap exists but its data was dropped, so fetch it.
    assert store.apply(body(transcoding("books", descriptorConfigMapName="protos"))) is True
    assert store.config_maps_to_fetch() == {("default", "protos")}
    assert store.apply(protos) is True  # the fetched body
    assert store.config_maps_to_fetch() == set()
    assert descriptor_set_of(store, "default/books") == "CgVib29rcw=="
    assert status_of(store, "Route", "default/books")["ResolvedRefs"][0] == "True"
    assert store.apply(copy.deepcopy(protos)) is False  # the same data again

    # A change of its data rebuilds; its deletion leaves the Route unresolved.
    changed = body(config_map("protos", descriptors_pb=b"\n\x04shop"), resourceVersion="2")
    assert store.apply(changed) is True
    assert descriptor_set_of(store, "default/books") == "CgRzaG9w"
    assert store.delete(changed) is True
    assert status_of(store, "Route", "default/books")["ResolvedRefs"][:2] == (
        "False", "ConfigMapNotFound")

    # A descriptor set Secret is kept once a Route names it, like a TLS Secret.
    pb = body(secret("pb-secret"))
    pb["data"] = {"descriptors.pb": "CgVib29rcw=="}
    assert store.apply(pb) is False
    assert store.apply(body(transcoding("other", descriptorSecretName="pb-secret"))) is True
    assert store.secrets_to_fetch() == {("default", "pb-secret")}
    assert store.apply(pb) is True
    assert descriptor_set_of(store, "default/other") == "CgVib29rcw=="

    # Routes that stop naming it: its data is forgotten at the next build.
    assert store.apply(body(route("books", "web"), generation=2)) is True
    assert store.apply(body(config_map("protos", descriptors_pb=b"x"))) is False
    store.forget_unreferenced_config_maps()
    assert store.config_maps == {}


def test_services_and_slices_matter_only_when_an_upstream_names_them() -> None:
    store = Store()
    assert store.apply(body(service("other"))) is False
    assert store.apply(body(endpoint_slice("other-1", "other", 8080, ["10.0.0.9"]))) is False
    assert store.apply(body(upstream("web", service=("web", 80)))) is True
    assert store.apply(body(service("web", 80))) is True
    web_slice = body(endpoint_slice("web-1", "web", 8080, [
        "10.0.0.1",
        ("10.0.0.2", {"ready": False}),                       # not ready
        ("10.0.0.3", {"ready": True, "terminating": True}),  # draining
        ("10.0.0.4", {}),                                      # unknown: taken as ready
    ]))
    assert store.apply(web_slice) is True
    assert store.apply(copy.deepcopy(web_slice)) is False
    assert store.service_endpoints() == {
        ("default", "web", 80): [Endpoint("10.0.0.1", 8080), Endpoint("10.0.0.4", 8080)]}
    assert store.apply(body(endpoint_slice("other-1", "other", 8080, ["10.0.0.8"]))) is False

    snapshot = store.compile().snapshot
    assert [e.address for e in snapshot.upstreams[0].endpoints] == ["10.0.0.1", "10.0.0.4"]
    assert store.compile().status("Upstream", "default/web").endpoints.to_dict() == {  # type: ignore[union-attr]
        "total": 2, "healthy": 2}

    # A second slice of the same Service adds to it; its deletion takes its endpoints away.
    second = body(endpoint_slice("web-2", "web", 8080, ["10.0.1.1"]))
    assert store.apply(second) is True
    assert len(store.service_endpoints()[("default", "web", 80)]) == 3
    assert store.delete(second) is True
    assert store.delete(body(service("web", 80))) is True
    assert status_of(store, "Upstream", "default/web")["ResolvedRefs"][:2] == (
        "False", "ServiceNotFound")


def test_slices_map_the_service_port_by_name() -> None:
    store = Store()
    store.apply(body(upstream("web", service=("web", 443))))
    svc = body(service("web", 80))
    svc["spec"]["ports"].append({"name": "https", "port": 443})
    store.apply(svc)
    both = body(endpoint_slice("web-1", "web", 8080, ["10.0.0.1"]))
    both["ports"].append({"name": "https", "port": 8443})
    store.apply(both)
    assert store.service_endpoints()[("default", "web", 443)] == [Endpoint("10.0.0.1", 8443)]
    assert store.service_endpoints()[("default", "web", 80)] == [Endpoint("10.0.0.1", 8080)]


def test_a_malformed_route_is_rejected_and_the_others_compile() -> None:
    store = Store()
    store.apply(body(upstream("web", endpoints=[("10.1.2.3", 80)])))
    store.apply(body(route("good", "web")))
    bad = body(route("bad", "web"))
    bad["spec"]["rules"][0]["backends"][0]["weight"] = "heavy"
    bad["spec"]["surprise"] = True
    assert store.apply(bad) is True
    result = store.compile()
    assert [r.key for r in result.snapshot.routes] == ["default/good"]
    conditions = status_of(store, "Route", "default/bad")
    assert conditions["Accepted"][:2] == ("False", "Invalid")
    assert "spec.rules[0].backends[0].weight" in conditions["Accepted"][2]
    assert "spec.surprise" in conditions["Accepted"][2]
    assert status_of(store, "Route", "default/good")["Accepted"][0] == "True"
    # Fixing it brings it in.
    assert store.apply(body(route("bad", "web"), generation=2)) is True
    assert len(store.compile().snapshot.routes) == 2


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.1.2.3", "::1", "localhost", "api.localhost", "169.254.169.254",
    "fe80::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "0.0.0.0", "10.9.8.7"])
def test_loopback_link_local_and_node_endpoints_are_refused(address: str) -> None:
    store = Store(policy=EndpointPolicy(node_addresses=frozenset({"10.9.8.7"})))
    store.apply(body(upstream("web", endpoints=[("10.1.1.1", 80), (address, 80)])))
    store.apply(body(route("shop", "web")))
    result = store.compile()
    assert result.snapshot.upstreams == ()
    accepted = status_of(store, "Upstream", "default/web")["Accepted"]
    assert accepted[:2] == ("False", "Invalid")
    assert "spec.endpoints[1].address" in accepted[2]
    assert "--allow-loopback-endpoints" in accepted[2]
    resolved = status_of(store, "Route", "default/shop")["ResolvedRefs"]
    assert resolved[:2] == ("False", "BackendNotFound")
    assert "Upstream default/web is not accepted" in resolved[2]

    allowed = Store(policy=EndpointPolicy(allow_loopback=True))
    allowed.apply(body(upstream("web", endpoints=[(address, 80)])))
    assert len(allowed.compile().snapshot.upstreams) == 1


def test_public_addresses_and_dns_names_are_fine() -> None:
    store = Store()
    store.apply(body(upstream("web", endpoints=[("10.1.1.1", 80), ("orders.internal", 80),
                                                 ("2001:db8::1", 80)])))
    assert status_of(store, "Upstream", "default/web")["Accepted"][0] == "True"


def test_the_compile_does_not_depend_on_event_order() -> None:
    objects = [
        body(upstream("web", service=("web", 80))), body(service("web", 80)),
        body(endpoint_slice("web-1", "web", 8080, ["10.0.0.2", "10.0.0.1"])),
        body(endpoint_slice("web-2", "web", 8080, ["10.0.0.3"])),
        body(route("shop", "web")), body(route("api", "web", hostnames=("api.example.com",))),
    ]
    forward, backward = Store(), Store()
    for item in objects:
        forward.apply(item)
    for item in reversed(objects):
        backward.apply(item)
    assert forward.compile().snapshot.version == backward.compile().snapshot.version

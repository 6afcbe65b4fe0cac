"""Mesh service names (pure): which spellings a mesh Route's host name answers to."""

from __future__ import annotations

import pytest

from kanal.contract.names import service_of, spellings
from kanal.contract.snapshot import Backend, Route, Rule, Snapshot
from kanal.dataplane.egress import EgressRules
from kanal.dataplane.mesh import with_mesh_aliases
from kanal.dataplane.router import RouteTable, normalize_host


@pytest.mark.parametrize(("name", "expected"), [
    ("orders", ("orders", "shop")),
    ("orders.shop", ("orders", "shop")),
    ("orders.shop.svc", ("orders", "shop")),
    ("Orders.Shop.svc.cluster.local.", ("orders", "shop")),
    ("api.example.com", None),
    ("*.shop", None),
    ("10.0.0.1", None),
    ("", None),
])
def test_service_of(name: str, expected: tuple[str, str] | None) -> None:
    assert service_of(name, "shop") == expected


def test_spellings_are_relative_to_the_local_namespace() -> None:
    every = ("orders.shop", "orders.shop.svc", "orders.shop.svc.cluster.local")
    assert set(spellings("orders", "shop", "shop")) == {"orders", *every}
    assert set(spellings("orders.shop.svc.cluster.local", "web", "shop")) == {"orders", *every}
    # From another namespace, `orders` is another Service: no bare name.
    assert set(spellings("orders.shop", "shop", "web")) == set(every)
    assert spellings("api.example.com", "shop", "shop") == ("api.example.com",)


def route(hostname: str, gateways: tuple[str, ...] = ("mesh",)) -> Route:
    return Route(key="shop/orders", hostnames=(hostname,), gateways=gateways,  # type: ignore[arg-type]
                 rules=(Rule(index=0, backends=(Backend("shop/orders"),)),))


@pytest.mark.parametrize("written", ["orders", "orders.shop", "orders.shop.svc.cluster.local"])
@pytest.mark.parametrize("asked", ["orders", "orders.shop", "orders.shop.svc.cluster.local",
                                   "ORDERS.shop:80"])
def test_a_route_in_any_spelling_takes_a_request_in_any_spelling(written: str, asked: str) -> None:
    snapshot = with_mesh_aliases(Snapshot(routes=(route(written),)), "shop")
    table = RouteTable.build(snapshot, gateway="mesh")
    host = normalize_host(asked)
    assert table.match(host, "GET", "/whoami") is not None
    assert EgressRules.from_snapshot(snapshot, "shop").decide(host, 80).mesh


def test_ingress_routes_and_other_names_are_left_as_written() -> None:
    snapshot = Snapshot(routes=(route("orders", ("ingress",)), route("api.example.com")))
    assert with_mesh_aliases(snapshot, "shop") is snapshot

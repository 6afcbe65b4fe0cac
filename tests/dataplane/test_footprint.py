"""A feature that is not configured costs no memory: its libraries are not loaded.

JWT policies (PyJWT and cryptography's Rust bindings), basic auth (bcrypt), Redis rate
limits, gRPC transcoding (protobuf) and regular expressions (RE2, a C++ library) load
their libraries when a configuration uses them. A dataplane serving plain Routes, as
most sidecars do, maps none of them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import upstream_yaml

pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc")

NATIVE = {
    "cryptography's Rust bindings": "cryptography/hazmat/bindings/_rust",
    "bcrypt": "bcrypt/_bcrypt",
    "protobuf": "google/_upb",
    "RE2": "re2/_re2",
}
"""The shared library each optional feature's package maps into the process."""

OPTIONAL_MODULES = ("jwt", "cryptography.hazmat.bindings._rust", "bcrypt", "redis",
                    "google.protobuf", "re2")


def mapped_libraries(pid: int) -> list[str]:
    """The optional features' libraries mapped into process `pid`."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return [name for name, path in NATIVE.items() if path in maps]


ROUTE = """\
    apiVersion: kanal.dev/v1alpha1
    kind: Route
    metadata: {{name: web}}
    spec:
      rules:
        - matches: [{{path: {{type: {kind}, value: "{path}"}}}}]
          backends: [{{upstream: web}}]
    """


async def test_a_plain_route_maps_no_library_of_an_optional_feature(kanal, backends):
    backend = await backends("v1")
    k = kanal({"up.yaml": upstream_yaml("web", backend),
               "route.yaml": ROUTE.format(kind="PathPrefix", path="/")})
    async with aiohttp.ClientSession() as session, session.get(k.url + "/a") as answer:
        assert answer.status == 200
    assert k.process is not None
    assert mapped_libraries(k.process.pid) == []


async def test_a_regular_expression_loads_re2_when_a_route_has_one(kanal, backends):
    backend = await backends("v1")
    k = kanal({"up.yaml": upstream_yaml("web", backend),
               "route.yaml": ROUTE.format(kind="RegularExpression", path="/api/(v1|v2)/.*")})
    async with aiohttp.ClientSession() as session:
        async with session.get(k.url + "/api/v2/orders") as answer:
            assert answer.status == 200
        async with session.get(k.url + "/api/v3/orders") as answer:
            assert answer.status == 404
    assert k.process is not None
    assert mapped_libraries(k.process.pid) == ["RE2"]


SIDECAR = textwrap.dedent("""\
    import json, sys
    import kanal.commands.cli, kanal.commands.dataplane, kanal.commands.run
    from kanal.dataplane import admin, forward, h2front, process, proxy, server
    from kanal.dataplane import splitreport, subscriber
    from kanal.contract.snapshot import Backend, Endpoint, Route, Rule, Snapshot, Upstream
    from kanal.dataplane.runtime import Runtime

    # A sidecar's configurations: a mesh Route, and the inbound listener's.
    runtime = Runtime(gateway="mesh", namespace="shop")
    runtime.mesh_namespace = "shop"
    runtime.apply(Snapshot(
        routes=(Route(key="shop/orders", hostnames=("orders",), gateways=("mesh",),
                      rules=(Rule(index=0, backends=(Backend("shop/orders"),)),)),),
        upstreams=(Upstream(key="shop/orders", endpoints=(Endpoint("10.0.0.1", 8080),)),),
    ).with_version())
    process.inbound_runtime(runtime, 8081)
    before = sorted(sys.modules)
    if sys.argv[1:] == ["jwt"]:
        from kanal.contract.access import AccessPolicy, JWTAuth
        from kanal.dataplane.access.policy import Access
        Access(AccessPolicy(name="p", jwt=JWTAuth(issuer="https://issuer.test")))
    print(json.dumps({"before": before, "after": sorted(sys.modules)}))
    """)


def sidecar_modules(*argv: str) -> dict[str, list[str]]:
    result = subprocess.run([sys.executable, "-c", SIDECAR, *argv], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    modules: dict[str, list[str]] = json.loads(result.stdout)
    return modules


def optional(modules: list[str]) -> list[str]:
    return [name for name in OPTIONAL_MODULES if name in modules]


def test_a_sidecar_imports_no_library_of_an_unconfigured_feature() -> None:
    assert optional(sidecar_modules()["before"]) == []


def test_a_jwt_policy_loads_pyjwt_when_it_is_compiled() -> None:
    modules = sidecar_modules("jwt")
    assert optional(modules["before"]) == []
    # (cryptography itself imports bcrypt, for SSH keys)
    assert {"jwt", "cryptography.hazmat.bindings._rust"} <= set(optional(modules["after"]))

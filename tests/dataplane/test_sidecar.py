"""Sidecar mode end to end: two `kanal dataplane --mode sidecar` fed by a real Publisher.

Namespace `shop`, all on 127.0.0.1:

    test ──▶ sidecar A inbound ──▶ web app ──(HTTP_PROXY = sidecar A forward)──▶ `orders`
                                                         80 │ 20
              orders-v1 app ◀── sidecar B inbound ◀────────┘  └──▶ orders-v2 app
                  └──(HTTP_PROXY = sidecar B forward)──▶ `web` ──▶ sidecar A inbound ──▶ web

The apps call each other by service name through their sidecar's forward listener
(aiohttp with `proxy=`), in the three spellings Kubernetes DNS allows; the mesh Route
`orders` splits 80/20 between the versions (splits are deterministic: exact counts),
and anything that is not a mesh service meets the namespace's EgressPolicy (none: 403).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from kanal.contract.snapshot import Backend as BackendRef
from kanal.contract.snapshot import Endpoint, Route, Rule, Snapshot, Upstream
from kanal.operator.publisher import Publisher, serve_publisher, shared_token_authenticator
from tests.conftest import async_wait_until, free_port

TOKEN = "sidecar-token"
TIMEOUT = aiohttp.ClientTimeout(total=10)


class App:
    """An app on 127.0.0.1 that answers with its name and calls others through its proxy."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.proxy: str | None = None  # its sidecar's forward listener
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/whoami", self.whoami)
        app.router.add_get("/call", self.call)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def whoami(self, request: web.Request) -> web.Response:
        return web.json_response({"app": self.name, "host": request.host})

    async def call(self, request: web.Request) -> web.Response:
        """GET ?url=...&n=...: `n` calls through the sidecar, answered with who answered."""
        url, count = request.query["url"], int(request.query.get("n", "1"))
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            async def one() -> str:
                async with session.get(url, proxy=self.proxy) as answer:
                    if answer.status != 200:
                        return f"{answer.status} {await answer.text()}"
                    return str((await answer.json())["app"])

            results = await asyncio.gather(*(one() for _ in range(count)))
        counts: dict[str, int] = {}
        for result in results:
            counts[result] = counts.get(result, 0) + 1
        return web.json_response(counts)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


class Sidecar:
    """`kanal dataplane --mode sidecar` next to `app`, as the injected pod runs it."""

    def __init__(self, name: str, app: App, control_plane: str, tmp: Path) -> None:
        self.name = name
        self.listen, self.forward, self.inbound, self.admin = (free_port() for _ in range(4))
        self.log_path = tmp / f"{name}.log"
        token = tmp / "token"
        token.write_text(TOKEN)
        self.argv = [
            sys.executable, "-m", "kanal", "dataplane", "--mode", "sidecar",
            "--control-plane", control_plane, "--token-file", str(token),
            "--dataplane-id", name, "--namespace", "shop", "--state-dir", str(tmp / name),
            "--listen", f"127.0.0.1:{self.listen}",
            "--forward-listen", f"127.0.0.1:{self.forward}",
            "--inbound-listen", f"127.0.0.1:{self.inbound}", "--app-port", str(app.port),
            "--admin", f"127.0.0.1:{self.admin}",
        ]
        app.proxy = f"http://127.0.0.1:{self.forward}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    async def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"{self.name} exited early:\n{self.log()}")
        try:
            async with aiohttp.ClientSession(timeout=TIMEOUT) as session, session.get(
                    f"http://127.0.0.1:{self.admin}/ready") as answer:
                return answer.status == 200
        except (aiohttp.ClientError, OSError):
            return False

    async def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.process.wait, 15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            await asyncio.to_thread(self.process.wait)


def mesh(web_inbound: int, orders_v1_inbound: int, orders_v2_port: int) -> Snapshot:
    """The mesh of namespace shop: `web` (written as its full name), `orders` split 80/20."""
    upstreams = (
        Upstream(key="shop/web", endpoints=(Endpoint("127.0.0.1", web_inbound),)),
        Upstream(key="shop/orders-v1", endpoints=(Endpoint("127.0.0.1", orders_v1_inbound),)),
        Upstream(key="shop/orders-v2", endpoints=(Endpoint("127.0.0.1", orders_v2_port),)),
    )
    routes = (
        Route(key="shop/orders", hostnames=("orders",), gateways=("mesh",), rules=(
            Rule(index=0, backends=(BackendRef("shop/orders-v1", 80),
                                    BackendRef("shop/orders-v2", 20))),)),
        Route(key="shop/web", hostnames=("web.shop.svc.cluster.local",), gateways=("mesh",),
              rules=(Rule(index=0, backends=(BackendRef("shop/web"),)),)),
    )
    return Snapshot(routes=routes, upstreams=upstreams).with_version()


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    publisher = Publisher(shared_token_authenticator(TOKEN))
    port = free_port()
    runner = await serve_publisher(publisher, "127.0.0.1", port)
    apps = {name: App(name) for name in ("web", "orders-v1", "orders-v2")}
    for app in apps.values():
        await app.start()
    url = f"http://127.0.0.1:{port}"
    sidecars = {"a": Sidecar("sidecar-a", apps["web"], url, tmp_path),
                "b": Sidecar("sidecar-b", apps["orders-v1"], url, tmp_path)}
    publisher.publish(mesh(sidecars["a"].inbound, sidecars["b"].inbound,
                           apps["orders-v2"].port))
    try:
        for sidecar in sidecars.values():
            sidecar.start()
        for sidecar in sidecars.values():
            await async_wait_until(sidecar.ready, timeout=20, interval=0.05)
        yield {"apps": apps, "sidecars": sidecars, "publisher": publisher}
    finally:
        for sidecar in sidecars.values():
            await sidecar.stop()
        for app in apps.values():
            await app.stop()
        publisher.close()
        await runner.cleanup()


async def get_json(url: str, **kwargs: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session, session.get(
            url, **kwargs) as answer:
        if answer.content_type == "application/json":
            return answer.status, await answer.json()
        return answer.status, await answer.text()


async def test_apps_call_each_other_by_service_name_through_their_sidecars(
        pair: dict[str, Any]) -> None:
    a, b = pair["sidecars"]["a"], pair["sidecars"]["b"]
    # Into web through its sidecar's inbound listener; web calls `orders` 100 times
    # through its forward proxy: the mesh Route splits them 80/20, exactly.
    status, counts = await get_json(f"http://127.0.0.1:{a.inbound}/call",
                                    params={"url": "http://orders/whoami", "n": "100"})
    assert status == 200, counts
    assert counts == {"orders-v1": 80, "orders-v2": 20}, a.log()[-2000:]

    # orders-v1 (reached through sidecar B's inbound) calls web back by its short name;
    # the Route says `web.shop.svc.cluster.local`.
    for spelling in ("web", "web.shop", "web.shop.svc", "web.shop.svc.cluster.local"):
        status, counts = await get_json(f"http://127.0.0.1:{b.inbound}/call",
                                        params={"url": f"http://{spelling}/whoami", "n": "3"})
        assert (status, counts) == (200, {"web": 3}), (spelling, counts, b.log()[-2000:])

    # Anything else meets the EgressPolicy of shop (there is none): 403 with the reason.
    status, counts = await get_json(f"http://127.0.0.1:{b.inbound}/call",
                                    params={"url": "http://example.com/whoami"})
    (only,) = counts
    assert only.startswith("403 ") and "no EgressPolicy in namespace shop" in only
    # Short names are relative to the pod's namespace: from shop, `orders.web` is not
    # the Route `orders` of shop.
    status, counts = await get_json(f"http://127.0.0.1:{a.inbound}/call",
                                    params={"url": "http://orders.web/whoami"})
    (only,) = counts
    assert only.startswith("403 ")


async def test_the_listen_port_routes_by_mesh_host(pair: dict[str, Any]) -> None:
    """What the chart promises: http://127.0.0.1:15001 with `Host: orders` reaches the mesh."""
    a = pair["sidecars"]["a"]
    seen: dict[str, int] = {}
    for host in ["orders", "orders.shop", "orders.shop.svc.cluster.local"] * 10:
        status, body = await get_json(f"http://127.0.0.1:{a.listen}/whoami",
                                      headers={"Host": host})
        assert status == 200, body
        assert body["host"] == host
        seen[body["app"]] = seen.get(body["app"], 0) + 1
    assert seen == {"orders-v1": 24, "orders-v2": 6}
    status, body = await get_json(f"http://127.0.0.1:{a.listen}/whoami",
                                  headers={"Host": "web"})
    assert (status, body["app"]) == (200, "web")


async def test_inbound_fails_fast_when_the_app_is_down(pair: dict[str, Any]) -> None:
    """The inbound listener is a routed Upstream: a dead app is a 502/503, not a hang."""
    a = pair["sidecars"]["a"]
    await pair["apps"]["web"].stop()
    statuses = set()
    for _ in range(8):
        status, _ = await get_json(f"http://127.0.0.1:{a.inbound}/whoami")
        statuses.add(status)
    assert statuses <= {502, 503}, statuses
    status, metrics = await get_json(f"http://127.0.0.1:{a.admin}/metrics")
    assert 'route="kanal-sidecar/inbound"' in metrics

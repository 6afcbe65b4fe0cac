"""X-Request-Id: generated when absent, kept only from a trusted hop, the same at the
backend, in the client's answer and in the access log."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from kanal.contract.snapshot import Backend as RouteBackend
from kanal.contract.snapshot import Endpoint, Route, Rule, Snapshot, Upstream
from kanal.dataplane.accesslog import AccessLog
from kanal.dataplane.requestid import RequestIds, acceptable
from kanal.dataplane.runtime import Runtime
from kanal.dataplane.server import bind_socket, start_listener
from tests.conftest import async_wait_until, header_values


def snapshot(port: int) -> Snapshot:
    return Snapshot(
        routes=(Route(key="shop/web", hostnames=("shop.test",), rules=(
            Rule(index=0, backends=(RouteBackend(upstream="shop/app"),)),)),),
        upstreams=(Upstream(key="shop/app", endpoints=(Endpoint(address="127.0.0.1", port=port),)),),
    ).with_version()


@pytest.fixture
async def proxy(backends) -> AsyncIterator[Callable[..., object]]:
    """`port, app = await proxy(trusted_hops=0, access=None)`: a listener with ids on."""
    made: list[tuple[object, Runtime]] = []

    async def start(trusted_hops: int = 0, access: AccessLog | None = None):
        app = await backends("app")
        runtime = Runtime()
        runtime.apply(snapshot(app.port))
        context = runtime.context(trusted_hops=trusted_hops)
        context.request_ids = RequestIds(b"test")
        context.access_log = access
        context.observing = access is not None
        sock = bind_socket("127.0.0.1", 0)
        server = await start_listener(context, sock)
        made.append((server, runtime))
        return sock.getsockname()[1], app

    yield start
    for server, runtime in made:
        server.close()  # type: ignore[attr-defined]
        runtime.close()


async def get(port: int, path: str = "/", **headers: str) -> tuple[int, list[str]]:
    async with aiohttp.ClientSession() as session, session.get(
        f"http://127.0.0.1:{port}{path}", headers={"Host": "shop.test", **headers},
    ) as answer:
        await answer.read()
        return answer.status, answer.headers.getall("X-Request-Id", [])


async def test_an_id_is_made_when_absent_and_is_the_same_at_both_ends(proxy):
    port, app = await proxy()
    status, first = await get(port)
    _, second = await get(port)
    assert status == 200 and len(first) == 1 and len(second) == 1
    assert first != second and first[0].startswith("test-")
    assert [header_values(r, "X-Request-Id") for r in app.received] == [first, second]


async def test_a_client_id_is_replaced_unless_its_hop_is_trusted(proxy):
    port, app = await proxy(trusted_hops=0)
    _, answered = await get(port, **{"X-Request-Id": "forged-1"})
    assert answered != ["forged-1"] and header_values(app.received[-1], "X-Request-Id") == answered

    port, app = await proxy(trusted_hops=1)
    _, answered = await get(port, **{"X-Request-Id": "edge-42"})
    assert answered == ["edge-42"] and header_values(app.received[-1], "X-Request-Id") == ["edge-42"]
    _, answered = await get(port, **{"X-Request-Id": "has space\tand tab"})
    assert answered[0].startswith("test-")


async def test_the_proxys_own_answers_and_the_access_log_carry_the_id(proxy, tmp_path: Path):
    path = tmp_path / "access.log"
    access = AccessLog(str(path), fields=("status", "requestId"))
    try:
        port, _ = await proxy(access=access)
        async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{port}/", headers={"Host": "elsewhere.test"}) as answer:
            assert answer.status == 404
            missing = answer.headers.getall("X-Request-Id")
        _, found = await get(port)

        async def two() -> bool:
            return path.exists() and len(path.read_text().splitlines()) == 2

        await async_wait_until(two)
    finally:
        access.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [{"status": 404, "requestId": missing[0]}, {"status": 200, "requestId": found[0]}]


def test_acceptable_ids() -> None:
    assert acceptable(b"0af7651916cd43dd8448eb211c80319c")
    assert acceptable(b"edge:42/a=b")
    assert not acceptable(b"")
    assert not acceptable(b"a b")
    assert not acceptable(b"x" * 201)


def test_a_filters_own_answer_carries_the_id_and_is_logged(kanal, tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    from tests.conftest import BackendThread, upstream_yaml, wait_until

    pool = BackendThread()
    try:
        app = pool.start("app")
        route = """\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: web}
spec:
  rules:
    - matches: [{path: {type: PathPrefix, value: /old}}]
      filters:
        - type: RequestRedirect
          requestRedirect: {hostname: new.test, statusCode: 301}
      backends: [{upstream: app}]
"""
        path = tmp_path / "access.log"
        k = kanal({"app.yaml": upstream_yaml("app", app), "route.yaml": route},
                  "--access-log", str(path), "--access-log-fields", "status,requestId,bytesOut")

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
                return None

        opener = urllib.request.build_opener(NoRedirect)
        with pytest.raises(urllib.error.HTTPError) as answer:
            opener.open(f"{k.url}/old/page", timeout=5)
        assert answer.value.code == 301
        given = answer.value.headers.get_all("X-Request-Id")
        assert given is not None and len(given) == 1
        assert answer.value.headers["Location"].startswith("http://new.test")
        wait_until(lambda: path.exists() and len(path.read_text().splitlines()) == 1)
        (line,) = [json.loads(text) for text in path.read_text().splitlines()]
        assert line["status"] == 301 and line["requestId"] == given[0]
    finally:
        pool.close()

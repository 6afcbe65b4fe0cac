"""/config speaks the resources' casing, and the proxy's log lines show text, not bytes."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from kanal.contract.snapshot import (
    Backend,
    Endpoint,
    Match,
    PathMatch,
    Route,
    Rule,
    Snapshot,
    Upstream,
    ValueMatch,
)
from kanal.dataplane.admin import config_document
from kanal.dataplane.casing import camel
from kanal.dataplane.runtime import Runtime
from kanal.dataplane.server import bind_socket, start_listener
from tests.conftest import raw_request


def keys(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for item in value.values() for k in keys(item)}
    if isinstance(value, list):
        return {k for item in value for k in keys(item)}
    return set()


def snapshot() -> Snapshot:
    match = Match(path=PathMatch("PathPrefix", "/api"),
                  query_params=(ValueMatch("beta_flag", "1"),))
    return Snapshot(
        routes=(Route(key="shop/web", hostnames=("shop.example.com",), rules=(
            Rule(index=0, matches=(match,), backends=(Backend(upstream="shop/v1"),)),)),),
        upstreams=(Upstream(key="shop/v1", endpoints=(Endpoint(address="127.0.0.1", port=9),)),),
    ).with_version()


def test_config_keys_are_camel_case_like_the_resources() -> None:
    runtime = Runtime()
    runtime.apply(snapshot())
    document = config_document(runtime.config)  # type: ignore[arg-type]
    names = keys(document)
    assert not [name for name in names if "_" in name], sorted(names)
    assert {"queryParams", "circuitBreaker", "appliedAt", "activeRequests"} <= names
    # Values are user data and stay as written.
    (rule,) = document["routes"][0]["rules"]
    assert rule["matches"][0]["queryParams"][0]["name"] == "beta_flag"


async def test_config_and_explain_on_the_admin_port_are_camel_case() -> None:
    import aiohttp
    from aiohttp import web

    from kanal.contract.snapshot import SessionAffinity
    from kanal.dataplane.admin import admin_app
    from tests.conftest import free_port

    runtime = Runtime()
    sticky = Snapshot(
        routes=(Route(key="shop/web", rules=(Rule(
            index=0, backends=(Backend(upstream="shop/v1"),),
            session_affinity=SessionAffinity()),)),),
        upstreams=(Upstream(key="shop/v1", endpoints=(Endpoint(address="127.0.0.1", port=9),)),),
    ).with_version()
    runtime.apply(sticky)
    runner = web.AppRunner(admin_app(runtime), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/config") as answer:
                config = await answer.json()
            async with session.get(f"http://127.0.0.1:{port}/explain",
                                   params={"url": "http://a.test/x"}) as answer:
                explained = await answer.json()
    finally:
        await runner.cleanup()
        runtime.close()
    for document in (config, explained):
        names = keys(document)
        assert not [name for name in names if "_" in name], sorted(names)
    assert "sessionAffinity" in keys(explained) and "pathAsSent" in keys(explained)


@pytest.mark.parametrize(("name", "expected"), [
    ("circuit_breaker", "circuitBreaker"), ("max_pending_requests", "maxPendingRequests"),
    ("version", "version"), ("appliedAt", "appliedAt"),
])
def test_camel(name: str, expected: str) -> None:
    assert camel(name) == expected


async def test_error_log_lines_show_text_not_bytes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="kanal.proxy")
    runtime = Runtime()
    runtime.apply(snapshot())
    sock = bind_socket("127.0.0.1", 0)
    server = await start_listener(runtime.context(), sock)
    try:
        port = sock.getsockname()[1]
        (answer,) = await raw_request(port, b"GET /nowhere HTTP/1.1\r\nHost: other.test\r\n\r\n")
        assert answer.status == 404
    finally:
        server.close()
        runtime.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "kanal.proxy"]
    assert any(line.startswith("GET /nowhere: 404") for line in lines), lines
    assert not any("b'" in line for line in lines), lines

"""Snapshots a dataplane must refuse, whoever wrote them, and configuration that never reaches the wire."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kanal.contract import snapshot as snap
from kanal.contract.validate import validate
from kanal.dataplane.runtime import Runtime


def upstream(**fields: object) -> snap.Upstream:
    return snap.Upstream(key="default/web", endpoints=(snap.Endpoint("127.0.0.1", 8080),),
                         **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("path", ["/health\r\nX-Injected: 1", "/a\nb", "/a\x00", "/a b", "health"])
def test_a_health_check_path_that_would_inject_is_refused(path: str) -> None:
    bad = snap.Snapshot(upstreams=(upstream(health_check=snap.HealthCheck(path=path)),))
    [problem] = validate(bad)
    assert "default/web" in problem and "health check path" in problem
    with pytest.raises(ValueError, match="health check path"):
        Runtime().build(bad)


def test_duplicate_keys_and_bad_values_are_named() -> None:
    route = snap.Route(key="default/r", hostnames=("a.test\r\n",), rules=(snap.Rule(
        index=0, backends=(snap.Backend("default/web", weight=-1),),
        session_affinity=snap.SessionAffinity(cookie_name="a b")),))
    bad = snap.Snapshot(routes=(route, route), upstreams=(upstream(tls=snap.UpstreamTLS(
        sni="evil\r\nHost: x")),))
    problems = validate(bad)
    assert any("route default/r appears twice" in p for p in problems)
    assert any("hostname" in p for p in problems)
    assert any("negative weight" in p for p in problems)
    assert any("cookie name" in p for p in problems)
    assert any("SNI" in p for p in problems)


def test_a_good_snapshot_has_no_problems_and_its_version_is_checked() -> None:
    good = snap.Snapshot(upstreams=(upstream(health_check=snap.HealthCheck()),)).with_version()
    assert validate(good, check_version=True) == []
    forged = snap.Snapshot(upstreams=good.upstreams, version="0123456789abcdef")
    assert validate(forged) == []
    assert "not the content's hash" in validate(forged, check_version=True)[0]


def test_kanal_validate_refuses_a_health_check_path_with_a_line_break(tmp_path: Path) -> None:
    (tmp_path / "web.yaml").write_text(
        "apiVersion: kanal.dev/v1alpha1\nkind: Upstream\nmetadata: {name: web}\n"
        "spec:\n  endpoints: [{address: 127.0.0.1, port: 8080}]\n"
        '  healthCheck: {path: "/healthz\\r\\nX-Injected: yes"}\n')
    result = subprocess.run([sys.executable, "-m", "kanal", "validate", str(tmp_path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    assert "healthCheck.path" in result.stdout + result.stderr, result.stdout + result.stderr


async def test_a_health_check_never_writes_a_line_break_even_if_one_got_through() -> None:
    import asyncio

    from kanal.dataplane.health import check_once

    received: list[bytes] = []

    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read(65536))
        writer.close()

    server = await asyncio.start_server(origin, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        ok, why = await check_once("127.0.0.1", port,
                                   snap.HealthCheck(path="/h\r\nX-Injected: 1", timeout=2.0))
    finally:
        server.close()
    assert not ok and "not safe" in why
    assert received == []

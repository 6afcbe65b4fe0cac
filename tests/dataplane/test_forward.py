"""The forward proxy in this process: real sockets, real clients (aiohttp, curl), real TLS.

Every backend listens on 127.0.0.1, which is loopback: tests that reach one need
`allow_private_networks`, and others prove the same backend is refused without it.
Backends are reached by the name `localhost` (allow rules name hosts, never
addresses). No traffic leaves 127.0.0.0/8: the denied destinations outside it are
refused before anything is dialed, and the log says no address was dialed.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
import pytest
import trustme
from aiohttp import web

from kanal.contract.snapshot import (
    Backend as RouteBackend,
)
from kanal.contract.snapshot import (
    EgressPolicy,
    EgressRule,
    Endpoint,
    Route,
    Rule,
    Snapshot,
    Upstream,
)
from kanal.dataplane.forward import ForwardProxy
from kanal.dataplane.runtime import Runtime
from kanal.dataplane.server import bind_socket
from tests.conftest import async_wait_until, free_port, raw_request, read_response


@dataclass
class Forward:
    proxy: ForwardProxy
    port: int
    runtime: Runtime

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def apply(self, *policies: EgressPolicy, routes=(), upstreams=()) -> None:
        self.runtime.apply(Snapshot(routes=tuple(routes), upstreams=tuple(upstreams),
                                    egress_policies=tuple(policies)).with_version())


@pytest.fixture
async def forward() -> AsyncIterator[Callable[..., Forward]]:
    """Start a forward proxy: `fwd = forward(policy, ..., tunnel_idle_timeout=0.3)`."""
    started: list[Forward] = []

    async def start(*policies: EgressPolicy, routes=(), upstreams=(), **timeouts: float) -> Forward:
        runtime = Runtime()
        proxy = ForwardProxy(runtime, **timeouts)
        sock = bind_socket("127.0.0.1", 0)
        await proxy.start(sock)
        instance = Forward(proxy, sock.getsockname()[1], runtime)
        instance.apply(*policies, routes=routes, upstreams=upstreams)
        started.append(instance)
        return instance

    yield start  # type: ignore[misc]
    for instance in started:
        await instance.proxy.close()
        instance.runtime.close()


def allow(*rules: EgressRule, private: bool = True, **kw) -> EgressPolicy:
    return EgressPolicy(key=kw.pop("key", "default/egress"), allow=rules,
                        allow_private_networks=private, **kw)


def local(port: int) -> EgressRule:
    return EgressRule("localhost", (port,))


async def curl(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "10", "--noproxy", "", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    return process.returncode or 0, out.decode(), err.decode()


def egress_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "kanal.egress"]


# --------------------------------------------------------------------------- absolute-form


async def test_absolute_form_requests_reach_the_origin_in_origin_form(forward, backends, caplog):
    caplog.set_level(logging.INFO, logger="kanal.egress")
    app = await backends("app")
    fwd = await forward(allow(local(app.port)))
    async with aiohttp.ClientSession() as session, session.get(
        f"http://localhost:{app.port}/path?q=1", proxy=fwd.url,
        headers={"X-Forwarded-For": "10.9.9.9"},
    ) as answer:
        assert answer.status == 200
        record = await answer.json()
    assert record["raw_path"] == "/path?q=1"
    headers = {k.lower(): v for k, v in record["headers"]}
    assert headers["host"] == f"localhost:{app.port}"
    assert headers["via"] == "1.1 kanal"
    assert headers["x-forwarded-for"] == "10.9.9.9, 127.0.0.1"
    assert headers["forwarded"] == "for=127.0.0.1"
    assert "proxy-connection" not in headers and "proxy-authorization" not in headers
    [line] = egress_lines(caplog)
    assert f"dest=localhost:{app.port} addr=127.0.0.1 decision=allow status=200" in line
    assert "client=127.0.0.1:" in line and "up=" in line and "down=" in line
    assert "duration=" in line


async def test_curl_through_the_proxy_and_keep_alive(forward, backends):
    app = await backends("app")
    fwd = await forward(allow(local(app.port)))
    code, out, err = await curl("-x", fwd.url, "-d", "hello", f"http://localhost:{app.port}/a",
                                f"http://localhost:{app.port}/b")
    assert code == 0, err
    assert out.count('"backend": "app"') == 2
    assert [r["path"] for r in app.received] == ["/a", "/b"]
    assert app.received[0]["body_size"] == 5
    # One client connection carried both (curl reports reuse on stderr with -v).
    code, _, err = await curl("-v", "-x", fwd.url, f"http://localhost:{app.port}/c",
                              f"http://localhost:{app.port}/d")
    assert code == 0 and "Re-using existing connection" in err


async def test_bodies_stream_both_ways(forward, backends):
    app = await backends("app")
    fwd = await forward(allow(local(app.port)))
    size = 16 * 1024 * 1024

    async def upload() -> AsyncIterator[bytes]:
        block = b"u" * 65536
        for _ in range(size // len(block)):
            yield block

    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://localhost:{app.port}/up", data=upload(),
                                proxy=fwd.url) as answer:
            assert answer.status == 200
            assert (await answer.json())["body_size"] == size
            assert (await answer.json())["chunked"]
        async with session.get(f"http://localhost:{app.port}/bytes/{size}", proxy=fwd.url) as answer:
            assert answer.status == 200
            received = 0
            async for chunk in answer.content.iter_any():
                received += len(chunk)
            assert received == size


async def test_anonymize_adds_and_keeps_no_forwarding_headers(forward, backends):
    app = await backends("app")
    fwd = await forward(allow(local(app.port), anonymize=True))
    async with aiohttp.ClientSession() as session, session.get(
        f"http://localhost:{app.port}/", proxy=fwd.url, headers={
            "X-Forwarded-For": "10.1.1.1", "Forwarded": "for=10.1.1.1", "Via": "1.1 other",
            "X-Real-IP": "10.1.1.1",
        },
    ) as answer:
        record = await answer.json()
    names = {k.lower() for k, _ in record["headers"]}
    assert not names & {"x-forwarded-for", "forwarded", "via", "x-real-ip"}


async def test_origin_form_requests_are_not_proxied(forward):
    fwd = await forward()
    (answer,) = await raw_request(fwd.port, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert answer.status == 400
    assert b"absolute-form" in answer.body


# --------------------------------------------------------------------------- CONNECT


@pytest.fixture
async def tls_backend() -> AsyncIterator[tuple[int, trustme.CA]]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_context)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"secret over TLS: {request.path}")

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=server_context).start()
    yield port, ca
    await runner.cleanup()


async def test_connect_tunnels_real_tls(forward, tls_backend, caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="kanal.egress")
    port, ca = tls_backend
    fwd = await forward(allow(local(port)))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with aiohttp.ClientSession() as session, session.get(
        f"https://localhost:{port}/x", proxy=fwd.url, ssl=client_context,
    ) as answer:
        assert answer.status == 200
        assert await answer.text() == "secret over TLS: /x"
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    code, out, err = await curl("-x", fwd.url, "--cacert", str(ca_file), f"https://localhost:{port}/y")
    assert code == 0, err
    assert out == "secret over TLS: /y"
    await async_wait_until(lambda: _true(len(egress_lines(caplog)) == 2))
    for line in egress_lines(caplog):
        assert f"method=CONNECT dest=localhost:{port} addr=127.0.0.1 decision=allow status=200" in line
        up, down = (int(line.split(f"{k}=")[1].split()[0]) for k in ("up", "down"))
        assert up > 200 and down > 500  # a TLS handshake each way at least


async def _true(value: bool) -> bool:
    return value


async def test_tunnels_pass_half_closes_both_ways(forward):
    """The client ends its side; the origin still answers, then ends; the client sees both."""
    seen = asyncio.get_running_loop().create_future()

    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the client's EOF, passed on by the proxy
        writer.write(b"got " + data)
        writer.write_eof()
        seen.set_result(data)
        await reader.read()
        writer.close()

    server = await asyncio.start_server(origin, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        fwd = await forward(allow(local(port)))
        reader, writer = await asyncio.open_connection("127.0.0.1", fwd.port)
        writer.write(f"CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\nping".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        writer.write(b" pong")
        writer.write_eof()
        assert await asyncio.wait_for(seen, 5) == b"ping pong"
        assert await asyncio.wait_for(reader.read(), 5) == b"got ping pong"
        writer.close()
    finally:
        server.close()


async def test_idle_tunnels_are_closed(forward, caplog):
    caplog.set_level(logging.INFO, logger="kanal.egress")
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        fwd = await forward(allow(local(port)), tunnel_idle_timeout=0.3)
        reader, writer = await asyncio.open_connection("127.0.0.1", fwd.port)
        writer.write(f"CONNECT localhost:{port} HTTP/1.1\r\n\r\n".encode())
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the proxy
        writer.close()
        await async_wait_until(lambda: _true(bool(egress_lines(caplog))))
        assert "idle timeout" in egress_lines(caplog)[0]
    finally:
        server.close()


# --------------------------------------------------------------------------- denials


async def absolute(port: int, url: str, headers: str = "") -> tuple[int, str, dict[str, str]]:
    host = url.split("/")[2]
    (answer,) = await raw_request(
        port, f"GET {url} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n".encode())
    return answer.status, answer.body.decode(), {k.lower(): v for k, v in answer.headers}


async def connect(port: int, target: str, headers: str = "") -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{headers}\r\n".encode())
        answer = await asyncio.wait_for(read_response(reader), 5)
        return answer.status, answer.body.decode()
    finally:
        writer.close()


@pytest.mark.parametrize(("target", "why"), [
    ("127.0.0.1", "a loopback address"),
    ("169.254.169.254", "link-local address (cloud metadata)"),
    ("10.0.0.1", "a private (RFC 1918) address"),
    ("100.64.0.1", "a carrier-grade NAT (RFC 6598) address"),
    ("[::ffff:127.0.0.1]", "the IPv4-mapped form of 127.0.0.1"),
    ("[64:ff9b::7f00:1]", "the NAT64 form of 127.0.0.1"),
    ("2130706433", "a loopback address"),
])
async def test_private_literals_are_refused_before_dialing(forward, caplog, target, why):
    caplog.set_level(logging.INFO, logger="kanal.egress")
    fwd = await forward(allow(local(80), EgressRule("example.com", (80, 443)), private=False))
    status, body, _ = await absolute(fwd.port, f"http://{target}/latest/meta-data/")
    assert status == 403 and why in body, body
    status, body = await connect(fwd.port, f"{target}:443")
    assert status == 403 and why in body, body
    lines = egress_lines(caplog)
    assert len(lines) == 2 and all("addr=- decision=deny status=403" in line for line in lines)


async def test_literals_are_refused_even_with_private_networks_allowed(forward, backends):
    app = await backends("app")
    fwd = await forward(allow(local(app.port)))
    status, body, _ = await absolute(fwd.port, f"http://127.0.0.1:{app.port}/")
    assert status == 403 and "IP literals are not allowed" in body
    assert app.received == []


async def test_a_name_resolving_to_loopback_is_refused_without_private_networks(forward, backends):
    app = await backends("app")
    fwd = await forward(allow(local(app.port), private=False))
    status, body, _ = await absolute(fwd.port, f"http://localhost:{app.port}/")
    assert status == 403
    assert "localhost resolves to 127.0.0.1 is a loopback address" in body
    status, body = await connect(fwd.port, f"localhost:{app.port}")
    assert status == 403 and "loopback" in body
    assert app.received == []


async def test_deny_wins_over_allow(forward, backends):
    app = await backends("app")
    fwd = await forward(allow(local(app.port)),
                        EgressPolicy(key="default/no", deny=(EgressRule("localhost"),)))
    status, body, _ = await absolute(fwd.port, f"http://localhost:{app.port}/")
    assert status == 403 and "denied by rule localhost of EgressPolicy default/no" in body
    assert app.received == []


async def test_wrong_port_and_no_policy_are_refused(forward, backends):
    app = await backends("app")
    fwd = await forward(allow(local(app.port)))
    status, body, _ = await absolute(fwd.port, f"http://localhost:{app.port + 1}/")
    assert status == 403 and f"port {app.port + 1} is not allowed for localhost" in body
    fwd.apply()  # no policy at all
    status, body, _ = await absolute(fwd.port, f"http://localhost:{app.port}/")
    assert status == 403 and "no EgressPolicy in namespace default" in body
    status, body = await connect(fwd.port, f"localhost:{app.port}")
    assert status == 403
    assert app.received == []


async def test_proxy_authorization(forward, backends):
    app = await backends("app")
    fwd = await forward(allow(local(app.port), basic_auth=(("robot", "s3cret"),)))
    url = f"http://localhost:{app.port}/"
    status, _body, headers = await absolute(fwd.port, url)
    assert status == 407 and headers["proxy-authenticate"] == 'Basic realm="kanal"'
    wrong = base64.b64encode(b"robot:wrong").decode()
    status, _, headers = await absolute(fwd.port, url, f"Proxy-Authorization: Basic {wrong}\r\n")
    assert status == 407 and headers["proxy-authenticate"] == 'Basic realm="kanal"'
    status, _ = await connect(fwd.port, f"localhost:{app.port}")
    assert status == 407
    assert app.received == []
    code, out, err = await curl("-x", fwd.url, "-U", "robot:s3cret", url)
    assert code == 0 and '"backend": "app"' in out, err
    assert not [v for k, v in app.received[0]["headers"] if k.lower() == "proxy-authorization"]


async def test_dns_failure_is_a_502(forward):
    fwd = await forward(allow(EgressRule("nonexistent.invalid", (80,)), private=False))
    status, body, _ = await absolute(fwd.port, "http://nonexistent.invalid/")
    assert status == 502 and "DNS lookup of nonexistent.invalid failed" in body


async def test_connect_refused_is_a_502(forward):
    port = free_port()  # nothing listens there
    fwd = await forward(allow(local(port)))
    status, body, _ = await absolute(fwd.port, f"http://localhost:{port}/")
    assert status == 502 and f"connect to localhost:{port} failed" in body
    status, body = await connect(fwd.port, f"localhost:{port}")
    assert status == 502


# --------------------------------------------------------------------------- mesh


def mesh_config(app_port: int) -> dict:
    return {
        "routes": (Route(key="default/orders", hostnames=("orders.mesh",), gateways=("mesh",),
                         rules=(Rule(index=0, backends=(RouteBackend("default/orders"),)),)),
                   Route(key="default/web", hostnames=("web.test",),
                         rules=(Rule(index=0, backends=(RouteBackend("default/orders"),)),))),
        "upstreams": (Upstream(key="default/orders",
                               endpoints=(Endpoint("127.0.0.1", app_port),)),),
    }


async def test_without_a_policy_mesh_services_go_through_the_mesh_routes(forward, backends, caplog):
    caplog.set_level(logging.INFO, logger="kanal.egress")
    app = await backends("orders")
    fwd = await forward(**mesh_config(app.port))
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post("http://orders.mesh/api?x=1", data=b"body", proxy=fwd.url) as answer:
                assert answer.status == 200
                record = await answer.json()
                assert record["backend"] == "orders" and record["raw_path"] == "/api?x=1"
                assert record["body_size"] == 4
        # An ingress-only Route's host is no mesh service, and nothing else is reachable.
        async with session.get("http://web.test/", proxy=fwd.url) as answer:
            assert answer.status == 403
        async with session.get(f"http://localhost:{app.port}/", proxy=fwd.url) as answer:
            assert answer.status == 403
    assert len(app.received) == 2
    await async_wait_until(lambda: _true(len(egress_lines(caplog)) == 4))
    assert sum("dest=orders.mesh:80 addr=- decision=mesh" in line for line in egress_lines(caplog)) == 2



async def test_connect_timeout_is_a_504(forward):
    """A listener that never accepts, its backlog full: connecting hangs, on loopback."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    held = []
    try:
        for _ in range(3):  # fill the backlog; later SYNs go unanswered
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            held.append(filler)
        fwd = await forward(allow(local(port)), connect_timeout=0.3)
        status, body, _ = await absolute(fwd.port, f"http://localhost:{port}/")
        assert status == 504 and "timed out after 0.3s" in body
    finally:
        for sock in held:
            sock.close()
        listener.close()

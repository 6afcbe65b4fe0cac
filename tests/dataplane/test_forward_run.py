"""`kanal run --forward-listen`: the forward proxy as users start it, and the reverse
listener that must never act as one.

One `kanal run` serves the module: an EgressPolicy of namespace `default` allowing
`localhost` on one backend's port (private networks allowed, since backends are on
127.0.0.1), a policy in another namespace that must not count, and a mesh Route.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from tests.conftest import free_port, raw_request, read_response, upstream_yaml, wait_until


@pytest.fixture(scope="module")
def app(module_backends):
    return module_backends("app")


@pytest.fixture(scope="module")
def victim(module_backends):
    """A backend no Route names: nothing may ever reach it through the reverse listener."""
    return module_backends("victim")


@pytest.fixture(scope="module")
def forward_port():
    return free_port()


@pytest.fixture(scope="module")
def k(module_kanal, app, forward_port):
    policy = f"""\
apiVersion: kanal.dev/v1alpha1
kind: EgressPolicy
metadata: {{name: egress}}
spec:
  allow: [{{host: localhost, ports: [{app.port}]}}]
  deny: [{{host: ads.localhost}}]
  allowPrivateNetworks: true
---
apiVersion: kanal.dev/v1alpha1
kind: EgressPolicy
metadata: {{name: elsewhere, namespace: other}}
spec:
  allow: [{{host: localhost}}]
  allowPrivateNetworks: true
"""
    routes = """\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: orders}
spec:
  hostnames: [orders.mesh]
  gateways: [mesh]
  rules: [{backends: [{upstream: app}]}]
---
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: catch-all}
spec:
  rules: [{backends: [{upstream: app}]}]
"""
    return module_kanal(
        {"app.yaml": upstream_yaml("app", app), "policy.yaml": policy, "routes.yaml": routes},
        "--forward-listen", f"127.0.0.1:{forward_port}",
    )


async def curl(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "10", "--noproxy", "", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    return process.returncode or 0, out.decode(), err.decode()


async def test_curl_through_kanal_run(k, app, forward_port):
    proxy = f"http://127.0.0.1:{forward_port}"
    code, out, err = await curl("-x", proxy, f"http://localhost:{app.port}/via-run?x=1")
    assert code == 0, err
    assert '"backend": "app"' in out and '"raw_path": "/via-run?x=1"' in out
    code, out, _ = await curl("-x", proxy, "-p", f"http://localhost:{app.port}/tunnelled")
    assert code == 0 and '"path": "/tunnelled"' in out
    code, out, _ = await curl("-x", proxy, "-w", "%{http_code}", "-o", "/dev/null",
                              f"http://localhost:{app.port + 1}/")
    assert out == "403"
    code, out, _ = await curl("-x", proxy, "-w", "%{http_code}", "-o", "/dev/null",
                              f"http://ads.localhost:{app.port}/")
    assert out == "403"
    code, out, _ = await curl("-x", proxy, "-w", "%{http_code}", "-o", "/dev/null",
                              "http://169.254.169.254/latest/meta-data/")
    assert out == "403"
    code, out, err = await curl("-x", proxy, "http://orders.mesh/mesh-call")
    assert code == 0 and '"path": "/mesh-call"' in out, err
    wait_until(lambda: k.log().count("kanal.egress") >= 6)
    log = k.log()
    assert f"dest=localhost:{app.port} addr=127.0.0.1 decision=allow status=200" in log
    assert "method=CONNECT" in log
    assert "dest=169.254.169.254:80 addr=- decision=deny status=403" in log
    assert "dest=orders.mesh:80 addr=- decision=mesh" in log


async def test_policies_follow_edits(k, app, forward_port):
    proxy = f"http://127.0.0.1:{forward_port}"
    old = k.version()
    k.write("block.yaml", """\
        apiVersion: kanal.dev/v1alpha1
        kind: EgressPolicy
        metadata: {name: block}
        spec:
          deny: [{host: localhost}]
        """)
    try:
        k.wait_for_new_version(old)
        _, out, _ = await curl("-x", proxy, "-w", "%{http_code}", "-o", "/dev/null",
                                  f"http://localhost:{app.port}/")
        assert out == "403"
    finally:
        old = k.version()
        (k.folder / "block.yaml").unlink()
        k.wait_for_new_version(old)
    _code, out, _ = await curl("-x", proxy, "-w", "%{http_code}", "-o", "/dev/null",
                              f"http://localhost:{app.port}/")
    assert out == "200"


async def test_the_reverse_listener_is_never_a_forward_proxy(k, app, victim):
    before = len(victim.received)
    # Absolute-form for an arbitrary host is routed by the reverse proxy's own routes:
    # the catch-all Route answers, from its own backend.
    (answer,) = await raw_request(
        k.port, f"GET http://127.0.0.1:{victim.port}/steal HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{victim.port}\r\n\r\n".encode())
    assert answer.status == 200 and answer.json()["backend"] == "app"
    (answer,) = await raw_request(
        k.port, f"CONNECT 127.0.0.1:{victim.port} HTTP/1.1\r\nHost: 127.0.0.1:{victim.port}\r\n\r\n"
        .encode())
    assert answer.status == 405
    _code, out, _ = await curl("-x", k.url, "-w", "%{http_connect}", "-o", "/dev/null", "-p",
                              f"http://127.0.0.1:{victim.port}/")
    assert out == "405"
    assert len(victim.received) == before


def test_an_allow_wildcard_across_a_public_suffix_is_refused_at_load(tmp_path):
    (tmp_path / "p.yaml").write_text("""\
apiVersion: kanal.dev/v1alpha1
kind: EgressPolicy
metadata: {name: wide}
spec:
  allow: [{host: "*.co.uk"}]
""")
    done = subprocess.run([sys.executable, "-m", "kanal", "validate", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "*.co.uk is a wildcard across the public suffix co.uk" in done.stdout + done.stderr


async def test_the_forward_listener_bounds_heads_and_refuses_what_the_reverse_one_does(
        k, app, forward_port):
    target = f"http://localhost:{app.port}"
    host = f"Host: localhost:{app.port}\r\n".encode()
    before = len(app.received)
    # a header past the limit is refused before its line ends, not held in memory
    reader, writer = await asyncio.open_connection("127.0.0.1", forward_port)
    try:
        writer.write(f"GET {target}/big HTTP/1.1\r\n".encode() + host + b"X-Big: "
                     + b"a" * 80_000)
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await read_response(reader)
        assert answer.status == 431
        assert answer.reason == "Request Header Fields Too Large"
    finally:
        writer.close()
    for data in (
        f"GET {target}/dup HTTP/1.1\r\n".encode() + host + b"Authorization: a\r\nAuthorization: b\r\n\r\n",
        f"GET {target}/te HTTP/1.1\r\n".encode() + host + b"Transfer-Encoding: xchunked\r\n\r\n",
        f"GET {target}/v HTTP/2.0\r\n".encode() + host + b"\r\n",
    ):
        [answer] = await raw_request(forward_port, data)
        assert answer.status in (400, 505), data
    assert len(app.received) == before

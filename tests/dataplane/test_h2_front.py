"""Scenario: HTTP/2 clients through a real `kanal run`.

h2c with prior knowledge on the plain listener (HTTP/1.1 still served on the same
port), ALPN `h2` on the TLS listener; clients are httpx (HTTP/2 over the h2 library) and
curl. What an HTTP/1.1 client gets (routing, TLS per SNI, HSTS, 421, forwarding
headers, timeouts, retries, proxy-made errors) an HTTP/2 client gets too, with
streams multiplexed on one connection.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import time

import aiohttp
import httpx
import pytest
import trustme

from tests.conftest import free_port, header_values, upstream_yaml
from tests.dataplane.test_tls_scenarios import tls_route, tls_secret

ROUTES = """\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: app}
spec:
  hostnames: [app.test]
  rules:
    - matches: [{path: {type: PathPrefix, value: /sleep}}]
      backends: [{upstream: echo}]
      timeout: 500ms
    - matches: [{headers: [{name: x-canary, value: "yes"}]}]
      backends: [{upstream: canary}]
    - matches: [{path: {type: PathPrefix, value: /retried}}]
      backends: [{upstream: half-dead}]
      retries: {attempts: 2, retryOn: [connect-failure]}
    - matches: [{path: {type: PathPrefix, value: /nowhere}}]
      backends: [{upstream: dead}]
    - matches: [{path: {type: PathPrefix, value: /sticky}}]
      backends: [{upstream: echo, weight: 1}, {upstream: canary, weight: 1}]
      sessionAffinity: {cookie: {name: kanal-affinity, ttl: 1h}}
    - backends: [{upstream: echo}]
"""


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def proxy(module_kanal, module_backends, ca):
    echo = module_backends("echo")
    canary = module_backends("canary")
    closed = free_port()  # nothing listens here
    files = {
        "routes.yaml": ROUTES,
        "tls.yaml": tls_route("secure", ["secure.test"], "echo", "secure-tls",
                              ", hsts: {maxAge: 600}"),
        "secret.yaml": tls_secret("secure-tls", ca.issue_cert("secure.test")),
        "echo.yaml": upstream_yaml("echo", echo),
        "canary.yaml": upstream_yaml("canary", canary),
        "dead.yaml": f"""\
apiVersion: kanal.dev/v1alpha1
kind: Upstream
metadata: {{name: dead}}
spec:
  endpoints: [{{address: 127.0.0.1, port: {closed}}}]
""",
        "half.yaml": f"""\
apiVersion: kanal.dev/v1alpha1
kind: Upstream
metadata: {{name: half-dead}}
spec:
  endpoints: [{{address: 127.0.0.1, port: {closed}}}, {{address: 127.0.0.1, port: {echo.port}}}]
""",
    }
    tls_port = free_port()
    k = module_kanal(files, "--tls-listen", f"127.0.0.1:{tls_port}")
    k.tls_port = tls_port  # type: ignore[attr-defined]
    return k


def h2c_client() -> httpx.AsyncClient:
    """An HTTP/2-only client: h2c with prior knowledge on http:// URLs."""
    return httpx.AsyncClient(http1=False, http2=True, timeout=10)


async def test_h2c_prior_knowledge_is_routed_and_forwarded(proxy):
    async with h2c_client() as client:
        answer = await client.get(proxy.url + "/a/b?x=1", headers={"host": "app.test"})
        assert answer.http_version == "HTTP/2"
        assert answer.status_code == 200, answer.text
        record = answer.json()
        assert record["backend"] == "echo"
        assert record["path"] == "/a/b?x=1"
        assert header_values(record, "host") == ["app.test"]
        assert header_values(record, "x-forwarded-proto") == ["http"]
        assert header_values(record, "x-forwarded-for") == ["127.0.0.1"]
        assert answer.headers["x-backend"] == "echo"
        assert "connection" not in answer.headers and "transfer-encoding" not in answer.headers
        # Header matches and a proxy-made 404 work the same over HTTP/2.
        canary = await client.get(proxy.url + "/", headers={"host": "app.test", "x-canary": "yes"})
        assert canary.json()["backend"] == "canary"
        missing = await client.get(proxy.url + "/", headers={"host": "nothing.test"})
        assert missing.status_code == 404 and "no route" in missing.text


async def test_http11_still_served_on_the_same_port(proxy):
    async with aiohttp.ClientSession() as session, session.get(
            proxy.url + "/", headers={"Host": "app.test"}) as answer:
        assert answer.status == 200 and answer.version == aiohttp.HttpVersion11
        assert (await answer.json())["backend"] == "echo"


async def test_streams_are_multiplexed_and_a_slow_one_stalls_no_other(proxy):
    async with h2c_client() as client:
        # One connection (httpx multiplexes on it); the slow stream times out on the
        # route's 500ms while twenty quick ones complete meanwhile.
        started = time.monotonic()
        slow = asyncio.create_task(client.get(proxy.url + "/sleep/3",
                                              headers={"host": "app.test"}))
        quick = await asyncio.gather(*(
            client.get(proxy.url + f"/q{i}", headers={"host": "app.test"}) for i in range(20)))
        assert all(a.status_code == 200 for a in quick)
        assert [a.json()["path"] for a in quick] == [f"/q{i}" for i in range(20)]
        answer = await slow
        assert answer.status_code == 504, answer.text
        assert "did not answer within 0.5s" in answer.text
        assert time.monotonic() - started < 2.5


async def test_bodies_both_ways_with_flow_control(proxy):
    body = bytes(range(256)) * 8192  # 2 MiB, far above every window
    async with h2c_client() as client:
        answer = await client.post(proxy.url + "/upload", content=body,
                                   headers={"host": "app.test"})
        assert answer.status_code == 200
        assert answer.json()["body_size"] == len(body)

        async def chunks():
            for _ in range(16):
                yield b"y" * 65536

        streamed = await client.post(proxy.url + "/upload2", content=chunks(),
                                     headers={"host": "app.test"})
        assert streamed.json()["body_size"] == 16 * 65536
        assert streamed.json()["chunked"] is True  # no length: chunked to the HTTP/1.1 upstream
        big = await client.get(proxy.url + "/bytes/5000000", headers={"host": "app.test"})
        assert big.status_code == 200 and len(big.content) == 5_000_000
        head = await client.head(proxy.url + "/bytes/1000", headers={"host": "app.test"})
        assert head.status_code == 200 and head.content == b""


async def test_retries_and_proxy_made_errors(proxy):
    async with h2c_client() as client:
        for _ in range(4):
            answer = await client.get(proxy.url + "/retried", headers={"host": "app.test"})
            assert answer.status_code == 200, answer.text  # the dead endpoint is retried past
        dead = await client.get(proxy.url + "/nowhere", headers={"host": "app.test"})
        assert dead.status_code == 502 and "upstream default/dead" in dead.text


async def test_alpn_h2_on_tls_with_sni_hsts_and_misdirection(proxy, ca):
    context = ssl.create_default_context()
    ca.configure_trust(context)
    transport = httpx.AsyncHTTPTransport(http2=True, verify=context)
    async with httpx.AsyncClient(transport=transport, timeout=10) as client:
        # secure.test resolves nowhere: connect to 127.0.0.1 and send the name as SNI.
        url = f"https://127.0.0.1:{proxy.tls_port}/tls"
        sni = {"sni_hostname": "secure.test"}
        answer = await client.get(url, headers={"host": "secure.test"}, extensions=sni)
        assert answer.http_version == "HTTP/2"
        assert answer.status_code == 200
        assert header_values(answer.json(), "x-forwarded-proto") == ["https"]
        assert answer.headers["strict-transport-security"] == "max-age=600"
        # Another host on the same connection is misdirected, as over HTTP/1.1.
        other = await client.get(url, headers={"host": "app.test"}, extensions=sni)
        assert other.http_version == "HTTP/2" and other.status_code == 421


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_http2_prior_knowledge(proxy):
    out = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "-H", "Host: app.test",
         "-w", "\n%{http_version} %{http_code}", proxy.url + "/curl"],
        capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    body, _, status = out.stdout.rpartition("\n")
    assert status == "2 200", out.stdout
    assert '"path": "/curl"' in body


async def test_split_and_cookie_affinity_over_http2(proxy):
    """A weighted split sets the affinity cookie on an HTTP/2 answer, and a client that
    sends it back keeps its backend."""
    seen = set()
    for _ in range(20):
        async with h2c_client() as fresh:  # no cookie yet: the split chooses
            answer = await fresh.get(proxy.url + "/sticky", headers={"host": "app.test"})
            seen.add(answer.json()["backend"])
    assert seen == {"echo", "canary"}
    async with h2c_client() as client:
        first = await client.get(proxy.url + "/sticky", headers={"host": "app.test"})
        cookie = first.headers["set-cookie"].split(";")[0]
        assert cookie.startswith("kanal-affinity=")
        backend = first.json()["backend"]
        for _ in range(10):
            again = await client.get(proxy.url + "/sticky",
                                     headers={"host": "app.test", "cookie": cookie})
            assert again.json()["backend"] == backend

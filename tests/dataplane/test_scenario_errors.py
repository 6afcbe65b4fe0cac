"""Scenario: the proxy's own errors, each with a status and a short body that says why.

One `kanal run` serves every case; each case has its own hostname. The malformed and
smuggling cases go through raw sockets, since a client library would refuse to send them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import pytest

from tests.conftest import free_port, raw_request, read_response, upstream_yaml

MiB = 1024 * 1024


def route(name: str, host: str, backends: str, extra: str = "") -> str:
    return f"""\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {{name: {name}}}
spec:
  hostnames: [{host}]
  rules:
    - backends: {backends}
{extra}---
"""


@pytest.fixture(scope="module")
def setup(module_kanal, module_backends):
    ok = module_backends("ok")
    slow = module_backends("slow")
    dead_port = free_port()  # nothing listens here
    garbage_port = free_port()  # a test starts a server answering garbage here
    files = {
        "ok.yaml": upstream_yaml("ok", ok),
        "slow.yaml": upstream_yaml("slow", slow),
        "dead.yaml": f"""\
apiVersion: kanal.dev/v1alpha1
kind: Upstream
metadata: {{name: dead}}
spec:
  endpoints: [{{address: 127.0.0.1, port: {dead_port}}}]
  timeouts: {{connect: 1s}}
""",
        "garbage.yaml": f"""\
apiVersion: kanal.dev/v1alpha1
kind: Upstream
metadata: {{name: garbage}}
spec:
  endpoints: [{{address: 127.0.0.1, port: {garbage_port}}}]
""",
        "empty.yaml": """\
apiVersion: kanal.dev/v1alpha1
kind: Upstream
metadata: {name: empty}
spec:
  endpoints: []
""",
        "routes.yaml": (
            route("ok", "ok.test", "[{upstream: ok}]")
            + route("dead", "dead.test", "[{upstream: dead}]")
            + route("garbage", "garbage.test", "[{upstream: garbage}]")
            + route("empty", "empty.test", "[{upstream: empty}]")
            + route(
                "standby",
                "standby.test",
                "[{upstream: ok, weight: 0}, {upstream: slow, weight: 0}]",
            )
            + route("missing", "missing.test", "[{upstream: orders-v9}]")
            + route("slow", "slow.test", "[{upstream: slow}]", "      timeout: 300ms\n")
        ),
    }
    k = module_kanal(files)
    return {"kanal": k, "ok": ok, "slow": slow, "garbage_port": garbage_port}


async def get(k, host: str, path: str = "/") -> tuple[int, str, float]:
    started = time.monotonic()
    async with (
        aiohttp.ClientSession() as session,
        session.get(k.url + path, headers={"Host": host}) as answer,
    ):
        return answer.status, await answer.text(), time.monotonic() - started


async def test_no_route_is_404_naming_host_and_path(setup):
    status, body, _ = await get(setup["kanal"], "nowhere.test", "/some/where")
    assert status == 404
    assert "no route" in body and "nowhere.test" in body and "/some/where" in body
    assert len(body) < 300


async def test_connect_failure_is_502(setup):
    status, body, elapsed = await get(setup["kanal"], "dead.test")
    assert status == 502
    assert "default/dead" in body and "connect" in body.lower()
    assert elapsed < 1.5


async def test_garbage_from_the_upstream_is_502(setup):
    got = asyncio.Event()

    async def answer_garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        got.set()
        writer.write(b"THIS IS NOT HTTP AT ALL\r\n\x00\x01\x02\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer_garbage, "127.0.0.1", setup["garbage_port"])
    try:
        status, body, _ = await get(setup["kanal"], "garbage.test")
    finally:
        server.close()
        await server.wait_closed()
    assert got.is_set()
    assert status == 502
    assert "default/garbage" in body and "invalid response" in body


async def test_upstream_without_endpoints_is_503_at_once(setup):
    status, body, elapsed = await get(setup["kanal"], "empty.test")
    assert status == 503
    assert "default/empty" in body
    assert elapsed < 1.0


async def test_every_backend_at_weight_zero_is_503(setup):
    status, body, elapsed = await get(setup["kanal"], "standby.test")
    assert status == 503
    assert "weight" in body
    assert elapsed < 1.0
    assert not setup["ok"].received or all(r["path"] != "/standby" for r in setup["ok"].received)


async def test_missing_upstream_is_503_naming_it(setup):
    status, body, _ = await get(setup["kanal"], "missing.test")
    assert status == 503
    assert "orders-v9" in body
    # the rest of the configuration still serves
    status, _, _ = await get(setup["kanal"], "ok.test")
    assert status == 200


async def test_rule_timeout_is_504(setup):
    status, body, elapsed = await get(setup["kanal"], "slow.test", "/sleep/2")
    assert status == 504
    assert "default/slow" in body and "0.3s" in body
    assert 0.25 < elapsed < 1.5


MALFORMED = [
    pytest.param(b"GET / HTTP/1.1\r\nHost: ok.test\r\nBroken header line\r\n\r\n", id="no-colon"),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: ok.test\r\nX-A: 1\r\n\x00\x01: 2\r\n\r\n", id="control-bytes"
    ),
    pytest.param(b"GET / HTTP/9.7\r\nHost: ok.test\r\n\r\n", id="bad-version"),
    pytest.param(b"G(T / HTTP/1.1\r\nHost: ok.test\r\n\r\n", id="bad-method"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: ok.test\r\nHost: other.test\r\n\r\n", id="two-hosts"),
    pytest.param(b"GET / HTTP/1.1\r\nX-A: 1\r\n\r\n", id="http11-without-host"),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: ok.test\r\nContent-Length: abc\r\n\r\n", id="bad-length"
    ),
]

SMUGGLING = [
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: ok.test\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: ok.test\r\n\r\n",
        id="cl-and-te",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: ok.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n"
        b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: ok.test\r\n\r\n",
        id="te-and-cl",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: ok.test\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcd",
        id="two-lengths",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: ok.test\r\nTransfer-Encoding: identity\r\n\r\n"
        b"GET /smuggled HTTP/1.1\r\nHost: ok.test\r\n\r\n",
        id="te-not-chunked",
    ),
]


@pytest.mark.parametrize("data", MALFORMED + SMUGGLING)
async def test_malformed_or_smuggling_request_is_400_and_never_reaches_a_backend(setup, data):
    ok = setup["ok"]
    before = len(ok.received)
    (answer,) = await raw_request(setup["kanal"].port, data)
    assert answer.status == 400, answer
    assert answer.body.startswith(b"kanal: 400"), answer.body
    assert (answer.header("connection") or "").lower() == "close"
    # a well-formed request afterwards still works, and nothing reached the backend before it
    status, _, _ = await get(setup["kanal"], "ok.test", "/after")
    assert status == 200
    assert [r["path"] for r in ok.received[before:]] == ["/after"]


OVERSIZED = [
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: ok.test\r\nX-Big: " + b"a" * MiB + b"\r\n\r\n", id="1MiB-header"
    ),
    pytest.param(b"GET /" + b"a" * MiB + b" HTTP/1.1\r\nHost: ok.test\r\n\r\n", id="1MiB-target"),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: ok.test\r\n"
        + b"".join(b"X-%d: 1\r\n" % i for i in range(20000))
        + b"\r\n",
        id="20000-headers",
    ),
]


@pytest.mark.parametrize("data", OVERSIZED)
async def test_an_oversized_request_head_is_refused_by_the_proxy(setup, data):
    ok = setup["ok"]
    before = len(ok.received)
    reader, writer = await asyncio.open_connection("127.0.0.1", setup["kanal"].port)
    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        async with asyncio.timeout(10):
            answer = await read_response(reader)
    finally:
        writer.close()
    assert answer.status in (400, 414, 431), answer
    assert answer.body.startswith(b"kanal:"), answer.body[:200]
    assert len(ok.received) == before

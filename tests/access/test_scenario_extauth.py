"""Scenario: an external authorization service that allows, refuses, hangs and is dead.

The service is a real aiohttp server on 127.0.0.1 that records what it was asked; the
backends record whether a refused request ever reached them.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiohttp import web

from tests.access.helpers import serve_app
from tests.conftest import free_port, header_values, raw_request, upstream_yaml


class AuthService:
    def __init__(self) -> None:
        self.port = free_port()
        self.asked: list[dict[str, object]] = []
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def check(request: web.Request) -> web.Response:
            self.asked.append({"method": request.method, "path": request.path_qs,
                               "headers": dict(request.headers)})
            body = await request.read()
            self.asked[-1]["body"] = body
            if request.path.startswith("/hang"):
                await asyncio.sleep(5)
            if request.path.startswith("/body"):
                if body.startswith(b"let-me-in"):
                    return web.Response(status=204)
                return web.Response(status=403, text="no")
            if request.headers.get("Authorization") == "Bearer good":
                return web.Response(status=200, headers={"X-Auth-User": "ann",
                                                         "X-Not-Copied": "1"})
            return web.Response(status=401, text=json.dumps({"error": "who are you?"}),
                                content_type="application/json",
                                headers={"WWW-Authenticate": 'Bearer realm="auth"'})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", check)
        self.runner = await serve_app(app, self.port)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def route(name: str, url: str, failure_mode: str = "Closed", extra: str = "") -> str:
    return f"""\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {{name: {name}}}
spec:
  hostnames: [{name}.test]
  policies:
    extAuth:
      url: "{url}"
      headersToBackend: [X-Auth-User]
      timeout: 300ms
      failureMode: {failure_mode}
{extra}  rules: [{{backends: [{{upstream: app}}]}}]
"""


@pytest.fixture
async def setup(backends, kanal):
    auth = AuthService()
    await auth.start()
    app = await backends("app")
    dead = f"http://127.0.0.1:{free_port()}/check"
    files = {
        "app.yaml": upstream_yaml("app", app),
        "ext.yaml": route("ext", f"http://127.0.0.1:{auth.port}/check"),
        "hang.yaml": route("hang", f"http://127.0.0.1:{auth.port}/hang"),
        "deadopen.yaml": route("deadopen", dead, "Open"),
        "deadclosed.yaml": route("deadclosed", dead, "Closed"),
        "body.yaml": route("body", f"http://127.0.0.1:{auth.port}/body",
                           extra="      bodyToExtAuth: {maxRequestBytes: 16}\n"),
    }
    k = kanal(files)
    yield k, auth, app
    await auth.stop()


async def get(k, host: str, path: str = "/", headers: str = ""):
    (answer,) = await raw_request(
        k.port, f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n".encode())
    return answer


async def test_allowed_requests_carry_the_chosen_answer_headers(setup) -> None:
    k, auth, app = setup
    answer = await get(k, "ext.test", "/orders?id=7",
                       "Authorization: Bearer good\r\nX-Auth-User: forged\r\nX-Private: 1\r\n")
    assert answer.status == 200
    record = answer.json()
    assert header_values(record, "X-Auth-User") == ["ann"]
    assert header_values(record, "X-Not-Copied") == []
    (asked,) = auth.asked
    assert asked["method"] == "GET" and asked["path"] == "/check/orders?id=7"
    headers = asked["headers"]
    assert isinstance(headers, dict)
    assert headers["Authorization"] == "Bearer good" and "X-Private" not in headers
    assert headers["X-Forwarded-Host"] == "ext.test"


async def test_refusals_are_returned_as_the_service_sent_them(setup) -> None:
    k, auth, app = setup
    answer = await get(k, "ext.test", headers="Authorization: Bearer bad\r\n")
    assert answer.status == 401
    assert answer.header("WWW-Authenticate") == 'Bearer realm="auth"'
    assert answer.header("Content-Type") == "application/json; charset=utf-8"
    assert json.loads(answer.body) == {"error": "who are you?"}
    assert app.received == []


async def test_a_hanging_service_is_failure_mode_after_the_timeout(setup) -> None:
    k, auth, app = setup
    started = time.monotonic()
    answer = await get(k, "hang.test", headers="Authorization: Bearer good\r\n")
    assert answer.status == 503
    assert time.monotonic() - started < 3
    assert app.received == []


async def test_a_dead_service_is_failure_mode(setup) -> None:
    k, auth, app = setup
    assert (await get(k, "deadclosed.test")).status == 503
    assert app.received == []
    assert (await get(k, "deadopen.test")).status == 200
    assert len(app.received) == 1
    assert (await get(k, "deadclosed.test")).status == 503
    assert k.log().count("is unavailable") == 1  # once per service and outage


async def test_the_body_is_sent_bounded_and_reaches_the_backend_whole(setup) -> None:
    k, auth, app = setup
    import asyncio as aio

    reader, writer = await aio.open_connection("127.0.0.1", k.port)
    body = b"let-me-in" + b"x" * 5000
    writer.write(b"POST /up HTTP/1.1\r\nHost: body.test\r\nContent-Length: %d\r\n\r\n"
                 % len(body))
    await writer.drain()
    writer.write(body)
    await writer.drain()
    from tests.conftest import read_response

    answer = await aio.wait_for(read_response(reader), 10)
    writer.close()
    assert answer.status == 200
    assert answer.json()["body_size"] == len(body)
    (asked,) = auth.asked
    assert asked["body"] == body[:16]
    assert asked["headers"]["X-Kanal-Auth-Partial-Body"] == "true"  # type: ignore[index]

    refused = await raw_request(k.port, b"POST /up HTTP/1.1\r\nHost: body.test\r\n"
                                        b"Content-Length: 5\r\n\r\nnope!")
    assert refused[0].status == 403
    assert len(app.received) == 1


async def test_a_short_chunked_body_is_sent_when_it_ends(setup) -> None:
    import asyncio as aio

    from tests.conftest import read_response

    k, auth, app = setup
    reader, writer = await aio.open_connection("127.0.0.1", k.port)
    writer.write(b"POST /up HTTP/1.1\r\nHost: body.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"9\r\nlet-me-in\r\n")
    await writer.drain()
    writer.write(b"0\r\n\r\n")  # the end arrives on its own
    await writer.drain()
    answer = await aio.wait_for(read_response(reader), 10)
    writer.close()
    assert answer.status == 200
    assert auth.asked[-1]["body"] == b"let-me-in"
    assert "X-Kanal-Auth-Partial-Body" not in auth.asked[-1]["headers"]  # type: ignore[operator]

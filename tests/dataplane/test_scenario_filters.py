"""Scenario: Route filters through `kanal run`, seen on the wire by clients and backends.

Requests are raw bytes and the backend records exactly what it receives, so each
filter is checked where a user notices it: the headers and path the backend gets, the
headers, status and body the client gets, and requests that never reach the backend.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import (
    async_wait_until,
    free_port,
    header_values,
    raw_request,
    read_response,
    upstream_yaml,
)

ROUTE = r"""
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: web, namespace: default}
spec:
  hostnames: [filters.test]
  rules:
    - name: headers
      matches: [{path: {type: PathPrefix, value: /hdr}}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: X-Env, value: prod}]
            add: [{name: X-Client, value: "${client_address} ${request_id} ${route_name} ${host}"}]
            remove: [X-Secret]
        - type: ResponseHeaderModifier
          responseHeaderModifier:
            set: [{name: X-Served-By, value: "${route_name}"}]
            remove: [X-Backend]
      backends: [{upstream: echo}]
    - name: rewrite
      matches: [{path: {type: PathPrefix, value: /api}}]
      filters:
        - type: URLRewrite
          urlRewrite:
            hostname: internal.svc
            path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}
      backends: [{upstream: echo}]
    - name: regex
      matches: [{path: {type: RegularExpression, value: "/users/([0-9]+)/profile"}}]
      filters:
        - type: URLRewrite
          urlRewrite: {path: {type: ReplaceRegexMatch, replaceRegexMatch: "/profiles/\\1"}}
      backends: [{upstream: echo}]
    - name: moved
      matches: [{path: {type: PathPrefix, value: /old}}]
      filters:
        - type: RequestRedirect
          requestRedirect:
            scheme: https
            hostname: new.test
            statusCode: 301
            path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}
    - name: robots
      matches: [{path: {type: Exact, value: /robots.txt}}]
      filters:
        - type: DirectResponse
          directResponse:
            statusCode: 200
            headers: [{name: Cache-Control, value: max-age=60}]
            body: "User-agent: *\nDisallow: /\n"
    - name: mirror
      matches: [{path: {type: PathPrefix, value: /mirror}}]
      filters:
        - type: RequestMirror
          requestMirror: {upstream: shadow, maxBodySize: 1Ki}
        - type: RequestMirror
          requestMirror: {upstream: silent}
      backends: [{upstream: echo}]
    - name: mirror-dead
      matches: [{path: {type: PathPrefix, value: /dead-mirror}}]
      filters:
        - type: RequestMirror
          requestMirror: {upstream: dead}
      backends: [{upstream: echo}]
    - name: mirror-none
      matches: [{path: {type: PathPrefix, value: /unmirrored}}]
      filters:
        - type: RequestMirror
          requestMirror: {upstream: shadow, percent: 0}
      backends: [{upstream: echo}]
    - name: cors
      matches: [{path: {type: PathPrefix, value: /cors}}]
      filters:
        - type: CORS
          cors:
            allowOrigins: ["https://app.example.com", "https://*.shop.test"]
            allowMethods: [GET, PUT]
            allowHeaders: [X-Token]
            exposeHeaders: [X-Total]
            allowCredentials: true
            maxAge: 600
      backends: [{upstream: echo}]
"""


@pytest.fixture(scope="module")
def echo(module_backends):
    return module_backends("echo")


@pytest.fixture(scope="module")
def shadow(module_backends):
    return module_backends("shadow")


class Silent:
    """A mirror backend that accepts connections, reads everything and never answers."""

    def __init__(self) -> None:
        import socket
        import threading

        self.received = bytearray()
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.port = self.server.getsockname()[1]
        self.connections: list = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn) -> None:
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            self.received += data

    def close(self) -> None:
        self.server.close()
        for conn in self.connections:
            conn.close()


@pytest.fixture(scope="module")
def silent():
    server = Silent()
    yield server
    server.close()


@pytest.fixture(scope="module")
def k(module_kanal, echo, shadow, silent):
    silent_yaml = f"""
apiVersion: kanal.dev/v1alpha1
kind: Upstream
metadata: {{name: silent}}
spec:
  endpoints: [{{address: 127.0.0.1, port: {silent.port}}}]
"""
    dead_yaml = f"""
apiVersion: kanal.dev/v1alpha1
kind: Upstream
metadata: {{name: dead}}
spec:
  endpoints: [{{address: 127.0.0.1, port: {free_port()}}}]
"""
    return module_kanal({"echo.yaml": upstream_yaml("echo", echo), "dead.yaml": dead_yaml,
                         "shadow.yaml": upstream_yaml("shadow", shadow),
                         "silent.yaml": silent_yaml, "route.yaml": ROUTE})


async def send(k, head: str, body: bytes = b""):
    (answer,) = await raw_request(k.port, head.encode() + b"\r\n" + body)
    return answer


async def send_head(k, head: str):
    reader, writer = await asyncio.open_connection("127.0.0.1", k.port)
    try:
        writer.write(head.encode())
        async with asyncio.timeout(10):
            return await read_response(reader, head_request=True)
    finally:
        writer.close()


async def test_request_and_response_headers_are_changed(k, echo) -> None:
    answer = await send(k, "GET /hdr HTTP/1.1\r\nHost: Filters.test:80\r\nX-Env: dev\r\n"
                           "X-Secret: s3cret\r\nX-Request-Id: req-7\r\n")
    assert answer.status == 200
    record = answer.json()
    assert header_values(record, "X-Env") == ["prod"]
    assert header_values(record, "X-Secret") == []
    assert header_values(record, "X-Client") == ["127.0.0.1 req-7 default/web filters.test"]
    assert answer.header("X-Served-By") == "default/web"
    assert answer.header("X-Backend") is None


async def test_url_rewrite_changes_host_and_prefix_on_whole_segments(k, echo) -> None:
    answer = await send(k, "GET /api/orders/7?full=1 HTTP/1.1\r\nHost: filters.test\r\n")
    record = answer.json()
    assert record["path"] == "/v2/orders/7?full=1"
    assert header_values(record, "Host") == ["internal.svc"]
    assert header_values(record, "X-Forwarded-Host") == ["filters.test"]
    answer = await send(k, "GET /api HTTP/1.1\r\nHost: filters.test\r\n")
    assert answer.json()["path"] == "/v2"


async def test_regex_rewrite_uses_the_matchs_groups(k, echo) -> None:
    answer = await send(k, "GET /users/42/profile?tab=1 HTTP/1.1\r\nHost: filters.test\r\n")
    assert answer.json()["path"] == "/profiles/42?tab=1"


async def test_redirect_never_reaches_the_backend(k, echo) -> None:
    before = len(echo.received)
    answer = await send(k, "GET /old/page?x=1 HTTP/1.1\r\nHost: filters.test:8080\r\n")
    assert answer.status == 301
    assert answer.header("Location") == "https://new.test/new/page?x=1"
    assert len(echo.received) == before


async def test_direct_response(k, echo) -> None:
    before = len(echo.received)
    answer = await send(k, "GET /robots.txt HTTP/1.1\r\nHost: filters.test\r\n")
    assert (answer.status, answer.body) == (200, b"User-agent: *\nDisallow: /\n")
    assert answer.header("Cache-Control") == "max-age=60"
    assert answer.header("Content-Type") == "text/plain; charset=utf-8"
    head = await send_head(k, "HEAD /robots.txt HTTP/1.1\r\nHost: filters.test\r\n\r\n")
    assert head.body == b""
    assert head.status == 200 and head.header("Content-Length") == "26"
    assert len(echo.received) == before


async def test_cors_preflight_is_answered_by_the_proxy(k, echo) -> None:
    before = len(echo.received)
    allowed = await send(k, "OPTIONS /cors/items HTTP/1.1\r\nHost: filters.test\r\n"
                            "Origin: https://app.example.com\r\n"
                            "Access-Control-Request-Method: PUT\r\n"
                            "Access-Control-Request-Headers: x-token\r\n")
    assert allowed.status == 204
    assert allowed.header("Access-Control-Allow-Origin") == "https://app.example.com"
    assert allowed.header("Access-Control-Allow-Credentials") == "true"
    assert allowed.header("Access-Control-Allow-Methods") == "GET, PUT"
    assert allowed.header("Access-Control-Max-Age") == "600"
    other = await send(k, "OPTIONS /cors/items HTTP/1.1\r\nHost: filters.test\r\n"
                          "Origin: https://evil.example\r\n"
                          "Access-Control-Request-Method: PUT\r\n")
    assert other.status == 204
    assert not [name for name, _ in other.headers if name.lower().startswith("access-control")]
    assert len(echo.received) == before


async def test_cors_on_actual_requests(k, echo) -> None:
    answer = await send(k, "GET /cors/items HTTP/1.1\r\nHost: filters.test\r\n"
                           "Origin: https://a.shop.test\r\n")
    assert answer.status == 200
    assert answer.header("Access-Control-Allow-Origin") == "https://a.shop.test"
    assert answer.header("Access-Control-Expose-Headers") == "X-Total"
    other = await send(k, "GET /cors/items HTTP/1.1\r\nHost: filters.test\r\n"
                          "Origin: https://shop.test.evil\r\n")
    assert other.status == 200
    assert other.header("Access-Control-Allow-Origin") is None


async def test_a_rule_without_filters_is_untouched(k, echo) -> None:
    answer = await send(k, "GET /hdr-not HTTP/1.1\r\nHost: other.test\r\n")
    assert answer.status == 404


def explain(k, query: str) -> dict:
    import json
    import urllib.request

    with urllib.request.urlopen(f"{k.admin}/explain?{query}", timeout=5) as answer:
        return json.loads(answer.read())


def test_explain_lists_the_filters_and_the_rewritten_request(k) -> None:
    found = explain(k, "url=http://filters.test/hdr/x%3Fa%3D1&header=X-Secret:1")
    assert found["rule"]["name"] == "headers"
    filters = found["filters"]
    assert filters["filters"] == ["RequestHeaderModifier", "ResponseHeaderModifier"]
    request = filters["request"]
    assert request["host"] == "filters.test" and request["method"] == "GET"
    assert ["X-Env", "prod"] in request["headersAdded"]
    assert request["headersRemoved"] == ["x-secret"]
    rewritten = explain(k, "url=http://filters.test/api/orders")["filters"]["request"]
    assert (rewritten["host"], rewritten["path"]) == ("internal.svc", "/v2/orders")


def test_explain_shows_the_answer_of_a_redirect(k) -> None:
    found = explain(k, "url=http://filters.test/old/a")["filters"]
    assert found["filters"] == ["RequestRedirect"] and found["request"] is None
    assert found["answer"]["status"] == 301
    assert found["answer"]["headers"] == [["Location", "https://new.test/new/a"]]
    assert "filters" not in explain(k, "url=http://other.test/")


def metric(k, line_start: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"{k.admin}/metrics", timeout=5) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_mirror_copies_arrive_while_the_client_gets_the_first_backends_answer(
        k, echo, shadow, silent) -> None:
    answer = await send(k, "POST /mirror/orders?x=1 HTTP/1.1\r\nHost: filters.test\r\n"
                           "Content-Length: 11\r\nX-Tag: m1\r\n", b"hello world")
    # The silent mirror never answers: the client's answer came from echo regardless.
    assert answer.status == 200 and answer.json()["backend"] == "echo"
    assert answer.json()["body_size"] == 11

    def copied() -> list:
        return [r for r in shadow.received if header_values(r, "X-Tag") == ["m1"]]

    await async_wait_until(lambda: _true(bool(copied())))
    (copy,) = copied()
    assert (copy["method"], copy["path"], copy["body_size"]) == ("POST", "/mirror/orders?x=1", 11)
    await async_wait_until(lambda: _true(b"X-Tag: m1" in silent.received))
    await async_wait_until(lambda: _true(
        metric(k, 'kanal_upstream_events_total{event="mirrored",upstream="default/shadow"}') >= 1))


async def test_chunked_bodies_are_mirrored_and_large_ones_are_not(k, echo, shadow) -> None:
    answer = await send(k, "POST /mirror/c HTTP/1.1\r\nHost: filters.test\r\n"
                           "Transfer-Encoding: chunked\r\nX-Tag: m2\r\n",
                        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    assert answer.status == 200 and answer.json()["body_size"] == 11
    await async_wait_until(lambda: _true(any(
        header_values(r, "X-Tag") == ["m2"] and r["body_size"] == 11 for r in shadow.received)))
    big = b"x" * 4096  # over the shadow mirror's maxBodySize of 1Ki
    answer = await send(k, "POST /mirror/big HTTP/1.1\r\nHost: filters.test\r\n"
                           f"Content-Length: {len(big)}\r\nX-Tag: m3\r\n", big)
    assert answer.status == 200 and answer.json()["body_size"] == 4096
    await async_wait_until(lambda: _true(metric(
        k, 'kanal_upstream_events_total{event="mirror_skipped",upstream="default/shadow"}') >= 1))
    assert not [r for r in shadow.received if header_values(r, "X-Tag") == ["m3"]]


async def test_percent_zero_mirrors_nothing(k, echo, shadow) -> None:
    for _ in range(5):
        answer = await send(k, "GET /unmirrored HTTP/1.1\r\nHost: filters.test\r\nX-Tag: m4\r\n")
        assert answer.status == 200
    # A mirrored request would have been sent before its answer; the shadow has none.
    marker = await send(k, "GET /mirror/marker HTTP/1.1\r\nHost: filters.test\r\nX-Tag: m5\r\n")
    assert marker.status == 200
    await async_wait_until(lambda: _true(any(header_values(r, "X-Tag") == ["m5"]
                                             for r in shadow.received)))
    assert not [r for r in shadow.received if header_values(r, "X-Tag") == ["m4"]]


async def _true(value: bool) -> bool:
    return value


async def test_the_proxys_own_answers_keep_the_connection_open(k, echo) -> None:
    answers = await raw_request(k.port, (
        b"GET /old/x HTTP/1.1\r\nHost: filters.test\r\n\r\n"
        b"OPTIONS /cors/y HTTP/1.1\r\nHost: filters.test\r\nOrigin: https://app.example.com\r\n"
        b"Access-Control-Request-Method: GET\r\n\r\n"
        b"GET /robots.txt HTTP/1.1\r\nHost: filters.test\r\n\r\n"
        b"GET /api/z HTTP/1.1\r\nHost: filters.test\r\n\r\n"), responses=4)
    assert [a.status for a in answers] == [301, 204, 200, 200]
    assert [a.header("Connection") for a in answers[:3]] == ["keep-alive"] * 3
    assert answers[3].json()["path"] == "/v2/z"


async def test_add_appends_to_a_header_the_request_has(k, echo) -> None:
    answer = await send(k, "GET /hdr HTTP/1.1\r\nHost: filters.test\r\nX-Client: edge-1\r\n"
                           "X-Request-Id: r2\r\n")
    assert header_values(answer.json(), "X-Client") == [
        "edge-1,127.0.0.1 r2 default/web filters.test"]


async def test_a_mirror_that_cannot_be_reached_is_counted_and_changes_nothing(k, echo) -> None:
    for _ in range(2):
        answer = await send(k, "GET /dead-mirror HTTP/1.1\r\nHost: filters.test\r\n")
        assert answer.status == 200 and answer.json()["backend"] == "echo"
    await async_wait_until(lambda: _true(metric(
        k, 'kanal_upstream_events_total{event="mirror_failed",upstream="default/dead"}') >= 2))

"""Scenario: request aggregation through a real `kanal run` (a Route rule with
`aggregate`): one client request, several sub-requests to real backends, one JSON
answer; parts that fail or are late follow the rule's `onError`."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import aiohttp
import httpx
import pytest

from tests.conftest import async_wait_until, free_port, upstream_yaml

ROUTES = """\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: bff}
spec:
  hostnames: [bff.test]
  rules:
    - matches: [{path: {type: RegularExpression, value: "/bff/users/(?P<id>[0-9]+)"}}]
      aggregate:
        parts:
          - {name: profile, upstream: users, path: "/users/{path.id}"}
          - {name: orders, upstream: orders, path: "/orders?user={path.id}&q={query.q}"}
          - {name: who, upstream: users, path: "/h/{header.x-user}", timeout: 2s}
    - matches: [{path: {type: RegularExpression, value: "/bff/partial/(?P<id>[0-9]+)"}}]
      aggregate:
        onError: Partial
        parts:
          - {name: ok, upstream: users, path: "/users/{path.id}"}
          - {name: broken, upstream: dead, path: "/x"}
          - {name: late, upstream: users, path: "/sleep/3", timeout: 300ms}
          - {name: refused, upstream: users, path: "/status/503"}
    - matches: [{path: {type: PathPrefix, value: /bff/fail}}]
      aggregate:
        parts:
          - {name: fine, upstream: users, path: "/fine"}
          - {name: broken, upstream: dead, path: "/x"}
    - matches: [{path: {type: PathPrefix, value: /bff/filtered}}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: x-internal, value: bff}, {name: accept, value: application/x-ndjson}]
            add: [{name: x-route, value: "${route_name}"}]
            remove: [x-drop-me]
      aggregate:
        parts:
          - {name: one, upstream: users, path: "/one"}
          - {name: two, upstream: orders, path: "/two/{header.x-internal}"}
    - matches: [{path: {type: PathPrefix, value: /bff/late}}]
      aggregate:
        onError: Partial
        parts:
          - {name: slow, upstream: silent, path: "/hang/own", timeout: 300ms}
    - matches: [{path: {type: PathPrefix, value: /bff/deadline/partial}}]
      timeout: 500ms
      aggregate:
        onError: Partial
        parts:
          - {name: fast, upstream: users, path: "/fast"}
          - {name: slow, upstream: silent, path: "/hang/partial", timeout: 10s}
    - matches: [{path: {type: PathPrefix, value: /bff/deadline/fail}}]
      timeout: 500ms
      aggregate:
        parts:
          - {name: fast, upstream: users, path: "/fast"}
          - {name: slow, upstream: silent, path: "/hang/fail", timeout: 10s}
    - matches: [{path: {type: PathPrefix, value: /bff/retried}}]
      retries: {attempts: 2, retryOn: ["503", connect-failure]}
      aggregate:
        parts:
          - {name: flaky, upstream: half-dead, path: "/flaky"}
"""


class Silent:
    """A backend that reads each request and never answers; it notes when the proxy
    hangs up on it (by the request's path)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.hung_up: dict[str, float] = {}
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        with sock:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                data += chunk
            path = data.split(b" ", 2)[1].decode()
            try:
                while sock.recv(65536):
                    pass
            except OSError:
                pass
            self.hung_up[path] = time.monotonic()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def silent() -> Iterator[Silent]:
    backend = Silent()
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def proxy(module_kanal, module_backends, silent):
    users, orders = module_backends("users"), module_backends("orders")
    closed = free_port()
    dead = ("apiVersion: kanal.dev/v1alpha1\nkind: Upstream\nmetadata: {name: dead}\n"
            f"spec:\n  endpoints: [{{address: 127.0.0.1, port: {closed}}}]\n")
    half = ("apiVersion: kanal.dev/v1alpha1\nkind: Upstream\nmetadata: {name: half-dead}\n"
            f"spec:\n  endpoints: [{{address: 127.0.0.1, port: {closed}}}, "
            f"{{address: 127.0.0.1, port: {users.port}}}]\n")
    quiet = ("apiVersion: kanal.dev/v1alpha1\nkind: Upstream\nmetadata: {name: silent}\n"
             f"spec:\n  endpoints: [{{address: 127.0.0.1, port: {silent.port}}}]\n")
    return module_kanal({"routes.yaml": ROUTES, "users.yaml": upstream_yaml("users", users),
                         "orders.yaml": upstream_yaml("orders", orders), "dead.yaml": dead,
                         "half.yaml": half, "silent.yaml": quiet})


async def get(proxy, path: str, headers: dict[str, str] | None = None):
    async with aiohttp.ClientSession() as session, session.get(
            proxy.url + path, headers={"Host": "bff.test", **(headers or {})}) as answer:
        return answer.status, answer.headers.get("Content-Type"), await answer.json()


async def test_parts_are_merged_under_their_names(proxy):
    status, kind, body = await get(proxy, "/bff/users/42?q=a b", {"x-user": "a/b?c"})
    assert (status, kind) == (200, "application/json")
    assert set(body) == {"profile", "orders", "who"}
    assert body["profile"]["backend"] == "users" and body["profile"]["path"] == "/users/42"
    assert body["orders"]["backend"] == "orders"
    assert body["orders"]["path"] == "/orders?user=42&q=a%20b"
    # Values are percent-encoded: a header cannot add a segment or a query to the part.
    assert body["who"]["raw_path"] == "/h/a%2Fb%3Fc"


async def test_the_rules_request_header_filters_apply_to_every_part(proxy):
    """A RequestHeaderModifier of the aggregate rule acts on each part's request (its
    own headers: no header of the client's is sent to parts) and on what `{header.X}`
    reads."""
    status, _, body = await get(proxy, "/bff/filtered", {"x-internal": "from-client",
                                                         "x-drop-me": "1"})
    assert status == 200
    for name in ("one", "two"):
        fields = {k.lower(): v for k, v in body[name]["headers"]}
        assert fields["x-internal"] == "bff"
        assert fields["accept"] == "application/x-ndjson"
        assert fields["x-route"] == "default/bff"
        assert "x-drop-me" not in fields
    assert body["two"]["path"] == "/two/bff"


async def test_a_missing_value_is_400(proxy):
    status, _, body = await get(proxy, "/bff/users/42?q=1")  # no x-user header
    assert status == 400 and "header.x-user" in body["error"]


async def test_partial_answers_null_and_errors_for_failed_and_late_parts(proxy):
    started = time.monotonic()
    status, _, body = await get(proxy, "/bff/partial/7")
    assert time.monotonic() - started < 2.5  # the late part's 300ms, not its 3s
    assert status == 200
    assert body["ok"]["path"] == "/users/7"
    assert body["broken"] is None and body["late"] is None and body["refused"] is None
    assert set(body["errors"]) == {"broken", "late", "refused"}
    assert "within 0.3s" in body["errors"]["late"]
    assert body["errors"]["refused"] == "answered 503"


async def test_fail_policy_answers_502_naming_the_part(proxy):
    status, _, body = await get(proxy, "/bff/fail")
    assert status == 502
    assert body["error"].startswith("part broken failed")


async def hung_up(silent: Silent, path: str, since: float) -> None:
    """The part's request to `silent` was given up (its connection closed) within 2s of
    `since` (well before the 10s of the parts the rule's timeout cuts)."""
    async def closed() -> bool:
        return path in silent.hung_up
    await async_wait_until(closed, timeout=5)
    assert silent.hung_up[path] - since < 2.0


async def test_a_late_parts_request_is_given_up(proxy, silent):
    """A part later than its own timeout is not left running on its backend."""
    started = time.monotonic()
    status, _, body = await get(proxy, "/bff/late")
    assert status == 200 and body["errors"] == {"slow": "no answer within 0.3s"}
    await hung_up(silent, "/hang/own", started)


async def test_the_rules_timeout_bounds_a_partial_aggregate(proxy, silent):
    """Past the rule's 500ms timeout the slow part (its own timeout 10s) is cancelled:
    null and an error entry for it, the parts that answered kept."""
    started = time.monotonic()
    status, _, body = await get(proxy, "/bff/deadline/partial")
    assert time.monotonic() - started < 2.0
    assert status == 200
    assert body["fast"]["path"] == "/fast" and body["slow"] is None
    assert body["errors"] == {"slow": "no answer within the rule's timeout (0.5s)"}
    await hung_up(silent, "/hang/partial", started)


async def test_the_rules_timeout_fails_a_fail_aggregate_with_504(proxy, silent):
    started = time.monotonic()
    status, _, body = await get(proxy, "/bff/deadline/fail")
    assert time.monotonic() - started < 2.0
    assert status == 504
    assert "part slow" in body["error"] and set(body["errors"]) == {"slow"}
    await hung_up(silent, "/hang/fail", started)


async def test_parts_take_the_upstreams_retries_and_breakers(proxy):
    # half-dead has a closed port and a live endpoint: each part that meets the closed
    # one is tried again on the other.
    for _ in range(4):
        status, _, body = await get(proxy, "/bff/retried")
        assert status == 200 and body["flaky"]["path"] == "/flaky"


async def test_aggregate_over_http2(proxy):
    async with httpx.AsyncClient(http1=False, http2=True, timeout=10) as client:
        answer = await client.get(proxy.url + "/bff/users/5?q=x",
                                  headers={"host": "bff.test", "x-user": "u"})
    assert answer.http_version == "HTTP/2" and answer.status_code == 200
    assert answer.json()["profile"]["path"] == "/users/5"


async def test_explain_and_config_show_the_aggregate_rule(proxy):
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.admin + "/explain",
                               params={"url": "http://bff.test/bff/users/1"}) as answer:
            assert answer.status == 200, await answer.text()
        async with session.get(proxy.admin + "/config") as answer:
            config = await answer.json()
    rules = next(r for r in config["routes"] if r["key"] == "default/bff")["rules"]
    assert rules[0]["aggregate"]["parts"][0]["name"] == "profile"

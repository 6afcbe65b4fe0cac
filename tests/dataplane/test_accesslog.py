"""Access logs: one line per request on the reverse, inbound and forward listeners,
JSON or text, fields chosen by name, and a slow sink that never stalls a request.

Real listeners (in this process, and `kanal run` as users start it), real backends on
127.0.0.1; the lines are read back from the file or pipe they were written to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kanal.contract.snapshot import (
    Backend as RouteBackend,
)
from kanal.contract.snapshot import (
    EgressPolicy,
    EgressRule,
    Endpoint,
    Retries,
    Route,
    Rule,
    Snapshot,
    Upstream,
)
from kanal.dataplane.accesslog import LISTENERS, AccessLog
from kanal.dataplane.logformat import FIELDS
from kanal.dataplane.process import DataplaneOptions, start_listeners
from kanal.dataplane.runtime import Runtime
from kanal.dataplane.server import bind_socket, start_listener
from tests.conftest import (
    async_wait_until,
    free_port,
    header_values,
    raw_request,
    upstream_yaml,
    wait_until,
)


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def shop(port: int, *, policies: tuple[EgressPolicy, ...] = ()) -> Snapshot:
    return Snapshot(
        routes=(Route(key="shop/web", hostnames=("shop.test",), rules=(
            Rule(index=0, name="main", backends=(RouteBackend(upstream="shop/app"),)),)),),
        upstreams=(Upstream(key="shop/app", endpoints=(Endpoint(address="127.0.0.1", port=port),)),),
        egress_policies=policies,
    ).with_version()


async def test_every_listener_writes_one_json_line_per_request(backends, tmp_path):
    app = await backends("app")
    path = tmp_path / "access.log"
    access = AccessLog(str(path))
    ports = free_port(), free_port(), free_port()
    options = DataplaneOptions(
        listen=("127.0.0.1", ports[0]), forward_listen=("127.0.0.1", ports[1]),
        inbound_listen=("127.0.0.1", ports[2]), app_port=app.port, admin=None,
        access_logs=dict.fromkeys(LISTENERS, access),
    )
    runtime = Runtime()
    policy = EgressPolicy(key="default/egress", allow=(EgressRule("localhost", (app.port,)),),
                          allow_private_networks=True)
    runtime.apply(shop(app.port, policies=(policy,)))
    servers = await start_listeners(runtime, options)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{ports[0]}/api/orders?x=1",
                                    data=b"a" * 1000, headers={"Host": "shop.test"}) as answer:
                body = await answer.read()
                assert answer.status == 200
            async with session.get(f"http://127.0.0.1:{ports[0]}/nowhere",
                                   headers={"Host": "other.test"}) as answer:
                assert answer.status == 404
            async with session.get(f"http://127.0.0.1:{ports[2]}/in") as answer:
                assert answer.status == 200
            async with session.get(f"http://localhost:{app.port}/out",
                                   proxy=f"http://127.0.0.1:{ports[1]}") as answer:
                assert answer.status == 200
        await async_wait_until(lambda: _true(len(read_json_lines(path)) == 4))
    finally:
        for server in servers:
            server.close()
        for forward in runtime.forward_proxies:
            await forward.close()
        runtime.close()
        access.close()
    lines = read_json_lines(path)
    assert len(lines) == 4, lines
    assert all(list(line) == list(FIELDS) for line in lines)
    by_path = {line["path"]: line for line in lines}

    ok = by_path["/api/orders?x=1"]
    assert ok["listener"] == "reverse" and ok["client"] == "127.0.0.1"
    assert (ok["method"], ok["host"], ok["protocol"], ok["status"]) == (
        "POST", "shop.test", "HTTP/1.1", 200)
    assert ok["bytesIn"] == 1000 and ok["bytesOut"] == len(body)
    assert (ok["route"], ok["rule"], ok["upstream"], ok["endpoint"]) == (
        "shop/web", "main", "shop/app", f"127.0.0.1:{app.port}")
    assert ok["retries"] == 0 and ok["cache"] == "" and ok["policy"] == ""
    assert 0 < ok["upstreamTime"] <= ok["duration"] < 10
    assert time.time() - 60 < _epoch(ok["time"]) <= time.time() + 1

    missing = by_path["/nowhere"]
    assert (missing["status"], missing["route"], missing["upstream"], missing["endpoint"]) == (
        404, "", "", "")
    assert missing["upstreamTime"] == ""

    inbound = by_path["/in"]
    assert inbound["listener"] == "inbound" and inbound["status"] == 200
    assert inbound["endpoint"] == f"127.0.0.1:{app.port}"

    (egress,) = [line for line in lines if line["listener"] == "forward"]
    assert egress["method"] == "GET" and egress["status"] == 200
    assert egress["host"] == f"localhost:{app.port}"
    assert egress["policy"] == "allow" and egress["endpoint"] == f"127.0.0.1:{app.port}"


async def test_listeners_can_be_left_out_of_the_log(backends, tmp_path):
    app = await backends("app")
    path = tmp_path / "access.log"
    access = AccessLog(str(path), fields=("listener", "path"))
    ports = free_port(), free_port()
    options = DataplaneOptions(
        listen=("127.0.0.1", ports[0]), inbound_listen=("127.0.0.1", ports[1]),
        app_port=app.port, admin=None, access_logs={"inbound": access})
    runtime = Runtime()
    runtime.apply(shop(app.port))
    servers = await start_listeners(runtime, options)
    try:
        async with aiohttp.ClientSession() as session:
            for port, page in ((ports[0], "/reverse"), (ports[1], "/inbound"),
                               (ports[0], "/reverse-again")):
                async with session.get(f"http://127.0.0.1:{port}{page}",
                                       headers={"Host": "shop.test"}) as answer:
                    assert answer.status == 200
        await async_wait_until(lambda: _true(access.written + len(access.queue) >= 1))
    finally:
        for server in servers:
            server.close()
        runtime.close()
        access.close()
    assert read_json_lines(path) == [{"listener": "inbound", "path": "/inbound"}]


async def test_a_refused_request_is_logged_too(backends, tmp_path):
    app = await backends("app")
    path = tmp_path / "access.log"
    access = AccessLog(str(path), form="text", fields=("method", "path", "status", "route"))
    runtime = Runtime()
    runtime.apply(shop(app.port))
    context = runtime.context()
    context.access_log = access
    context.observing = access is not None
    sock = bind_socket("127.0.0.1", 0)
    server = await start_listener(context, sock)
    try:
        port = sock.getsockname()[1]
        (good, bad) = await raw_request(
            port, b"GET /a HTTP/1.1\r\nHost: shop.test\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            responses=2)
        assert (good.status, bad.status) == (200, 400)
        await async_wait_until(lambda: _true(len(_text_lines(path)) == 2))
    finally:
        server.close()
        runtime.close()
        access.close()
    assert _text_lines(path) == [
        "method=GET path=/a status=200 route=shop/web",
        "method=- path=- status=400 route=-",
    ]


async def test_retries_are_counted_when_every_try_failed(tmp_path):
    path = tmp_path / "access.log"
    access = AccessLog(str(path), fields=("status", "retries", "upstream"))
    dead = (Endpoint(address="127.0.0.1", port=free_port()),)  # one: no implicit retry
    runtime = Runtime()
    runtime.apply(Snapshot(
        routes=(Route(key="shop/web", rules=(Rule(index=0, backends=(
            RouteBackend(upstream="shop/dead"),), retries=Retries(
                attempts=1, retry_on=("connect-failure",))),)),),
        upstreams=(Upstream(key="shop/dead", endpoints=dead),),
    ).with_version())
    context = runtime.context()
    context.access_log = access
    context.observing = True
    sock = bind_socket("127.0.0.1", 0)
    server = await start_listener(context, sock)
    try:
        (answer,) = await raw_request(sock.getsockname()[1], b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert answer.status == 502
        await async_wait_until(lambda: _true(len(read_json_lines(path)) == 1))
    finally:
        server.close()
        runtime.close()
        access.close()
    assert read_json_lines(path) == [{"status": 502, "retries": 1, "upstream": "shop/dead"}]


async def test_a_stuck_sink_drops_and_counts_but_never_stalls_requests(backends):
    """The log goes to a pipe nobody reads: once its buffer is full the writer blocks,
    records are dropped and counted, and every request is still answered at once."""
    app = await backends("app")
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    access = AccessLog("pipe", stream=stream, capacity=50)
    runtime = Runtime()
    runtime.apply(shop(app.port))
    context = runtime.context()
    context.access_log = access
    context.observing = access is not None
    access.metrics = runtime.metrics
    sock = bind_socket("127.0.0.1", 0)
    server = await start_listener(context, sock)
    port = sock.getsockname()[1]
    try:
        request = b"GET /%d HTTP/1.1\r\nHost: shop.test\r\n\r\n"
        started = time.monotonic()
        for batch in range(10):
            data = b"".join(request % (batch * 100 + i) for i in range(100))
            answers = await raw_request(port, data, responses=100, timeout=20)
            assert all(answer.status == 200 for answer in answers)
        elapsed = time.monotonic() - started
        assert access.dropped > 0 and runtime.metrics.access_log_dropped == access.dropped
        assert access.written + access.dropped + len(access.queue) <= 1000
        assert elapsed < 30
    finally:
        server.close()
        runtime.close()
        os.close(read_end)  # the blocked writer fails, and its thread ends
        access.close()
        with contextlib.suppress(OSError):
            stream.close()


async def test_a_client_that_leaves_mid_exchange_is_logged_with_status_0(backends, tmp_path):
    app = await backends("app")
    path = tmp_path / "access.log"
    access = AccessLog(str(path), fields=("path", "status", "upstream", "endpoint"))
    runtime = Runtime()
    runtime.apply(shop(app.port))
    context = runtime.context()
    context.access_log = access
    context.observing = True
    sock = bind_socket("127.0.0.1", 0)
    server = await start_listener(context, sock)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        writer.write(b"GET /sleep/2 HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        await writer.drain()

        async def reached() -> bool:
            return any(r["path"] == "/sleep/2" for r in app.received)

        await async_wait_until(reached)
        # A reset, not a half-close (after which the answer would still be awaited).
        sock_of_client = writer.get_extra_info("socket")
        sock_of_client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        await async_wait_until(lambda: _true(len(read_json_lines(path)) == 1))
    finally:
        server.close()
        runtime.close()
        access.close()
    assert read_json_lines(path) == [{"path": "/sleep/2", "status": 0, "upstream": "shop/app",
                                      "endpoint": f"127.0.0.1:{app.port}"}]


async def test_mesh_requests_through_the_forward_listener_get_a_request_id(backends, tmp_path):
    from kanal.dataplane.requestid import RequestIds

    app = await backends("orders")
    path = tmp_path / "access.log"
    access = AccessLog(str(path), fields=("listener", "host", "status", "policy", "route",
                                          "requestId"))
    port = free_port()
    options = DataplaneOptions(listen=None, forward_listen=("127.0.0.1", port), admin=None,
                               access_logs={"forward": access}, request_ids=RequestIds(b"mesh"))
    runtime = Runtime()
    runtime.apply(Snapshot(
        routes=(Route(key="default/orders", hostnames=("orders.mesh",), gateways=("mesh",),
                      rules=(Rule(index=0, backends=(RouteBackend(upstream="default/orders"),)),)),),
        upstreams=(Upstream(key="default/orders",
                            endpoints=(Endpoint(address="127.0.0.1", port=app.port),)),),
    ).with_version())
    servers = await start_listeners(runtime, options)
    try:
        async with aiohttp.ClientSession() as session, session.get(
                "http://orders.mesh/x", proxy=f"http://127.0.0.1:{port}") as answer:
            assert answer.status == 200
            given = answer.headers.getall("X-Request-Id")
        await async_wait_until(lambda: _true(len(read_json_lines(path)) == 1))
    finally:
        for server in servers:
            server.close()
        for forward in runtime.forward_proxies:
            await forward.close()
        runtime.close()
        access.close()
    assert len(given) == 1 and given[0].startswith("mesh-")
    assert header_values(app.received[0], "X-Request-Id") == given
    assert read_json_lines(path) == [
        {"listener": "forward", "host": "orders.mesh", "status": 200, "policy": "mesh",
         "route": "default/orders", "requestId": given[0]}]


def test_kanal_run_access_log_flags(kanal, tmp_path, module_backends):
    app = module_backends("app")
    path = tmp_path / "access.log"
    route = """\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: web}
spec:
  rules: [{name: all, backends: [{upstream: app}]}]
"""
    k = kanal({"app.yaml": upstream_yaml("app", app), "route.yaml": route},
              "--access-log", str(path), "--access-log-format", "text",
              "--access-log-fields", "status,method,path,rule,upstream")
    import urllib.request

    for i in range(3):
        with urllib.request.urlopen(f"{k.url}/page/{i}", timeout=5) as answer:
            assert answer.status == 200
            assert answer.headers["X-Request-Id"]  # --request-id auto: on with the log
    wait_until(lambda: len(_text_lines(path)) == 3)
    assert _text_lines(path) == [
        f"status=200 method=GET path=/page/{i} rule=all upstream=default/app" for i in range(3)]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sighup_reopens_the_file_after_a_rotation(kanal, tmp_path, workers, module_backends):
    import signal
    import urllib.request

    app = module_backends("app")
    path = tmp_path / "access.log"
    route = """\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: web}
spec:
  rules: [{backends: [{upstream: app}]}]
"""
    k = kanal({"app.yaml": upstream_yaml("app", app), "route.yaml": route},
              "--access-log", str(path), "--access-log-fields", "path",
              "--workers", workers)

    def get(page: str) -> None:
        with urllib.request.urlopen(f"{k.url}/{page}", timeout=5) as answer:
            assert answer.status == 200

    get("before")
    wait_until(lambda: _text_lines(path) == ['{"path":"/before"}'])
    rotated = tmp_path / "access.log.1"
    path.rename(rotated)
    assert k.process is not None
    k.process.send_signal(signal.SIGHUP)
    # Until a worker has reopened, its lines still go to the renamed file: keep
    # asking until one reaches the new one.
    def reopened() -> bool:
        get("after")
        return '{"path":"/after"}' in _text_lines(path)

    wait_until(reopened)
    assert k.process.poll() is None
    assert _text_lines(rotated)[0] == '{"path":"/before"}'


@pytest.mark.parametrize("workers", ["1", "2"])
def test_each_listener_writes_to_its_own_file_and_sighup_reopens_both(kanal, tmp_path, workers, module_backends):
    import signal
    import urllib.request

    app = module_backends("app")
    forward_port = free_port()
    reverse_log, forward_log = tmp_path / "reverse.log", tmp_path / "forward.log"
    files = {
        "app.yaml": upstream_yaml("app", app),
        "route.yaml": "apiVersion: kanal.dev/v1alpha1\nkind: Route\n"
                      "metadata: {name: web}\nspec:\n  rules: [{backends: [{upstream: app}]}]\n",
        "policy.yaml": "apiVersion: kanal.dev/v1alpha1\nkind: EgressPolicy\n"
                       "metadata: {name: egress}\nspec:\n"
                       f"  allow: [{{host: localhost, ports: [{app.port}]}}]\n"
                       "  allowPrivateNetworks: true\n",
    }
    # The default (the inbound listener's, unused here) is overridden for both.
    k = kanal(files, "--forward-listen", f"127.0.0.1:{forward_port}",
              "--access-log", "off", "--access-log", f"reverse={reverse_log}",
              "--access-log", f"forward={forward_log}",
              "--access-log-fields", "listener,path,status", "--workers", workers)
    through_forward = urllib.request.build_opener(urllib.request.ProxyHandler(
        {"http": f"http://127.0.0.1:{forward_port}"}))

    def reverse(page: str) -> None:
        with urllib.request.urlopen(f"{k.url}/{page}", timeout=5) as answer:
            assert answer.status == 200

    def forward(page: str) -> None:
        with through_forward.open(f"http://localhost:{app.port}/{page}", timeout=5) as answer:
            assert answer.status == 200

    for i in range(3):
        reverse(f"in-{i}")
        forward(f"out-{i}")
    wait_until(lambda: len(_text_lines(reverse_log)) == 3 and len(_text_lines(forward_log)) == 3)
    assert sorted(read_json_lines(reverse_log), key=str) == [
        {"listener": "reverse", "path": f"/in-{i}", "status": 200} for i in range(3)]
    # The forward listener logs the absolute target it was asked for.
    assert sorted(read_json_lines(forward_log), key=str) == [
        {"listener": "forward", "path": f"http://localhost:{app.port}/out-{i}", "status": 200}
        for i in range(3)]

    # Rotation: both files renamed, one SIGHUP, and both are written at their path again.
    reverse_log.rename(tmp_path / "reverse.log.1")
    forward_log.rename(tmp_path / "forward.log.1")
    assert k.process is not None
    k.process.send_signal(signal.SIGHUP)

    def reopened() -> bool:
        reverse("after")
        forward("after")
        return (any(line["path"] == "/after" for line in read_json_lines(reverse_log))
                and any(line["path"].endswith("/after") for line in read_json_lines(forward_log)))

    wait_until(reopened)
    assert k.process.poll() is None
    assert {line["listener"] for line in read_json_lines(reverse_log)} == {"reverse"}
    assert {line["listener"] for line in read_json_lines(forward_log)} == {"forward"}


def test_destinations_per_listener():
    from kanal.dataplane.accesslog import destinations

    assert destinations([(None, "stdout")]) == dict.fromkeys(LISTENERS, "stdout")
    assert destinations([]) == {}
    # A prefixed one overrides the default for its listener, `off` included.
    assert destinations([(None, "all.log"), ("forward", "egress.log"), ("inbound", "off")]) == {
        "reverse": "all.log", "forward": "egress.log"}
    assert destinations([("reverse", "r.log"), (None, "off")]) == {"reverse": "r.log"}
    # --access-log-listeners narrows the default only.
    assert destinations([(None, "all.log"), ("forward", "egress.log")], ("inbound",)) == {
        "inbound": "all.log", "forward": "egress.log"}


def test_listeners_naming_one_file_share_one_writer(tmp_path, monkeypatch):
    from kanal.dataplane.accesslog import open_access_logs

    monkeypatch.chdir(tmp_path)
    logs = open_access_logs({"reverse": "a.log", "inbound": str(tmp_path / "a.log"),
                             "forward": "b.log"}, fields=("listener",))
    try:
        assert logs["reverse"] is logs["inbound"] and logs["forward"] is not logs["reverse"]
        for listener, writer in logs.items():
            writer.put((0.0, listener) + (None,) * (len(FIELDS) - 2))
    finally:
        for writer in {id(w): w for w in logs.values()}.values():
            writer.close()
    assert sorted(read_json_lines(tmp_path / "a.log"), key=str) == [
        {"listener": "inbound"}, {"listener": "reverse"}]
    assert read_json_lines(tmp_path / "b.log") == [{"listener": "forward"}]


def test_unknown_field_or_unwritable_path_is_refused_at_start(tmp_path):
    import subprocess
    import sys

    for flags, said in ((["--access-log-fields", "status,colour"], "unknown access log field colour"),
                        (["--access-log", str(tmp_path / "no" / "such" / "dir.log")],
                         "cannot write the access log"),
                        (["--access-log", f"reverse={tmp_path / 'no' / 'dir.log'}"],
                         "cannot write the access log"),
                        (["--access-log", "backwards=stdout"], "unknown listener 'backwards'")):
        result = subprocess.run(
            [sys.executable, "-m", "kanal", "run", str(tmp_path), *flags],
            capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and said in result.stderr, result.stderr


def _text_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _epoch(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def _true(value: bool) -> bool:
    return value


pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


def test_an_answer_from_the_cache_counts_its_body_bytes(kanal, tmp_path, module_backends):
    import urllib.request

    app = module_backends("app")
    path = tmp_path / "access.log"
    route = """\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: web}
spec:
  rules: [{backends: [{upstream: app}], cache: {defaultTTL: 60s}}]
"""
    k = kanal({"app.yaml": upstream_yaml("app", app), "route.yaml": route},
              "--access-log", str(path), "--access-log-fields", "status,bytesOut,cache")
    sizes, caches = [], []
    for _ in range(2):
        with urllib.request.urlopen(f"{k.url}/page", timeout=5) as answer:
            sizes.append(len(answer.read()))
            caches.append(answer.headers["X-Cache"])
    assert caches[1] == "HIT" and len(app.received) == 1
    wait_until(lambda: len(_text_lines(path)) == 2)
    assert read_json_lines(path) == [
        {"status": 200, "bytesOut": size, "cache": outcome}
        for size, outcome in zip(sizes, ["MISS", "HIT"], strict=True)]

"""Scenario: gRPC through a real `kanal run`, grpcio clients to grpcio servers.

The Upstream speaks `protocol: H2C`; clients speak h2c with prior knowledge to the plain
listener. Unary and streaming calls (client, server, bidi), status codes and trailing
metadata, deadlines and cancellations, and the answers the proxy makes itself when no
server can answer, as gRPC statuses.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import h2.events
import pytest

from tests.conftest import free_port, wait_until

SERVICE = "kanal.test.Echo"


class EchoServer:
    """A grpcio server with generic handlers: bytes in, bytes out (no generated code)."""

    def __init__(self, name: str, health: Any = None) -> None:
        self.name = name
        self.port = free_port()
        self.calls: list[str] = []
        self.cancelled = threading.Event()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
            "Slow": grpc.unary_unary_rpc_method_handler(self.slow),
            "Deadline": grpc.unary_unary_rpc_method_handler(self.deadline),
            "Flaky": grpc.unary_unary_rpc_method_handler(self.flaky),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),))
        if health is not None:
            from grpc_health.v1 import health_pb2_grpc

            health_pb2_grpc.add_HealthServicer_to_server(health, self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.calls.append("Unary")
        metadata = dict(context.invocation_metadata())
        context.set_trailing_metadata((("x-served-by", self.name),))
        return self.name.encode() + b":" + request + b":" + metadata.get("x-hello", "").encode()

    def fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.calls.append("Fail")
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + request.decode())
        raise AssertionError("unreachable")

    def flaky(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Server "one" is unavailable, "two" answers."""
        self.calls.append("Flaky")
        if self.name == "one":
            context.abort(grpc.StatusCode.UNAVAILABLE, "one is draining")
        return self.name.encode()

    def slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.calls.append("Slow")
        deadline = time.monotonic() + float(request.decode() or "5")
        while time.monotonic() < deadline:
            if not context.is_active():
                self.cancelled.set()
                return b""
            time.sleep(0.01)
        return b"slow done"

    def deadline(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """The seconds left of the deadline this server was given, or "none"."""
        left = context.time_remaining()  # grpcio: None or a huge number without one
        return b"none" if left is None or left > 1e9 else b"%f" % left

    def server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        count, size = (int(x) for x in request.decode().split(","))
        for index in range(count):
            yield index.to_bytes(4, "big") + b"z" * size

    def client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        total = count = 0
        for request in requests:
            total += len(request)
            count += 1
        return f"{count} messages, {total} bytes".encode()

    def bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for request in requests:
            yield b"echo:" + request

    def stop(self) -> None:
        self.server.stop(grace=None)


def grpc_upstream(name: str, *servers: EchoServer, extra: str = "") -> str:
    endpoints = ", ".join(f"{{address: 127.0.0.1, port: {s.port}}}" for s in servers)
    return (f"apiVersion: kanal.dev/v1alpha1\nkind: Upstream\nmetadata: {{name: {name}}}\n"
            f"spec:\n  protocol: H2C\n  endpoints: [{endpoints}]\n{extra}")


ROUTES = f"""\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {{name: grpc}}
spec:
  rules:
    - matches: [{{path: {{type: PathPrefix, value: /{SERVICE}/Slow}}}}]
      backends: [{{upstream: echo}}]
      timeout: 1s
    - matches: [{{path: {{type: Exact, value: /{SERVICE}/Deadline}}, headers: [{{name: x-bound, value: "route"}}]}}]
      backends: [{{upstream: echo}}]
      timeout: 2s
    - matches: [{{path: {{type: Exact, value: /{SERVICE}/Deadline}}, headers: [{{name: x-bound, value: "try"}}]}}]
      backends: [{{upstream: echo}}]
      timeout: 5s
      retries: {{attempts: 1, perTryTimeout: 1500ms}}
    - matches: [{{path: {{type: Exact, value: /{SERVICE}/Flaky}}, headers: [{{name: x-retry, value: "yes"}}]}}]
      backends: [{{upstream: echo}}]
      retries: {{attempts: 2, retryOn: [unavailable]}}
    - matches: [{{headers: [{{name: x-target, value: dead}}]}}]
      backends: [{{upstream: dead}}]
    - backends: [{{upstream: echo}}]
"""


@pytest.fixture(scope="module")
def servers() -> Iterator[list[EchoServer]]:
    started = [EchoServer("one"), EchoServer("two")]
    yield started
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def proxy(module_kanal, servers):
    closed = free_port()
    dead = ("apiVersion: kanal.dev/v1alpha1\nkind: Upstream\nmetadata: {name: dead}\n"
            f"spec:\n  protocol: H2C\n  endpoints: [{{address: 127.0.0.1, port: {closed}}}]\n")
    return module_kanal({"routes.yaml": ROUTES, "echo.yaml": grpc_upstream("echo", *servers),
                         "dead.yaml": dead})


@pytest.fixture
def channel(proxy) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{proxy.port}") as chan:
        yield chan


def method(channel: grpc.Channel, kind: str, name: str) -> Any:
    factory = getattr(channel, kind)
    return factory(f"/{SERVICE}/{name}")


def test_unary_call_with_metadata_and_trailers(channel, servers):
    unary = method(channel, "unary_unary", "Unary")
    seen = set()
    for _ in range(6):
        answer, call = unary.with_call(b"ping", metadata=(("x-hello", "world"),), timeout=10)
        name, _, rest = answer.partition(b":")
        assert rest == b"ping:world"
        seen.add(name.decode())
        assert call.code() == grpc.StatusCode.OK
        assert ("x-served-by", name.decode()) in tuple(call.trailing_metadata())
    assert seen == {"one", "two"}  # balanced over both endpoints


def test_error_status_and_message_are_relayed(channel):
    with pytest.raises(grpc.RpcError) as failed:
        method(channel, "unary_unary", "Fail")(b"x", timeout=10)
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert failed.value.details() == "no such thing: x"


def test_server_streaming_with_flow_control(channel):
    # 200 messages of 64 KiB: far more than every window, so the proxy must relay with
    # flow control rather than buffer.
    replies = list(method(channel, "unary_stream", "ServerStream")(b"200,65536", timeout=30))
    assert len(replies) == 200
    assert [int.from_bytes(r[:4], "big") for r in replies] == list(range(200))
    assert all(len(r) == 4 + 65536 for r in replies)


def test_client_streaming(channel):
    def requests() -> Iterator[bytes]:
        for _ in range(100):
            yield b"q" * 32768

    answer = method(channel, "stream_unary", "ClientStream")(requests(), timeout=30)
    assert answer == b"100 messages, 3276800 bytes"


def test_bidi_streaming_interleaves(channel):
    """Each reply comes back before the next request is sent: nothing waits for the end."""
    outgoing: list[bytes] = []
    gate = threading.Semaphore(0)

    def requests() -> Iterator[bytes]:
        for index in range(20):
            message = f"m{index}".encode()
            outgoing.append(message)
            yield message
            assert gate.acquire(timeout=10), "the reply did not come before the next request"

    replies = []
    for reply in method(channel, "stream_stream", "Bidi")(requests(), timeout=30):
        replies.append(reply)
        gate.release()
    assert replies == [b"echo:" + m for m in outgoing]


def test_retry_on_a_grpc_status_name(channel, servers):
    flaky = method(channel, "unary_unary", "Flaky")
    # Without the retry policy, server one's status reaches the client as it is.
    codes = set()
    for _ in range(4):
        try:
            flaky(b"", timeout=10)
            codes.add(grpc.StatusCode.OK)
        except grpc.RpcError as error:
            codes.add(error.code())
            assert error.details() == "one is draining"
    assert codes == {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
    # With `retryOn: [unavailable]`, it is retried on the other server. (Fewer calls
    # than the breaker's consecutiveFailures, which counts each retried failure.)
    for _ in range(4):
        assert flaky(b"", metadata=(("x-retry", "yes"),), timeout=10) == b"two"


def test_route_timeout_is_deadline_exceeded(channel):
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as failed:
        method(channel, "unary_unary", "Slow")(b"5", timeout=10)
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 4


def deadline_seen(channel: grpc.Channel, bound: str | None, timeout: float | None) -> float | None:
    """The deadline (seconds left) the server got for a call with the client's `timeout`."""
    metadata = (("x-bound", bound),) if bound else ()
    answer = method(channel, "unary_unary", "Deadline")(b"", metadata=metadata, timeout=timeout)
    return None if answer == b"none" else float(answer)


@pytest.mark.parametrize(("bound", "client", "low", "high"), [
    ("route", 30.0, 1.0, 2.0),   # the route's 2s timeout cuts the client's 30s
    ("route", None, 1.0, 2.0),   # no grpc-timeout from the client: the route's is sent
    ("route", 0.8, 0.3, 0.8),    # the client's, shorter than the route's, is kept
    ("try", 30.0, 0.5, 1.5),     # the per-try timeout (1.5s) is shorter than the route's
    (None, 30.0, 25.0, 30.0),    # no route timeout: the client's time left goes on
])
def test_grpc_timeout_sent_upstream_is_bounded_by_the_route(channel, bound, client, low, high):
    seen = deadline_seen(channel, bound, client)
    # grpcio reads its deadline back through a wall clock: allow it a little slack.
    assert seen is not None and low < seen <= high + 0.3


def test_no_timeout_anywhere_sends_no_deadline(channel):
    assert deadline_seen(channel, None, None) is None


def test_no_server_is_unavailable(channel):
    with pytest.raises(grpc.RpcError) as failed:
        method(channel, "unary_unary", "Unary")(b"x", metadata=(("x-target", "dead"),), timeout=10)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "default/dead" in (failed.value.details() or "")


def test_client_cancellation_reaches_the_server(channel, servers):
    for server in servers:
        server.cancelled.clear()
    before = sum(s.calls.count("Slow") for s in servers)
    future = method(channel, "unary_unary", "Slow").future(b"0.8", timeout=10)
    deadline = time.monotonic() + 5
    while sum(s.calls.count("Slow") for s in servers) == before and time.monotonic() < deadline:
        time.sleep(0.01)  # poll: the call reached a server
    future.cancel()
    assert any(s.cancelled.wait(timeout=5) for s in servers)


def test_client_deadline_is_honoured(channel):
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as failed:
        method(channel, "unary_unary", "Slow")(b"0.9", timeout=0.3)
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 0.9


def test_grpc_health_checks_take_a_not_serving_endpoint_out(kanal):
    from grpc_health.v1 import health, health_pb2

    checks = {"up": health.HealthServicer(), "flip": health.HealthServicer()}
    servers = {name: EchoServer(name, health=servicer) for name, servicer in checks.items()}
    try:
        extra = ("  healthCheck: {grpc: {service: kanal.test.Echo}, interval: 100ms, "
                 "timeout: 100ms, healthyThreshold: 1, unhealthyThreshold: 1}\n")
        route = ("apiVersion: kanal.dev/v1alpha1\nkind: Route\nmetadata: {name: r}\n"
                 "spec:\n  rules: [{backends: [{upstream: checked}]}]\n")
        for servicer in checks.values():
            servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        k = kanal({"up.yaml": grpc_upstream("checked", *servers.values(), extra=extra),
                   "route.yaml": route})
        with grpc.insecure_channel(f"127.0.0.1:{k.port}") as chan:
            unary = method(chan, "unary_unary", "Unary")

            def answered_by() -> set[str]:
                return {unary(b"", timeout=5).partition(b":")[0].decode() for _ in range(6)}

            assert answered_by() == {"up", "flip"}
            checks["flip"].set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
            wait_until(lambda: answered_by() == {"up"}, timeout=10)
            checks["flip"].set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
            wait_until(lambda: answered_by() == {"up", "flip"}, timeout=10)
    finally:
        for server in servers.values():
            server.stop()


async def test_grpc_timeout_is_enforced_by_the_proxy(proxy, servers):
    """A client that sends grpc-timeout but never cancels gets DEADLINE_EXCEEDED from the
    proxy on time, and the server's call is cancelled."""
    from tests.dataplane.test_h2_limits import RawH2, ended

    for server in servers:
        server.cancelled.clear()
    client = await RawH2.open(proxy.port)
    message = b"\x00" + (1).to_bytes(4, "big") + b"5"  # one gRPC message: b"5" (seconds)
    stream_id = client.request(f"/{SERVICE}/Slow", end=False, method=b"POST", extra=[
        (b"content-type", b"application/grpc"), (b"te", b"trailers"),
        (b"grpc-timeout", b"300m")])
    client.conn.send_data(stream_id, message, end_stream=True)
    client.flush()
    started = time.monotonic()
    await client.until(ended(stream_id))
    assert time.monotonic() - started < 1.0
    answer = next(e for e in client.events if isinstance(e, h2.events.ResponseReceived))
    fields = dict(answer.headers)
    assert fields[b":status"] == b"200"
    assert fields[b"grpc-status"] == b"4"  # DEADLINE_EXCEEDED, in one HEADERS frame
    # The server is told the same deadline (rounded down), so either side may say it first:
    # the proxy names the grpc-timeout, grpcio says "Deadline Exceeded".
    assert (b"grpc-timeout" in fields[b"grpc-message"]
            or fields[b"grpc-message"] == b"Deadline Exceeded")
    await client.close()
    assert any(s.cancelled.wait(timeout=5) for s in servers)


async def test_grpc_through_a_sidecars_inbound_listener(tmp_path):
    """`kanal dataplane --mode sidecar`: gRPC calls to the inbound listener reach a gRPC
    app over h2c without any setting (HTTP/1.1 requests still go over HTTP/1.1)."""
    import asyncio

    from kanal.contract.snapshot import Snapshot
    from kanal.operator.publisher import Publisher, serve_publisher, shared_token_authenticator
    from tests.conftest import async_wait_until
    from tests.dataplane.test_sidecar import TOKEN, Sidecar

    publisher = Publisher(shared_token_authenticator(TOKEN))
    port = free_port()
    runner = await serve_publisher(publisher, "127.0.0.1", port)
    app = EchoServer("app")
    sidecar = Sidecar("sidecar-grpc", app, f"http://127.0.0.1:{port}", tmp_path)  # type: ignore[arg-type]
    publisher.publish(Snapshot().with_version())
    try:
        sidecar.start()
        await async_wait_until(sidecar.ready, timeout=20, interval=0.05)

        def calls() -> tuple[bytes, list[bytes]]:
            with grpc.insecure_channel(f"127.0.0.1:{sidecar.inbound}") as chan:
                unary = method(chan, "unary_unary", "Unary")(b"in", timeout=10)
                streamed = list(method(chan, "stream_stream", "Bidi")(iter([b"a", b"b"]),
                                                                      timeout=10))
                return unary, streamed

        unary, streamed = await asyncio.to_thread(calls)
        assert unary == b"app:in:"
        assert streamed == [b"echo:a", b"echo:b"]
    finally:
        await sidecar.stop()
        app.stop()
        publisher.close()
        await runner.cleanup()


def test_grpc_to_a_tls_upstream_with_alpn_h2(kanal):
    """`protocol: H2`: TLS to the server, verified against the CA Secret for the SNI,
    HTTP/2 agreed by ALPN."""
    import trustme

    from tests.dataplane.test_tls_scenarios import ca_secret

    ca = trustme.CA()
    cert = ca.issue_cert("echo.internal")
    credentials = grpc.ssl_server_credentials([(
        cert.private_key_pem.bytes(), b"".join(b.bytes() for b in cert.cert_chain_pems))])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(lambda request, context: b"tls:" + request),
    }),))
    port = free_port()
    server.add_secure_port(f"127.0.0.1:{port}", credentials)
    server.start()
    try:
        upstream = ("apiVersion: kanal.dev/v1alpha1\nkind: Upstream\nmetadata: {name: secure}\n"
                    f"spec:\n  protocol: H2\n  endpoints: [{{address: 127.0.0.1, port: {port}}}]\n"
                    "  tls: {sni: echo.internal, caSecretName: echo-ca}\n")
        route = ("apiVersion: kanal.dev/v1alpha1\nkind: Route\nmetadata: {name: r}\n"
                 "spec:\n  rules: [{backends: [{upstream: secure}]}]\n")
        k = kanal({"up.yaml": upstream, "route.yaml": route, "ca.yaml": ca_secret("echo-ca", ca)})
        with grpc.insecure_channel(f"127.0.0.1:{k.port}") as chan:
            assert method(chan, "unary_unary", "Unary")(b"x", timeout=10) == b"tls:x"
    finally:
        server.stop(grace=None)


def test_an_http11_client_reaches_an_h2c_upstream_and_gets_its_trailers(proxy):
    """An HTTP/1.1 request to an H2C Upstream goes out as an HTTP/2 stream; the answer's
    trailers come back after the last chunk."""
    import socket

    body = b"\x00" + (2).to_bytes(4, "big") + b"hi"
    request = (f"POST /{SERVICE}/Unary HTTP/1.1\r\nHost: h1.test\r\n"
               "Content-Type: application/grpc\r\nTE: trailers\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"transfer-encoding: chunked" in head.lower()
    assert rest.endswith(b"\r\n\r\n") and b"\r\n0\r\n" in rest
    trailers = rest[rest.index(b"\r\n0\r\n") + 5:]
    assert b"grpc-status: 0" in trailers
    assert b"x-served-by: " in trailers


def test_grpc_clients_over_tls_to_the_ingress(kanal, servers):
    """A gRPC client with TLS to `--tls-listen` (ALPN h2, the Route's certificate by
    SNI), the ingress speaking h2c to the servers."""
    import trustme

    from tests.dataplane.test_tls_scenarios import tls_secret

    ca = trustme.CA()
    route = ("apiVersion: kanal.dev/v1alpha1\nkind: Route\nmetadata: {name: r}\n"
             "spec:\n  hostnames: [grpc.test]\n  tls: {secretName: grpc-tls}\n"
             "  rules: [{backends: [{upstream: echo}]}]\n")
    tls_port = free_port()
    kanal({"up.yaml": grpc_upstream("echo", *servers), "route.yaml": route,
           "secret.yaml": tls_secret("grpc-tls", ca.issue_cert("grpc.test"))},
          "--tls-listen", f"127.0.0.1:{tls_port}")
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
    options = (("grpc.ssl_target_name_override", "grpc.test"),
               ("grpc.default_authority", "grpc.test"))
    with grpc.secure_channel(f"127.0.0.1:{tls_port}", credentials, options=options) as chan:
        answer = method(chan, "unary_unary", "Unary")(b"secure", timeout=10)
        assert answer.partition(b":")[2] == b"secure:"
        replies = list(method(chan, "unary_stream", "ServerStream")(b"5,10", timeout=10))
        assert len(replies) == 5


def test_a_server_that_dies_mid_stream_fails_the_call_visibly(kanal):
    """The server stops while a server-streaming call is relayed: the client sees an
    error status, never a clean end, and the next call finds the live server."""
    release = threading.Event()

    def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield b"first"
        release.wait(10)
        yield b"never"

    dying = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    dying.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "ServerStream": grpc.unary_stream_rpc_method_handler(stream)}),))
    port = free_port()
    dying.add_insecure_port(f"127.0.0.1:{port}")
    dying.start()
    try:
        upstream = ("apiVersion: kanal.dev/v1alpha1\nkind: Upstream\nmetadata: {name: dying}\n"
                    f"spec:\n  protocol: H2C\n  endpoints: [{{address: 127.0.0.1, port: {port}}}]\n")
        route = ("apiVersion: kanal.dev/v1alpha1\nkind: Route\nmetadata: {name: r}\n"
                 "spec:\n  rules: [{backends: [{upstream: dying}]}]\n")
        k = kanal({"up.yaml": upstream, "route.yaml": route})
        with grpc.insecure_channel(f"127.0.0.1:{k.port}") as chan:
            replies = method(chan, "unary_stream", "ServerStream")(b"", timeout=10)
            assert next(replies) == b"first"
            dying.stop(grace=None)
            with pytest.raises(grpc.RpcError) as failed:
                next(replies)
            assert failed.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE,
                                           grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED)
            with pytest.raises(grpc.RpcError) as refused:
                method(chan, "unary_unary", "Unary")(b"", timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        release.set()
        dying.stop(grace=None)

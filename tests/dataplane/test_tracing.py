"""Tracing through `kanal run`: W3C traceparent propagated to real backends, spans
received by a real OTLP/HTTP receiver (aiohttp, decoded with opentelemetry-proto) and
checked against what was sent, parent and child links included."""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from kanal.dataplane.tracecontext import parse_traceparent, traceparent
from kanal.dataplane.tracing import Tracing
from tests.conftest import async_wait_until, free_port, header_values, upstream_yaml

ROUTES = """\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: shop}
spec:
  hostnames: [shop.test]
  rules:
    - name: flaky
      matches: [{path: {type: PathPrefix, value: /status}}]
      backends: [{upstream: app}]
      retries: {attempts: 1, retryOn: ["503"]}
    - name: main
      backends: [{upstream: app}]
"""


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict[str, Any]
    error: bool
    service: str


@dataclass
class Receiver:
    port: int
    spans: list[Span] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """An OTLP/HTTP trace receiver, as a collector serves it (protobuf bodies)."""
    found = Receiver(free_port())

    async def traces(request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        for resource_spans in export.resource_spans:
            service = next((a.value.string_value for a in resource_spans.resource.attributes
                            if a.key == "service.name"), "")
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attributes = {}
                    for item in span.attributes:
                        value = item.value
                        attributes[item.key] = (value.string_value if value.HasField("string_value")
                                                else value.int_value)
                    found.spans.append(Span(
                        span.name, span.trace_id.hex(), span.span_id.hex(),
                        span.parent_span_id.hex(), span.kind, attributes,
                        span.status.code == 2, service))
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", found.port).start()
    yield found
    await runner.cleanup()


SERVER, CLIENT = 2, 3  # OTLP SpanKind values


async def test_spans_and_propagation_of_a_traced_request_with_a_retry(kanal, backends, receiver,
                                                                      tmp_path):
    app = await backends("app")
    log = tmp_path / "access.log"
    k = kanal({"app.yaml": upstream_yaml("app", app), "route.yaml": ROUTES},
              "--tracing-endpoint", receiver.url, "--tracing-sample-ratio", "0",
              "--tracing-service-name", "edge", "--access-log", str(log))
    caller_trace, caller_span = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7
    incoming = traceparent(caller_trace, caller_span, True).decode()
    async with aiohttp.ClientSession() as session:
        # The caller sampled it: recorded even at ratio 0, and joined to the caller's trace.
        async with session.get(k.url + "/orders", headers={
                "Host": "shop.test", "traceparent": incoming, "tracestate": "vendor=1"}) as answer:
            assert answer.status == 200
        async with session.get(k.url + "/status/503", headers={
                "Host": "shop.test", "traceparent": incoming}) as answer:
            assert answer.status == 503
        # No traceparent, ratio 0: a new trace, propagated, not recorded.
        async with session.get(k.url + "/quiet", headers={"Host": "shop.test"}) as answer:
            assert answer.status == 200

    async def arrived() -> bool:
        return len(receiver.spans) >= 5

    await async_wait_until(arrived, timeout=15)
    trace = f"{caller_trace:032x}"
    servers = [s for s in receiver.spans if s.kind == SERVER]
    clients = [s for s in receiver.spans if s.kind == CLIENT]
    assert len(servers) == 2 and len(clients) == 3, receiver.spans
    assert all(s.trace_id == trace and s.service == "edge" for s in receiver.spans)
    assert all(s.parent_id == f"{caller_span:016x}" for s in servers)
    ok = next(s for s in servers if s.attributes["url.path"] == "/orders")
    failed = next(s for s in servers if s.attributes["url.path"] == "/status/503")
    assert ok.attributes["kanal.route"] == "default/shop" and ok.attributes["kanal.rule"] == "main"
    assert ok.attributes["http.response.status_code"] == 200 and not ok.error
    assert failed.attributes["kanal.retries"] == 1 and failed.error

    ok_tries = [c for c in clients if c.parent_id == ok.span_id]
    failed_tries = [c for c in clients if c.parent_id == failed.span_id]
    assert len(ok_tries) == 1 and len(failed_tries) == 2
    assert [c.attributes["kanal.attempt"] for c in failed_tries] == [0, 1]
    assert all(c.attributes["error.type"] == "503" and c.error for c in failed_tries)
    assert ok_tries[0].attributes["kanal.endpoint"] == f"127.0.0.1:{app.port}"

    # The backend saw each try's own span as its parent, in the caller's trace.
    parents = [parse_traceparent(header_values(r, "traceparent")[0].encode())
               for r in app.received]
    assert all(p is not None and f"{p.trace_id:032x}" == trace and p.sampled
               for p in parents[:3])
    assert [f"{p.span_id:016x}" for p in parents[:3]] == [  # type: ignore[union-attr]
        ok_tries[0].span_id, *[c.span_id for c in failed_tries]]
    assert header_values(app.received[0], "tracestate") == ["vendor=1"]

    quiet = parse_traceparent(header_values(app.received[3], "traceparent")[0].encode())
    assert quiet is not None and not quiet.sampled and f"{quiet.trace_id:032x}" != trace

    async def logged() -> bool:
        return log.exists() and len(log.read_text().splitlines()) == 3

    await async_wait_until(logged)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["traceId"] for line in lines] == [trace, trace, f"{quiet.trace_id:032x}"]


def test_sampling_follows_the_caller_else_the_ratio() -> None:
    never = Tracing("http://127.0.0.1:9/v1/traces", ratio=0.0)
    always = Tracing("http://127.0.0.1:9/v1/traces", ratio=1.0)
    half = Tracing("http://127.0.0.1:9/v1/traces", ratio=0.5)
    try:
        assert not never.begin([]).sampled and always.begin([]).sampled
        unsampled = traceparent(7, 9, False)
        headers = [(b"traceparent", unsampled), (b"tracestate", b"a=1")]
        trace = always.begin(headers)
        assert not trace.sampled and trace.trace_id == 7
        assert headers == [(b"traceparent", unsampled), (b"tracestate", b"a=1")]  # untouched
        headers = [(b"Traceparent", b"garbage"), (b"tracestate", b"a=1")]
        trace = always.begin(headers)
        assert trace.sampled and trace.trace_id != 0
        assert [name for name, _ in headers] == [b"traceparent"]  # no tracestate without parent
        share = sum(half.begin([]).sampled for _ in range(2000))
        assert 800 < share < 1200
    finally:
        never.close()
        always.close()
        half.close()


@pytest.mark.parametrize("value", [
    b"", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
    b"00-00000000000000000000000000000000-b7ad6b7169203331-01",
    b"00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
    b"ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    b"00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
    b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
])
def test_invalid_traceparents_start_a_new_trace(value: bytes) -> None:
    assert parse_traceparent(value) is None


def test_a_valid_traceparent() -> None:
    parent = parse_traceparent(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    assert parent is not None and parent.sampled
    assert (parent.trace_id, parent.span_id) == (0x0AF7651916CD43DD8448EB211C80319C,
                                                 0xB7AD6B7169203331)
    assert parse_traceparent(b"01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00-x") \
        is not None  # a later version may add fields

"""Tracing: W3C trace context on every request, spans of the sampled ones exported by
the OpenTelemetry SDK over OTLP/HTTP.

Per request the proxy calls `begin` (before the upstream head is built: it sets the
`traceparent` the backend receives), `retry` when a try failed and another follows,
and `finish` once the answer is over. A sampled request's spans are built only in
`retry` and `finish`, from times the proxy already holds, with ids chosen here (the
backend's spans must name the attempt span as their parent before it exists), and
handed to the SDK's `BatchSpanProcessor`: a bounded queue that its own thread exports
in batches, dropping when the collector cannot keep up. Nothing waits for the network
on the event loop. This module (and with it the SDK) is imported only when tracing is
on.

Spans of one request: a SERVER span for the proxy's whole part (its parent is the
caller's span when `traceparent` came in), with the route, rule and upstream; one
CLIENT span per try to an endpoint, children of it, the ones that failed and were
retried marked with `error.type`.
"""

from __future__ import annotations

import random
import time
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

from kanal.dataplane.tracecontext import (
    MAX_TRACESTATE,
    TRACEPARENT,
    TRACESTATE,
    parse_traceparent,
    traceparent,
)

_MASK64 = (1 << 64) - 1
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_OK, _ERROR = Status(StatusCode.UNSET), Status(StatusCode.ERROR)


class ExchangeTrace:
    """The trace of one exchange: its ids, and whether its spans are recorded."""

    __slots__ = ("attempt_id", "attempts", "header", "parent_id", "recorded_start",
                 "sampled", "server_id", "trace_id")

    def __init__(self, trace_id: int, parent_id: int, sampled: bool, server_id: int,
                 attempt_id: int, header: bytes) -> None:
        self.trace_id = trace_id
        self.parent_id = parent_id  # the caller's span (0: none)
        self.sampled = sampled
        self.server_id = server_id
        self.attempt_id = attempt_id
        self.header = header  # the traceparent value sent upstream (b"": the caller's, as is)
        self.attempts = 0  # tries already recorded (failed ones)
        self.recorded_start = -1.0


class Tracing:
    """One process's tracer: `--tracing-endpoint`, `--tracing-sample-ratio`."""

    def __init__(
        self,
        endpoint: str,
        *,
        ratio: float = 0.01,
        service_name: str = "kanal",
        rng: random.Random | None = None,
        schedule_delay: float = 1.0,
        processor: BatchSpanProcessor | None = None,
    ) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"the sample ratio must be between 0 and 1, got {ratio}")
        self.endpoint = endpoint
        self.ratio = ratio
        # As OpenTelemetry's TraceIdRatioBased: sampled when the trace id's low 64 bits
        # fall under the bound, so every hop that uses the rule agrees on a trace.
        self.bound = round(ratio * (1 << 64))
        self.rng = rng or random.Random()
        self.processor = processor or BatchSpanProcessor(
            OTLPSpanExporter(endpoint=endpoint, timeout=5.0), max_queue_size=8192,
            schedule_delay_millis=schedule_delay * 1000, max_export_batch_size=512)
        self.resource = Resource.create({"service.name": service_name})
        self.scope = InstrumentationScope("kanal.dataplane")

    # --- per request ----------------------------------------------------------------------

    def begin(self, headers: list[tuple[bytes, bytes]]) -> ExchangeTrace:
        """The request's trace; `headers` (the request's, as they go upstream) are left
        with the traceparent the backend should see."""
        received = None
        state = False
        for name, value in headers:
            size = len(name)
            if size == 11 and name.lower() == TRACEPARENT:
                received = value if received is None else b""  # two: invalid
            elif size == 10 and name.lower() == TRACESTATE:
                state = True
        parent = parse_traceparent(received) if received else None
        getrandbits = self.rng.getrandbits
        if parent is not None and not parent.sampled:
            # The caller decided not to record: pass its context on untouched.
            return ExchangeTrace(parent.trace_id, parent.span_id, False, 0, 0, b"")
        if parent is not None:
            trace_id, parent_id, sampled = parent.trace_id, parent.span_id, True
        else:
            trace_id = getrandbits(128) or 1
            parent_id = 0
            sampled = (trace_id & _MASK64) < self.bound
        server_id = getrandbits(64) or 1
        attempt_id = (getrandbits(64) or 1) if sampled else server_id
        header = traceparent(trace_id, attempt_id, sampled)
        if received is not None or state:  # (most requests carry neither)
            keep_state = parent is not None
            headers[:] = [
                (name, value) for name, value in headers
                if not (len(name) == 11 and name.lower() == TRACEPARENT)
                and not (len(name) == 10 and name.lower() == TRACESTATE
                         and (not keep_state or len(value) > MAX_TRACESTATE))
            ]
        headers.append((TRACEPARENT, header))
        return ExchangeTrace(trace_id, parent_id, sampled, server_id, attempt_id, header)

    def retry(self, trace: ExchangeTrace, head: bytes, *, started: float, endpoint: str,
              upstream: str, condition: str) -> bytes:
        """A try failed and another follows: record the failed one, and give the next its
        own span id in the head sent upstream."""
        if not trace.sampled:
            return head
        now = time.monotonic()
        self._attempt_span(trace, started, now, endpoint, upstream, error=condition, status=0)
        trace.attempts += 1
        trace.recorded_start = started
        trace.attempt_id = self.rng.getrandbits(64) or 1
        header = traceparent(trace.trace_id, trace.attempt_id, True)
        head = head.replace(b"traceparent: " + trace.header, b"traceparent: " + header, 1)
        trace.header = header
        return head

    def finish(self, trace: ExchangeTrace, *, started: float, attempt_started: float | None,
               method: bytes, host: str, target: bytes, http11: bool, status: int, peer: str,
               route: str, rule: str | int, upstream: str, endpoint: str, retries: int,
               request_id: bytes | None) -> None:
        """The exchange is over: record its server span and its last try's span."""
        if not trace.sampled:
            return
        now = time.monotonic()
        if attempt_started is not None and endpoint and attempt_started != trace.recorded_start:
            self._attempt_span(trace, attempt_started, now, endpoint, upstream,
                               error=str(status) if status >= 500 else "", status=status)
        method_text = method.decode("latin-1") or "-"
        attributes: dict[str, Any] = {
            "http.request.method": method_text,
            "url.path": target.partition(b"?")[0].decode("latin-1"),
            "server.address": host,
            "client.address": peer,
            "network.protocol.version": "1.1" if http11 else "1.0",
            "http.response.status_code": status,
            "kanal.route": route,
            "kanal.rule": str(rule),
            "kanal.upstream": upstream,
            "kanal.retries": retries,
        }
        if request_id is not None:
            attributes["kanal.request_id"] = request_id.decode("latin-1")
        self._span(trace, trace.server_id, trace.parent_id, f"{method_text} {route or '-'}",
                   "SERVER", started or now, now, attributes, error=status >= 500)

    # --- spans --------------------------------------------------------------------------------

    def _attempt_span(self, trace: ExchangeTrace, started: float, ended: float, endpoint: str,
                      upstream: str, *, error: str, status: int) -> None:
        address, _, port = endpoint.rpartition(":")
        attributes: dict[str, Any] = {
            "server.address": address, "server.port": int(port) if port.isdigit() else 0,
            "kanal.upstream": upstream, "kanal.endpoint": endpoint,
            "kanal.attempt": trace.attempts,
        }
        if status:
            attributes["http.response.status_code"] = status
        if error:
            attributes["error.type"] = error
        self._span(trace, trace.attempt_id, trace.server_id, f"upstream {upstream}", "CLIENT",
                   started, ended, attributes, error=bool(error))

    def _span(self, trace: ExchangeTrace, span_id: int, parent_id: int, name: str, kind: str,
              started: float, ended: float, attributes: dict[str, Any], *, error: bool) -> None:
        offset = time.time_ns() - time.monotonic_ns()
        flags = _SAMPLED
        parent = (SpanContext(trace.trace_id, parent_id, is_remote=parent_id != trace.server_id,
                              trace_flags=flags) if parent_id else None)
        span = ReadableSpan(
            name=name,
            context=SpanContext(trace.trace_id, span_id, is_remote=False, trace_flags=flags),
            parent=parent,
            resource=self.resource,
            attributes=attributes,
            kind=SpanKind.SERVER if kind == "SERVER" else SpanKind.CLIENT,
            status=_ERROR if error else _OK,
            start_time=int(started * 1e9) + offset,
            end_time=int(ended * 1e9) + offset,
            instrumentation_scope=self.scope,
        )
        self.processor.on_end(span)

    def close(self) -> None:
        """Export what is queued, then stop the exporting thread."""
        self.processor.shutdown()  # type: ignore[no-untyped-call]  # untyped in the SDK

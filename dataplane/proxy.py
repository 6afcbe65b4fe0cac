"""The reverse proxy's client side: one `asyncio.Protocol` per client connection.

The hot path is a relay with one header parse and one route lookup. Bytes from the
client are parsed by llhttp (through httptools); on the end of the request head the
route, backend and endpoint are chosen and the rewritten head is written to a pooled
upstream connection at once, inside the parser callback: no task, future or timer is
made for a request unless a connection has to be opened or the rule sets a timeout.
Bodies are relayed chunk by chunk in both directions with transport flow control, so a
large upload or download never piles up in memory.

A connection carries one exchange at a time. Requests pipelined behind it wait (the
socket is paused meanwhile) and are served in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import struct
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Final

import httptools

from kanal.dataplane import grpc as grpc_rules
from kanal.dataplane import headers as hdrs
from kanal.dataplane import http1, linger, mirror
from kanal.dataplane.access import gate as access_gate
from kanal.dataplane.aggregate import begin as aggregate_begin
from kanal.dataplane.cache import exchange as cache
from kanal.dataplane.headers import cookie_value
from kanal.dataplane.http1 import (
    KEEPALIVE_TIMEOUT,
    MAX_HEAD,
    MAX_HEADERS,
    MAX_TARGET,
    status_line,
)
from kanal.dataplane.pool import EndpointPool, UpstreamConnectError, UpstreamConnection, write_batch
from kanal.dataplane.requestid import HEADER as REQUEST_ID
from kanal.dataplane.requestid import without_request_id
from kanal.dataplane.retry import FailedTry, retry_kind
from kanal.dataplane.tlspolicy import hsts_value, tls_answer
from kanal.dataplane.transcode import begin as transcode_begin

if TYPE_CHECKING:
    from collections.abc import Callable

    from kanal.contract.snapshot import Retries, Route, Rule
    from kanal.dataplane.balancer import EndpointState
    from kanal.dataplane.cache.client import CacheExchange
    from kanal.dataplane.compress import Encoder
    from kanal.dataplane.filters import Exchange, OwnAnswer
    from kanal.dataplane.linger import Linger
    from kanal.dataplane.logformat import Record
    from kanal.dataplane.router import Selection
    from kanal.dataplane.runtime import Config, ProxyContext, UpstreamRuntime
    from kanal.dataplane.tracing import ExchangeTrace

log = logging.getLogger("kanal.proxy")

MAX_BUFFERED_BODY: Final = 256 * 1024
RETRY_BUFFER = 1024 * 1024
"""Body bytes kept for a retry; a request that streamed more than this is not retried."""
NO_BODY = b""
_CHUNK_END: Final = b"0\r\n\r\n"

_SPECIAL_REQUEST_HEADERS: Final = (
    hdrs.HOP_BY_HOP | hdrs.FORWARDING
    | {b"host", b"cookie", b"content-length", b"transfer-encoding", b"expect"}
)
_METHOD_TEXT: Final = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}

class Request:
    """One request on a client connection and its exchange: what the parser learned of
    it, then how far its exchange has come (route, backend, tries, answer).

    A new one is made for every request, so nothing of one exchange carries into the
    next on a keep-alive connection. The exchange's state sits at class level below:
    its resting values cost nothing until a step of the exchange sets them (a rule
    without retries, a cache or filters never touches theirs).
    """

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.host: bytes | None = None
        self.http11 = True
        self.keep_alive = True
        self.chunked = False
        self.content_length: bytes | None = None
        self.upgrade = False
        self.expect_continue = False
        self.complete = False
        self.body: list[bytes] = []
        self.body_size = 0
        self.started = 0.0
        self.cookie: bytes | None = None
        self.forwarded: dict[bytes, list[bytes]] | None = None
        self.connection_named: set[bytes] | None = None
        self.upgrade_value: bytes | None = None
        self.decoded: dict[str, str] | None = None
        self.head_size = 0
        self.singletons: set[bytes] | None = None
        self.websocket_key: bytes | None = None
        self.received = 0  # body bytes, for the access log
        # Began in the middle of a read: its request line was not checked before parsing.
        self.line_unchecked = False

    # --- the exchange ---------------------------------------------------------------------
    # Where it goes: the route and rule, the Upstream and backend, the filters' state,
    # the request id and trace, and what the access policy and the cache hold of it.
    route_key: str = ""
    route_rule: Rule | None = None
    upstream_key: str = ""
    upstream_runtime: UpstreamRuntime | None = None
    filter_state: Exchange | None = None
    request_id: bytes | None = None
    trace: ExchangeTrace | None = None
    hsts: bytes | None = None
    set_cookie: bytes | None = None  # a session affinity cookie to set
    hash_key: str | None = None
    body_limit: int | None = None
    access_headers: bytes | None = None  # RateLimit lines for the answer
    body_waiter: Callable[[], None] | None = None  # an access check waiting for the body
    cache_selection: Selection | None = None  # consulted once the access policy passed
    cache_exchange: CacheExchange | None = None
    cache_outcome: bytes = b""  # the access log's `cache` field, for an answer served here
    aggregated: Rule | None = None  # answered by sub-requests once the policy passed
    transcoded: Rule | None = None  # answered by transcoding once the policy passed
    # Its tries: the head sent upstream, the endpoint of the try under way, the route's
    # and the try's timers, the retry policy and what is kept to replay the body.
    upstream_head: bytes = b""
    request_sent: bool = False
    endpoint_state: EndpointState | None = None
    tried: EndpointState | None = None
    attempt_started: float = 0.0
    route_timer: asyncio.TimerHandle | None = None
    try_timer: asyncio.TimerHandle | None = None
    retries: Retries | None = None
    attempts_left: int = 0
    implicit_used: int = 0
    retried: int = 0
    is_retry: bool = False
    resent_stale: bool = False
    last_failure: tuple[int, str] | None = None
    kept_body: list[bytes] | None = None
    kept_size: int = 0
    # Its answer.
    response_started: bool = False
    response_chunked: bool = False
    response_close: bool = False
    encoder: Encoder | None = None
    body_sent: int = 0

    def cancel_try_timer(self) -> None:
        timer = self.try_timer
        if timer is not None:
            timer.cancel()
            self.try_timer = None

    def cancel_route_timer(self) -> None:
        timer = self.route_timer
        if timer is not None:
            timer.cancel()
            self.route_timer = None

    def keep(self, chunks: list[bytes]) -> None:
        """Remember body bytes sent, while they fit, so a retry can send them again."""
        kept = self.kept_body
        if kept is None:
            return
        for chunk in chunks:
            self.kept_size += len(chunk)
            if self.kept_size > RETRY_BUFFER:
                self.kept_body = None  # too big to replay: this request is not retried
                return
            kept.append(chunk)

    # A read-only mapping of lower-case header names to values (repeated fields joined
    # with ", "), for the router; decoded only if a route asks for a header.

    def _table(self) -> dict[str, str]:
        table = self.decoded
        if table is None:
            table = {}
            for name, value in self.headers:
                # Repeated fields are matched as the backend reads them: one list value.
                key = name.decode("latin-1").lower()
                text = value.decode("latin-1")
                table[key] = table[key] + ", " + text if key in table else text
            if self.host is not None:
                table.setdefault("host", self.host.decode("latin-1"))
            if self.forwarded:
                for name, values in self.forwarded.items():
                    table.setdefault(name.decode("latin-1"), values[0].decode("latin-1"))
            self.decoded = table
        return table

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._table().get(name, default)

    def __getitem__(self, name: str) -> str:
        return self._table()[name]

    def __contains__(self, name: object) -> bool:
        return name in self._table()


class ClientConnection(asyncio.Protocol):
    """One client connection on a reverse-proxy listener."""

    def __init__(self, context: ProxyContext) -> None:
        self.context = context
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer = ""
        self.parsing: Request | None = None
        self.current: Request | None = None
        self.waiting: deque[Request] = deque()
        self.upstream: UpstreamConnection | None = None
        self.close_after = False
        self.paused_for_body = False
        self.tunnel = False
        # A gRPC call over HTTP/2 (set by the stream's owner, a connection that carries
        # one request): the loop time its client's grpc-timeout runs out (inf without
        # one). None on every other connection.
        self.grpc_deadline: float | None = None
        self.batch: list[bytes] | None = None
        self.forwarded_key: bytes | None = None
        self.host_bytes: bytes | None = b"\x00"
        self.host_text = ""
        self.forwarded_lines = b""
        self.last_activity = time.monotonic()
        self.closed = False
        self.lines = http1.LineCheck()  # runs of spaces in request lines

    # --- output -------------------------------------------------------------------------------

    def end_batch(self) -> None:
        batch = self.batch
        self.batch = None
        if batch:
            self.flush(batch)

    def flush(self, batch: list[bytes]) -> None:
        if self.transport is not None:
            write_batch(self.transport, batch)

    def _write(self, data: bytes) -> None:
        batch = self.batch
        if batch is not None:
            batch.append(data)
        elif self.transport is not None:
            self.transport.write(data)

    def _close(self) -> None:
        self.end_batch()
        if self.transport is not None:
            self.transport.close()

    def _close_lingering(self) -> None:
        """Close after an answer the client may not have read while it is still sending
        (an error, or an answer before the end of its body): `linger.start`."""
        self.end_batch()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.tunnel:
            transport.close()
            return
        lingering = linger.start(transport)
        if lingering is None:
            return
        self.tunnel = True  # data_received hands what comes to the Linger (no upstream)
        self.linger = lingering
        self.parsing = None
        if self.paused_for_body:
            self.paused_for_body = False
            transport.resume_reading()

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else ""
        ssl_object = transport.get_extra_info("ssl_object")
        self.server_name: str | None = getattr(ssl_object, "kanal_server_name", None)  # set by tls.py
        context = self.context
        context.clients.add(self)  # (connection caps pause accepting: acceptor.py)
        if (ssl_object is not None and context.http2 is not None
                and ssl_object.selected_alpn_protocol() == "h2"):
            context.http2(self, transport, b"")

    def data_received(self, data: bytes) -> None:
        if self.tunnel:  # (or lingering after an error answer: see _close_lingering)
            upstream = self.upstream
            if upstream is not None:
                upstream.write(data)
            elif self.linger is not None:
                self.linger.received(data)
            return
        self.last_activity = time.monotonic()
        if self.deferred_error is not None:
            return  # the parser stopped at a malformed request; answers before it go out
        parsing = self.parsing
        lines = self.lines
        if lines.read(data, parsing is None):
            self._parse_failed(400, http1.SPACED_LINE)
            return
        head_open = parsing is not None and not parsing.method
        heads_before = self.heads_seen
        if head_open or len(data) > MAX_HEAD // 4:
            # A head spread over reads, or a big read that may hold a big head: count
            # each header's size exactly from now on, on this connection.
            self.strict_head = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            offset = upgrade.args[0] if upgrade.args else len(data)
            self._client_upgrade(data[offset:])
            return
        except httptools.HttpParserError as exc:
            lines.read_over()
            if (self.heads_seen == 0 and self.context.http2 is not None and self.transport is not None
                    and self.context.http2(self, self.transport, data)):
                return  # the h2c preface: the connection speaks HTTP/2 from now on
            refused = self.refused
            self.refused = None
            status, reason = refused if refused is not None else (400, f"malformed request: {exc}")
            self._parse_failed(status, reason)
            return
        lines.read_over()
        after = self.parsing
        if after is not None and not after.method and after.line_unchecked:
            if lines.goes_on(data, self.parser.get_method(), after.target):
                self._parse_failed(400, http1.SPACED_LINE)
                return
        if (after is not None and not after.method and self.heads_seen == heads_before
                and (after is parsing or parsing is None)):
            # The read held nothing but an unfinished head: bound the bytes it has taken
            # (431), whatever pieces it comes in (llhttp holds a header's pieces until
            # its line ends).
            after.head_size += len(data)
            if after.head_size > MAX_HEAD + MAX_TARGET:
                self._parse_failed(431, f"request head larger than {MAX_HEAD} bytes")

    def _parse_failed(self, status: int, reason: str) -> None:
        """The parser met a request it cannot take: answer every request before it, then
        this error, then close (nothing after it is read)."""
        self.parsing = None
        current = self.current
        if current is not None and not current.complete:
            # The current request's own body is malformed: it cannot be finished.
            if current.response_started:
                self._abort()
            else:
                self._fail_request(status, reason, close=True)
            return
        if current is None:
            request = Request()
            request.complete = True
            self.parsing = request
            self._fail_request(status, reason, close=True)
            return
        self.deferred_error = (status, reason)
        if self.transport is not None and not self.paused_for_body:
            self.transport.pause_reading()
            self.paused_for_body = True

    def _answer_deferred_error(self) -> None:
        """Every request before a malformed one is answered: now answer it, and close."""
        assert self.deferred_error is not None
        status, reason = self.deferred_error
        request = Request()
        request.complete = True
        self.parsing = request
        self._fail_request(status, reason, close=True)

    def sweep(self, now: float) -> None:
        """Close the connection if it idled past the keep-alive time, or answer 408 if it
        stalled in a head or a body.

        A head's time counts from its first byte: trickling bytes (slowloris) does not
        extend it. A body's counts from its last byte.
        """
        current = self.current
        if self.tunnel or self.transport is None:
            return
        if current is not None:
            timeout = self.context.body_idle_timeout
            if (not current.complete and not self.paused_for_body and not current.response_started
                    and now - self.last_activity > timeout):
                # The client stopped sending its body (not paused by us): answer, close.
                self._fail_request(408, f"request body stalled for {timeout:g}s", close=True)
            return
        parsing = self.parsing
        if parsing is not None:
            timeout = self.context.head_timeout
            if now - parsing.started > timeout:
                self._fail_request(
                    408, f"request head not received within {timeout:g}s", close=True)
        elif now - self.last_activity > KEEPALIVE_TIMEOUT:
            self.transport.close()

    def close_if_idle(self) -> bool:
        """Close the connection unless an exchange is under way; True when it was idle."""
        if self.current is None:
            if self.transport is not None:
                self.transport.close()
            return True
        return False

    def _refuse_head(self, status: int, reason: str) -> None:
        """Stop parsing a request head that is too large; data_received answers `status`."""
        self.refused = (status, reason)
        raise httptools.HttpParserError(reason)

    def eof_received(self) -> bool | None:
        if self.tunnel and self.upstream is not None:
            transport = self.upstream.transport
            if transport is not None and transport.can_write_eof():
                transport.write_eof()
                return True
        if self.current is not None and self.current.complete:
            # Half-close after a complete request: answer it, then close.
            self.close_after = True
            return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.context.clients.discard(self)
        if self.linger is not None:
            self.linger.cancel()
        upstream = self.upstream
        self.upstream = None
        request = self.current
        if request is not None:
            if self.context.observing and not self.tunnel:
                # The client left mid-exchange: logged with what it was sent (0: nothing).
                self._observed(request, upstream.status
                               if upstream is not None and request.response_started else 0)
            if upstream is not None:
                # The answer can no longer be delivered: the connection is mid-exchange.
                upstream.abort()
            self._finish_endpoint(request, None)
            self._exchange_over(request)
        elif upstream is not None:
            upstream.abort()
        self.current = None
        self.waiting.clear()

    def pause_writing(self) -> None:
        upstream = self.upstream
        if upstream is not None:
            upstream.pause_answers()  # (resumed when released to the pool, if not before)

    def resume_writing(self) -> None:
        upstream = self.upstream
        if upstream is not None:
            upstream.resume_answers()

    # --- httptools callbacks (request) ------------------------------------------------------

    def on_message_begin(self) -> None:
        request = Request()
        # The read holding the message's start set it (a mesh request's forward proxy
        # sets it before calling here): one clock read fewer per request.
        request.started = self.last_activity
        request.line_unchecked = self.lines.begin()
        self.parsing = request

    def on_url(self, url: bytes) -> None:
        request = self.parsing
        if request is not None:
            request.target += url
            if len(request.target) > MAX_TARGET:
                self._refuse_head(414, f"request target longer than {MAX_TARGET} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self.parsing
        if request is None:
            return
        if self.strict_head:
            request.head_size += len(name) + len(value) + 4
            if request.head_size > MAX_HEAD:
                self._refuse_head(431, f"request headers larger than {MAX_HEAD} bytes")
        lower = name.lower()
        if lower not in _SPECIAL_REQUEST_HEADERS:
            if http1.UNDERSCORE in name:
                # CGI-style backends read X_Forwarded_For as X-Forwarded-For: drop it,
                # as Envoy's headers_with_underscores_action DROP_HEADER does.
                self.context.metrics.count_event("header_with_underscore_dropped", "")
                return
            if lower in http1.SINGLETON_HEADERS:
                seen = request.singletons
                if seen is None:
                    request.singletons = {lower}
                elif lower in seen:
                    self._refuse_head(400, f"more than one {name.decode('latin-1')} header")
                else:
                    seen.add(lower)
            request.headers.append((name, value))
            return
        if lower == b"host":
            if request.host is not None:
                self._refuse_head(400, "more than one Host header")
            request.host = value
        elif lower == b"cookie":
            request.cookie = value if request.cookie is None else request.cookie + b"; " + value
        elif lower == b"content-length":
            request.content_length = value
            return
        elif lower == b"transfer-encoding":
            problem = http1.transfer_coding_problem(value)
            if problem is not None:
                self._refuse_head(400, problem)
            request.chunked = True
            return
        elif lower == b"expect":
            if value.lower() == b"100-continue":
                request.expect_continue = True
            return
        elif lower in hdrs.FORWARDING:
            if request.forwarded is None:
                request.forwarded = {}
            request.forwarded.setdefault(lower, []).append(value)
            return
        else:  # hop-by-hop: stops here, but `Connection` also names others that do
            if lower == b"connection":
                tokens = http1.nominated(value)
                if tokens:
                    request.connection_named = (request.connection_named or set()) | tokens
            elif lower == b"upgrade":
                request.upgrade_value = value
            return
        request.headers.append((name, value))

    def on_headers_complete(self) -> None:
        request = self.parsing
        if request is None:
            return
        self.heads_seen += 1
        if len(request.headers) > MAX_HEADERS:
            self._refuse_head(431, f"more than {MAX_HEADERS} request headers")
        parser = self.parser
        version = "1.1" if not request.line_unchecked and self.lines.version_11() \
            else parser.get_http_version()
        if version != "1.1":
            refused = http1.version_problem(version)
            if refused is not None:
                self._refuse_head(*refused)
        method = parser.get_method()
        if request.line_unchecked and self.lines.spaced_at_head(method, request.target):
            self._refuse_head(400, http1.SPACED_LINE)
        problem = http1.target_problem(method, request.target, self.context.scheme)
        host = request.host
        if problem is None and host is not None and host != self.checked_host:
            # Keep-alive clients repeat their Host: check each new value once.
            problem = http1.host_problem(host)
            if problem is None:
                self.checked_host = host
        if problem is not None:
            self._refuse_head(400, problem)
        request.method = method
        request.http11 = version == "1.1"
        request.keep_alive = parser.should_keep_alive()
        request.upgrade = parser.should_upgrade()
        if request.upgrade and method != b"CONNECT":  # llhttp counts CONNECT as one
            self._check_upgrade(request)
        if self.current is not None:
            # Pipelined behind an exchange in progress: wait for it.
            self.waiting.append(request)
            if self.transport is not None and not self.paused_for_body:
                self.transport.pause_reading()
                self.paused_for_body = True
            return
        self._begin(request)

    def begin_parsed(self, request: Request) -> None:
        """Serve a request whose head another listener parsed and checked (the forward
        proxy's mesh requests) as if its head had just been parsed here. It was built by
        this connection's own `on_message_begin`, `on_url` and `on_header`; the rest of
        its body follows through `on_body` and `on_message_complete`."""
        self._begin(request)

    def _check_upgrade(self, request: Request) -> None:
        """Only a valid WebSocket opening handshake may become a tunnel."""
        key = version = None
        for name, value in request.headers:
            lower = name.lower()
            if lower == b"sec-websocket-key":
                key = value
            elif lower == b"sec-websocket-version":
                version = value
        problem = http1.websocket_problem(request.method, request.http11, request.upgrade_value,
                                          key, version)
        if problem is not None:
            self._refuse_head(400, problem)
        request.websocket_key = key

    def on_body(self, body: bytes) -> None:
        request = self.parsing
        if request is None:
            return
        request.received += len(body)
        exchange = request.filter_state
        if exchange is not None and exchange.copy is not None and request is self.current:
            exchange.copy.feed(body)  # a RequestMirror's copy of the body
        if request is self.current and request.request_sent and self.upstream is not None:
            if request.body_limit is not None:
                request.body_size += len(body)
                if request.body_size > request.body_limit:
                    self._body_too_large(request)
                    return
            self.upstream.write(b"%x\r\n%b\r\n" % (len(body), body) if request.chunked else body)
            if request.kept_body is not None:
                request.keep([body])
            return
        request.body.append(body)
        request.body_size += len(body)
        if (request.body_limit is not None and request is self.current
                and request.body_size > request.body_limit):
            self._body_too_large(request)
            return
        if request.body_size > MAX_BUFFERED_BODY and not self.paused_for_body:
            if self.transport is not None:
                self.transport.pause_reading()
                self.paused_for_body = True
        if request.body_waiter is not None and request is self.current:
            request.body_waiter()  # an access check waits for this body (external auth)

    def _body_too_large(self, request: Request) -> None:
        """A streamed body went past its rule's maxRequestBodySize: 413 if nothing was
        answered yet, else a visible cut."""
        if request.response_started:
            self._abort()
            return
        self._fail_request(413, f"request body larger than {request.body_limit} bytes "
                                f"(maxRequestBodySize of {request.route_key})", close=True)

    def on_message_complete(self) -> None:
        request = self.parsing
        if request is None:
            return
        request.complete = True
        self.parsing = None
        exchange = request.filter_state
        if exchange is not None and exchange.copy is not None and request is self.current:
            exchange.copy.complete()  # the RequestMirror copies go out
            exchange.copy = None
        if request is self.current and request.request_sent and self.upstream is not None:
            if request.chunked:
                self.upstream.write(_CHUNK_END)
        elif request.body_waiter is not None and request is self.current:
            request.body_waiter()  # the body an access check waits for is complete

    # --- one exchange ---------------------------------------------------------------------

    def _begin(self, request: Request) -> None:
        self.current = request
        context = self.context
        if context.request_ids is not None:
            request.request_id = context.request_ids.assign(request.headers, context.trusted_hops > 0)
        if context.tracing is not None:
            request.trace = context.tracing.begin(request.headers)
        if context.overloaded:
            context.metrics.overload_refused += 1
            self._fail_request(503, http1.OVERLOADED, close=True, overloaded=True)
            return
        config = context.config
        if config is None:
            self._fail_request(503, "no configuration applied yet")
            return
        if request.method == b"CONNECT":
            self._fail_request(405, "CONNECT is only served on the forward-proxy listener", close=True)
            return
        target = request.target
        host = request.host
        if target[:1] != b"/":
            if target == b"*" and request.method == b"OPTIONS":
                self._fail_request(404, "no route for OPTIONS *")
                return
            try:
                # Any: httptools' stub types the URL's parts as bytes, but a missing part
                # is None, and compiled code would trust the stub.
                url: Any = httptools.parse_url(target)
            except httptools.HttpParserInvalidURLError:
                self._fail_request(400, "malformed request target", close=True)
                return
            if url.host:
                host = url.host if url.port is None else b"%b:%d" % (url.host, url.port)
                request.host = host
                request.headers = [(n, v) for n, v in request.headers if n.lower() != b"host"]
                request.headers.append((b"Host", host))
            target = (url.path or b"/") + (b"?" + url.query if url.query else b"")
            request.target = target
        if host is None and request.http11:
            self._fail_request(400, "HTTP/1.1 request without Host", close=True)
            return
        path, _, query = target.partition(b"?")
        method_text = _METHOD_TEXT.get(request.method) or request.method.decode("latin-1")
        if host != self.host_bytes:
            self.host_bytes = host
            self.host_text = host.decode("latin-1") if host is not None else ""
        host_text = self.host_text
        selection = config.table.match(
            host_text, method_text, path.decode("latin-1"), query.decode("latin-1") if query else "",
            request,  # type: ignore[arg-type]  # a Mapping in all the router uses
        )
        if selection is None:
            self._fail_request(404, f"no route for host {host_text or '-'} path {path.decode('latin-1')}")
            return
        request.route_key = selection.route_key
        request.route_rule = selection.rule
        # (The rule's settings are read from the Selection: native copies.)
        if selection.tls is not None or context.scheme == "https":
            if self._tls_policy(request, selection.route, host_text):
                return
        filters = selection.filters
        if filters is not None:
            exchange = request.filter_state = filters.begin(request, scheme=context.scheme, peer=self.peer)
            if exchange.answer is not None:
                if not request.chunked and request.content_length in (None, b"0"):
                    request.complete = True  # no body follows: the connection stays open
                self._fail_request(exchange.answer.status, exchange.answer.reason, own=exchange.answer)
                return
        rule = selection.rule
        if request.upgrade and not selection.allow_websocket:
            self._fail_request(403, f"{selection.route_key}: WebSocket upgrades are not allowed "
                                    "on this rule", close=True)
            return
        if selection.aggregate is not None:
            # Answered by sub-requests, after the rule's access policy passed.
            request.aggregated = rule
            if selection.access is not None and access_gate.admit(self, request, selection.access):
                return
            self._access_passed(request)
            return
        limit = selection.max_request_body_size
        if limit is not None:
            request.body_limit = limit
            declared = request.content_length
            if (declared is not None and int(declared) > limit) or request.body_size > limit:
                self._fail_request(413, f"request body larger than {limit} bytes "
                                        f"(maxRequestBodySize of {selection.route_key})", close=True)
                return
        affinity_token = None
        affinity = selection.session_affinity
        if affinity is not None and request.cookie is not None:
            affinity_token = cookie_value(request.cookie, affinity.cookie_name)
        backend, set_token = selection.split.choose(affinity_token)
        if backend is None:
            self._fail_request(503, f"route {selection.route_key} has no backend with weight above 0")
            return
        request.upstream_key = backend
        if filters is not None:
            filters.backend_chosen(exchange, request, backend)
        upstream = config.upstreams.get(backend)
        if upstream is None:
            self._fail_request(503, f"upstream {backend} does not exist")
            return
        request.upstream_runtime = upstream
        if selection.grpc_transcoder is not None:
            request.transcoded = rule  # answered by transcoding, once the policy passed
        if set_token is not None and affinity is not None:
            request.set_cookie = selection.split.set_cookie_header(set_token).encode("latin-1")
        if upstream.hashed:
            request.hash_key = upstream.hash_key(request, self.peer)
        retries = selection.retries
        if retries is not None:
            # (A request without a policy keeps the resting values: nothing to set.)
            request.retries = retries
            request.attempts_left = retries.attempts
            if retries.attempts and not request.upgrade:
                request.kept_body = []
        timeout = selection.timeout
        if timeout:
            request.route_timer = asyncio.get_running_loop().call_later(timeout, self._timed_out, timeout)
        if selection.cache is not None:
            request.cache_selection = selection  # consulted once the access policy passed
        if selection.access is not None and access_gate.admit(self, request, selection.access):
            return  # refused, or waiting for the policy (_access_passed goes on)
        self._access_passed(request)

    def _access_passed(self, request: Request) -> None:
        """The request may go on (no policy, or its policy let it through, at once or
        after waiting): a cached rule looks in its cache first, never before its
        policy has passed."""
        aggregated = request.aggregated
        if aggregated is not None:
            request.aggregated = None
            config = self.context.config
            assert config is not None
            exchange = request.filter_state
            aggregate_begin(self, request, aggregated, config,
                            exchange.part_headers if exchange is not None else None)
            return
        selection = request.cache_selection
        if selection is not None:
            request.cache_selection = None
            if cache.begin(self, request, selection):
                return  # answered from the cache, or waiting for a fill of the same key
        self._send_upstream(request)

    def _send_upstream(self, request: Request) -> None:
        """Render the request's head, start its mirrors, send it to an endpoint."""
        context = self.context
        config = context.config
        assert config is not None
        request.upstream_head = self._request_head(request, config)
        exchange = request.filter_state
        if exchange is not None and exchange.mirrors and not request.upgrade:
            # Only requests that passed their policies are copied.
            exchange.copy = mirror.start(
                context, config, exchange.mirrors, request.upstream_head, body=request.body,
                complete=request.complete, chunked=request.chunked,
                head_only=request.method == b"HEAD")
        if request.expect_continue and not request.complete and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        rule = request.transcoded
        if rule is not None:
            request.transcoded = None
            assert request.upstream_runtime is not None
            transcode_begin(self, request, rule, request.upstream_runtime)
            return
        self._attempt(request, None)

    def _attempt(self, request: Request, exclude: EndpointState | None) -> None:
        """Send the request to one endpoint of the chosen upstream."""
        upstream = request.upstream_runtime
        assert upstream is not None
        state = upstream.balancer.pick(request.hash_key, exclude)
        if state is not None and state.breaker is not None and state.breaker.state != "closed":
            # Half-open: this request is its probe if a probe is free, else pick another.
            if not upstream.acquire(state):
                state = upstream.pick(request.hash_key, state)
        if state is None:
            if request.last_failure is not None:
                self._fail_request(*request.last_failure)
            else:
                self._fail_request(503, f"upstream {upstream.key} has no available endpoints "
                                        "(every endpoint is unhealthy or its circuit is open)")
            return
        state.active += 1
        request.endpoint_state = state
        request.tried = state
        request.attempt_started = time.monotonic()
        retries = request.retries
        if retries is not None and retries.per_try_timeout:
            request.try_timer = asyncio.get_running_loop().call_later(
                retries.per_try_timeout, self._try_timed_out, retries.per_try_timeout
            )
        pool = upstream.pools[state.key]
        conn = pool.take_idle() if not request.upgrade else None
        if conn is not None:
            self._send(conn, request, request.attempt_started)
            return
        settings = upstream.spec.circuit_breaker
        admission = upstream.limits.admit(settings.max_connections, settings.max_pending_requests)
        if admission == "refuse":
            self._finish_endpoint(request, None)
            upstream.metrics.count_event("overload", upstream.key)
            self._fail_request(
                503, f"upstream {upstream.key} is overloaded: {settings.max_connections} "
                     f"connections busy and {settings.max_pending_requests} requests waiting",
                overloaded=True)
            return
        if admission == "wait":
            upstream.limits.wait(lambda: self._resume(request, pool))
            return
        self.context.spawn(self._connect_and_send(pool, request))

    def _resume(self, request: Request, pool: EndpointPool) -> None:
        """A connection of the upstream freed up while this request waited for one."""
        if self.current is not request or self.closed or self.upstream is not None:
            if request.upstream_runtime is not None:
                request.upstream_runtime.limits.wake_one()
            return
        conn = pool.take_idle()
        if conn is not None:
            self._send(conn, request)
            return
        upstream = request.upstream_runtime
        assert upstream is not None
        # It waited already: it keeps its place at the head of the queue.
        if upstream.limits.admit(upstream.spec.circuit_breaker.max_connections, 0) != "connect":
            upstream.limits.wait(lambda: self._resume(request, pool), first=True)
            return
        self.context.spawn(self._connect_and_send(pool, request))

    async def _connect_and_send(self, pool: EndpointPool, request: Request) -> None:
        try:
            conn = await pool.connect()
        except UpstreamConnectError as exc:
            if self.current is request and not self.closed and self.upstream is None:
                self._attempt_failed("connect-failure", False, 502,
                                     f"upstream {request.upstream_key}: {exc}")
            return
        if self.current is not request or self.closed or self.upstream is not None:
            conn.release()
            return
        self._send(conn, request)

    def _send(self, conn: UpstreamConnection, request: Request, now: float = 0.0) -> None:
        """`now`: the clock read when this try began, if that is this moment."""
        self.upstream = conn
        head = request.upstream_head
        if self.grpc_deadline is not None:
            head = _with_grpc_timeout(request, head, self.grpc_deadline)
        conn.start(self, head, request.method == b"HEAD", now)
        request.request_sent = True
        chunks: list[bytes] = []
        if request.is_retry and request.kept_body:
            chunks.extend(request.kept_body)  # what the failed try had sent
        if request.body:
            fresh = request.body  # what arrived while no connection was ready
            request.body = []
            request.body_size = 0
            request.keep(fresh)
            chunks.extend(fresh)
        if chunks:
            if request.chunked:
                conn.write(b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in chunks))
            else:
                conn.write(b"".join(chunks))
        if request.complete and request.chunked:
            conn.write(_CHUNK_END)
        if self.paused_for_body and not self.waiting and self.transport is not None:
            self.paused_for_body = False
            self.transport.resume_reading()

    def _attempt_failed(self, condition: str, reached: bool, status: int, reason: str) -> None:
        """One try failed before any answer reached the client: retry it, or answer."""
        request = self.current
        if request is None:
            return
        failed = request.endpoint_state
        self._finish_endpoint(request, False, refused=condition == "connect-failure")
        request.cancel_try_timer()
        self.upstream = None
        request.last_failure = (status, reason)
        if self._may_retry(request, condition, reached):
            upstream = request.upstream_runtime
            assert upstream is not None
            upstream.metrics.count_event("retry", upstream.key)
            upstream.metrics.count_retry(request.route_key, upstream.key)
            request.retried += 1
            if request.trace is not None and self.context.tracing is not None:
                request.upstream_head = self.context.tracing.retry(
                    request.trace, request.upstream_head, started=request.attempt_started,
                    upstream=upstream.key, endpoint=failed.key if failed is not None else "",
                    condition=condition)
            if not request.is_retry:
                request.is_retry = True
                upstream.limits.active_retries += 1
            log.debug("retrying %s %s after %s: %s", request.method.decode("latin-1"),
                      request.target.decode("latin-1"), condition, reason)
            self._attempt(request, failed)
            return
        self._fail_request(status, reason)

    def _may_retry(self, request: Request, condition: str, reached: bool) -> bool:
        upstream = request.upstream_runtime
        if upstream is None or request.response_started or request.upgrade or self.closed:
            return False
        failure = FailedTry(condition, reached, request.method,
                            request.chunked or request.content_length not in (None, b"0"),
                            request.kept_body is not None)
        budget_allows = upstream.retry_allowed()
        kind = retry_kind(failure, request.retries, endpoints=len(upstream.states),
                          implicit_used=request.implicit_used, attempts_left=request.attempts_left,
                          already_retrying=request.is_retry, budget_allows=budget_allows)
        if kind == "implicit":
            request.implicit_used += 1
            return True
        if kind is None:
            return False
        if not budget_allows:
            upstream.metrics.count_event("retry_budget_exhausted", upstream.key)
            return False
        request.attempts_left -= 1
        return True

    def _try_timed_out(self, timeout: float) -> None:
        request = self.current
        if request is None:
            return
        request.try_timer = None
        if request.response_started:
            return
        conn = self.upstream
        self.upstream = None
        if conn is not None:
            conn.abort()
        self._attempt_failed("timeout", True, 504,
                             f"upstream {request.upstream_key} did not answer within {timeout:g}s (per try)")

    def _tls_policy(self, request: Request, route: Route, host_text: str) -> bool:
        """HTTPS redirects, HSTS and misdirected requests; True when already answered."""
        context = self.context
        misdirected = context.misdirected
        answer = tls_answer(
            scheme=context.scheme, route_key=route.key, tls=route.tls, host=host_text,
            target=request.target, https_port=context.https_port,
            misdirected=misdirected is not None and misdirected(self.server_name, host_text),
            server_name=self.server_name)
        if answer is not None:
            self._fail_request(answer.status, answer.reason, location=answer.location)
            return True
        if context.scheme == "https":
            request.hsts = hsts_value(route.tls)
        return False

    def _request_head(self, request: Request, config: Config) -> bytes:
        headers = request.headers
        named = request.connection_named
        if named:
            headers = [(name, value) for name, value in headers if name.lower() not in named]
        # One join of flat parts: no bytes built per header line.
        parts = [request.method, b" ", request.target, b" HTTP/1.1\r\n"]
        if request.host is None:
            # An HTTP/1.0 client may send no Host; the upstream leg is HTTP/1.1 and needs one.
            upstream = request.upstream_runtime
            authority = upstream.states[0].key if upstream is not None and upstream.states else "localhost"
            parts += (b"Host: ", authority.encode("latin-1"), b"\r\n")
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if request.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        elif request.content_length is not None:
            parts += (b"Content-Length: ", request.content_length, b"\r\n")
        if request.upgrade:
            parts += (b"Connection: Upgrade\r\nUpgrade: ", request.upgrade_value or b"websocket",
                      b"\r\n")
        parts.append(self._forwarding_lines(request))
        return b"".join(parts)

    def _forwarding_lines(self, request: Request) -> bytes:
        """The X-Forwarded-*, X-Real-IP and Forwarded lines, ending the head.

        When nothing the client sent is used (no trusted hops, or no such headers),
        they depend only on the peer and the Host, so a keep-alive connection computes
        them once.
        """
        context = self.context
        cacheable = context.trusted_hops <= 0 or request.forwarded is None
        if cacheable and self.forwarded_key == request.host and self.forwarded_lines:
            return self.forwarded_lines
        forwarded = hdrs.forwarded_for(
            peer=self.peer,
            scheme=context.scheme,
            host=request.host,
            received=request.forwarded or {},
            trusted_hops=context.trusted_hops,
        )
        lines = [b"X-Forwarded-For: " + forwarded.x_forwarded_for,
                 b"X-Forwarded-Proto: " + forwarded.x_forwarded_proto]
        if forwarded.x_forwarded_host:
            lines.append(b"X-Forwarded-Host: " + forwarded.x_forwarded_host)
        lines.append(b"X-Real-IP: " + forwarded.client.encode("latin-1"))
        lines.append(b"Forwarded: " + forwarded.forwarded)
        lines.append(b"\r\n")
        text = b"\r\n".join(lines)
        if cacheable:
            self.forwarded_key = request.host
            self.forwarded_lines = text
        return text

    # --- the upstream's answer (ResponseSink) -------------------------------------------------

    def response_head(self, conn: UpstreamConnection) -> None:
        request = self.current
        if request is None or self.transport is None:
            conn.abort()
            return
        status = conn.status
        if request.try_timer is not None:
            request.cancel_try_timer()
        if status >= 500 or conn.grpc_status:
            condition = str(status) if status >= 500 else conn.grpc_status
            if request.retries is not None and self._may_retry(request, condition, True):
                # Retried: this answer is dropped, and so is its connection.
                request.attempts_left += 1  # _attempt_failed counts it again
                conn.sink = None
                conn.abort()
                self.upstream = None
                self._attempt_failed(condition, True, status if status >= 500 else 502,
                                     f"upstream answered {condition}")
                return
            self._finish_endpoint(request, status < 500, now=conn.last_activity)
        else:
            self._finish_endpoint(request, True, now=conn.last_activity)
        if request.cache_exchange is not None and cache.head(self, request, conn):
            return  # the cache answered (a revalidated or stale entry)
        headers = conn.headers
        if conn.connection_named:
            named = conn.connection_named
            headers = [(name, value) for name, value in headers if name.lower() not in named]
        if request.request_id is not None:  # the client sees the id the backend was given
            headers = [*without_request_id(headers), (REQUEST_ID, request.request_id)]
        no_body = conn.no_body or request.method == b"HEAD"
        conn.no_body = no_body
        length = conn.content_length
        exchange = request.filter_state
        if exchange is not None:
            headers, length, request.encoder = exchange.response_head(
                status, headers, length, no_body=no_body, chunked_ok=request.http11)
        # After an answer that refuses an upgrade, the client may already be speaking
        # the new protocol: nothing more on this connection can be read as HTTP.
        close = not request.keep_alive or self.close_after or request.upgrade
        lines = [status_line(status)]
        for name, value in headers:
            lines.append(name + b": " + value)
        if length is not None and not conn.chunked:
            lines.append(b"Content-Length: " + length)
        elif no_body:
            pass
        elif request.http11:
            lines.append(b"Transfer-Encoding: chunked")
            request.response_chunked = True
        else:
            close = True
        if request.set_cookie is not None:
            lines.append(b"Set-Cookie: " + request.set_cookie)
        if request.hsts is not None:
            lines.append(b"Strict-Transport-Security: " + request.hsts)
        if request.access_headers is not None:
            lines.append(request.access_headers)  # set by an access policy (RateLimit)
        if not request.complete:
            # The client is still sending a body the upstream did not wait for; the
            # connection cannot be reused for another request once this one ends.
            close = True
        if close:
            lines.append(b"Connection: close")
        elif not request.http11:
            lines.append(b"Connection: keep-alive")
        request.response_close = close
        lines.append(b"\r\n")
        request.response_started = True
        self._write(b"\r\n".join(lines))

    def response_body(self, chunk: bytes) -> None:
        request = self.current
        if request is None:
            return
        if request.cache_exchange is not None and cache.body(request, chunk):
            return
        if request.response_chunked:
            if request.encoder is not None:
                chunk = request.encoder.compress(chunk)
                if not chunk:
                    return
            request.body_sent += len(chunk)
            self._write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            request.body_sent += len(chunk)
            self._write(chunk)

    def response_done(self, conn: UpstreamConnection) -> None:
        request = self.current
        if request is None:
            conn.abort()
            return
        if request.cache_exchange is not None and cache.done(self, request, conn):
            return
        if request.response_chunked:
            if request.encoder is not None:
                tail = request.encoder.finish()
                request.encoder = None
                if tail:
                    request.body_sent += len(tail)
                    self._write(b"%x\r\n%b\r\n" % (len(tail), tail))
            trailers = conn.trailers  # an HTTP/2 upstream's (gRPC status): after the last chunk
            self._write(_CHUNK_END if trailers is None else
                        b"0\r\n%b\r\n" % b"".join(n + b": " + v + b"\r\n" for n, v in trailers))
        # The answer is complete: send it before the bookkeeping below (pool, breaker,
        # metrics, the next pipelined request), which the client need not wait for.
        self.end_batch()
        self.upstream = None
        if request.complete:
            conn.release()
        else:
            conn.close()
        self._end_exchange(conn.status)

    def upstream_failed(self, conn: UpstreamConnection, reason: str, exc: BaseException | None) -> None:
        request = self.current
        if request is None:
            self.upstream = None
            return
        if request.cache_exchange is not None and cache.upstream_failed(self, request):
            return  # the client had its answer from the cache
        self.upstream = None
        if request.response_started:
            # Mid-answer: the client must see the answer cut off, never a clean end.
            self._record(request, 502)
            self._abort()
            return
        if (
            conn.requests > 1
            and not conn.got_bytes
            and not isinstance(exc, TimeoutError)
            and not request.upgrade
            and (request.kept_body is not None or not (
                request.chunked or request.content_length not in (None, b"0")))
            and not request.resent_stale
        ):
            # A pooled connection the server had closed while it sat idle: the request
            # never reached the application (no byte came back), so send it again on a
            # new connection to the same endpoint. Not a failure of the endpoint.
            request.resent_stale = True
            request.is_retry = request.is_retry or bool(request.kept_body)
            self.context.spawn(self._connect_and_send(conn.pool, request))
            return
        if isinstance(exc, TimeoutError):
            self._attempt_failed("timeout", True, 504, f"upstream {request.upstream_key}: {reason}")
        else:
            self._attempt_failed("reset", True, 502, f"upstream {request.upstream_key}: {reason}")

    def upstream_upgraded(self, conn: UpstreamConnection, rest: bytes) -> None:
        transport = self.transport
        request = self.current
        if transport is None or request is None:
            conn.abort()
            return
        problem = _switch_problem(request, conn)
        if problem is not None:
            # No tunnel: nothing the client sends next may reach the backend unparsed.
            conn.abort()
            self.upstream = None
            self._finish_endpoint(request, False)
            self._fail_request(502, f"upstream {request.upstream_key}: {problem}", close=True)
            return
        status = conn.status
        lines = [b"HTTP/1.1 %d Switching Protocols" % status]
        for name, value in conn.headers:
            lines.append(name + b": " + value)
        lines.append(b"Connection: Upgrade")
        lines.append(b"Upgrade: " + (conn.upgrade_value or b"websocket"))
        lines.append(b"\r\n")
        transport.write(b"\r\n".join(lines))
        if rest:
            transport.write(rest)
        self.tunnel = True
        conn.tunnel = transport
        conn.sink = None
        self._finish_endpoint(request, True)
        self._record(request, status)
        request.cancel_route_timer()
        buffered = request.body
        request.body = []
        for chunk in buffered:
            conn.write(chunk)
        if self.paused_for_body:
            self.paused_for_body = False
            transport.resume_reading()

    def upstream_pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def upstream_resume_writing(self) -> None:
        if self.transport is not None and not self.paused_for_body:
            self.transport.resume_reading()

    # --- endings ------------------------------------------------------------------------------

    def _client_upgrade(self, rest: bytes) -> None:
        """The client asked to switch protocols; bytes after its head wait for the answer."""
        request = self.current
        if request is None:
            return
        request.complete = True
        self.parsing = None
        if rest:
            if request.request_sent and self.upstream is not None and self.tunnel:
                self.upstream.write(rest)
            else:
                request.body.append(rest)
        # Nothing more is parsed as HTTP on this connection: pause until the upstream answers.
        if self.transport is not None and not self.tunnel:
            self.transport.pause_reading()
            self.paused_for_body = True

    def _finish_endpoint(self, request: Request, ok: bool | None, *, refused: bool = False,
                         now: float = 0.0) -> None:
        """The request's try is over: count it off the endpoint, and tell its breaker.
        `now`: the clock already read for this moment (an answer's read), if any."""
        state = request.endpoint_state
        if state is not None:
            state.active -= 1
            request.endpoint_state = None
            breaker = state.breaker
            if not now:
                now = time.monotonic()
            if ok and breaker is not None and breaker.count_success(
                    now, now - request.attempt_started):
                return  # the common case: a success of a closed circuit, counted
            upstream = request.upstream_runtime
            if upstream is not None:
                upstream.report(state, ok, now - request.attempt_started, refused=refused)

    def _end_exchange(self, status: int) -> None:
        request = self.current
        assert request is not None
        self._record(request, status)
        if request.route_timer is not None:
            request.cancel_route_timer()
        if (request.try_timer is not None or request.retries is not None
                or request.last_failure is not None):
            self._exchange_over(request)
        self.current = None
        transport = self.transport
        if transport is None:
            return
        if not request.complete:
            self._close_lingering()  # answered before the end of its body
            return
        if request.response_close or self.close_after:
            self._close()
            return
        if self.waiting:
            following = self.waiting.popleft()
            if (not self.waiting and self.paused_for_body and self.deferred_error is None
                    and following.body_size <= MAX_BUFFERED_BODY):
                self.paused_for_body = False
                transport.resume_reading()
            self._begin(following)
        elif self.deferred_error is not None:
            self._answer_deferred_error()

    def _record(self, request: Request, status: int) -> None:
        if self.context.observing:
            self._observed(request, status)
        self.context.metrics.observe(
            request.route_key, request.upstream_key, status, time.monotonic() - request.started,
            request.received, request.body_sent,
        )
        if self.exchange_ended is not None:
            self.exchange_ended()  # (a forward proxy's mesh requests: it moves on)

    def _fail_request(
        self, status: int, reason: str, *, close: bool = False, location: bytes | None = None,
        overloaded: bool = False, extra_headers: bytes = b"", body: bytes | None = None,
        own: OwnAnswer | None = None,
    ) -> None:
        """Answer the current request with an error of the proxy's own."""
        request = self.current or self.parsing
        transport = self.transport
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.abort()
        if request is not None:
            self._finish_endpoint(request, None)
            self._exchange_over(request)
        if request is None or transport is None or transport.is_closing():
            if transport is not None:
                transport.close()
            return
        if status >= 500 or status == 404:
            log.debug("%s %s: %d %s", request.method.decode("latin-1") or "-",
                      request.target.decode("latin-1") or "-", status, reason)
        relayed = body is not None  # an answer relayed as its author sent it (external auth)
        body = f"kanal: {status} {reason}\n".encode() if body is None else body
        keep = not close and request.keep_alive and request.complete and not self.close_after
        extra = http1.RETRY_AFTER if status == 503 else b""
        if overloaded:
            extra += http1.OVERLOADED_LINE
        if location is not None:
            extra += b"Location: " + location + b"\r\n"
        cache_line = b""  # X-Cache, on a rule with a cache
        if request.cache_exchange is not None:
            outcome = cache.error(self, request, status)
            if outcome is None:
                return  # a stale entry answered instead (stale-if-error)
            cache_line = outcome
        elif self.current is request:
            cache_line = cache.not_asked(request.route_rule)  # answered before the cache was asked
            if cache_line:
                request.cache_outcome = cache.BYPASS  # (the access log's `cache` field)
        extra += cache_line
        rid = request.request_id
        if rid is not None:
            extra += REQUEST_ID + b": " + rid + b"\r\n"
        extra += extra_headers
        if own is not None:  # an answer a filter gives (redirect, direct response, preflight)
            data = own.encode(keep_alive=keep, head_only=request.method == b"HEAD")
            lines = (REQUEST_ID + b": " + rid + b"\r\n" if rid is not None else b"") + cache_line
            if lines:  # after the status line
                data = data.replace(b"\r\n", b"\r\n" + lines, 1)
            self._write(data)
            request.body_sent = 0 if request.method == b"HEAD" else len(own.body)
        else:
            head = (http1.relayed_head if relayed else http1.error_head)(
                status, len(body), keep_alive=keep, extra=extra)
            self._write(head + (b"" if request.method == b"HEAD" else body))
            request.body_sent = 0 if request.method == b"HEAD" else len(body)
        if self.current is request:
            self._record(request, status)
        elif self.context.observing:  # a request refused before it began
            self._observed(request, status)
        self.current = None
        if not keep:
            self._close_lingering()
            return
        if self.waiting:
            self._begin(self.waiting.popleft())
        elif self.deferred_error is not None:
            self._answer_deferred_error()
        elif self.paused_for_body:
            self.paused_for_body = False
            transport.resume_reading()

    def _timed_out(self, timeout: float) -> None:
        request = self.current
        if request is None:
            return
        request.route_timer = None
        if request.response_started:
            self._record(request, 504)
            self._abort()
            return
        self._finish_endpoint(request, False)
        self._fail_request(504, f"upstream {request.upstream_key} did not answer within {timeout:g}s"
                                " (the route's timeout, retries included)")

    def _exchange_over(self, request: Request) -> None:
        """Release what an exchange held outside itself: its timers, a cache fill and its
        share of the retry budget. (Its own state goes with it: the next request is a
        new object.)"""
        request.cancel_route_timer()
        request.cancel_try_timer()
        if request.cache_exchange is not None:
            cache.over(request)
        if request.is_retry:
            request.is_retry = False
            if request.upstream_runtime is not None:
                limits = request.upstream_runtime.limits
                limits.active_retries = max(limits.active_retries - 1, 0)

    def _abort(self) -> None:
        """Cut the client off visibly: a truncated answer must never look complete."""
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.abort()
        request = self.current
        if request is not None:
            self._finish_endpoint(request, None)
            self._exchange_over(request)
        self.current = None
        if self.transport is not None:
            reset_connection(self.transport)

    def _observed(self, request: Request, status: int) -> None:
        """The exchange is over: its access log line and its trace's spans."""
        context = self.context
        if context.access_log is not None:
            context.access_log.put(self._access_record(request, status))
        trace = request.trace
        if trace is not None and trace.sampled and context.tracing is not None:
            request.trace = None
            rule = request.route_rule
            tried = request.tried
            context.tracing.finish(
                trace, started=request.started,
                attempt_started=request.attempt_started if tried is not None else None,
                method=request.method, host=self.host_text if request.host is not None else "",
                target=request.target, http11=request.http11, status=status, peer=self.peer,
                route=request.route_key,
                rule=(rule.name if rule.name is not None else rule.index) if rule else "",
                upstream=request.upstream_key, endpoint=tried.key if tried is not None else "",
                retries=request.retried, request_id=request.request_id)

    def _access_record(self, request: Request, status: int) -> Record:
        """The access log's record of the current exchange (see logformat.FIELDS): values
        held now, formatted later by the writer thread."""
        now = time.monotonic()
        rule = request.route_rule
        tried = request.tried
        started = request.started
        exchange = request.cache_exchange  # (an answer from the store has already let it go)
        cached = request.cache_outcome or (exchange.outcome if exchange is not None else b"")
        return (
            time.time(), self.context.listener, self.peer, request.method,
            self.host_text if request.host is not None else "", request.target,
            "HTTP/1.1" if request.http11 else "HTTP/1.0", status, request.received,
            request.body_sent, now - started if started else 0.0,
            now - request.attempt_started if tried is not None and request.attempt_started else None,
            request.route_key, (rule.name if rule.name is not None else rule.index) if rule else "",
            request.upstream_key, tried.key if tried is not None else "", request.retried, cached,
            self.context.policy,
            request.request_id, request.trace.trace_id if request.trace is not None else None,
        )

    exchange_ended: Callable[[], None] | None = None
    linger: Linger | None = None  # a lingering close under way (see _close_lingering)
    refused: tuple[int, str] | None = None
    deferred_error: tuple[int, str] | None = None
    heads_seen: int = 0
    checked_host: bytes | None = None
    strict_head: bool = False

def _with_grpc_timeout(request: Request, head: bytes, deadline: float) -> bytes:
    """A gRPC call's head with the time this try has left as its `grpc-timeout`: the
    client's deadline, cut to the route's timeout and the per-try timeout (Envoy's
    max_grpc_timeout), so the server stops when the proxy stops waiting for it."""
    for timer in (request.route_timer, request.try_timer):
        if timer is not None:
            deadline = min(deadline, timer.when())
    if deadline == math.inf:
        return head
    return grpc_rules.with_timeout(head, deadline - asyncio.get_running_loop().time())


def _switch_problem(request: Request, conn: UpstreamConnection) -> str | None:
    """Why an upstream's 101 does not open a WebSocket tunnel, or None when it may."""
    if not request.upgrade or request.websocket_key is None:
        return "switched protocols without an upgrade request"
    if (conn.upgrade_value or b"").strip().lower() != b"websocket":
        return "switched to a protocol other than websocket"
    wanted = http1.websocket_accept(request.websocket_key)
    accepts = [value.strip() for name, value in conn.headers
               if name.lower() == b"sec-websocket-accept"]
    if accepts != [wanted]:
        return "101 without the matching Sec-WebSocket-Accept"
    return None


def reset_connection(transport: asyncio.BaseTransport) -> None:
    """Abort with a TCP reset (SO_LINGER 0), not a FIN: a close-delimited answer cut
    short must not look like a complete one to the client."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()  # type: ignore[attr-defined]

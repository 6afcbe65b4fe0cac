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
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

import httptools

from kanal.dataplane import headers as hdrs
from kanal.dataplane.pool import UpstreamConnection, UpstreamConnectError

if TYPE_CHECKING:
    from kanal.dataplane.runtime import Config, ProxyContext, UpstreamRuntime
    from kanal.dataplane.snapshot import Route

log = logging.getLogger("kanal.proxy")

MAX_BUFFERED_BODY = 256 * 1024
NO_BODY = b""
_CHUNK_END = b"0\r\n\r\n"

_SPECIAL_REQUEST_HEADERS = (
    hdrs.HOP_BY_HOP | hdrs.FORWARDING
    | {b"host", b"cookie", b"content-length", b"transfer-encoding", b"expect"}
)
_METHOD_TEXT = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}

REASONS = {
    308: b"Permanent Redirect", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
    408: b"Request Timeout", 413: b"Content Too Large", 421: b"Misdirected Request",
    500: b"Internal Server Error", 502: b"Bad Gateway", 503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


class Request:
    """What the parser learned of one request, and how far its exchange has come."""

    __slots__ = (
        "method", "target", "headers", "host", "http11", "keep_alive", "chunked",
        "content_length", "upgrade", "expect_continue", "complete", "body", "body_size",
        "started", "cookie", "forwarded", "connection_named", "upgrade_value", "decoded",
    )

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

    # A read-only mapping of lower-case header names to first values, for the router;
    # decoded only if a route asks for a header.

    def _table(self) -> dict[str, str]:
        table = self.decoded
        if table is None:
            table = {}
            for name, value in self.headers:
                table.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
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
        self.upstream_runtime: UpstreamRuntime | None = None
        self.route_key = ""
        self.upstream_key = ""
        self.response_chunked = False
        self.response_close = False
        self.response_started = False
        self.request_sent = False
        self.close_after = False
        self.paused_for_body = False
        self.tunnel = False
        self.timer: asyncio.TimerHandle | None = None
        self.batch: list[bytes] | None = None
        self.forwarded_key: bytes | None = None
        self.host_bytes: bytes | None = b"\x00"
        self.host_text = ""
        self.forwarded_lines = b""
        self.last_activity = time.monotonic()
        self.closed = False

    # --- output -------------------------------------------------------------------------------

    def begin_batch(self) -> None:
        """Collect writes until `end_batch`: a small answer leaves in one send."""
        self.batch = []

    def end_batch(self) -> None:
        batch = self.batch
        self.batch = None
        if batch and self.transport is not None:
            self.transport.write(batch[0] if len(batch) == 1 else b"".join(batch))

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

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else ""
        ssl_object = transport.get_extra_info("ssl_object")
        self.server_name: str | None = getattr(ssl_object, "kanal_server_name", None)  # set by tls.py
        self.context.clients.add(self)

    def data_received(self, data: bytes) -> None:
        if self.tunnel:
            upstream = self.upstream
            if upstream is not None:
                upstream.write(data)
            return
        self.last_activity = time.monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            offset = upgrade.args[0] if upgrade.args else len(data)
            self._client_upgrade(data[offset:])
        except httptools.HttpParserError as exc:
            if self.current is not None and self.response_started:
                self._abort()
            else:
                self._fail_request(400, f"malformed request: {exc}", close=True)

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
        self._cancel_timer()
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            # The answer can no longer be delivered: the connection is mid-exchange.
            upstream.abort()
        self.current = None
        self.waiting.clear()

    def pause_writing(self) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.resume_reading()

    # --- httptools callbacks (request) ------------------------------------------------------

    def on_message_begin(self) -> None:
        request = Request()
        request.started = time.monotonic()
        self.parsing = request

    def on_url(self, url: bytes) -> None:
        request = self.parsing
        if request is not None:
            request.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self.parsing
        if request is None:
            return
        lower = name.lower()
        if lower not in _SPECIAL_REQUEST_HEADERS:
            request.headers.append((name, value))
            return
        if lower == b"host":
            if request.host is not None:
                raise httptools.HttpParserError("more than one Host header")
            request.host = value
        elif lower == b"cookie":
            request.cookie = value if request.cookie is None else request.cookie + b"; " + value
        elif lower == b"content-length":
            request.content_length = value
            return
        elif lower == b"transfer-encoding":
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
                tokens = hdrs.connection_tokens(value) - hdrs.REQUEST_DROPPED
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
        parser = self.parser
        request.method = parser.get_method()
        request.http11 = parser.get_http_version() == "1.1"
        request.keep_alive = parser.should_keep_alive()
        request.upgrade = parser.should_upgrade()
        if self.current is not None:
            # Pipelined behind an exchange in progress: wait for it.
            self.waiting.append(request)
            if self.transport is not None and not self.paused_for_body:
                self.transport.pause_reading()
                self.paused_for_body = True
            return
        self._begin(request)

    def on_body(self, body: bytes) -> None:
        request = self.parsing
        if request is None:
            return
        if request is self.current and self.request_sent and self.upstream is not None:
            self.upstream.write(b"%x\r\n%b\r\n" % (len(body), body) if request.chunked else body)
            return
        request.body.append(body)
        request.body_size += len(body)
        if request.body_size > MAX_BUFFERED_BODY and not self.paused_for_body:
            if self.transport is not None:
                self.transport.pause_reading()
                self.paused_for_body = True

    def on_message_complete(self) -> None:
        request = self.parsing
        if request is None:
            return
        request.complete = True
        self.parsing = None
        if request is self.current and self.request_sent and self.upstream is not None:
            if request.chunked:
                self.upstream.write(_CHUNK_END)

    # --- one exchange ---------------------------------------------------------------------

    def _begin(self, request: Request) -> None:
        self.current = request
        self.response_started = False
        self.request_sent = False
        self.response_chunked = False
        self.response_close = False
        context = self.context
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
                url = httptools.parse_url(target)
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
            self.route_key = ""
            self._fail_request(404, f"no route for host {host_text or '-'} path {path.decode('latin-1')}")
            return
        self.route_key = selection.route_key
        self.hsts = None
        route_tls = selection.route.tls
        if route_tls is not None or context.scheme == "https":
            if self._tls_policy(request, selection.route, host_text, path):
                return
        cookie_value = None
        if selection.rule.session_affinity is not None and request.cookie is not None:
            cookie_value = _cookie(request.cookie, selection.rule.session_affinity.cookie_name)
        backend, set_token = selection.split.choose(cookie_value)
        if backend is None:
            self._fail_request(503, f"route {selection.route_key} has no backend with weight above 0")
            return
        self.upstream_key = backend
        upstream = config.upstreams.get(backend)
        if upstream is None:
            self._fail_request(503, f"upstream {backend} does not exist")
            return
        self.upstream_runtime = upstream
        self.set_cookie = None
        if set_token is not None and selection.rule.session_affinity is not None:
            self.set_cookie = selection.split.set_cookie_header(set_token).encode("latin-1")
        hash_key = upstream.hash_key(request, self.peer) if upstream.hashed else None
        state = upstream.balancer.pick(hash_key)
        if state is None:
            self._fail_request(503, f"upstream {backend} has no available endpoints")
            return
        timeout = selection.rule.timeout
        if timeout:
            self.timer = asyncio.get_running_loop().call_later(timeout, self._timed_out, timeout)
        head = self._request_head(request, config)
        pool = upstream.pools[state.key]
        if request.expect_continue and not request.complete and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        conn = pool.take_idle() if not request.upgrade else None
        state.active += 1
        self.endpoint_state = state
        if conn is not None:
            self._send(conn, request, head)
        else:
            context.spawn(self._connect_and_send(pool, request, head))

    async def _connect_and_send(self, pool: object, request: Request, head: bytes) -> None:
        from kanal.dataplane.pool import EndpointPool

        assert isinstance(pool, EndpointPool)
        try:
            conn = await pool.connect()
        except UpstreamConnectError as exc:
            if self.current is request and not self.closed:
                self._finish_endpoint()
                self._fail_request(502, f"upstream {self.upstream_key}: {exc}")
            return
        if self.current is not request or self.closed:
            conn.release()
            return
        self._send(conn, request, head)

    def _send(self, conn: UpstreamConnection, request: Request, head: bytes) -> None:
        self.upstream = conn
        self.sent_head = head
        no_body = request.method == b"HEAD"
        conn.start(self, head, no_body)
        self.request_sent = True
        if request.body:
            chunks = request.body
            request.body = []
            request.body_size = 0
            if request.chunked:
                conn.write(b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in chunks))
            else:
                conn.write(b"".join(chunks))
        if request.complete and request.chunked:
            conn.write(_CHUNK_END)
        if self.paused_for_body and not self.waiting and self.transport is not None:
            self.paused_for_body = False
            self.transport.resume_reading()

    def _tls_policy(self, request: Request, route: Route, host_text: str, path: bytes) -> bool:
        """HTTPS redirects, HSTS and misdirected requests; True when already answered."""
        context = self.context
        tls = route.tls
        if context.scheme == "https":
            misdirected = context.misdirected
            if misdirected is not None and misdirected(self.server_name, host_text):
                self._fail_request(
                    421, f"host {host_text} is not served by the certificate of this connection "
                         f"(TLS server name {self.server_name or '-'})")
                return True
            if tls is not None and tls.hsts is not None:
                value = b"max-age=%d" % tls.hsts.max_age
                if tls.hsts.include_sub_domains:
                    value += b"; includeSubDomains"
                self.hsts = value
            return False
        if tls is not None and tls.redirect_http and tls.cert_pem:
            host = host_text.rpartition(":")[0] if host_text.rpartition(":")[2].isdigit() else host_text
            if context.https_port not in (None, 443):
                host = f"{host}:{context.https_port}"
            location = f"https://{host}".encode("latin-1") + request.target
            self._fail_request(308, f"{route.key} is served over HTTPS: {location.decode('latin-1')}",
                               location=location)
            return True
        return False

    def _request_head(self, request: Request, config: Config) -> bytes:
        headers = request.headers
        named = request.connection_named
        if named:
            headers = [(name, value) for name, value in headers if name.lower() not in named]
        lines = [request.method + b" " + request.target + b" HTTP/1.1"]
        lines += [name + b": " + value for name, value in headers]
        if request.chunked:
            lines.append(b"Transfer-Encoding: chunked")
        elif request.content_length is not None:
            lines.append(b"Content-Length: " + request.content_length)
        if request.upgrade:
            lines.append(b"Connection: Upgrade")
            lines.append(b"Upgrade: " + (request.upgrade_value or b"websocket"))
        lines.append(self._forwarding_lines(request))
        return b"\r\n".join(lines)

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
        headers = conn.headers
        if conn.connection_named:
            named = conn.connection_named
            headers = [(name, value) for name, value in headers if name.lower() not in named]
        no_body = conn.no_body or request.method == b"HEAD"
        conn.no_body = no_body
        # After an answer that refuses an upgrade, the client may already be speaking
        # the new protocol: nothing more on this connection can be read as HTTP.
        close = not request.keep_alive or self.close_after or request.upgrade
        lines = [b"HTTP/1.1 %d %b" % (status, conn.reason or REASONS.get(status, b"OK"))]
        for name, value in headers:
            lines.append(name + b": " + value)
        if conn.content_length is not None and not conn.chunked:
            lines.append(b"Content-Length: " + conn.content_length)
        elif no_body:
            pass
        elif request.http11:
            lines.append(b"Transfer-Encoding: chunked")
            self.response_chunked = True
        else:
            close = True
        if self.set_cookie is not None:
            lines.append(b"Set-Cookie: " + self.set_cookie)
        if self.hsts is not None:
            lines.append(b"Strict-Transport-Security: " + self.hsts)
        if not request.complete:
            # The client is still sending a body the upstream did not wait for; the
            # connection cannot be reused for another request once this one ends.
            close = True
        if close:
            lines.append(b"Connection: close")
        elif not request.http11:
            lines.append(b"Connection: keep-alive")
        self.response_close = close
        lines.append(b"\r\n")
        self.response_started = True
        self._write(b"\r\n".join(lines))

    def response_body(self, chunk: bytes) -> None:
        if self.response_chunked:
            self._write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            self._write(chunk)

    def response_done(self, conn: UpstreamConnection) -> None:
        request = self.current
        if request is None:
            conn.abort()
            return
        if self.response_chunked:
            self._write(_CHUNK_END)
        self.upstream = None
        if request.complete:
            conn.release()
        else:
            conn.close()
        self._finish_endpoint()
        self._end_exchange(conn.status)

    def upstream_failed(self, conn: UpstreamConnection, reason: str, exc: BaseException | None) -> None:
        request = self.current
        self.upstream = None
        if request is None:
            self._finish_endpoint()
            return
        if self.response_started:
            self._finish_endpoint()
            self._record(request, 502)
            self._abort()
            return
        if (
            conn.requests > 1
            and not conn.got_bytes
            and not isinstance(exc, TimeoutError)
            and self.sent_head
            and request.content_length in (None, b"0")
            and not request.chunked
            and not request.upgrade
        ):
            # A pooled connection the server had closed while it sat idle: the request
            # never reached the application (no byte came back), so send it again on a
            # new connection to the same endpoint.
            pool = conn.pool
            head = self.sent_head
            self.sent_head = b""
            self.context.spawn(self._connect_and_send(pool, request, head))
            return
        self._finish_endpoint()
        status = 504 if isinstance(exc, TimeoutError) else 502
        self._fail_request(status, f"upstream {self.upstream_key}: {reason}")

    def upstream_upgraded(self, conn: UpstreamConnection, rest: bytes) -> None:
        transport = self.transport
        request = self.current
        if transport is None or request is None:
            conn.abort()
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
        self._finish_endpoint()
        self._record(request, status)
        self._cancel_timer()
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
            if self.request_sent and self.upstream is not None and self.tunnel:
                self.upstream.write(rest)
            else:
                request.body.append(rest)
        # Nothing more is parsed as HTTP on this connection: pause until the upstream answers.
        if self.transport is not None and not self.tunnel:
            self.transport.pause_reading()
            self.paused_for_body = True

    def _finish_endpoint(self) -> None:
        state = getattr(self, "endpoint_state", None)
        if state is not None:
            state.active -= 1
            self.endpoint_state = None

    def _end_exchange(self, status: int) -> None:
        request = self.current
        assert request is not None
        self._record(request, status)
        self._cancel_timer()
        self.current = None
        transport = self.transport
        if transport is None:
            return
        if self.response_close or self.close_after or not request.complete:
            self._close()
            return
        if self.waiting:
            following = self.waiting.popleft()
            if not self.waiting and self.paused_for_body and following.body_size <= MAX_BUFFERED_BODY:
                self.paused_for_body = False
                transport.resume_reading()
            self._begin(following)

    def _record(self, request: Request, status: int) -> None:
        self.context.metrics.observe(
            self.route_key, self.upstream_key, status, time.monotonic() - request.started
        )

    def _fail_request(
        self, status: int, reason: str, *, close: bool = False, location: bytes | None = None
    ) -> None:
        """Answer the current request with an error of the proxy's own."""
        request = self.current or self.parsing
        transport = self.transport
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.abort()
        self._cancel_timer()
        if request is None or transport is None or transport.is_closing():
            if transport is not None:
                transport.close()
            return
        if status >= 500 or status == 404:
            log.debug("%s %s: %d %s", request.method, request.target, status, reason)
        body = f"kanal: {status} {reason}\n".encode()
        keep = not close and request.keep_alive and request.complete and not self.close_after
        head = (
            b"HTTP/1.1 %d %b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
            % (status, REASONS.get(status, b"Error"), len(body))
        )
        if status == 503:
            head += b"Retry-After: 1\r\n"
        if location is not None:
            head += b"Location: " + location + b"\r\n"
        head += b"Connection: keep-alive\r\n\r\n" if keep else b"Connection: close\r\n\r\n"
        self._write(head + (b"" if request.method == b"HEAD" else body))
        if self.current is request:
            self._record(request, status)
        self.current = None
        if not keep:
            self._close()
            return
        if self.waiting:
            self._begin(self.waiting.popleft())
        elif self.paused_for_body:
            self.paused_for_body = False
            transport.resume_reading()

    def _timed_out(self, timeout: float) -> None:
        self.timer = None
        if self.current is None:
            return
        if self.response_started:
            self._record(self.current, 504)
            self._abort()
            return
        self._finish_endpoint()
        self._fail_request(504, f"upstream {self.upstream_key} did not answer within {timeout:g}s")

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _abort(self) -> None:
        """Cut the client off visibly: a truncated answer must never look complete."""
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.abort()
        self.current = None
        if self.transport is not None:
            self.transport.abort()

    def idle_for(self, now: float) -> float:
        return now - self.last_activity if self.current is None else 0.0

    set_cookie: bytes | None = None
    hsts: bytes | None = None
    sent_head: bytes = b""
    endpoint_state: object | None = None


def _header(headers: list[tuple[bytes, bytes]], lower_name: bytes) -> bytes | None:
    for name, value in headers:
        if name.lower() == lower_name:
            return value
    return None


def _cookie(header: bytes, name: str) -> str | None:
    wanted = name.encode("latin-1")
    for part in header.split(b";"):
        key, sep, value = part.strip().partition(b"=")
        if sep and key == wanted:
            return value.strip(b'"').decode("latin-1")
    return None

"""The forward (egress) proxy: `--forward-listen`, governed by EgressPolicies.

One `ForwardConnection` (an `asyncio.Protocol`, parsed by llhttp through httptools,
like the reverse proxy's client side) per client connection. It serves:

- absolute-form requests (`GET http://host:port/path HTTP/1.1`): sent to the origin
  with the origin-form request line (`GET /path HTTP/1.1`), hop-by-hop headers and
  `Proxy-*` removed, bodies streamed both ways with transport flow control, 1xx
  answers relayed. The connections to origins are the reverse proxy's own
  (`pool.UpstreamConnection` in a `pool.EndpointPool`), one pool per dialed address
  and port, kept by the `ForwardProxy` and shared by all its clients
  (`kanal.dataplane.forwardpool`): a client takes an idle connection to an address
  only once that address was checked for its own request. The client connection is
  kept alive.
- `CONNECT host:port`: a tunnel relaying bytes both ways without looking at them
  (TLS stays end to end), half-closes passed on (`eof_received` -> `write_eof`), and
  closed after `tunnel_idle_timeout` seconds without a byte either way. Tunnels have
  a connection of their own (`TunnelEnd`), never pooled.
- requests for mesh services (hosts of Routes with `gateways: [mesh]`, in any
  spelling of a Service's name relative to the proxy's namespace: `orders`,
  `orders.shop`, `orders.shop.svc.cluster.local`; see `kanal.dataplane.mesh`): handed,
  as parsed here (head and streamed body, never re-framed and parsed again), to the
  reverse proxy's own `ClientConnection` over the route table built for the `mesh`
  gateway (`ClientConnection.begin_parsed`), so they are balanced, retried and
  circuit-broken like any routed request. The client connection stays open after
  them as after any other request.

Requests meet the reverse listener's edge (`kanal.dataplane.http1`): the same head
limits and checks, request lines with runs of spaces refused (`http1.LineCheck`), a
malformed request pipelined behind others answered 400 after them, a lingering close
after an error answer (`kanal.dataplane.linger`), and, while the process is over
`--overload-memory`, 503 and close for every new request, CONNECT included.

Every decision is `kanal.dataplane.egress`'s (pure): credentials first, then the
destination by name and port, then ONE resolution (`loop.getaddrinfo`) whose every
address is checked; the checked addresses themselves are dialed, never the name
again. A resolution is reused for a short while to find idle connections
(`resolution_reuse`), and the address they go to is checked again for each request.
Denied: 403 with the reason; missing or wrong credentials: 407 with
`Proxy-Authenticate: Basic realm="kanal"`; DNS failure 502, connect refused 502,
connect timeout 504. Every request and tunnel leaves one line on the `kanal.egress`
logger (INFO): client, destination, address dialed, decision, status, bytes each way,
duration; with `--access-log`, an access log line instead (`egress_record`), in the
format of the reverse listeners.

When the configuration changes, pooled connections to destinations their names are no
longer allowed to reach are retired (idle ones close at once, busy ones after their
exchange).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import httptools

from kanal.dataplane import headers as hdrs
from kanal.dataplane import http1, linger
from kanal.dataplane.acceptor import listen
from kanal.dataplane.cache import forward as forward_cache
from kanal.dataplane.egress import (
    EgressRules,
    InvalidHost,
    IPAddress,
    check_addresses,
    normalize_host,
)
from kanal.dataplane.forwardpool import Destinations
from kanal.dataplane.http1 import (
    HEAD_TIMEOUT,
    MAX_HEAD,
    MAX_HEADERS,
    MAX_TARGET,
    status_line,
)
from kanal.dataplane.pool import write_batch
from kanal.dataplane.proxy import ClientConnection

if TYPE_CHECKING:
    from kanal.dataplane.accesslog import AccessLog
    from kanal.dataplane.cache.client import CacheExchange
    from kanal.dataplane.cache.rule import RuleCache
    from kanal.dataplane.linger import Linger
    from kanal.dataplane.logformat import Record
    from kanal.dataplane.pool import EndpointPool, UpstreamConnection
    from kanal.dataplane.proxy import Request
    from kanal.dataplane.runtime import Config, ProxyContext, Runtime

log = logging.getLogger("kanal.egress")

MAX_BUFFERED_BODY = 256 * 1024
_CHUNK_END = b"0\r\n\r\n"
_REQUEST_DROPPED = hdrs.HOP_BY_HOP | {b"content-length", b"host"}
_FORWARDING = hdrs.FORWARDING | {b"via"}

_Dialed = TypeVar("_Dialed")


class ForwardProxy:
    """What every connection of one forward listener shares: policy, mesh routes,
    timeouts, and the pools of connections to origins."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        namespace: str = "default",
        connect_timeout: float = 10.0,
        resolve_timeout: float = 5.0,
        idle_timeout: float = 60.0,
        tunnel_idle_timeout: float = 300.0,
        keepalive_timeout: float = 75.0,
        head_timeout: float = HEAD_TIMEOUT,
        max_connections: int | None = None,
        max_idle_per_destination: int = 16,
        max_upstream_connections: int = 1024,
        resolution_reuse: float = 30.0,
    ) -> None:
        self.runtime = runtime
        self.head_timeout = head_timeout
        self.max_connections = max_connections
        self.namespace = namespace
        self.connect_timeout = connect_timeout
        self.resolve_timeout = resolve_timeout
        self.idle_timeout = idle_timeout
        self.tunnel_idle_timeout = tunnel_idle_timeout
        self.keepalive_timeout = keepalive_timeout
        self.rules = EgressRules((), (), namespace)
        self.access_log: AccessLog | None = None  # --access-log; None: the kanal.egress line
        self.cache_rule: RuleCache | None = None  # the namespace's EgressPolicy `cache`
        self.connections: set[ForwardConnection] = set()
        # Connections to origins (absolute-form requests), shared by every client.
        self.destinations = Destinations(
            connect_timeout=connect_timeout, idle_timeout=idle_timeout,
            max_idle=max_idle_per_destination, max_open=max_upstream_connections,
            resolution_reuse=resolution_reuse, on_informational=_relay_informational)
        self.server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        # The reverse proxy over the mesh gateway's routes, for mesh services: the
        # runtime builds them with each Config (Config.mesh). Its context is one of the
        # runtime's, so graceful stops drain it too.
        runtime.mesh_namespace = namespace
        if runtime.config is not None:
            # Built before this proxy asked for mesh routes: build them now.
            runtime.apply(runtime.config.snapshot)
        self.mesh_context: ProxyContext = runtime.context("http", 0, mesh=True)
        runtime.on_apply.append(self.apply)
        if runtime.config is not None:
            self.apply(runtime.config)

    def apply(self, config: Config) -> None:
        """Follow a new configuration: its egress policies (mesh hosts in any spelling
        of a Service's name, relative to this namespace); pooled connections that
        the new policies no longer allow are retired."""
        mesh = config.mesh
        rules = EgressRules.from_snapshot(mesh.snapshot if mesh is not None else config.snapshot,
                                          self.namespace)
        for ignored in rules.ignored:
            log.warning("EgressPolicy %s: a wildcard across a public suffix is ignored", ignored)
        self.rules = rules
        self.cache_rule = forward_cache.egress_cache(config.snapshot, self.namespace)
        self.destinations.retire(self._still_reaches)

    def _still_reaches(self, host: str, port: int, address: IPAddress) -> bool:
        """Whether the current policies let a request for `host:port` reach `address`."""
        decision = self.rules.decide(host, port)
        return (decision.allowed and not decision.mesh
                and check_addresses([address], decision.allow_private) is None)

    async def start(self, sock: socket.socket) -> asyncio.AbstractServer:
        loop = asyncio.get_running_loop()
        self.server = await listen("forward", sock, lambda: ForwardConnection(self),
                                   cap=self.max_connections, gate=self.runtime.connection_gate)
        self._sweeper = loop.create_task(self._sweep_forever())
        return self.server

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.abort("proxy stopping")
        self.destinations.close_all()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    async def _sweep_forever(self) -> None:
        """Idle clients, stalled exchanges, idle tunnels and idle pooled connections;
        ends once the listener closed."""
        shortest = min(self.idle_timeout, self.tunnel_idle_timeout, self.keepalive_timeout)
        interval = max(0.05, min(1.0, shortest / 4))
        while self.server is None or self.server.is_serving() or self.connections:
            await asyncio.sleep(interval)
            self.sweep(time.monotonic())

    def sweep(self, now: float) -> None:
        for conn in list(self.connections):
            conn.sweep(now)
        self.destinations.sweep(now)


class ForwardRequest:
    """One request (or CONNECT) from a client, and the bookkeeping of its exchange."""

    __slots__ = (
        "address",
        "authorization",
        "body",
        "body_size",
        "chunked",
        "complete",
        "content_length",
        "decision",
        "down",
        "header_bytes",
        "head_lines",
        "head_size",
        "headers",
        "host",
        "http11",
        "keep_alive",
        "line_unchecked",
        "logged",
        "method",
        "no_body",
        "port",
        "reason",
        "resent",
        "sent",
        "singletons",
        "started",
        "status",
        "target",
        "up",
        "upgrade",
        "wire_head",
    )

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.http11 = True
        self.keep_alive = True
        self.chunked = False
        self.content_length: bytes | None = None
        self.complete = False
        self.body: list[bytes] = []
        self.body_size = 0
        self.started = time.monotonic()
        self.authorization: bytes | None = None
        self.upgrade = False
        self.host = ""
        self.port = 0
        self.address = "-"
        self.decision = "-"
        self.reason = ""
        self.status = 0
        self.up = 0
        self.down = 0
        self.sent = False
        self.logged = False
        self.no_body = False
        self.head_size = 0
        self.header_bytes = 0
        self.head_lines = 0
        self.singletons: set[bytes] = set()
        self.wire_head = b""  # the head sent to the origin (sent again on a fresh connection)
        self.resent = False
        self.line_unchecked = False  # its request line is checked at its head's end


class _Refused(Exception):
    """A request answered by the proxy itself (status, reason)."""

    def __init__(self, status: int, reason: str, decision: str = "deny") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.decision = decision


class ForwardConnection(asyncio.Protocol):
    """One client connection on the forward listener; the sink (`pool.ResponseSink`)
    of the pooled connection carrying its current exchange."""

    def __init__(self, proxy: ForwardProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer = "-"
        self.peer_ip = ""
        self.parsing: ForwardRequest | None = None
        self.current: ForwardRequest | None = None
        self.waiting: deque[ForwardRequest] = deque()
        self.upstream: UpstreamConnection | None = None  # the current exchange's (pooled)
        self.origin: TunnelEnd | None = None  # a CONNECT tunnel's far end
        self.mode = "http"  # http | tunnel | mesh (while a mesh request is served)
        self.inner: ClientConnection | None = None  # the reverse proxy, for mesh requests
        self.inner_request: Request | None = None
        self.task: asyncio.Task[None] | None = None
        self.last_activity = time.monotonic()
        self.read_paused: set[str] = set()
        self.client_eof = False
        self.origin_eof = False
        self.closed = False
        self.response_chunked = False
        self.response_close = False
        self.response_started = False
        self.refused: tuple[int, str] | None = None
        # A malformed request behind ones still being served: answered after them.
        self.deferred_error: tuple[int, str] | None = None
        self.lines = http1.LineCheck()  # runs of spaces in request lines
        self.linger: Linger | None = None  # a lingering close under way
        self.heads_seen = 0
        self.cache_exchange: CacheExchange | None = None
        # ResponseSink: a pooled connection batches what a read makes its sink write;
        # this sink writes at once (the cache writes its answers itself), so it stays empty.
        self.batch: list[bytes] | None = None

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer_ip = str(peer[0])
            self.peer = f"{peer[0]}:{peer[1]}"
        # (Past --max-connections, the listener stops accepting: acceptor.py.)
        self.proxy.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        if self.mode == "tunnel":
            request = self.current
            if request is not None:
                request.up += len(data)
            if self.origin is not None:
                self.origin.write(data)
            return
        if self.linger is not None:
            self.linger.received(data)  # after an error answer: dropped (linger.py)
            return
        request = self.current
        if request is not None and request.method == b"CONNECT" and request.complete:
            request.body.append(data)  # early tunnel bytes: sent once the tunnel is up
            request.body_size += len(data)
            return
        if self.deferred_error is not None:
            return  # the parser stopped at a malformed request; answers before it go out
        parsing = self.parsing
        lines = self.lines
        if lines.read(data, parsing is None):
            self._parse_failed(400, http1.SPACED_LINE)
            return
        heads_before = self.heads_seen
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            lines.read_over()
            offset = upgrade.args[0] if upgrade.args else len(data)
            self._client_upgrade(data[offset:])
            return
        except httptools.HttpParserError as exc:
            lines.read_over()
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
            # The read held nothing but an unfinished head: bound what it has taken (431).
            after.head_size += len(data)
            if after.head_size > MAX_HEAD + MAX_TARGET:
                self._parse_failed(431, f"request head larger than {MAX_HEAD} bytes")

    def _parse_failed(self, status: int, reason: str) -> None:
        """The parser met a request it cannot take: answer every request before it, then
        this error, then close (nothing after it is parsed)."""
        self.parsing = None
        current = self.current
        if current is not None and not current.complete:
            # The current request's own body is malformed: it cannot be finished.
            if self.response_started:
                self.abort(reason)
            else:
                self._refuse(current, status, reason, close=True)
            return
        if current is not None:
            self.deferred_error = (status, reason)
            self.pause("malformed")
            return
        self._answer_error(status, reason)

    def _answer_error(self, status: int, reason: str) -> None:
        """Answer a request the parser refused, then close."""
        request = ForwardRequest()
        request.decision = "error"
        self.current = request
        self._refuse(request, status, reason, close=True)

    def _refuse_head(self, status: int, reason: str) -> None:
        """Stop parsing a head the proxy will not take; data_received answers `status`."""
        self.refused = (status, reason)
        raise httptools.HttpParserError(reason)

    def eof_received(self) -> bool | None:
        if self.mode == "tunnel":
            self.client_eof = True
            origin = self.origin
            if origin is not None and origin.transport is not None:
                if self.origin_eof:
                    self._close()
                    return True
                if origin.transport.can_write_eof():
                    origin.transport.write_eof()
                    return True
            return None
        if self.mode == "mesh" and self.inner is not None:
            self.response_close = True
            return self.inner.eof_received()
        if self.current is not None and self.current.complete:
            self.response_close = True  # answer what was asked, then close
            return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.proxy.connections.discard(self)
        if self.linger is not None:
            self.linger.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.abort()  # mid-exchange: its answer can no longer be delivered
        origin = self.origin
        self.origin = None
        if origin is not None:
            origin.close()
        if self.inner is not None:
            self.inner.connection_lost(exc)
        request = self.current
        if request is not None and not request.logged:
            if not request.status:
                request.status = 499  # the client went away first
            self._log(request)
        self.current = None
        self.waiting.clear()

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()
        upstream = self.upstream
        if upstream is not None:
            upstream.pause_answers()  # (resumed when released to the pool, if not before)
        if self.origin is not None:
            self.origin.pause_reading("client")

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()
        upstream = self.upstream
        if upstream is not None:
            upstream.resume_answers()
        if self.origin is not None:
            self.origin.resume_reading("client")

    # --- reading from the client, paused for several reasons at once -------------------------

    def pause(self, why: str) -> None:
        if not self.read_paused and self.transport is not None:
            self.transport.pause_reading()
        self.read_paused.add(why)

    def resume(self, why: str) -> None:
        if why not in self.read_paused:
            return
        self.read_paused.discard(why)
        if not self.read_paused and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # --- httptools callbacks (request) ------------------------------------------------------

    def on_message_begin(self) -> None:
        request = ForwardRequest()
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
        request.head_lines += 1
        request.header_bytes += len(name) + len(value) + 4
        if request.header_bytes > MAX_HEAD or request.head_lines > MAX_HEADERS:
            self._refuse_head(431, f"request headers larger than {MAX_HEAD} bytes or more "
                                   f"than {MAX_HEADERS} lines")
        if http1.UNDERSCORE in name:
            return  # CGI-style backends read X_A as X-A: dropped, as on the reverse listener
        lower = name.lower()
        if lower in http1.SINGLETON_HEADERS:
            if lower in request.singletons:
                self._refuse_head(400, f"more than one {name.decode('latin-1')} header")
            request.singletons.add(lower)
        if lower == b"proxy-authorization":
            request.authorization = value
        elif lower == b"content-length":
            request.content_length = value
        elif lower == b"transfer-encoding":
            problem = http1.transfer_coding_problem(value)
            if problem is not None:
                self._refuse_head(400, problem)
            request.chunked = True
        request.headers.append((name, value))

    def on_headers_complete(self) -> None:
        request = self.parsing
        if request is None:
            return
        self.heads_seen += 1
        parser = self.parser
        version = parser.get_http_version()
        refused = http1.version_problem(version)
        if refused is not None:
            self._refuse_head(*refused)
        method = parser.get_method()
        if request.line_unchecked and self.lines.spaced_at_head(method, request.target):
            self._refuse_head(400, http1.SPACED_LINE)
        if http1.HASH in request.target:
            self._refuse_head(400, "request target with a fragment (#)")
        request.method = method
        request.http11 = version == "1.1"
        request.keep_alive = parser.should_keep_alive()
        request.upgrade = parser.should_upgrade()
        request.no_body = request.method == b"HEAD"
        if request.upgrade and request.method != b"CONNECT" and self.current is None:
            self.current = request  # refused once the parser stops at the upgrade
            return
        if self.current is not None:
            self.waiting.append(request)
            self.pause("queued")
            return
        self._begin(request)

    def on_body(self, body: bytes) -> None:
        request = self.parsing
        if request is None:
            return
        if request is self.current:
            if self.mode == "mesh":
                inner = self.inner
                if inner is not None:
                    request.up += len(body)
                    inner.last_activity = self.last_activity
                    inner.on_body(body)
                return
            if request.sent and self.upstream is not None:
                request.up += len(body)
                self.upstream.write(_frame(body) if request.chunked else body)
                return
        request.body.append(body)
        request.body_size += len(body)
        if request.body_size > MAX_BUFFERED_BODY:
            self.pause("body")

    def on_message_complete(self) -> None:
        request = self.parsing
        if request is None:
            return
        request.complete = True
        self.parsing = None
        if request is not self.current:
            return
        if self.mode == "mesh":
            if self.inner is not None:
                self.inner.on_message_complete()
        elif request.chunked and request.sent and self.upstream is not None:
            self.upstream.write(_CHUNK_END)

    def _client_upgrade(self, rest: bytes) -> None:
        """CONNECT (or another protocol switch): nothing more is parsed as HTTP."""
        request = self.current
        if request is None or request.method != b"CONNECT":
            if request is not None:
                self._refuse(request, 501, "protocol upgrades through the forward proxy are not "
                                           "supported; use CONNECT", close=True)
            else:
                self.abort("upgrade behind another request")
            return
        request.complete = True
        self.parsing = None
        self.pause("connect")
        if rest:
            request.body.append(rest)
            request.body_size += len(rest)

    # --- one exchange -----------------------------------------------------------------------

    def _begin(self, request: ForwardRequest) -> None:
        self.current = request
        self.response_started = False
        self.response_chunked = False
        self.cache_exchange = None
        self.pause("deciding")
        self.task = asyncio.get_running_loop().create_task(self._serve(request))

    async def _serve(self, request: ForwardRequest) -> None:
        overload = self.proxy.runtime.overload
        if overload is not None and overload.active:
            # --overload-memory, as on the reverse listeners (kanal.dataplane.overload)
            self.proxy.runtime.metrics.overload_refused += 1
            request.decision = "error"
            self._refuse(request, 503, http1.OVERLOADED, close=True, overloaded=True)
            return
        try:
            await self._serve_checked(request)
        except _Refused as refused:
            request.decision = refused.decision
            self._refuse(request, refused.status, refused.reason,
                         close=request.method == b"CONNECT" or not request.complete)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # pragma: no cover - a bug: answer and say so
            log.exception("forward proxy error")
            self._refuse(request, 502, f"proxy error: {exc}", close=True)

    async def _serve_checked(self, request: ForwardRequest) -> None:
        proxy = self.proxy
        rules = proxy.rules  # one policy for the whole exchange, as one config per request
        connect = request.method == b"CONNECT"
        if not rules.authenticate(request.authorization):
            request.decision = "auth"
            raise _Refused(407, "proxy authentication required"
                           if request.authorization is None else "wrong proxy credentials",
                           decision="auth")
        host, port, path = _destination(request)
        request.host, request.port = host, port
        decision = rules.decide(host, port, connect=connect)
        request.reason = decision.reason
        if not decision.allowed:
            raise _Refused(403, decision.reason)
        if decision.mesh:
            self._to_mesh(request)
            return
        request.decision = "allow"
        if connect:
            addresses = await self._checked_addresses(host, port, decision.allow_private)
            origin = await self._dial(request, host, port, addresses, self._open_tunnel(port))
            if self.closed:
                origin.abort()
                return
            self.origin = origin
            self._start_tunnel(request, origin)
            return
        cache_rule = proxy.cache_rule
        if cache_rule is not None and await forward_cache.begin(self, request, path, cache_rule):
            return  # answered from the cache (or the client left while it waited)
        conn = await self._connection(request, host, port, decision.allow_private)
        if self.closed:
            conn.release()  # not used: another client may have it
            return
        self._send_request(request, conn, path, anonymize=rules.anonymize)

    async def _connection(self, request: ForwardRequest, host: str, port: int,
                          allow_private: bool) -> UpstreamConnection:
        """A connection to an address of `host`, checked for this request: an idle one
        to where a recent resolution of the name led, else one to the first address of
        a new resolution that has one idle or takes a new one."""
        destinations = self.proxy.destinations
        remembered = destinations.remembered(host, port, time.monotonic())
        if remembered is not None:
            pool, address = remembered
            why = check_addresses([address], allow_private)
            if why is not None:
                raise _Refused(403, f"{host} resolves to {why}")
            conn = pool.take_idle()
            if conn is not None:
                request.address = str(address)
                return conn
        addresses = await self._checked_addresses(host, port, allow_private)
        return await self._dial(request, host, port, addresses, self._pooled(host, port))

    def _pooled(self, host: str, port: int) -> Callable[[IPAddress], Awaitable[UpstreamConnection]]:
        destinations = self.proxy.destinations

        async def connection(address: IPAddress) -> UpstreamConnection:
            pool = destinations.pool(address, port)
            conn = pool.take_idle() or await destinations.connect(pool)
            destinations.remember(host, port, pool, address, time.monotonic())
            return conn

        return connection

    def _open_tunnel(self, port: int) -> Callable[[IPAddress], Awaitable[TunnelEnd]]:
        async def tunnel(address: IPAddress) -> TunnelEnd:
            _, end = await asyncio.get_running_loop().create_connection(
                lambda: TunnelEnd(self), str(address), port)
            return end

        return tunnel

    async def _checked_addresses(self, host: str, port: int,
                                 allow_private: bool) -> list[IPAddress]:
        addresses = await self._resolve(host, port)
        why = check_addresses(addresses, allow_private)
        if why is not None:
            raise _Refused(403, f"{host} resolves to {why}")
        return addresses

    async def _resolve(self, host: str, port: int) -> list[IPAddress]:
        """One resolution; every address it gave, in order, each once."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.proxy.resolve_timeout):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                               proto=socket.IPPROTO_TCP)
        except TimeoutError:
            raise _Refused(504, f"DNS lookup of {host} timed out after "
                                f"{self.proxy.resolve_timeout:g}s", decision="error") from None
        except (socket.gaierror, OSError, UnicodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise _Refused(502, f"DNS lookup of {host} failed: {reason}",
                           decision="error") from None
        addresses: list[IPAddress] = []
        for family, _, _, _, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise _Refused(502, f"DNS lookup of {host} gave no address", decision="error")
        return addresses

    async def _dial(self, request: ForwardRequest, host: str, port: int,
                    addresses: list[IPAddress],
                    open_one: Callable[[IPAddress], Awaitable[_Dialed]]) -> _Dialed:
        """Connect to the checked addresses themselves, in order, within the connect timeout."""
        loop = asyncio.get_running_loop()
        failures: list[str] = []
        deadline = loop.time() + self.proxy.connect_timeout
        for address in addresses:
            left = deadline - loop.time()
            if left <= 0:
                break
            request.address = str(address)
            try:
                async with asyncio.timeout(left):
                    return await open_one(address)
            except TimeoutError:
                failures.append(f"{address}: timed out")
                break
            except OSError as exc:
                cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
                failures.append(f"{address}: {cause.strerror or cause}")
                continue
        if failures and failures[-1].endswith("timed out"):
            raise _Refused(504, f"connect to {host}:{port} timed out after "
                                f"{self.proxy.connect_timeout:g}s", decision="error")
        raise _Refused(502, f"connect to {host}:{port} failed ({'; '.join(failures)})",
                       decision="error")

    def _send_request(self, request: ForwardRequest, conn: UpstreamConnection, path: bytes,
                      *, anonymize: bool) -> None:
        lines = [request.method + b" " + path + b" HTTP/1.1", b"Host: " + _host_header(request)]
        lines += [name + b": " + value
                  for name, value in _end_to_end(request.headers, anonymize)]
        if request.chunked:
            lines.append(b"Transfer-Encoding: chunked")
        elif request.content_length is not None:
            lines.append(b"Content-Length: " + request.content_length)
        if not anonymize:
            lines += self._forwarding_lines(request)
        lines.append(b"\r\n")
        request.wire_head = b"\r\n".join(lines)
        self._start(request, conn)

    def _start(self, request: ForwardRequest, conn: UpstreamConnection) -> None:
        """Send the request (its head, and what arrived of its body) on `conn`."""
        self.upstream = conn
        conn.start(self, request.wire_head, request.no_body)
        request.up += len(request.wire_head)
        request.sent = True
        if request.body:
            chunks, request.body, request.body_size = request.body, [], 0
            data = b"".join(_frame(c) for c in chunks) if request.chunked else b"".join(chunks)
            request.up += len(data)
            conn.write(data)
        if request.complete and request.chunked:
            conn.write(_CHUNK_END)
        self.resume("body")
        self.resume("deciding")

    def _forwarding_lines(self, request: ForwardRequest) -> list[bytes]:
        sent: dict[bytes, list[bytes]] = {}
        for name, value in request.headers:
            lower = name.lower()
            if lower in (b"x-forwarded-for", b"forwarded", b"via"):
                sent.setdefault(lower, []).append(value)
        peer = self.peer_ip.encode("latin-1")
        node = b'"[' + peer + b']"' if peer.find(b":") >= 0 else peer
        chains = {name: b", ".join(values) + b", " for name, values in sent.items()}
        return [
            b"X-Forwarded-For: " + chains.get(b"x-forwarded-for", b"") + peer,
            b"Forwarded: " + chains.get(b"forwarded", b"") + b"for=" + node,
            b"Via: " + chains.get(b"via", b"") + (b"1.1 kanal" if request.http11 else b"1.0 kanal"),
        ]

    def _start_tunnel(self, request: ForwardRequest, origin: TunnelEnd) -> None:
        assert self.transport is not None
        self.mode = "tunnel"
        answer = b"HTTP/1.1 200 Connection Established\r\n\r\n"
        request.status = 200
        request.down += len(answer)
        self.transport.write(answer)
        self.response_started = True
        if request.body:
            data = b"".join(request.body)
            request.body, request.body_size = [], 0
            request.up += len(data)
            origin.write(data)
        self.read_paused.clear()
        self.transport.resume_reading()

    # --- mesh requests: the reverse proxy's request path, entered with the parsed request ---

    def _to_mesh(self, request: ForwardRequest) -> None:
        """Hand the request, as parsed, to the reverse proxy over the mesh routes."""
        assert self.transport is not None
        request.decision = "mesh"
        request.status = -1  # the reverse proxy answers; its own metrics have the status
        inner = self.inner
        if inner is None:
            inner = self.inner = ClientConnection(self.proxy.mesh_context)
            inner.connection_made(_InnerTransport(self, self.transport))  # type: ignore[arg-type]
            inner.exchange_ended = self._mesh_exchange_ended
        else:
            self.proxy.mesh_context.clients.add(inner)  # swept and drained while it serves
        self.mode = "mesh"
        # The request as the reverse proxy's parser would have built it: its own rules
        # for each header (hop-by-hop, forwarding, cookies, Host), applied once here.
        inner.last_activity = time.monotonic()
        inner.on_message_begin()
        try:
            inner.on_url(request.target)
            for name, value in request.headers:
                inner.on_header(name, value)
        except httptools.HttpParserError as exc:
            refused = inner.refused
            inner.refused = None
            inner.parsing = None
            self._mesh_over()
            status, reason = refused if refused is not None else (400, str(exc))
            raise _Refused(status, reason, decision="error") from None
        routed = inner.parsing
        assert routed is not None
        routed.method = request.method
        routed.http11 = request.http11
        routed.keep_alive = request.keep_alive
        routed.started = request.started
        self.inner_request = routed
        if request.body:  # what arrived while the policy was decided
            chunks, request.body, request.body_size = request.body, [], 0
            for chunk in chunks:
                request.up += len(chunk)
                inner.on_body(chunk)
        if request.complete:
            inner.on_message_complete()
        self.resume("body")
        self.resume("deciding")
        inner.begin_parsed(routed)

    def _mesh_exchange_ended(self) -> None:
        """The reverse proxy ended a mesh exchange: once it has finished with it (and
        closed the connection if it had to), go on with the client's next request."""
        request = self.current
        if request is not None and self.mode == "mesh":
            asyncio.get_running_loop().call_soon(self._mesh_request_done, request)

    def _mesh_request_done(self, request: ForwardRequest) -> None:
        if self.current is not request or self.closed:
            return
        self._mesh_over()
        transport = self.transport
        if transport is None or transport.is_closing():
            self._log(request)
            return
        inner = self.inner
        if inner is not None and inner.linger is not None:
            # The reverse proxy answered an error and closes lingering: what the client
            # still sends goes to that Linger, never to the parser.
            self._log(request)
            self.current = None
            self._lingering(inner.linger)
            return
        self._end_exchange(request)

    def _mesh_over(self) -> None:
        """The connection leaves mesh mode: the reverse proxy's side rests until the
        next mesh request (it is neither swept nor drained meanwhile)."""
        self.mode = "http"
        self.inner_request = None
        inner = self.inner
        if inner is not None:
            self.proxy.mesh_context.clients.discard(inner)
            inner.paused_for_body = False  # reading is this connection's again
        self.resume("inner")

    # --- the origin's answer (pool.ResponseSink) --------------------------------------------

    def response_informational(self, conn: UpstreamConnection) -> None:
        """A 1xx before the final answer (but 101): relayed to HTTP/1.1 clients."""
        request = self.current
        if request is not None and request.http11 and self.transport is not None:
            line = status_line(conn.status) + b"\r\n\r\n"
            request.down += len(line)
            self.transport.write(line)

    def response_head(self, conn: UpstreamConnection) -> None:
        request = self.current
        transport = self.transport
        if request is None or transport is None or conn is not self.upstream:
            conn.abort()
            return
        status = conn.status
        request.status = status
        no_body = request.no_body or conn.no_body
        conn.no_body = no_body
        if self.cache_exchange is not None and forward_cache.head(self, request, conn):
            return  # a 304 to the cache's revalidation: the stored answer went out
        headers = conn.headers
        named = conn.connection_named
        if named:
            headers = [(name, value) for name, value in headers if name.lower() not in named]
        close = not request.keep_alive or not request.complete or self.response_close
        lines = [status_line(status)]
        lines += [name + b": " + value for name, value in headers]
        self.response_chunked = False
        if no_body:
            if conn.content_length is not None:
                lines.append(b"Content-Length: " + conn.content_length)
        elif conn.content_length is not None and not conn.chunked:
            lines.append(b"Content-Length: " + conn.content_length)
        elif request.http11:
            lines.append(b"Transfer-Encoding: chunked")
            self.response_chunked = True
        else:
            close = True
        if close:
            lines.append(b"Connection: close")
        elif not request.http11:
            lines.append(b"Connection: keep-alive")
        self.response_close = close
        lines.append(b"\r\n")
        head = b"\r\n".join(lines)
        request.down += len(head)
        self.response_started = True
        transport.write(head)

    def response_body(self, chunk: bytes) -> None:
        request = self.current
        if request is None or self.transport is None:
            return
        if self.cache_exchange is not None and forward_cache.body(self, chunk):
            return
        self.last_activity = time.monotonic()
        data = _frame(chunk) if self.response_chunked else chunk
        request.down += len(data)
        self.transport.write(data)

    def response_done(self, conn: UpstreamConnection) -> None:
        request = self.current
        if request is None or self.transport is None or conn is not self.upstream:
            conn.abort()
            return
        if self.cache_exchange is not None:
            forward_cache.done(self)
        if self.response_chunked:
            request.down += len(_CHUNK_END)
            self.transport.write(_CHUNK_END)
        self.upstream = None
        if request.complete:
            self.proxy.destinations.release(conn)  # idle again, for any client
        else:
            conn.close()
        self._end_exchange(request)

    def upstream_failed(self, conn: UpstreamConnection, reason: str,
                        exc: BaseException | None) -> None:
        if conn is not self.upstream:
            return
        self.upstream = None
        request = self.current
        if request is None:
            return
        if (conn.requests > 1 and not conn.got_bytes and not self.response_started
                and not isinstance(exc, TimeoutError) and not request.resent
                and not request.chunked and request.content_length in (None, b"0")):
            # A pooled connection the origin had closed while it sat idle: the request
            # never reached it (no byte came back). Sent again on a new connection.
            request.resent = True
            self.task = asyncio.get_running_loop().create_task(self._resend(request, conn.pool))
            return
        self.origin_failed(reason, timeout=isinstance(exc, TimeoutError))

    async def _resend(self, request: ForwardRequest, pool: EndpointPool) -> None:
        try:
            async with asyncio.timeout(self.proxy.connect_timeout):
                conn = await self.proxy.destinations.connect(pool)
        except (TimeoutError, OSError) as exc:
            if self.current is request and not self.closed:
                self.origin_failed(f"reconnecting failed: {exc}",
                                   timeout=isinstance(exc, TimeoutError))
            return
        if self.current is not request or self.closed:
            conn.release()
            return
        self._start(request, conn)

    def upstream_upgraded(self, conn: UpstreamConnection, rest: bytes) -> None:
        conn.abort()
        if conn is self.upstream:
            self.upstream = None
            self.origin_failed("switched protocols without an upgrade request")

    def upstream_pause_writing(self) -> None:
        self.pause("origin")

    def upstream_resume_writing(self) -> None:
        self.resume("origin")

    def end_batch(self) -> None:
        batch = self.batch
        self.batch = None
        if batch:
            self.flush(batch)

    def flush(self, batch: list[bytes]) -> None:
        if self.transport is not None:
            write_batch(self.transport, batch)

    def origin_failed(self, reason: str, *, timeout: bool = False) -> None:
        """The origin (or the tunnel's far end) failed or went silent."""
        if self.cache_exchange is not None:
            forward_cache.failed(self)
        request = self.current
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.abort()
        if self.mode == "tunnel":
            self._close()
            return
        if request is None or not request.sent:
            return
        if self.response_started:
            request.status = request.status or 502
            request.reason = reason
            self.abort(reason)
            return
        request.decision = "error"
        self._refuse(request, 504 if timeout else 502, f"{request.host}:{request.port}: {reason}",
                     close=True)

    def tunnel_data(self, data: bytes) -> None:
        request = self.current
        if request is not None:
            request.down += len(data)
        self.last_activity = time.monotonic()
        if self.transport is not None:
            self.transport.write(data)

    def tunnel_eof(self) -> bool:
        self.origin_eof = True
        transport = self.transport
        if transport is None:
            return False
        if self.client_eof:
            self._close()
            return False
        if transport.can_write_eof():
            transport.write_eof()
            return True
        return False

    def tunnel_lost(self, origin: TunnelEnd) -> None:
        if self.origin is origin:
            self.origin = None
        self._close()

    # --- endings ----------------------------------------------------------------------------

    def _end_exchange(self, request: ForwardRequest, *, error: bool = False) -> None:
        """The exchange is over: on to the next request, or close (after an error
        answer, or one given before the request's body ended, a lingering close)."""
        self._log(request)
        self.current = None
        self.task = None
        self.resume("origin")  # (a write to the origin that filled its buffer is over)
        if self.response_close or not request.keep_alive or not request.complete:
            if error or not request.complete:
                self._close_lingering()
            else:
                self._close()
            return
        self.resume("body")
        self.resume("deciding")
        if self.waiting:
            following = self.waiting.popleft()
            if not self.waiting:
                self.resume("queued")
            self._begin(following)
        elif self.deferred_error is not None:
            self._answer_error(*self.deferred_error)
            return
        self.last_activity = time.monotonic()

    def _refuse(self, request: ForwardRequest, status: int, reason: str, *, close: bool = False,
                overloaded: bool = False) -> None:
        """Answer with an error of the proxy's own."""
        transport = self.transport
        upstream = self.upstream
        if upstream is not None and request.sent:
            self.upstream = None
            upstream.abort()
        origin = self.origin
        if origin is not None and request.method == b"CONNECT":
            self.origin = None
            origin.abort()
        if self.cache_exchange is not None and forward_cache.error(self, request, status):
            return  # a stale entry answered instead (stale-if-error)
        request.status = status
        request.reason = reason
        if request.decision == "-":
            request.decision = "deny" if status in (403, 407) else "error"
        if transport is None or transport.is_closing():
            self._log(request)
            self.current = None
            return
        body = f"kanal: {status} {reason}\n".encode()
        keep = not close and request.keep_alive and request.complete and not self.response_close
        extra = b'Proxy-Authenticate: Basic realm="kanal"\r\n' if status == 407 else b""
        if status == 503:
            extra += http1.RETRY_AFTER
        if overloaded:
            extra += http1.OVERLOADED_LINE
        head = http1.error_head(status, len(body), keep_alive=keep, extra=extra)
        data = head + (b"" if request.method == b"HEAD" else body)
        request.down += len(data)
        transport.write(data)
        self.response_close = not keep
        self._end_exchange(request, error=True)

    def _log(self, request: ForwardRequest) -> None:
        if request.logged:
            return
        request.logged = True
        access = self.proxy.access_log
        if access is not None:  # the access log's format, as on the reverse listeners
            if request.decision != "mesh":  # (a mesh request's line is its reverse proxy's)
                access.put(egress_record(self.peer, request))
            return
        method = request.method.decode("latin-1") or "-"
        destination = f"{request.host}:{request.port}" if request.host else "-"
        status = "-" if request.status < 0 else str(request.status)
        log.info(
            "client=%s method=%s dest=%s addr=%s decision=%s status=%s up=%d down=%d "
            "duration=%.3fs reason=%r",
            self.peer, method, destination, request.address, request.decision, status,
            request.up, request.down, time.monotonic() - request.started, request.reason,
        )

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _close_lingering(self) -> None:
        """Close after an answer the client may not have read while it is still sending:
        `linger.start`; what the client sends meanwhile is dropped, never parsed."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        lingering = linger.start(transport)
        if lingering is not None:
            self._lingering(lingering)

    def _lingering(self, lingering: Linger) -> None:
        self.linger = lingering
        self.parsing = None
        self.waiting.clear()
        self.read_paused.clear()
        if self.transport is not None:
            self.transport.resume_reading()

    def abort(self, reason: str) -> None:
        """Cut the client off: a truncated answer must never look complete."""
        request = self.current
        if request is not None and not request.reason:
            request.reason = reason
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.abort()
        origin = self.origin
        self.origin = None
        if origin is not None:
            origin.abort()
        if self.transport is not None:
            self.transport.abort()

    def sweep(self, now: float) -> None:
        if self.linger is not None:
            return  # it ends on its own
        proxy = self.proxy
        idle = now - self.last_activity
        upstream = self.upstream
        if upstream is not None:
            idle = min(idle, now - upstream.last_activity)
        origin = self.origin
        if origin is not None:
            idle = min(idle, now - origin.last_activity)
        if self.mode == "tunnel":
            if idle > proxy.tunnel_idle_timeout:
                if self.current is not None:
                    self.current.reason = (f"tunnel idle for {proxy.tunnel_idle_timeout:g}s "
                                           f"(idle timeout)")
                self._close()
                if origin is not None:
                    origin.close()
            return
        if self.mode == "mesh":
            return  # the reverse proxy's housekeeping looks after it
        request = self.current
        parsing = self.parsing
        if (parsing is not None and not parsing.method
                and now - parsing.started > proxy.head_timeout):
            # Counted from the head's first byte: trickling (slowloris) does not extend it.
            self._parse_failed(408, f"request head not received within {proxy.head_timeout:g}s")
            return
        if request is None:
            if idle > proxy.keepalive_timeout:
                self._close()
        elif request.sent and idle > proxy.idle_timeout:
            if self.response_started:
                request.reason = f"no data for {proxy.idle_timeout:g}s (idle timeout)"
                self.abort(request.reason)
            else:
                self.origin_failed(f"no answer within {proxy.idle_timeout:g}s (idle timeout)",
                                   timeout=True)
        elif not request.sent and idle > proxy.idle_timeout + proxy.connect_timeout:
            self.abort("stalled before reaching the origin")


def _relay_informational(conn: UpstreamConnection) -> None:
    """A forward pool's connection got a 1xx: its client hears of it."""
    sink = conn.sink
    if isinstance(sink, ForwardConnection):
        sink.response_informational(conn)


class _InnerTransport:
    """The client transport as the reverse proxy's ClientConnection sees it (mesh requests).

    Writes are counted for the access log; pausing and resuming reading go through the
    forward connection, which also pauses for reasons of its own.
    """

    def __init__(self, outer: ForwardConnection, transport: asyncio.Transport) -> None:
        self._outer = outer
        self._transport = transport

    def write(self, data: bytes) -> None:
        request = self._outer.current
        if request is not None:
            request.down += len(data)
        self._transport.write(data)

    def pause_reading(self) -> None:
        self._outer.pause("inner")

    def resume_reading(self) -> None:
        self._outer.resume("inner")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class TunnelEnd(asyncio.Protocol):
    """A CONNECT tunnel's far end: bytes relayed as they come, never parsed, never pooled."""

    def __init__(self, client: ForwardConnection) -> None:
        self.client: ForwardConnection | None = client
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.last_activity = time.monotonic()
        self.paused: set[str] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def write(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        if self.transport is not None:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        if self.client is None:
            self.close()
            return
        self.client.tunnel_data(data)

    def eof_received(self) -> bool | None:
        if self.client is not None:
            return self.client.tunnel_eof()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        client = self.client
        self.client = None
        if client is not None:
            client.tunnel_lost(self)

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.pause("origin")

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.resume("origin")

    def pause_reading(self, why: str) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused.add(why)

    def resume_reading(self, why: str) -> None:
        if why in self.paused:
            self.paused.discard(why)
            if not self.paused and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        self.client = None
        if self.transport is not None:
            self.transport.abort()


# --------------------------------------------------------------------------- helpers


def _frame(chunk: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(chunk), chunk)


def _destination(request: ForwardRequest) -> tuple[str, int, bytes]:
    """Host, port and origin-form target of a forward request; _Refused(400) if unusable."""
    target = request.target
    if request.method == b"CONNECT":
        text = target.decode("latin-1")
        host, sep, port_text = text.rpartition(":")
        if not sep or not port_text.isdigit() or not host:
            raise _Refused(400, f"CONNECT needs host:port, got {text!r}", decision="error")
        port = int(port_text)
        path = b""
    else:
        if target[:1] == b"/" or target == b"*":
            raise _Refused(400, "this is a forward proxy: send absolute-form requests "
                                "(GET http://host/path) or CONNECT", decision="error")
        try:
            url = httptools.parse_url(target)
        except httptools.HttpParserInvalidURLError:
            raise _Refused(400, "malformed request target", decision="error") from None
        if url.schema is None or url.schema.lower() != b"http":
            raise _Refused(400, "only http:// URLs are forwarded; use CONNECT for https",
                           decision="error")
        if url.userinfo:
            raise _Refused(400, "credentials in the URL are not forwarded", decision="error")
        if not url.host:
            raise _Refused(400, "absolute-form request without a host", decision="error")
        host = url.host.decode("latin-1")
        port = url.port if url.port is not None else 80
        path = (url.path or b"/") + (b"?" + url.query if url.query else b"")
    if not 1 <= port <= 65535:
        raise _Refused(400, f"port {port} out of range", decision="error")
    try:
        return normalize_host(host), port, path
    except InvalidHost as exc:
        raise _Refused(400, str(exc), decision="error") from None


def _host_header(request: ForwardRequest) -> bytes:
    host = request.host
    text = f"[{host}]" if ":" in host else host
    if request.port != 80:
        text += f":{request.port}"
    return text.encode("latin-1")


_KEPT_DROPPED = _REQUEST_DROPPED | {b"x-forwarded-for", b"forwarded", b"via"}
_ANONYMOUS_DROPPED = _REQUEST_DROPPED | _FORWARDING


def _end_to_end(headers: list[tuple[bytes, bytes]], anonymize: bool) -> list[tuple[bytes, bytes]]:
    """The client's headers minus hop-by-hop ones, those `Connection` names and Host; the
    chains of X-Forwarded-For, Forwarded and Via are re-added by `_forwarding_lines`, or,
    anonymizing, every forwarding header is dropped."""
    return hdrs.filter_headers(headers, _ANONYMOUS_DROPPED if anonymize else _KEPT_DROPPED)


def egress_record(peer: str, request: ForwardRequest) -> Record:
    """A forward exchange as an access log record (logformat.FIELDS): the destination is
    the host, the decision the policy outcome, bytes each way as relayed."""
    destination = f"{request.host}:{request.port}" if request.host else ""
    return (
        time.time(), "forward", peer, request.method, destination, request.target,
        "HTTP/1.1" if request.http11 else "HTTP/1.0", max(request.status, 0), request.up,
        request.down, time.monotonic() - request.started, None, "", "", "",
        f"{request.address}:{request.port}" if request.address != "-" else "", 0, "",
        request.decision if request.decision != "-" else "", None, None,
    )

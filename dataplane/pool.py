"""Keep-alive connections to one endpoint, and the protocol that reads its responses.

A pooled connection is an `asyncio.Protocol`, not a stream: response bytes are parsed
by llhttp (through httptools) as they arrive and handed straight to the client side of
the exchange, with no task, future or timer per request. That is where a plain
aiohttp proxy loses most of its time (see the performance notes in the README).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol

import httptools
from mypy_extensions import mypyc_attr

from kanal.dataplane.headers import HOP_BY_HOP, RESPONSE_DROPPED, connection_tokens
from kanal.dataplane.http1 import MAX_RESPONSE_HEAD, final_coding_is_chunked
from kanal.dataplane.limits import UpstreamLimits

_SPECIAL_RESPONSE_HEADERS: Final = HOP_BY_HOP | {b"content-length"}
# Whether a name of each length may be one of them: most answer headers (Date, Server,
# Content-Type...) are told apart by their length alone, without a lower-case copy
# and a set lookup.
_SPECIAL_RESPONSE_LENGTHS: Final[tuple[bool, ...]] = tuple(
    any(len(name) == n for name in _SPECIAL_RESPONSE_HEADERS) for n in range(32))
# `Connection` values that name no header beyond the hop-by-hop ones.
_PLAIN_CONNECTION: Final = frozenset({b"keep-alive", b"Keep-Alive", b"upgrade", b"Upgrade"})

if TYPE_CHECKING:
    from kanal.dataplane.balancer import EndpointState


@mypyc_attr(native_class=False)  # mypyc cannot subclass built-in exceptions natively
class UpstreamConnectError(ConnectionError):
    """The endpoint could not be reached (refused, unreachable, TLS failure)."""


@mypyc_attr(native_class=False)
class UpstreamConnectTimeout(UpstreamConnectError, asyncio.TimeoutError):
    """Connecting took longer than the Upstream's connect timeout.

    It is both a connect error and a timeout, so callers can catch either.
    """


def write_batch(transport: asyncio.Transport, batch: list[bytes]) -> None:
    """Send what a sink gathered while one read was parsed, in one send: a batch whose
    last part is large goes out with `writelines` (one writev, the body not copied
    into a join), a small one joined."""
    if len(batch) == 1:
        transport.write(batch[0])
    elif len(batch[-1]) >= 4096:
        transport.writelines(batch)
    else:
        transport.write(b"".join(batch))


class ResponseSink(Protocol):
    """The client side of an exchange: what a pooled connection reports to."""

    def response_head(self, conn: UpstreamConnection) -> None: ...
    def response_body(self, chunk: bytes) -> None: ...
    def response_done(self, conn: UpstreamConnection) -> None: ...
    def upstream_failed(self, conn: UpstreamConnection, reason: str, exc: BaseException | None) -> None: ...
    def upstream_upgraded(self, conn: UpstreamConnection, rest: bytes) -> None: ...
    def upstream_pause_writing(self) -> None: ...
    batch: list[bytes] | None
    def end_batch(self) -> None: ...
    def flush(self, batch: list[bytes]) -> None: ...
    def upstream_resume_writing(self) -> None: ...


@mypyc_attr(allow_interpreted_subclasses=True)  # HTTP/2 streams and aggregates
class UpstreamConnection(asyncio.Protocol):
    """One connection to an endpoint, carrying one exchange at a time."""

    __slots__ = (
        "pool", "transport", "parser", "sink", "status", "headers", "content_length",
        "chunked", "no_body", "got_bytes", "idle_since", "last_activity", "closed",
        "requests", "tunnel", "head_done", "keep_alive", "connection_named",
        "upgrade_value", "head_bytes", "head_read_bytes", "trailers", "grpc_status",
        "answers_paused",
    )

    def __init__(self, pool: EndpointPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.sink: ResponseSink | None = None
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_length: bytes | None = None
        self.chunked = False
        self.no_body = False
        self.got_bytes = False
        self.head_done = False
        self.keep_alive = True
        self.connection_named: set[bytes] | None = None
        self.upgrade_value: bytes | None = None
        self.head_bytes = 0
        self.head_read_bytes = 0
        self.idle_since = 0.0
        self.last_activity = 0.0
        self.closed = False
        self.requests = 0
        self.tunnel: asyncio.Transport | None = None
        # The answer's trailers, relayed after its last chunk (HTTP/2 upstreams: gRPC).
        self.trailers: list[tuple[bytes, bytes]] | None = None
        # A gRPC answer's status name when it failed in its head (trailers-only), for
        # retryOn; "" otherwise.
        self.grpc_status = ""
        # Reading paused by the sink while its client catches up (`pause_answers`).
        self.answers_paused = False

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        sink = self.sink
        if sink is None:
            # Bytes from an idle connection: the server is confused or closing; drop it.
            self.close()
            return
        self.got_bytes = True
        self.last_activity = time.monotonic()
        sink.batch = []  # what the sink writes while this is parsed leaves in one send
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            offset = upgrade.args[0] if upgrade.args else len(data)
            sink.end_batch()
            sink.upstream_upgraded(self, data[offset:])
        except httptools.HttpParserError as exc:
            self.sink = None
            self.close()
            sink.end_batch()
            sink.upstream_failed(self, f"invalid response from upstream: {exc}", exc)
        else:
            # Through the sink's method, not by reading `sink.batch` here: an answer that
            # ended within this read has gone out already (the attribute is None again),
            # which compiled code would not expect of the list assigned above.
            sink.end_batch()
            if not self.head_done and self.sink is sink:
                # Still in the answer's head: bound it, whatever pieces it comes in.
                self.head_read_bytes += len(data)
                if self.head_read_bytes > MAX_RESPONSE_HEAD:
                    self._head_too_large(sink)

    def _head_too_large(self, sink: ResponseSink) -> None:
        self.sink = None
        self.close()
        sink.upstream_failed(
            self, f"invalid response from upstream: head larger than {MAX_RESPONSE_HEAD} bytes",
            None)

    def eof_received(self) -> bool | None:
        if self.tunnel is not None:
            if self.tunnel.can_write_eof():
                self.tunnel.write_eof()
                return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.tunnel is not None:
            self.tunnel.close()
            self.tunnel = None
            return
        sink = self.sink
        if sink is None:
            return
        if self.head_done and self.content_length is None and not self.chunked and not self.no_body:
            # The body was delimited by the connection's end: this is its clean end.
            sink.response_done(self)
            return
        self.sink = None
        reason = "upstream closed the connection" if exc is None else f"upstream connection lost: {exc}"
        sink.upstream_failed(self, reason, exc)

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_pause_writing()

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_resume_writing()

    # --- httptools callbacks -------------------------------------------------------------

    # No on_message_begin or on_status: each callback httptools finds is a Python call
    # per answer. `start` resets what a new answer needs, and the reason phrase, which
    # HTTP/1.1 clients ignore, is the standard one for the status.

    def _reset_answer(self) -> None:
        self.head_bytes = 0
        self.headers = []
        self.connection_named = None
        self.upgrade_value = None
        self.content_length = None
        self.chunked = False
        self.head_done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        """Keep end-to-end headers; note framing and hop-by-hop ones, which stop here."""
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > MAX_RESPONSE_HEAD:
            raise httptools.HttpParserError(f"response head larger than {MAX_RESPONSE_HEAD} bytes")
        size = len(name)
        if size >= 32 or not _SPECIAL_RESPONSE_LENGTHS[size]:
            self.headers.append((name, value))
            return
        lower = name.lower()
        if lower not in _SPECIAL_RESPONSE_HEADERS:
            self.headers.append((name, value))
        elif lower == b"content-length":
            self.content_length = value
        elif lower == b"transfer-encoding":
            self.chunked = final_coding_is_chunked(value)
        elif lower == b"connection":
            if value in _PLAIN_CONNECTION:
                return  # names nothing beyond what stops here anyway (most answers)
            tokens = connection_tokens(value) - RESPONSE_DROPPED
            if tokens:
                self.connection_named = (self.connection_named or set()) | tokens
        elif lower == b"upgrade":
            self.upgrade_value = value

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        self.status = status
        if 100 <= status < 200:
            # Informational: the final answer follows on the same connection. A 101 ends
            # HTTP here: feed_data raises HttpParserUpgrade, and the sink hears of it then.
            if status != 101:
                relay = self.pool.on_informational
                if relay is not None:
                    relay(self)
                self._reset_answer()
            return
        self.head_done = True
        # Read now: once the message is complete the parser forgets the answer's version.
        self.keep_alive = self.parser.should_keep_alive()
        if self.no_body and (self.chunked or self.content_length not in (None, b"0")):
            # The answer to a HEAD announces a body it does not carry. Some servers send
            # it anyway; a reused connection would read those bytes as the next answer.
            self.keep_alive = False
        if status in (204, 304):
            self.no_body = True
        sink = self.sink
        if sink is not None:
            sink.response_head(self)
            if self.no_body and self.sink is sink:
                # A HEAD answer (or 204/304) carries no body, whatever its headers say;
                # llhttp cannot be told so, hence a fresh parser for the next answer.
                self.parser = httptools.HttpResponseParser(self)
                self.sink = None
                sink.response_done(self)

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            self.sink.response_body(body)

    def on_message_complete(self) -> None:
        if not self.head_done:
            return  # the end of an informational answer
        sink = self.sink
        if sink is not None:
            self.sink = None
            sink.response_done(self)

    # --- exchanges -----------------------------------------------------------------------

    def start(self, sink: ResponseSink, head: bytes, no_body: bool, now: float = 0.0) -> None:
        """Send a request head; the answer will be reported to `sink`. `now`: the clock
        already read for this moment, if any."""
        self.sink = sink
        self.no_body = no_body
        self.got_bytes = False
        self.head_bytes = 0
        self.head_read_bytes = 0
        self.headers = []
        self.connection_named = None
        self.upgrade_value = None
        self.content_length = None
        self.chunked = False
        self.head_done = False
        self.requests += 1
        self.last_activity = now or time.monotonic()
        assert self.transport is not None
        self.transport.write(head)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.last_activity = time.monotonic()
        self.transport.write(data)

    def pause_answers(self) -> None:
        """Stop reading the answer while the sink's client catches up (its transport
        asked to pause writing)."""
        transport = self.transport
        if not self.answers_paused and transport is not None:
            self.answers_paused = True
            transport.pause_reading()

    def resume_answers(self) -> None:
        """Read the answer again: the sink's client caught up."""
        if self.answers_paused:
            self.answers_paused = False
            transport = self.transport
            if transport is not None and not self.closed:
                transport.resume_reading()

    def release(self) -> None:
        """The exchange is over: back to the pool if the connection can carry another.

        An answer can end while its client lags (in the read that made the client's
        transport pause writing, so the sink paused this connection's reading): the
        pool only keeps connections that read, or the next exchange's answer would
        never be seen."""
        self.sink = None
        transport = self.transport
        if (self.keep_alive and not self.closed and self.tunnel is None and transport is not None
                and not transport.is_closing()):
            if self.answers_paused:
                self.resume_answers()
            self.pool.put_back(self)
        else:
            self.close()

    def close(self) -> None:
        self.sink = None
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.sink = None
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


@mypyc_attr(allow_interpreted_subclasses=True)  # HTTP/2 streams and aggregates
class EndpointPool:
    """Idle keep-alive connections to one endpoint, most recently used first."""

    __slots__ = (
        "address", "port", "ssl_context", "server_hostname", "connect_timeout",
        "idle_timeout", "max_idle", "idle", "open", "state", "limits", "on_informational",
    )

    def __init__(
        self,
        address: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        connect_timeout: float = 2.0,
        idle_timeout: float = 60.0,
        max_idle: int = 256,
        state: EndpointState | None = None,
    ) -> None:
        self.address = address
        self.port = port
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.idle: list[UpstreamConnection] = []
        self.open: set[UpstreamConnection] = set()
        self.state = state
        self.limits: UpstreamLimits | None = None  # the Upstream's, set by Runtime.build
        # Told of each informational answer (1xx but 101) before the final one, with the
        # connection whose sink the exchange is; None: they are dropped (the reverse
        # proxy answers `Expect` itself). The forward proxy relays them to its clients.
        self.on_informational: Callable[[UpstreamConnection], None] | None = None

    def take_idle(self) -> UpstreamConnection | None:
        """The most recently used idle connection; one that closed has left the list."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def connect(self) -> UpstreamConnection:
        """A new connection, counted against the Upstream's connection limit."""
        limits = self.limits
        if limits is not None:
            limits.connection_opened()
        try:
            conn = await self._dial()
        except BaseException:
            if limits is not None:
                limits.connection_closed()
            raise
        self.open.add(conn)
        return conn

    async def _dial(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        factory: Callable[[], UpstreamConnection] = lambda: UpstreamConnection(self)  # noqa: E731
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.ssl_context is not None:
                    _, conn = await loop.create_connection(
                        factory, self.address, self.port, ssl=self.ssl_context,
                        server_hostname=self.server_hostname or self.address,
                    )
                else:
                    _, conn = await loop.create_connection(factory, self.address, self.port)
        except TimeoutError as exc:
            raise UpstreamConnectTimeout(
                f"connect to {self.address}:{self.port} timed out after {self.connect_timeout:g}s"
            ) from exc
        except ssl.SSLError as exc:
            raise UpstreamConnectError(f"TLS to {self.address}:{self.port} failed: {exc}") from exc
        except OSError as exc:
            reason = exc.strerror or str(exc) or (  # a bare reset: say where it happened
                f"{type(exc).__name__} in the TLS handshake" if self.ssl_context else type(exc).__name__)
            raise UpstreamConnectError(f"connect to {self.address}:{self.port} failed: {reason}") from exc
        return conn

    def put_back(self, conn: UpstreamConnection) -> None:
        if len(self.idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = conn.last_activity  # its last read or write: the answer's end
        self.idle.append(conn)
        limits = self.limits
        if limits is not None and limits.waiters:
            limits.wake_one()

    def forget(self, conn: UpstreamConnection) -> None:
        if conn in self.open:
            self.open.discard(conn)
            if self.limits is not None:
                self.limits.connection_closed()
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def retire(self) -> None:
        """The endpoint left the configuration: idle connections close now, busy ones
        finish their exchange and then close, as the pool no longer takes them back."""
        self.max_idle = 0
        for conn in self.idle:
            conn.close()
        self.idle.clear()

    def sweep(self, now: float) -> None:
        """Close idle connections older than the idle timeout, and time out stalled ones.

        An exchange with no byte either way for the idle timeout is given up (504, or
        an aborted answer if it had started): one sweep a second serves every exchange,
        so no request needs a timer of its own for this.
        """
        limit = now - self.idle_timeout
        for conn in list(self.open):
            sink = conn.sink
            if sink is not None and conn.tunnel is None and conn.last_activity < limit:
                conn.sink = None
                conn.abort()
                sink.upstream_failed(
                    conn, f"no data from upstream for {self.idle_timeout:g}s (idle timeout)",
                    TimeoutError(),
                )
        if self.idle and self.idle[0].idle_since < limit:
            keep = []
            for conn in self.idle:
                if conn.idle_since < limit:
                    conn.close()
                else:
                    keep.append(conn)
            self.idle = keep

    def close_all(self) -> None:
        for conn in list(self.open):
            conn.close()
        self.idle.clear()

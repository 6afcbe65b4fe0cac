"""HTTP/2 to upstreams (`protocol: H2C` or `H2`): a few multiplexed connections per
endpoint, each request a stream, in the shape the proxy knows.

The request logic (`proxy.ClientConnection`) talks to an upstream through a pooled
HTTP/1 connection (`pool.UpstreamConnection`): it takes an idle one or asks for a new
one, writes an HTTP/1.1 head and body bytes, and hears of the answer through its
`ResponseSink` methods. `H2EndpointPool` gives it an `H2Stream` instead, an
`UpstreamConnection` whose head and body are read back (llhttp) and sent as HEADERS and
DATA frames on a shared `H2Channel`, and whose answer (HEADERS, DATA, trailers) is
reported to the same sink. So retries, breakers, timeouts and limits work unchanged.

"Idle" means a channel with room for one more stream (the server's
SETTINGS_MAX_CONCURRENT_STREAMS); a new channel is opened only when none has room, and
is counted against the Upstream's connection limit. A stream the server refused
(REFUSED_STREAM, or beyond the last stream of its GOAWAY) never reached the
application: it is reported as a stale HTTP/1 connection's request is, so the request
logic sends it again on a new channel when it can (no body, or a body kept for retries).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import httptools

from kanal.dataplane import grpc, h2rules
from kanal.dataplane.pool import (
    EndpointPool,
    ResponseSink,
    UpstreamConnectError,
    UpstreamConnection,
)

log = logging.getLogger("kanal.h2pool")

_CONNECTION_SPECIFIC = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade",
    b"host", b"te",
})


class H2EndpointPool(EndpointPool):
    """HTTP/2 connections to one endpoint; hands out streams."""

    __slots__ = ("channels",)

    def __init__(self, address: str, port: int, **settings: Any) -> None:
        super().__init__(address, port, **settings)
        self.channels: list[H2Channel] = []

    def take_idle(self) -> UpstreamConnection | None:
        """A stream on a connection with room for one, or None (connect then)."""
        for channel in reversed(self.channels):
            if channel.has_room():
                return H2Stream(self, channel)
        return None

    async def connect(self) -> UpstreamConnection:
        for channel in reversed(self.channels):
            if channel.has_room():  # opened while this request waited for its turn
                return H2Stream(self, channel)
        limits = self.limits
        if limits is not None:
            limits.connection_opened()
        try:
            channel = await self._dial_channel()
        except BaseException:
            if limits is not None:
                limits.connection_closed()
            raise
        self.channels.append(channel)
        return H2Stream(self, channel)

    async def _dial_channel(self) -> H2Channel:
        loop = asyncio.get_running_loop()
        where = f"{self.address}:{self.port}"
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.ssl_context is not None:
                    transport, channel = await loop.create_connection(
                        lambda: H2Channel(self), self.address, self.port, ssl=self.ssl_context,
                        server_hostname=self.server_hostname or self.address)
                    ssl_object = transport.get_extra_info("ssl_object")
                    if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
                        transport.close()
                        raise UpstreamConnectError(
                            f"TLS to {where}: the endpoint did not agree to HTTP/2 (ALPN h2)")
                else:
                    _, channel = await loop.create_connection(
                        lambda: H2Channel(self), self.address, self.port)
        except TimeoutError as exc:
            raise UpstreamConnectError(
                f"connect to {where} timed out after {self.connect_timeout:g}s") from exc
        except UpstreamConnectError:
            raise
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise UpstreamConnectError(f"connect to {where} failed: {reason}") from exc
        return channel

    def channel_lost(self, channel: H2Channel) -> None:
        if channel in self.channels:
            self.channels.remove(channel)
            if self.limits is not None:
                self.limits.connection_closed()

    def stream_over(self) -> None:
        """A stream ended: a request waiting for a connection may take its place."""
        limits = self.limits
        if limits is not None and limits.waiters:
            limits.wake_one()

    def put_back(self, conn: UpstreamConnection) -> None:
        self.stream_over()

    def forget(self, conn: UpstreamConnection) -> None:
        return

    def retire(self) -> None:
        self.max_idle = 0
        for channel in list(self.channels):
            channel.close_when_idle()

    def sweep(self, now: float) -> None:
        """Give up streams with no byte either way for the idle timeout; close channels
        that carried no stream for as long."""
        limit = now - self.idle_timeout
        for channel in list(self.channels):
            for stream in list(channel.streams.values()):
                if stream.sink is not None and stream.last_activity < limit:
                    stream.fail(f"no data from upstream for {self.idle_timeout:g}s (idle timeout)",
                                TimeoutError())
            if not channel.streams and channel.idle_since and channel.idle_since < limit:
                channel.close()

    def close_all(self) -> None:
        for channel in list(self.channels):
            channel.close()
        self.channels.clear()
        self.idle.clear()


class H2Channel(asyncio.Protocol):
    """One HTTP/2 connection to an endpoint, carrying many streams."""

    def __init__(self, pool: H2EndpointPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config=config)
        self.streams: dict[int, H2Stream] = {}
        self.closed = False
        self.going_away = False
        self.idle_since = time.monotonic()

    def has_room(self) -> bool:
        if self.closed or self.going_away or self.transport is None:
            return False
        h2conn = self.h2
        return h2conn.open_outbound_streams < min(h2conn.remote_settings.max_concurrent_streams,
                                                  h2rules.MAX_CONCURRENT_STREAMS)

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(h2rules.CONNECTION_WINDOW - h2rules.DEFAULT_WINDOW)
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.flush()
            self._fail_all(f"HTTP/2 protocol error from upstream: {exc}", refused=False)
            self.close()
            return
        for event in events:
            self._dispatch(event)
        self.flush()

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                stream.on_response(list(event.headers or ()), event.stream_ended is not None)
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id or 0)
            size = event.flow_controlled_length or 0
            if stream is None:
                if size:
                    self.h2.acknowledge_received_data(size, event.stream_id or 0)
                return
            stream.on_data(event.data or b"", size)
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                stream.trailers = [(n, v) for n, v in event.headers or ()
                                   if h2rules.field_is_safe(n, v)]
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.pop(event.stream_id or 0, None)
            if stream is not None:
                stream.on_end()
                self._stream_gone()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.pop(event.stream_id or 0, None)
            if stream is not None:
                refused = event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
                stream.on_failure(f"upstream reset the stream ({_code(event.error_code)})",
                                  refused=refused)
                self._stream_gone()
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.send_pending()
            else:
                for stream in list(self.streams.values()):
                    stream.send_pending()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.going_away = True
            last = event.last_stream_id or 0
            for stream_id in [i for i in self.streams if i > last]:
                self.streams.pop(stream_id).on_failure(
                    "upstream is going away (GOAWAY) before this stream", refused=True)
            if event.error_code:
                self._fail_all(f"upstream ended the connection ({_code(event.error_code)})",
                               refused=False)
            self._stream_gone()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.channel_lost(self)
        reason = "upstream closed the connection" if exc is None else f"upstream connection lost: {exc}"
        self._fail_all(reason, refused=False)

    # --- streams --------------------------------------------------------------------------

    def open_stream(self, stream: H2Stream, headers: list[tuple[bytes, bytes]], end: bool) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, headers, end_stream=end)
        self.streams[stream_id] = stream
        self.idle_since = 0.0
        self.flush()
        return stream_id

    def _stream_gone(self) -> None:
        if not self.streams:
            self.idle_since = time.monotonic()
            if self.going_away or self.pool.max_idle == 0:
                self.close()
        self.pool.stream_over()

    def _fail_all(self, reason: str, *, refused: bool) -> None:
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            stream.on_failure(reason, refused=refused)

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def reset(self, stream_id: int) -> None:
        if self.streams.pop(stream_id, None) is None:
            return
        try:
            self.h2.reset_stream(stream_id, error_code=h2.errors.ErrorCodes.CANCEL)
        except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
            pass
        self.flush()
        self._stream_gone()

    def close_when_idle(self) -> None:
        self.going_away = True
        if not self.streams:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.pool.channel_lost(self)
        try:
            self.h2.close_connection()
        except h2.exceptions.ProtocolError:
            pass
        data = self.h2.data_to_send()
        if self.transport is not None:
            if data:
                self.transport.write(data)
            self.transport.close()


def _code(code: object) -> str:
    return getattr(code, "name", str(code))


class _StreamReading(asyncio.Transport):
    """What the request logic pauses when its client reads slowly: the stream's window."""

    def __init__(self, stream: H2Stream) -> None:
        super().__init__()
        self.stream = stream

    def pause_reading(self) -> None:
        self.stream.reading_paused = True

    def resume_reading(self) -> None:
        self.stream.resume_reading()

    def is_reading(self) -> bool:
        return not self.stream.reading_paused

    def is_closing(self) -> bool:
        return self.stream.sink is None

    def close(self) -> None:
        self.stream.close()

    def abort(self) -> None:
        self.stream.abort()

    def can_write_eof(self) -> bool:
        return False


class _RequestReader:
    """Reads the HTTP/1.1 request the logic writes, for its stream (llhttp callbacks)."""

    def __init__(self, stream: H2Stream) -> None:
        self.stream = stream
        self.target = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.complete = False
        self.body: list[bytes] = []

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class H2Stream(UpstreamConnection):
    """One request on an `H2Channel`, in the shape of a pooled HTTP/1 connection."""

    __slots__ = ("channel", "stream_id", "reader", "request_parser", "outbox", "request_ended",
                 "reading_paused", "held", "end_sent")

    def __init__(self, pool: H2EndpointPool, channel: H2Channel) -> None:
        super().__init__(pool)
        self.channel = channel
        self.stream_id = 0
        self.transport = _StreamReading(self)
        self.reader = _RequestReader(self)
        self.request_parser = httptools.HttpRequestParser(self.reader)
        self.outbox: deque[bytes] = deque()
        self.request_ended = False
        self.end_sent = False
        self.reading_paused = False
        self.held = 0  # answer bytes read but not yet acknowledged (reading paused)

    # --- the request, as the logic writes it ----------------------------------------------

    def start(self, sink: ResponseSink, head: bytes, no_body: bool, now: float = 0.0) -> None:
        self.sink = sink
        self.no_body = no_body
        self.requests = 1
        self.last_activity = time.monotonic()
        channel = self.channel
        if channel.closed or self.stream_id:
            self.requests = 2  # never reached the server: may be sent again elsewhere
            self._fail_soon("upstream connection closed before the request")
            return
        try:
            self.request_parser.feed_data(head)
        except httptools.HttpParserError as exc:
            self._fail_soon(f"request could not be framed for HTTP/2: {exc}")
            return
        reader = self.reader
        scheme = b"https" if self.pool.ssl_context is not None else b"http"
        headers = upstream_headers(self.request_parser.get_method(), reader.target, scheme,
                                   reader.fields)
        try:
            self.stream_id = channel.open_stream(self, headers, reader.complete)
        except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError) as exc:
            self.requests = 2  # never reached the server: may be sent again elsewhere
            self._fail_soon(f"upstream connection refused a new stream: {exc}")
            return
        self.request_ended = reader.complete
        self.end_sent = reader.complete
        self._take_body()

    def _fail_soon(self, reason: str) -> None:
        """Fail after `start` returns: the logic is still sending this try's body."""
        asyncio.get_running_loop().call_soon(self.fail, reason, None)

    def write(self, data: bytes) -> None:
        if self.sink is None or not self.stream_id:
            return
        self.last_activity = time.monotonic()
        try:
            self.request_parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(f"request body could not be framed for HTTP/2: {exc}", None)
            return
        self._take_body()

    def _take_body(self) -> None:
        reader = self.reader
        if reader.body:
            self.outbox.extend(reader.body)
            reader.body.clear()
        if reader.complete:
            self.request_ended = True
        self.send_pending()

    def send_pending(self) -> None:
        """Send what the upstream's windows allow of the request body."""
        if not self.stream_id or self.sink is None:
            return
        h2conn = self.channel.h2
        outbox = self.outbox
        try:
            while outbox:
                window = min(h2conn.local_flow_control_window(self.stream_id),
                             h2conn.max_outbound_frame_size)
                if window <= 0:
                    break
                chunk = outbox[0]
                if len(chunk) <= window:
                    outbox.popleft()
                else:
                    outbox[0] = chunk[window:]
                    chunk = chunk[:window]
                h2conn.send_data(self.stream_id, chunk)
            if not outbox and self.request_ended and not self.end_sent:
                self.end_sent = True
                h2conn.end_stream(self.stream_id)
        except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
            return  # the stream is over; its end is reported by the channel
        self.channel.flush()
        sink = self.sink
        if sink is not None:
            # Backpressure on the client: stop reading its body while the upstream's
            # window is shut and a frame's worth waits.
            if sum(len(c) for c in outbox) > h2rules.RESPONSE_HIGH_WATER:
                sink.upstream_pause_writing()
            else:
                sink.upstream_resume_writing()

    # --- the answer -----------------------------------------------------------------------

    def on_response(self, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        sink = self.sink
        self.got_bytes = True
        self.last_activity = time.monotonic()
        status = 0
        fields: list[tuple[bytes, bytes]] = []
        length: bytes | None = None
        for name, value in headers:
            if name == b":status":
                status = int(value)
            elif name == b"content-length":
                length = value
            elif name[:1] != b":" and h2rules.field_is_safe(name, value):
                fields.append((name, value))
                if name == b"grpc-status" and ended:
                    # A trailers-only gRPC answer: its status may be retried (retryOn).
                    self.grpc_status = grpc.status_name(value) or ""
        if 100 <= status < 200:
            return  # informational: the final answer follows
        self.status = status
        self.headers = fields
        self.content_length = length
        self.chunked = False
        self.head_done = True
        if status in (204, 304):
            self.no_body = True
        if sink is not None:
            sink.response_head(self)

    def on_data(self, data: bytes, size: int) -> None:
        self.last_activity = time.monotonic()
        sink = self.sink
        if sink is not None and data and not self.no_body:
            sink.response_body(data)
        if self.reading_paused:
            self.held += size
        elif size:
            self.channel.h2.acknowledge_received_data(size, self.stream_id)

    def resume_reading(self) -> None:
        self.reading_paused = False
        held = self.held
        self.held = 0
        if held and self.stream_id in self.channel.streams:
            self.channel.h2.acknowledge_received_data(held, self.stream_id)
            self.channel.flush()

    def on_end(self) -> None:
        sink = self.sink
        if sink is None:
            return
        if not self.head_done:
            self.sink = None
            sink.upstream_failed(self, "upstream ended the stream without an answer", None)
            return
        self.sink = None
        sink.response_done(self)

    def on_failure(self, reason: str, *, refused: bool) -> None:
        if refused and not self.got_bytes:
            self.requests = 2  # never reached the application: sent again (proxy.py)
        self.fail(reason, None)

    def fail(self, reason: str, exc: BaseException | None) -> None:
        sink = self.sink
        self.sink = None
        self.closed = True
        if self.stream_id:
            self.channel.reset(self.stream_id)
        if sink is not None:
            sink.upstream_failed(self, reason, exc)

    # --- endings, as the logic asks -------------------------------------------------------

    def release(self) -> None:
        self.sink = None
        self.closed = True
        if self.stream_id in self.channel.streams:
            self.channel.reset(self.stream_id)  # the logic is done with an unfinished answer

    def close(self) -> None:
        self.release()

    def abort(self) -> None:
        self.release()


def upstream_headers(method: bytes, target: bytes, scheme: bytes,
                     fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """An HTTP/1.1 request head as an HTTP/2 header block: `Host` becomes `:authority`,
    names go to lower case, connection-specific fields are left out, and `te: trailers`
    is sent (gRPC servers require it; it says the proxy relays trailers)."""
    authority = b""
    rest: list[tuple[bytes, bytes]] = []
    for name, value in fields:
        lower = name.lower()
        if lower == b"host":
            authority = value
        elif lower not in _CONNECTION_SPECIFIC:
            rest.append((lower, value))
    block = [(b":method", method), (b":scheme", scheme), (b":path", target)]
    if authority:
        block.append((b":authority", authority))
    block.append((b"te", b"trailers"))
    return block + rest

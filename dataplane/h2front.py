"""HTTP/2 to clients: one `asyncio.Protocol` per HTTP/2 connection, on the h2 library.

A connection becomes HTTP/2 when TLS's ALPN chose `h2`, or when a plain connection
starts with the HTTP/2 preface (h2c with prior knowledge); `take_over` is called by the
HTTP/1 protocol (`proxy.ClientConnection`) at that point and replaces it on the
transport.

Every stream is served by a `ClientConnection` of its own, the very request logic of
HTTP/1.1 connections (routing, splits, affinity, retries, timeouts, breakers, TLS
policy, forwarding headers, and every filter added there), so HTTP/2 never forks it. The
stream's request is handed to it as an HTTP/1.1 head (`h2rules.request_head`) and its
DATA as body bytes; its "transport" is a `StreamTransport`, which reads the HTTP/1.1
answer the logic writes (llhttp again) and turns it into HEADERS and DATA frames, and
maps the logic's flow control (pause and resume reading, pause and resume writing) to
the stream's HTTP/2 windows.

Limits: SETTINGS_MAX_CONCURRENT_STREAMS (a stream over it is refused alone, with
RST_STREAM(REFUSED_STREAM): `h2server`), the header list size (enforced by the HPACK
decoder while it decodes), per-stream and per-connection windows (the bound on buffered
request bytes), a bound on queued answer bytes per stream, and flood counters (rapid
reset, refused streams, PING, SETTINGS, empty DATA frames) that end the connection with
GOAWAY(ENHANCE_YOUR_CALM). A stream whose answer waits on a window the client keeps at
zero is reset after the listener's body timeout. A graceful stop sends GOAWAY naming
the last stream taken, finishes those streams and refuses later ones.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import h2.config
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import httptools
from hyperframe.frame import GoAwayFrame

from kanal.dataplane import grpc, h2rules
from kanal.dataplane.h2server import ServerConnection, StreamRefused
from kanal.dataplane.http1 import KEEPALIVE_TIMEOUT
from kanal.dataplane.proxy import ClientConnection

if TYPE_CHECKING:
    from kanal.dataplane.runtime import ProxyContext

log = logging.getLogger("kanal.h2")

_END_CHUNK = b"0\r\n\r\n"


def take_over(client: ClientConnection, transport: asyncio.BaseTransport, data: bytes) -> bool:
    """Serve `transport` as HTTP/2 from now on, if it is: after ALPN `h2` (`data` empty),
    or when `data` (the read on which llhttp paused on `PRI`) continues a preface."""
    if isinstance(transport, StreamTransport):
        return False
    if data:
        initial = h2rules.preface_rest(data)
        if initial is None:
            return False
    else:
        initial = b""
    context = client.context
    context.clients.discard(client)
    client.closed = True
    connection = Http2Connection(context, client.peer, getattr(client, "server_name", None))
    transport.set_protocol(connection)
    connection.connection_made(transport)
    if initial:
        connection.data_received(initial)
    return True


class Stream:
    """One stream: its request logic, and the bytes waiting in each direction."""

    __slots__ = (
        "answer_done", "chunked", "conn", "deadline", "done", "grpc", "inbox", "method",
        "outbox", "outbox_size",
        "reading_paused", "request_done", "stalled_since", "stream_id", "trailers", "transport",
        "writing_paused",
    )

    def __init__(self, stream_id: int, method: bytes, chunked: bool) -> None:
        self.stream_id = stream_id
        self.method = method
        self.chunked = chunked
        self.conn: ClientConnection | None = None
        self.transport: StreamTransport | None = None
        self.inbox: deque[tuple[bytes, int]] = deque()  # (bytes for the logic, window size)
        self.outbox: deque[bytes] = deque()
        self.outbox_size = 0
        self.answer_done = False   # our END_STREAM is queued (in outbox or sent)
        self.request_done = False  # the client's END_STREAM arrived
        self.done = False          # nothing more is sent on this stream
        self.reading_paused = False
        self.writing_paused = False
        self.stalled_since = 0.0
        self.trailers: list[tuple[bytes, bytes]] | None = None  # sent after the last DATA
        self.grpc = False
        self.deadline: asyncio.TimerHandle | None = None  # grpc-timeout


class Http2Connection(asyncio.Protocol):
    """One client connection speaking HTTP/2."""

    def __init__(self, context: ProxyContext, peer: str, server_name: str | None) -> None:
        self.context = context
        self.peer = peer
        self.server_name = server_name
        self.transport: asyncio.Transport | None = None
        # What the proxy sends is made by h2rules (lower-case names, no connection-specific
        # fields, values llhttp has read): h2's checks of it would only cost time. What
        # the client sends is always checked.
        config = h2.config.H2Configuration(client_side=False, header_encoding=None,
                                           validate_outbound_headers=False,
                                           normalize_outbound_headers=False)
        self.h2 = ServerConnection(config)
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: h2rules.MAX_CONCURRENT_STREAMS,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: h2rules.MAX_HEADER_LIST_SIZE,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: h2rules.STREAM_WINDOW,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        })
        self.streams: dict[int, Stream] = {}
        self.write_paused = False
        self.dispatching = False
        self.flush_scheduled = False
        self.closed = False
        self.going_away: int | None = None  # the last stream id announced in our GOAWAY
        self.last_activity = time.monotonic()
        self.resets = h2rules.WindowCounter(h2rules.MAX_RESETS)
        self.pings = h2rules.WindowCounter(h2rules.MAX_PINGS)
        self.settings = h2rules.WindowCounter(h2rules.MAX_SETTINGS)
        self.empty_frames = h2rules.WindowCounter(h2rules.MAX_EMPTY_FRAMES)
        self.refusals = h2rules.WindowCounter(h2rules.MAX_REFUSED_STREAMS)

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.context.clients.add(self)
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(h2rules.CONNECTION_WINDOW - h2rules.DEFAULT_WINDOW)
        self._flush_now()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_activity = now = time.monotonic()
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # h2 has queued a GOAWAY with the error's code: send it, and close.
            log.debug("HTTP/2 protocol error from %s: %s", self.peer, exc)
            self._close_now()
            return
        self.dispatching = True
        try:
            for event in events:
                if self.closed:
                    return
                self._dispatch(event, now)
        finally:
            self.dispatching = False
        self._flush_now()

    def _dispatch(self, event: h2.events.Event, now: float) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._request(event)
        elif isinstance(event, h2.events.DataReceived):
            self._data(event, now)
        elif isinstance(event, h2.events.StreamEnded):
            self._request_ended(event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            self._reset_by_client(event.stream_id, now)
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    self._send_pending(stream)
            else:
                self._send_all_pending()
        elif isinstance(event, h2.events.PingReceived):
            if self.pings.hit(now):
                self._calm_down("PING flood")
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            if self.settings.hit(now):
                self._calm_down("SETTINGS flood")
        elif isinstance(event, h2.events.ConnectionTerminated):
            # The client's GOAWAY: finish what it sent, then close.
            self.going_away = event.last_stream_id or 0
            self._close_when_idle()
        elif isinstance(event, StreamRefused):
            log.debug("HTTP/2 client %s: stream %d refused: over %d streams open",
                      self.peer, event.stream_id, h2rules.MAX_CONCURRENT_STREAMS)
            if self.refusals.hit(now):
                self._calm_down("streams opened beyond SETTINGS_MAX_CONCURRENT_STREAMS")

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._send_all_pending()
        self.flush()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.context.clients.discard(self)
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            self._drop(stream)

    # --- output ---------------------------------------------------------------------------

    def flush(self) -> None:
        """Write what h2 has framed, once per turn of the loop: the frames of every
        stream answered meanwhile leave in one send (during event dispatch, at its end)."""
        if self.dispatching or self.flush_scheduled:
            return
        self.flush_scheduled = True
        asyncio.get_running_loop().call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self.flush_scheduled = False
        data = self.h2.data_to_send()
        transport = self.transport
        if data and transport is not None and not self.closed:
            transport.write(data)
            if transport.get_write_buffer_size() > h2rules.WRITE_BUFFER_LIMIT:
                self._calm_down("a client that does not read its control frames")

    def _close_now(self) -> None:
        """Send what is framed (our GOAWAY) and close. On TCP, only our side closes at
        first: what the client still sends is read and dropped for a moment, since
        closing with unread bytes resets the connection and the client could lose the
        GOAWAY that says why (nginx's lingering close)."""
        self._flush_now()
        self.closed = True
        transport = self.transport
        if transport is None:
            return
        if transport.can_write_eof():
            transport.write_eof()
            asyncio.get_running_loop().call_later(h2rules.LINGER, transport.close)
        else:
            transport.close()

    def _calm_down(self, why: str) -> None:
        log.warning("HTTP/2 client %s: %s; closing with ENHANCE_YOUR_CALM", self.peer, why)
        self.context.metrics.count_event("http2_flood", "")
        self.h2.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        self.dispatching = False
        self._close_now()

    # --- requests -------------------------------------------------------------------------

    def _request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        if self.going_away is not None and stream_id > self.going_away:
            self._reset(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        ended = event.stream_ended is not None
        head = h2rules.request_head(list(event.headers or ()), ended)
        if isinstance(head, str):
            log.debug("HTTP/2 client %s: stream %d refused: %s", self.peer, stream_id, head)
            self._reset(stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return
        stream = Stream(stream_id, head.method, head.chunked)
        stream.grpc = head.grpc
        conn = ClientConnection(self.context)
        if head.grpc:
            conn.grpc_deadline = math.inf
        if head.grpc_timeout is not None:
            stream.deadline = asyncio.get_running_loop().call_later(
                head.grpc_timeout, self._deadline, stream, head.grpc_timeout)
            conn.grpc_deadline = stream.deadline.when()
        transport = StreamTransport(self, stream)
        conn.transport = transport
        conn.peer = self.peer
        conn.server_name = self.server_name
        stream.conn = conn
        stream.transport = transport
        self.streams[stream_id] = stream
        conn.data_received(head.head)

    def _data(self, event: h2.events.DataReceived, now: float) -> None:
        stream_id = event.stream_id
        size = event.flow_controlled_length or 0
        data = event.data or b""
        stream = self.streams.get(stream_id)
        if not data and event.stream_ended is None and self.empty_frames.hit(now):
            self._calm_down("empty DATA frames")
            return
        if stream is None or stream.conn is None or stream.done:
            self._acknowledge(stream_id, size)
            return
        if stream.chunked and data:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        if stream.reading_paused or stream.inbox:
            stream.inbox.append((data, size))
            return
        if data:
            stream.conn.data_received(data)
        self._acknowledge(stream_id, size)

    def _request_ended(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        stream.request_done = True
        if stream.chunked and stream.conn is not None and not stream.done:
            if stream.reading_paused or stream.inbox:
                stream.inbox.append((_END_CHUNK, 0))
            else:
                stream.conn.data_received(_END_CHUNK)

    def _acknowledge(self, stream_id: int, size: int) -> None:
        if size:
            self.h2.acknowledge_received_data(size, stream_id)
            self.flush()

    def resume_stream(self, stream: Stream) -> None:
        """The request logic reads again: hand it what waited, while it keeps reading."""
        stream.reading_paused = False
        conn = stream.conn
        while stream.inbox and not stream.reading_paused and conn is not None and not stream.done:
            data, size = stream.inbox.popleft()
            if data:
                conn.data_received(data)
            self._acknowledge(stream.stream_id, size)

    def _reset_by_client(self, stream_id: int, now: float) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None or stream.done:
            return
        if self.resets.hit(now):
            self._calm_down("rapid reset: streams reset before their answer was sent")
        self._drop(stream)

    def _drop(self, stream: Stream) -> None:
        """The stream ends before its answer did, from outside the request logic: the
        logic lets go of it (an upstream connection mid-exchange is closed)."""
        conn = stream.conn
        self._forget(stream)
        if conn is not None:
            conn.connection_lost(None)

    # --- answers --------------------------------------------------------------------------

    def send_headers(self, stream: Stream, block: list[tuple[bytes, bytes]], end: bool) -> None:
        if stream.done:
            return
        try:
            self.h2.send_headers(stream.stream_id, block, end_stream=end)
        except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError) as exc:
            log.debug("HTTP/2 stream %d: headers not sent: %s", stream.stream_id, exc)
            self._forget(stream)
            return
        if end:
            stream.answer_done = True
            self._finished(stream)
        self.flush()

    def queue_data(self, stream: Stream, data: bytes, end: bool) -> None:
        """Queue answer bytes; `send_data` sends them (a body and its end in one frame)."""
        if stream.done:
            return
        if data:
            stream.outbox.append(data)
            stream.outbox_size += len(data)
        if end:
            stream.answer_done = True

    def send_data(self, stream: Stream, data: bytes, end: bool) -> None:
        self.queue_data(stream, data, end)
        if stream.done:
            return
        self._send_pending(stream)
        self.flush()
        conn = stream.conn
        if (stream.outbox_size > h2rules.RESPONSE_HIGH_WATER and not stream.writing_paused
                and conn is not None):
            stream.writing_paused = True
            conn.pause_writing()

    def _send_pending(self, stream: Stream) -> None:
        """Send what the windows allow of a stream's queued answer."""
        if stream.done:
            return
        if self.write_paused:
            if stream.outbox and not stream.stalled_since:
                stream.stalled_since = time.monotonic()
            return
        h2conn = self.h2
        try:
            while stream.outbox:
                window = min(h2conn.local_flow_control_window(stream.stream_id),
                             h2conn.max_outbound_frame_size)
                if window <= 0:
                    break
                chunk = stream.outbox[0]
                if len(chunk) <= window:
                    stream.outbox.popleft()
                else:
                    stream.outbox[0] = chunk[window:]
                    chunk = chunk[:window]
                stream.outbox_size -= len(chunk)
                last = not stream.outbox and stream.answer_done and not stream.trailers
                h2conn.send_data(stream.stream_id, chunk, end_stream=last)
                if last:
                    stream.trailers = None
                    self._finished(stream)
                    return
            if not stream.outbox and stream.answer_done:
                if stream.trailers:
                    h2conn.send_headers(stream.stream_id, stream.trailers, end_stream=True)
                else:
                    h2conn.end_stream(stream.stream_id)
        except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError) as exc:
            log.debug("HTTP/2 stream %d: data not sent: %s", stream.stream_id, exc)
            self._forget(stream)
            self.streams.pop(stream.stream_id, None)
            return
        if not stream.outbox:
            stream.stalled_since = 0.0
        elif not stream.stalled_since:
            stream.stalled_since = time.monotonic()
        if stream.writing_paused and stream.outbox_size <= h2rules.RESPONSE_HIGH_WATER // 2:
            stream.writing_paused = False
            if stream.conn is not None:
                stream.conn.resume_writing()
        if not stream.outbox and stream.answer_done:
            self._finished(stream)

    def _send_all_pending(self) -> None:
        for stream in list(self.streams.values()):
            if stream.outbox or stream.answer_done:
                self._send_pending(stream)

    def _deadline(self, stream: Stream, timeout: float) -> None:
        """The client's grpc-timeout ran out before the answer ended (the route's timeout
        bounds it too, through the request logic): DEADLINE_EXCEEDED, as gRPC servers
        answer, and the upstream's exchange is given up."""
        stream.deadline = None
        transport = stream.transport
        if stream.done or stream.answer_done or transport is None:
            return
        self.streams.pop(stream.stream_id, None)
        if transport.head_sent and transport.held_head is None:
            self._drop(stream)
            self._reset(stream.stream_id, h2.errors.ErrorCodes.CANCEL)
            return
        conn = stream.conn
        stream.conn = None
        if conn is not None:
            conn.connection_lost(None)
        block = grpc.error_block(grpc.DEADLINE_EXCEEDED,
                                 f"kanal: deadline of {timeout:g}s (grpc-timeout) exceeded")
        stream.answer_done = True
        self.streams[stream.stream_id] = stream
        self.send_headers(stream, block, True)
        self.flush()

    def _forget(self, stream: Stream) -> None:
        """Nothing more will be sent or read on the stream."""
        if stream.deadline is not None:
            stream.deadline.cancel()
            stream.deadline = None
        stream.done = True
        stream.conn = None
        stream.inbox.clear()
        stream.outbox.clear()
        stream.outbox_size = 0

    def _finished(self, stream: Stream) -> None:
        """The whole answer went out (END_STREAM)."""
        self._forget(stream)
        self.streams.pop(stream.stream_id, None)
        if not stream.request_done:
            # Answered before the client finished its body: it may stop sending.
            self._reset(stream.stream_id, h2.errors.ErrorCodes.NO_ERROR)
        if self.going_away is not None:
            self._close_when_idle()

    def reset_stream(self, stream: Stream, code: h2.errors.ErrorCodes) -> None:
        """End a stream from the request logic's side (an answer cut short)."""
        if stream.done:
            return
        self._forget(stream)
        self.streams.pop(stream.stream_id, None)
        self._reset(stream.stream_id, code)
        if self.going_away is not None:
            self._close_when_idle()

    def _reset(self, stream_id: int, code: h2.errors.ErrorCodes) -> None:
        try:
            self.h2.reset_stream(stream_id, error_code=code)
        except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
            return
        self.flush()

    # --- housekeeping ---------------------------------------------------------------------

    def sweep(self, now: float) -> None:
        """Body stalls (408, by the request logic), answers stalled on a zero window
        (reset), and an idle connection (closed with GOAWAY)."""
        if self.closed:
            return
        stall = self.context.body_idle_timeout
        for stream in list(self.streams.values()):
            conn = stream.conn
            if conn is not None and not stream.done:
                conn.sweep(now)
            if stream.stalled_since and now - stream.stalled_since > stall and not stream.done:
                log.debug("HTTP/2 stream %d: window closed for %gs", stream.stream_id, stall)
                self.context.metrics.count_event("http2_window_stalled", "")
                self.streams.pop(stream.stream_id, None)
                self._drop(stream)
                self._reset(stream.stream_id, h2.errors.ErrorCodes.CANCEL)
        if not self.streams and now - self.last_activity > KEEPALIVE_TIMEOUT:
            self.h2.close_connection()
            self._close_now()

    def close_if_idle(self) -> bool:
        """A graceful stop: announce GOAWAY once, finish the streams taken, then close."""
        if self.closed:
            return True
        if self.going_away is None:
            self.going_away = self.h2.highest_inbound_stream_id
            self._flush_now()
            # Sent beside h2's state machine, which would refuse every frame after its
            # own GOAWAY: streams already taken must still be served.
            frame = GoAwayFrame(0)
            frame.last_stream_id = self.going_away
            frame.error_code = h2.errors.ErrorCodes.NO_ERROR
            if self.transport is not None:
                self.transport.write(frame.serialize())
        return self._close_when_idle()

    def _close_when_idle(self) -> bool:
        if self.streams or self.closed:
            return self.closed
        self.h2.close_connection(last_stream_id=self.going_away)
        self._close_now()
        return True


class StreamTransport(asyncio.Transport):
    """What a stream's request logic writes to: its HTTP/1.1 answer is read back (by
    llhttp) and sent as HTTP/2 frames; its pauses and closes act on the stream alone."""

    def __init__(self, owner: Http2Connection, stream: Stream) -> None:
        super().__init__()
        self.owner = owner
        self.stream = stream
        self.parser = httptools.HttpResponseParser(self)
        self.fields: list[tuple[bytes, bytes]] = []
        self.informational = False
        self.head_sent = False
        # A head carrying grpc-status is a gRPC "trailers-only" answer: it must reach
        # the client as one HEADERS frame that ends the stream.
        self.held_head: list[tuple[bytes, bytes]] | None = None
        # A non-gRPC answer (the proxy's own error) to a gRPC request: its status and
        # body, answered as a gRPC status when it ends.
        self.grpc_error = 0
        self.error_body = b""

    # --- asyncio.Transport, as ClientConnection uses it ----------------------------------

    def write(self, data: bytes | bytearray | memoryview[Any]) -> None:
        stream = self.stream
        if stream.done:
            return
        try:
            self.parser.feed_data(bytes(data))
        except httptools.HttpParserError as exc:
            log.debug("HTTP/2 stream %d: unreadable answer: %s", stream.stream_id, exc)
            self.owner.reset_stream(stream, h2.errors.ErrorCodes.INTERNAL_ERROR)
            return
        if stream.outbox or (stream.answer_done and not stream.done):
            self.owner.send_data(stream, b"", False)

    def close(self) -> None:
        """After a whole answer, the stream ends with it; before, the answer is cut."""
        if not self.stream.answer_done:
            self.owner.reset_stream(self.stream, h2.errors.ErrorCodes.INTERNAL_ERROR)

    def abort(self) -> None:
        """A cut-off answer: the client sees the stream reset, never a clean end."""
        if not self.stream.answer_done:
            self.owner.reset_stream(self.stream, h2.errors.ErrorCodes.INTERNAL_ERROR)

    def is_closing(self) -> bool:
        return self.stream.done or self.owner.closed

    def pause_reading(self) -> None:
        self.stream.reading_paused = True

    def resume_reading(self) -> None:
        if self.stream.reading_paused:
            self.owner.resume_stream(self.stream)

    def is_reading(self) -> bool:
        return not self.stream.reading_paused

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            transport = self.owner.transport
            return transport.get_extra_info(name, default) if transport is not None else default
        return default  # no socket: a reset acts on the stream, not the connection

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self.stream.outbox_size

    # --- httptools callbacks (the HTTP/1.1 answer) ---------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))  # after the head: trailers

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        fields = self.fields
        self.fields = []
        if status < 200:
            self.informational = True  # `100 Continue`: HTTP/2 clients do not wait for it
            return
        self.informational = False
        block = h2rules.response_headers(status, fields)
        self.head_sent = True
        end = self.stream.method == b"HEAD"
        if self.stream.grpc and status != 200 and not any(n == b"grpc-status" for n, _ in block):
            self.grpc_error = status
            return
        if not end and any(name == b"grpc-status" for name, _ in block):
            self.held_head = block
            return
        self.owner.send_headers(self.stream, block, end)

    def _send_held_head(self, end: bool) -> None:
        block = self.held_head
        if block is not None:
            self.held_head = None
            self.owner.send_headers(self.stream, block, end)

    def on_body(self, body: bytes) -> None:
        if self.grpc_error:
            if len(self.error_body) < grpc.MAX_MESSAGE:
                self.error_body += body
            return
        if not self.stream.answer_done:
            self._send_held_head(False)
            self.owner.queue_data(self.stream, body, False)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        if self.grpc_error:
            message = self.error_body.decode("utf-8", "replace").strip()
            status = grpc.status_for_http(self.grpc_error)
            self.grpc_error = 0
            self.owner.send_headers(self.stream, grpc.error_block(status, message), True)
            return
        if self.fields and self.head_sent:
            self.stream.trailers = h2rules.response_headers(0, self.fields)[1:]
            self.fields = []
        if self.held_head is not None and not self.stream.trailers:
            self._send_held_head(True)
            return
        self._send_held_head(False)
        if not self.stream.answer_done:
            self.owner.queue_data(self.stream, b"", True)

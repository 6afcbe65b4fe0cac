"""HTTP/2 to clients, the pure part: limits, the h2c preface, and the translation of a
stream's header block to the HTTP/1.1 head the proxy's request logic reads.

Each HTTP/2 stream is served by the same request logic as an HTTP/1.1 connection
(`proxy.ClientConnection`), fed an HTTP/1.1 head made here. Because that head is then
parsed by llhttp, a field HTTP/2 lets through but HTTP/1 framing would read otherwise
(a CR, LF or NUL in a value, a space or colon in a name) must never reach it: such a
stream is malformed (RFC 9113 8.2.1) and is refused here, before any byte is written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kanal.dataplane import grpc
from kanal.dataplane.http1 import MAX_HEAD, MAX_HEADERS

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
"""The client connection preface (RFC 9113 3.4): h2c with prior knowledge starts with it."""
_PRI_HEAD = PREFACE[:18]  # what llhttp reads as a request head before it pauses
_PRI_REST = PREFACE[18:]

MAX_CONCURRENT_STREAMS = 100
"""Streams a client may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS), as nginx."""
MAX_HEADER_LIST_SIZE = MAX_HEAD
"""Decoded header list bytes (SETTINGS_MAX_HEADER_LIST_SIZE): the HTTP/1 head limit. The
HPACK decoder enforces it while decoding, so a small block that expands (an HPACK bomb)
is stopped as it grows."""
DEFAULT_WINDOW = 65535
"""Every window's size before SETTINGS and WINDOW_UPDATE change it (RFC 9113 6.9.2)."""
STREAM_WINDOW = 64 * 1024
"""Request body bytes a stream may have in flight unread (its flow-control window)."""
CONNECTION_WINDOW = STREAM_WINDOW * MAX_CONCURRENT_STREAMS
"""The connection's window: every stream can fill its own window at once, so streams
whose upstream is slow to read never stall the others; and the bound on request body
bytes buffered per connection."""
RESPONSE_HIGH_WATER = 64 * 1024
"""Answer bytes queued on a stream waiting for the client's window; above this the
stream's upstream is no longer read until the client opens its window again."""
WRITE_BUFFER_LIMIT = 4 * 1024 * 1024
"""Bytes queued toward a client that does not read (answers are paused long before):
only a flood of control frames (PING and SETTINGS acknowledgements) fills it."""

LINGER = 2.0
"""Seconds a closing connection still reads (and drops) what the client sends."""

FLOOD_WINDOW = 10.0
MAX_RESETS = 200
"""Streams a client may reset before their answer is complete, per FLOOD_WINDOW
seconds: rapid reset (CVE-2023-44487) makes the server start work and abandons it."""
MAX_REFUSED_STREAMS = 100
"""Streams a client may open beyond SETTINGS_MAX_CONCURRENT_STREAMS (each refused with
REFUSED_STREAM) per FLOOD_WINDOW seconds: a client that read our SETTINGS opens none,
one that did not yet only a few; more is a flood."""
MAX_PINGS = 1000
MAX_SETTINGS = 100
MAX_EMPTY_FRAMES = 1000
"""DATA frames without bytes and without END_STREAM, per FLOOD_WINDOW seconds."""

HOP_BY_HOP_RESPONSE = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade",
    b"te", b"trailer",
})
"""Response fields of the HTTP/1.1 leg that HTTP/2 forbids (RFC 9113 8.2.2)."""

_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+\Z")
_VALUE_BAD = re.compile(rb"[\x00\r\n]")
_TARGET_BAD = re.compile(rb"[\x00-\x20\x7f]")


def field_is_safe(name: bytes, value: bytes) -> bool:
    """Whether a field can be written into HTTP/1.1 framing as is."""
    return _NAME.match(name) is not None and _VALUE_BAD.search(value) is None


class WindowCounter:
    """Events in fixed windows of time; `hit` says when one window holds too many."""

    __slots__ = ("count", "limit", "started", "window")

    def __init__(self, limit: int, window: float = FLOOD_WINDOW) -> None:
        self.limit = limit
        self.window = window
        self.started = 0.0
        self.count = 0

    def hit(self, now: float) -> bool:
        if now - self.started >= self.window:
            self.started = now
            self.count = 0
        self.count += 1
        return self.count > self.limit


def preface_rest(data: bytes) -> bytes | None:
    """llhttp paused on `PRI * HTTP/2.0` while reading `data`: the whole preface and what
    followed it, for the HTTP/2 connection; None if this is not an HTTP/2 preface.

    llhttp pauses right after the head's empty line, so `data` starts with the last
    bytes of `PRI * HTTP/2.0\\r\\n\\r\\n` (all of it on a first read); the rest must go on
    as the preface does (`SM\\r\\n\\r\\n`, then frames).
    """
    for taken in range(min(len(_PRI_HEAD), len(data)), 0, -1):
        if data[:taken] != _PRI_HEAD[-taken:]:
            continue
        rest = data[taken:]
        if rest[: len(_PRI_REST)] == _PRI_REST[: len(rest)]:
            return _PRI_HEAD + rest
    return None


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A stream's request as HTTP/1.1: the head, and how its DATA frames are framed."""

    head: bytes
    method: bytes
    chunked: bool  # DATA is sent as chunks (no content-length and a body follows)
    grpc: bool = False  # content-type application/grpc: errors are answered as gRPC
    grpc_timeout: float | None = None  # seconds, from grpc-timeout (then not in `head`)


def request_head(headers: list[tuple[bytes, bytes]], ended: bool) -> RequestHead | str:
    """The HTTP/1.1 head for a stream's header block, or why the stream is malformed.

    `ended`: the block carried END_STREAM (no body). The h2 library has already checked
    the pseudo-header rules and refused connection-specific fields.
    """
    method = path = authority = b""
    lines: list[bytes] = []
    has_length = False
    is_grpc = False
    grpc_timeout = None
    timeout_line = -1
    if len(headers) > MAX_HEADERS + 4:
        return f"more than {MAX_HEADERS} request headers"
    for name, value in headers:
        if _VALUE_BAD.search(value) is not None:
            return "a header value holds CR, LF or NUL"
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            continue
        if _NAME.match(name) is None:
            return "a header name holds a character outside the token set"
        if name == b"host" and authority:
            continue
        if name == b"te":
            continue  # only `trailers` is allowed on HTTP/2; hop-by-hop on HTTP/1.1
        if name == b"content-length":
            has_length = True
        elif name == b"content-type":
            is_grpc = grpc.is_grpc(value)
        elif name == b"grpc-timeout":
            grpc_timeout = grpc.parse_timeout(value)
            timeout_line = len(lines)
        lines.append(name + b": " + value)
    if is_grpc and timeout_line >= 0:
        # The proxy writes the time left, bounded by the route's timeout, when it sends.
        del lines[timeout_line]
    if method == b"CONNECT":
        path = authority
    if not method or not path or _TARGET_BAD.search(path) or _TARGET_BAD.search(method):
        return "missing or malformed :method or :path"
    if authority:
        if _TARGET_BAD.search(authority):
            return "malformed :authority"
        lines.insert(0, b"host: " + authority)
    chunked = not ended and not has_length
    if chunked:
        lines.append(b"transfer-encoding: chunked")
    head = b"%b %b HTTP/1.1\r\n%b\r\n\r\n" % (method, path, b"\r\n".join(lines))
    if not lines:
        head = b"%b %b HTTP/1.1\r\n\r\n" % (method, path)
    return RequestHead(head=head, method=method, chunked=chunked, grpc=is_grpc,
                       grpc_timeout=grpc_timeout if is_grpc else None)


def response_headers(status: int, fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """An HTTP/1.1 answer's status and fields as an HTTP/2 header block: names in lower
    case, hop-by-hop fields (and those its `Connection` names) left out."""
    named: set[bytes] = set()
    for name, value in fields:
        if name.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    block = [(b":status", b"%d" % status)]
    for name, value in fields:
        lower = name.lower()
        if lower in HOP_BY_HOP_RESPONSE or lower in named:
            continue
        block.append((lower, value))
    return block

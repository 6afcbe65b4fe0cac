"""HTTP/1 policy shared by every listener and the upstream side: what is refused, what
is dropped, what the limits are, and how heads and error answers are spelled.

llhttp (through httptools) does the framing; this module decides what a framed head may
hold, as HAProxy's strict parser and Envoy's edge defaults do. Pure: bytes in, decisions
out. The reverse listener (`proxy.py`), the forward listener (`forward.py`) and the
upstream connections (`pool.py`) all take their rules from here, so a fix made once
reaches every side.
"""

from __future__ import annotations

import base64
import hashlib
import http
import re
from typing import Final

from kanal.dataplane import headers as hdrs
from kanal.dataplane.headers import CONNECTION_PROTECTED as CONNECTION_PROTECTED

MAX_TARGET: Final = 8 * 1024
"""Longest request target accepted (414 beyond), as nginx's large header buffers."""
MAX_HEAD: Final = 64 * 1024
"""Most bytes of request headers accepted (431 beyond)."""
MAX_HEADERS: Final = 200
"""Most request header lines accepted (431 beyond)."""
MAX_RESPONSE_HEAD: Final = 64 * 1024
"""Most bytes of an upstream's response head relayed (502 beyond)."""
HEAD_TIMEOUT = 30.0
"""Time a client has to send a whole request head, from its first byte (408 after)."""
BODY_IDLE_TIMEOUT = 60.0
"""Time a request body may go without a byte (408 after)."""
KEEPALIVE_TIMEOUT = 75.0
"""Client connections idle for longer than this are closed (nginx's default)."""

SINGLETON_HEADERS: Final = frozenset({
    b"host", b"authorization", b"proxy-authorization", b"content-type", b"content-length",
    b"if-modified-since", b"if-unmodified-since", b"if-range", b"max-forwards", b"range",
    b"referer", b"from", b"origin", b"sec-websocket-key", b"sec-websocket-version",
})
"""Request fields defined to appear once (RFC 9110): a second copy is refused (400), as
a backend might read the other copy than the one the proxy routed or checked on."""



def status_line(status: int) -> bytes:
    """`HTTP/1.1 <status> <standard reason phrase>`."""
    return _STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown" % status


REASONS = {
    **{status.value: status.phrase.encode("latin-1") for status in http.HTTPStatus},
    # RFC 9110's names, where older Pythons still carry RFC 7231's
    413: b"Content Too Large", 414: b"URI Too Long", 416: b"Range Not Satisfiable",
    422: b"Unprocessable Content",
}
"""Standard reason phrases by status code."""
_STATUS_LINES = {code: b"HTTP/1.1 %d %b" % (code, phrase) for code, phrase in REASONS.items()}


def error_head(status: int, body_length: int, *, keep_alive: bool,
               extra: bytes = b"") -> bytes:
    """The head of an answer of the proxy's own (text body of `body_length` bytes)."""
    return (status_line(status)
            + b"\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
            % body_length + extra
            + (b"Connection: keep-alive\r\n\r\n" if keep_alive else b"Connection: close\r\n\r\n"))


def relayed_head(status: int, body_length: int, *, keep_alive: bool,
                 extra: bytes = b"") -> bytes:
    """The head of an answer the proxy relays for another party (an external auth
    service's refusal): that party's header lines in `extra`, framed by the proxy."""
    return (status_line(status) + b"\r\nContent-Length: %d\r\n" % body_length + extra
            + (b"Connection: keep-alive\r\n\r\n" if keep_alive else b"Connection: close\r\n\r\n"))


RETRY_AFTER = b"Retry-After: 1\r\n"
"""Sent with every 503 of the proxy's own."""
OVERLOADED_LINE = b"X-Kanal-Overloaded: true\r\n"
"""Sent with a 503 for overload: the process's memory (`--overload-memory`), or an
Upstream's connection limit."""
OVERLOADED = "overloaded: resident memory is above --overload-memory"
"""Why a new request is refused (503, then close) while the process is over
`--overload-memory` (`kanal.dataplane.overload`), on every listener."""


# Bytes looked for in bytes as ints: `b"#" in data` first tries the operand as an
# integer, and raises (and drops) a TypeError for a bytes one, about 1,800 CPU
# instructions a test; `35 in data` is a memchr.
CR: Final = 13
LF: Final = 10
NUL: Final = 0
HASH: Final = 35
UNDERSCORE: Final = 95


def wire_safe(value: bytes) -> bool:
    """Whether `value` may be written into a head: no CR, LF or NUL."""
    return CR not in value and LF not in value and NUL not in value


def nominated(connection_value: bytes) -> set[bytes]:
    """The fields a request's `Connection` header asks the proxy to remove.

    Hop-by-hop fields are removed anyway; end-to-end framing and routing fields are never
    removed, whatever `Connection` says.
    """
    return hdrs.connection_tokens(connection_value) - hdrs.REQUEST_DROPPED - CONNECTION_PROTECTED


def version_problem(version: str) -> tuple[int, str] | None:
    """Why a request's HTTP version is refused: 400 for none (HTTP/0.9), 505 for others."""
    if version in ("1.1", "1.0"):
        return None
    if version == "0.9":
        return 400, "request line without an HTTP version"
    return 505, f"HTTP/{version} is not served on an HTTP/1 connection"


SPACED_LINE: Final = "request line with more than one space between its parts"
"""Why a request line with a run of spaces is refused (400). llhttp reads `GET  / HTTP/1.1`
as `GET / HTTP/1.1`; RFC 9112 §3 allows one SP only, and a server behind another parser
may split such a line differently."""


def line_start(data: bytes) -> int:
    """Where a request line begins in `data`, past the empty lines RFC 9112 §2.2 lets a
    server ignore before it (len(data) when there is nothing else)."""
    if data[:1] != b"\r" and data[:1] != b"\n":
        return 0
    return len(data) - len(data.lstrip(b"\r\n"))


def spaced_line_in(window: bytes, method: bytes, target: bytes) -> bool:
    """Whether `window` holds the request line `method target HTTP/...` with a run of
    spaces around the target (for a request that began in the middle of a read, whose
    line cannot be located exactly)."""
    escaped = re.escape(target)
    pattern = (re.escape(method) + b"(?: {2,}" + escaped + b" +| +" + escaped + b" {2,})HTTP/")
    return re.search(pattern, window) is not None


LINE_WINDOW = MAX_TARGET + 64
"""Bytes kept of a read in which a request began mid-read, for its request line check."""


# A request line of single spaces between visible parts, ending in HTTP/1.1: no run of
# spaces in it, and llhttp reads version 1.1 from it.
_PLAIN_LINE_11: Final = re.compile(rb"[!-~]+ [!-~]+ HTTP/1\.1\r\n")


class LineCheck:
    """Runs of spaces in the request lines of one client connection (`SPACED_LINE`),
    found as its reads come, around llhttp, which lets them through.

    Every listener calls it at the same points: `read` before the parser takes a read,
    `begin` from `on_message_begin`, `spaced_at_head` from `on_headers_complete` for a
    message `begin` left unchecked, `read_over` after the parser took the read, then
    `goes_on` if an unchecked request's head is still open. A
    request that fits one read (the common case) costs two searches of its first line;
    a request that begins in the middle of a read is checked at its head's end, from
    the read (and, if its line goes on into the next read, the bytes kept of it).
    """

    def __init__(self) -> None:
        # b" "/b"" while a request line goes on into the next read (whether the last one
        # ended with a space), else None.
        self.part: bytes | None = None
        self.checked = False  # the next message to begin is the current read's first, checked
        self.reading = b""  # the read being parsed
        self.window = b""  # the start of a request that began mid-read and goes on
        # Whether the read's first line, checked at its start, ends in `HTTP/1.1`.
        self.line_11 = False

    def read(self, data: bytes, between: bool) -> bool:
        """A read, before the parser takes it (`between`: no request head is open):
        True when the request line beginning or going on in it has a run of spaces."""
        if between and self.part is None:
            if _PLAIN_LINE_11.match(data) is not None:  # most reads: one call, no search
                self.checked = True
                self.line_11 = True
                self.reading = data
                return False
            self.line_11 = False  # (other lines: llhttp says which version it read)
            end = data.find(b"\n")
            if end > 0 and data[0] != 13 and data.find(b"  ", 0, end) < 0:
                self.checked = True
            elif self._spaced(data):
                return True
        elif self.part is not None and self._spaced(data):
            return True
        self.reading = data
        return False

    def _spaced(self, data: bytes) -> bool:
        """Whether the request line beginning (or going on) in `data` has a run of
        spaces. Only the first line of the read is looked at."""
        part = self.part
        start = 0
        if part is None:
            start = line_start(data)
            if start == len(data):
                return False  # empty lines only: the request line is still to come
            self.checked = True
        elif part and data[:1] == b" ":
            return True  # a space ended the last read, and one begins this one
        end = data.find(b"\n", start)
        if data.find(b"  ", start, end if end >= 0 else len(data)) >= 0:
            return True
        self.part = None if end >= 0 else (b" " if data[-1:] == b" " else b"")
        return False

    def begin(self) -> bool:
        """A message begins: True when its line is still to be checked (it began in
        the middle of a read)."""
        if self.checked:
            self.checked = False
            return False
        self.window = b""
        self.line_11 = False
        return True

    def version_11(self) -> bool:
        """After `begin` said the message's line was checked (it is the read's first
        line): whether that line ends in `HTTP/1.1`, so llhttp read version 1.1 from it.
        (llhttp's own answer is a string formatted anew for every message.)"""
        line_11 = self.line_11
        self.line_11 = False
        return line_11

    def spaced_at_head(self, method: bytes, target: bytes) -> bool:
        """The head of a message `begin` left unchecked is complete: whether its line
        has a run of spaces."""
        return spaced_line_in(self.window + self.reading, method, target)

    def read_over(self) -> None:
        """The parser took the read (or refused it): it is let go."""
        self.reading = b""

    def goes_on(self, data: bytes, method: bytes, target: bytes) -> bool:
        """After `read_over`: a request `begin` left unchecked goes on into the next
        read (`method` and `target` as parsed so far). True when its line, whole in
        `data`, has a run of spaces; else the bytes it may span are kept."""
        window = self.window
        if not window:
            if spaced_line_in(data, method, target):
                return True
            self.window = data[-LINE_WINDOW:]
        elif len(window) < 2 * LINE_WINDOW:
            self.window = window + data[:LINE_WINDOW]
        return False


def target_problem(method: bytes, target: bytes, scheme: str) -> str | None:
    """Why a request target is refused (400), or None when it is acceptable.

    Origin form (`/path`) is the rule; `*` only for OPTIONS; absolute form only with the
    listener's own scheme; no fragment (RFC 9112 §3.2 has none to send).
    """
    if target[:1] == b"/":
        return "request target with a fragment (#)" if HASH in target else None
    if HASH in target:
        return "request target with a fragment (#)"
    if method == b"CONNECT":
        return None  # authority form: each listener says whether it serves CONNECT
    if target == b"*":
        return None if method == b"OPTIONS" else "request target * is only for OPTIONS"
    lowered = target[:8].lower()
    if lowered.startswith(b"http://") or lowered.startswith(b"https://"):
        wanted = scheme.encode() + b"://"
        if not lowered.startswith(wanted):
            return f"absolute-form target of another scheme on this {scheme} listener"
        return None
    return "request target is not a path"


_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%]+)(?::([0-9]{1,5}))?")


def host_problem(host: bytes) -> str | None:
    """Why a Host value is refused (400): a name or an IP literal, and a port 0-65535."""
    found = _HOST.fullmatch(host)
    if found is None:
        return f"invalid Host {host[:100].decode('latin-1')!r}"
    port = found.group(1)
    if port is not None and int(port) > 65535:
        return f"invalid port in Host {host[:100].decode('latin-1')!r}"
    return None


WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def websocket_accept(key: bytes) -> bytes:
    """The `Sec-WebSocket-Accept` that answers `key` (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.strip() + WEBSOCKET_GUID).digest())


def websocket_problem(method: bytes, http11: bool, upgrade: bytes | None,
                      key: bytes | None, version: bytes | None) -> str | None:
    """Why an upgrade request is refused (400), or None for a valid WebSocket opening
    handshake (RFC 6455 §4.2.1). Kanal tunnels WebSocket upgrades only."""
    tokens = [t.strip().lower() for t in (upgrade or b"").split(b",") if t.strip()]
    if tokens != [b"websocket"]:
        return "only a WebSocket upgrade (Upgrade: websocket) is served"
    if method != b"GET" or not http11:
        return "a WebSocket upgrade must be an HTTP/1.1 GET"
    if version is None or version.strip() != b"13":
        return "a WebSocket upgrade needs Sec-WebSocket-Version: 13"
    if key is None:
        return "a WebSocket upgrade needs Sec-WebSocket-Key"
    try:
        decoded = base64.b64decode(key.strip(), validate=True)
    except ValueError:
        decoded = b""
    if len(decoded) != 16:
        return "Sec-WebSocket-Key is not 16 bytes in base64"
    return None


def transfer_coding_problem(value: bytes) -> str | None:
    """Why a Transfer-Encoding is refused: only `chunked`, last, is understood (RFC 9112
    §6.1); anything else cannot be framed and is not guessed at."""
    codings = [c.strip().lower() for c in value.split(b",") if c.strip()]
    if not codings or codings[-1] != b"chunked" or any(c != b"chunked" for c in codings):
        return f"unsupported Transfer-Encoding {value[:60].decode('latin-1')!r}"
    if len(codings) > 1:
        return "chunked applied more than once"
    return None


def final_coding_is_chunked(value: bytes) -> bool:
    """Whether a response's Transfer-Encoding ends with `chunked`. When it does not (an
    unknown coding such as `xchunked`), the body runs to the connection's end (RFC 9112
    §6.3): it is never guessed to be chunked."""
    codings = [c.strip().lower() for c in value.split(b",")]
    return bool(codings) and codings[-1] == b"chunked"

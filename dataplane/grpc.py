"""gRPC's rules the proxy applies (pure): status codes and names, the `grpc-timeout`
header, and how an HTTP answer that is not gRPC reads to a gRPC client.

A gRPC client cannot read the proxy's own plain-text errors (a 503 with a body): it
sees "Received http2 header with status: 503" and no reason. So when the request was
gRPC (`content-type: application/grpc...`) and the answer carries no `grpc-status`,
the answer becomes HTTP 200 with `grpc-status` and `grpc-message` (the proxy's reason),
as Envoy does. Statuses follow gRPC's HTTP-to-gRPC table, except that a timeout of the
proxy's (504, 408) is DEADLINE_EXCEEDED and a refused size (413, 431)
RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

from kanal.contract.grpc import STATUS_NAMES

OK = 0
DEADLINE_EXCEEDED = 4
UNAVAILABLE = 14

_FROM_HTTP = {
    400: 13, 401: 16, 403: 7, 404: 12, 408: 4, 413: 8, 429: 14, 431: 8,
    502: 14, 503: 14, 504: 4,
}

_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}

MAX_MESSAGE = 1024
"""Bytes of the proxy's reason kept in `grpc-message`."""


def is_grpc(content_type: bytes | None) -> bool:
    """`application/grpc`, with or without a `+proto`-style suffix or parameters."""
    if content_type is None:
        return False
    value = content_type.strip().lower()
    return value == b"application/grpc" or value.startswith((b"application/grpc+",
                                                            b"application/grpc;"))


def status_name(value: bytes) -> str | None:
    """The `retryOn` name of a `grpc-status` value that is not OK, else None."""
    if value == b"0" or not value.isdigit():
        return None
    return STATUS_NAMES.get(int(value), "unknown")


def status_for_http(status: int) -> int:
    """The gRPC status an HTTP answer without `grpc-status` stands for."""
    return _FROM_HTTP.get(status, 2)


def parse_timeout(value: bytes) -> float | None:
    """`grpc-timeout` (`1S`, `250m`, up to 8 digits and a unit) in seconds; None if invalid."""
    value = value.strip()
    digits, unit = value[:-1], value[-1:]
    if not digits or len(digits) > 8 or not digits.isdigit() or unit not in _TIMEOUT_UNITS:
        return None
    return int(digits) * _TIMEOUT_UNITS[unit]


_UNITS_FINEST_FIRST = ((b"m", 1e3), (b"S", 1.0), (b"M", 1 / 60), (b"H", 1 / 3600))
_MAX_TIMEOUT_DIGITS = 99_999_999


def format_timeout(seconds: float) -> bytes:
    """`grpc-timeout` for `seconds`: the finest unit from milliseconds up whose value
    fits the 8 digits the wire format allows, rounded down (the callee gives up no later
    than the proxy would), as Envoy writes it."""
    for unit, per_second in _UNITS_FINEST_FIRST:
        value = int(max(seconds, 0.0) * per_second)
        if value <= _MAX_TIMEOUT_DIGITS:
            return b"%d%b" % (value, unit)
    return b"%dH" % _MAX_TIMEOUT_DIGITS


def with_timeout(head: bytes, seconds: float) -> bytes:
    """An HTTP/1.1 request head (ending with its empty line) with a `grpc-timeout` of
    `seconds` added as its last field."""
    return head[:-2] + b"grpc-timeout: " + format_timeout(seconds) + b"\r\n\r\n"


def encode_message(text: str) -> bytes:
    """`grpc-message`: UTF-8, percent-encoded outside printable ASCII and `%`."""
    raw = text.encode("utf-8")[:MAX_MESSAGE]
    return b"".join(bytes([c]) if 0x20 <= c <= 0x7E and c != 0x25 else b"%%%02X" % c
                    for c in raw)


def error_block(status: int, message: str) -> list[tuple[bytes, bytes]]:
    """A trailers-only gRPC answer (one HEADERS frame that ends the stream)."""
    return [(b":status", b"200"), (b"content-type", b"application/grpc"),
            (b"grpc-status", b"%d" % status), (b"grpc-message", encode_message(message))]


# --- grpc.health.v1 ------------------------------------------------------------------------
#
# The two messages of the health protocol have one field each; they are written and read
# here so the dataplane needs no protobuf runtime. HealthCheckRequest { string service = 1; }
# HealthCheckResponse { ServingStatus status = 1; } with SERVING = 1.

HEALTH_PATH = b"/grpc.health.v1.Health/Check"
SERVING = 1


def frame(message: bytes) -> bytes:
    """One uncompressed gRPC message on the wire (length-prefixed)."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def health_request(service: str) -> bytes:
    """A framed HealthCheckRequest for `service` (empty: the server as a whole)."""
    name = service.encode("utf-8")
    return frame(b"\x0a" + _varint(len(name)) + name if name else b"")


def _read_varint(message: bytes, index: int) -> tuple[int, int]:
    """The varint at `index` and the index after it (a truncated one ends the message)."""
    value = shift = 0
    while index < len(message):
        byte = message[index]
        index += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return value, index


def health_status(body: bytes) -> int | None:
    """The status field of a framed HealthCheckResponse (0, UNKNOWN, when absent);
    None when the bytes are not one."""
    if len(body) < 5 or body[0] != 0:
        return None
    length = int.from_bytes(body[1:5], "big")
    message = body[5:5 + length]
    if len(message) != length:
        return None
    index = 0
    status = 0
    while index < len(message):
        key = message[index]
        index += 1
        wire = key & 0x07
        if wire == 0:
            value, index = _read_varint(message, index)
            if key >> 3 == 1:
                status = value
        elif wire == 2:
            value, index = _read_varint(message, index)
            index += value
        else:
            return None
    return status

"""Access log records and their two spellings, JSON and text (logfmt). Pure: no I/O.

The listeners hand over a record as a plain tuple, in the order of `FIELDS`, built from
values they already hold at the end of an exchange (bytes are left undecoded, times
unformatted): the work of turning it into a line is done here, by the writer thread,
never on the event loop.
"""

from __future__ import annotations

import json
import json.encoder
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

FIELDS: tuple[str, ...] = (
    "time",          # when the exchange ended, RFC 3339 in UTC with milliseconds
    "listener",      # reverse | inbound | forward
    "client",        # the peer's address
    "method",
    "host",          # Host (or the forward proxy's destination host:port)
    "path",          # the request target as received: path and query
    "protocol",      # HTTP/1.1 | HTTP/1.0
    "status",        # the status sent to the client; 0 when none was
    "bytesIn",       # request body bytes received from the client
    "bytesOut",      # response body bytes sent to the client
    "duration",      # seconds from the request head to the end of the answer
    "upstreamTime",  # seconds from the last try's start to the end of the answer
    "route",         # namespace/name of the Route, empty when none matched
    "rule",          # the rule's name, else its index in the Route
    "upstream",      # namespace/name of the Upstream chosen
    "endpoint",      # address:port of the endpoint that answered (the last try's)
    "retries",       # tries after the first
    "cache",         # the cache's outcome (X-Cache): HIT, MISS, STALE, REVALIDATED, BYPASS
    "policy",        # policy outcome: the forward proxy's decision (allow, deny, mesh, auth, error)
    "requestId",     # X-Request-Id, as sent to the backend and returned to the client
    "traceId",       # the W3C trace id, when tracing is on
)
"""Every field, in record order; `--access-log-fields` picks from these names."""

INDEX = {name: position for position, name in enumerate(FIELDS)}
FORMATS = ("json", "text")

Record = tuple[Any, ...]


def select(names: Sequence[str]) -> tuple[int, ...]:
    """Positions of the named fields; ValueError naming any unknown one."""
    unknown = [name for name in names if name not in INDEX]
    if unknown:
        raise ValueError(f"unknown access log field {', '.join(unknown)} "
                         f"(known: {', '.join(FIELDS)})")
    return tuple(INDEX[name] for name in names)


# How each field is spelled (by position in FIELDS): the record's types are fixed.
_STR, _BYTES, _INT, _FLOAT, _ANY, _TRACE = 1, 2, 3, 4, 5, 6
_KINDS = {"time": 0, "status": _INT, "bytesIn": _INT, "bytesOut": _INT, "retries": _INT,
          "duration": _FLOAT, "upstreamTime": _FLOAT, "method": _BYTES, "path": _BYTES,
          "requestId": _BYTES, "rule": _ANY, "traceId": _TRACE, "cache": _BYTES}


class Formatter:
    """Turns records into lines of one format and field choice, as fast as plain Python
    allows (the writer thread shares the interpreter with the event loop): the line is
    one %-template made once, each field's value is turned into its spelling by one
    call chosen once (strings escaped by the json module's C encoder), and the time's
    `YYYY-MM-DDTHH:MM:SS` is made once a second."""

    def __init__(self, chosen: tuple[int, ...], form: str) -> None:
        if form not in FORMATS:
            raise ValueError(f"unknown access log format {form!r} (json or text)")
        self.chosen = chosen
        self.json = form == "json"
        pieces = []
        plan: list[tuple[int, Callable[[Any], Any]]] = []
        for i in chosen:
            name = FIELDS[i]
            kind = _KINDS.get(name, _STR)
            convert: Callable[[Any], Any]
            if kind == _INT:
                piece, convert = "%d", int
            elif kind == _FLOAT and name == "duration":
                piece, convert = "%.6f", float
            elif kind == 0:
                piece, convert = "%s", self._json_time if self.json else self._time
            elif self.json:
                piece, convert = "%s", _JSON_CONVERT.get(kind, _encode)
            else:
                piece, convert = "%s", _TEXT_CONVERT.get(kind, _logfmt)
            pieces.append(('"' + name + '":' if self.json else name + "=") + piece)
            plan.append((i, convert))
        body = ",".join(pieces) if self.json else " ".join(pieces)
        self.template = "{" + body + "}" if self.json else body
        self.plan = tuple(plan)
        self._second = -1
        self._stamp = ""

    def line(self, record: Record) -> str:
        return self.template % tuple([convert(record[i]) for i, convert in self.plan])

    def _time(self, epoch: float) -> str:
        second, millis = divmod(round(epoch * 1000), 1000)
        if second != self._second:
            self._second = second
            self._stamp = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._stamp}.{millis:03d}Z"

    def _json_time(self, epoch: float) -> str:
        return '"' + self._time(epoch) + '"'


def _logfmt(value: Any) -> str:
    """A text value: `-` when empty, double-quoted with JSON escapes when it holds a
    space, `"`, `=`, `\\` or anything but printable ASCII."""
    if value is None:
        return "-"
    text = value.decode("latin-1") if type(value) is bytes else str(value)
    if not text:
        return "-"
    if (text.isascii() and text.isprintable() and " " not in text and '"' not in text
            and "=" not in text and "\\" not in text):
        return text
    return _encode(text)


def _json_bytes(value: bytes | str | None) -> str:
    if value is None:
        return '""'
    return _encode(value.decode("latin-1") if type(value) is bytes else str(value))


def _json_float(value: float | None) -> str:
    return '""' if value is None else "%.6f" % value  # noqa: UP031  # the fastest spelling


def _text_float(value: float | None) -> str:
    return "-" if value is None else "%.6f" % value  # noqa: UP031


def _json_any(value: Any) -> str:
    """rule: a name, or an index."""
    return str(value) if type(value) is int else _encode(str(value))


def _json_trace(value: int | None) -> str:
    return '""' if value is None else f'"{value:032x}"'


def _text_trace(value: int | None) -> str:
    return "-" if value is None else f"{value:032x}"


_encode: Callable[[str], str] = json.encoder.encode_basestring
_JSON_CONVERT: dict[int, Callable[[Any], Any]] = {
    _BYTES: _json_bytes, _FLOAT: _json_float, _ANY: _json_any, _TRACE: _json_trace}
_TEXT_CONVERT: dict[int, Callable[[Any], Any]] = {
    _BYTES: _logfmt, _FLOAT: _text_float, _ANY: _logfmt, _TRACE: _text_trace}

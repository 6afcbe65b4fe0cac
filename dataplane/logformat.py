"""Access log records and their two spellings, JSON and text (logfmt). Pure: no I/O.

The listeners hand over a record as a plain tuple, in the order of `FIELDS`, built from
values they already hold at the end of an exchange (bytes are left undecoded, times
unformatted): the work of turning it into a line is done here, by the writer thread,
never on the event loop.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
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
    "cache",         # cache outcome (reserved: empty until a cache exists)
    "policy",        # policy outcome: the forward proxy's decision (allow, deny, mesh, auth, error)
    "requestId",     # X-Request-Id, as sent to the backend and returned to the client
    "traceId",       # the W3C trace id, when tracing is on
)
"""Every field, in record order; `--access-log-fields` picks from these names."""

INDEX = {name: position for position, name in enumerate(FIELDS)}
_TRACE_ID = INDEX["traceId"]
FORMATS = ("json", "text")

Record = tuple[Any, ...]


def select(names: Sequence[str]) -> tuple[int, ...]:
    """Positions of the named fields; ValueError naming any unknown one."""
    unknown = [name for name in names if name not in INDEX]
    if unknown:
        raise ValueError(f"unknown access log field {', '.join(unknown)} "
                         f"(known: {', '.join(FIELDS)})")
    return tuple(INDEX[name] for name in names)


def values(record: Record) -> list[Any]:
    """The record's values as JSON-ready text and numbers (bytes decoded, time formatted)."""
    out: list[Any] = []
    for position, value in enumerate(record):
        if position == 0:
            value = _rfc3339(value)
        elif position == _TRACE_ID and isinstance(value, int):
            value = f"{value:032x}"
        elif isinstance(value, bytes):
            value = value.decode("latin-1")
        elif isinstance(value, float):
            value = round(value, 6)
        elif value is None:
            value = ""
        out.append(value)
    return out


def json_line(record: Record, chosen: tuple[int, ...]) -> str:
    """One JSON object per line, with the chosen fields in the order chosen."""
    shown = values(record)
    return json.dumps({FIELDS[i]: shown[i] for i in chosen}, separators=(",", ":"),
                      ensure_ascii=False)


def text_line(record: Record, chosen: tuple[int, ...]) -> str:
    """logfmt: `name=value` pairs separated by spaces; a value with a space, a quote or
    an `=` is double-quoted (JSON string escapes); an empty value is `-`."""
    shown = values(record)
    parts = []
    for i in chosen:
        value = shown[i]
        text = value if isinstance(value, str) else str(value)
        if text == "":
            text = "-"
        elif any(c in text for c in ' "=\\') or not text.isprintable():
            text = json.dumps(text, ensure_ascii=False)
        parts.append(f"{FIELDS[i]}={text}")
    return " ".join(parts)


def line(record: Record, chosen: tuple[int, ...], form: str) -> str:
    return json_line(record, chosen) if form == "json" else text_line(record, chosen)


def _rfc3339(epoch: float) -> str:
    moment = datetime.fromtimestamp(epoch, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"

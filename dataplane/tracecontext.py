"""W3C Trace Context (`traceparent`, `tracestate`): parsing and writing. Pure: no I/O,
no clock, no random source (ids are drawn by the caller).

Written out rather than taken from OpenTelemetry's propagator, which goes through
context objects and a carrier getter per request: here a header is checked and split
in a few byte operations, on the event loop, only for requests that carry one.
"""

from __future__ import annotations

from typing import NamedTuple

TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"
_HEX = frozenset(b"0123456789abcdef")
MAX_TRACESTATE = 512
"""Longer tracestate values are dropped, as the specification allows."""


class Parent(NamedTuple):
    trace_id: int
    span_id: int
    sampled: bool


def parse_traceparent(value: bytes) -> Parent | None:
    """The caller's trace and span, or None when the header is not a valid traceparent
    (then a new trace is started and tracestate is ignored)."""
    value = value.strip()
    if len(value) < 55 or value[2:3] != b"-" or value[35:36] != b"-" or value[52:53] != b"-":
        return None
    version, trace, span, flags = value[:2], value[3:35], value[36:52], value[53:55]
    if not all(byte in _HEX for byte in version + trace + span + flags):
        return None
    if version == b"ff" or (version == b"00" and len(value) != 55):
        return None
    if len(value) > 55 and value[55:56] != b"-":  # a later version may append fields
        return None
    trace_id, span_id = int(trace, 16), int(span, 16)
    if trace_id == 0 or span_id == 0:
        return None
    return Parent(trace_id, span_id, bool(int(flags, 16) & 1))


def traceparent(trace_id: int, span_id: int, sampled: bool) -> bytes:
    return b"00-%032x-%016x-%s" % (trace_id, span_id, b"01" if sampled else b"00")


def trace_hex(trace_id: int) -> str:
    return f"{trace_id:032x}"

"""Lingering close, as nginx's: how a client connection closes after an answer the
client may not have read while it is still sending (an error answer, or an answer
before the end of its request body).

A plain close with unread bytes makes the kernel send a reset, which can destroy the
answer before the client reads it. So the answer goes out, then a FIN (`write_eof`),
and what the client still sends is read and dropped until it closes, for at most
LINGER_IDLE seconds without a byte, LINGER_TOTAL in all and LINGER_BYTES. TLS and
HTTP/2 streams cannot half-close: they just close. Every listener's client side uses
this one (the reverse, TLS and sidecar listeners' `ClientConnection`, the forward
listener's `ForwardConnection`).
"""

from __future__ import annotations

import asyncio
import time

LINGER_IDLE = 5.0
LINGER_TOTAL = 30.0
LINGER_BYTES = 64 * 1024 * 1024
"""A lingering close ends after this long without a byte, this long in all, or this
many bytes read and dropped, whichever comes first (nginx: lingering_timeout 5s,
lingering_time 30s)."""


class Linger:
    """One connection's lingering close; its protocol hands it what still comes
    (`received`) instead of parsing it."""

    __slots__ = ("transport", "until", "left", "last", "timer")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        now = time.monotonic()
        self.last = now
        self.until = now + LINGER_TOTAL
        self.left = LINGER_BYTES
        self.timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            LINGER_IDLE, self._over)

    def received(self, data: bytes) -> None:
        """Bytes the client still sent: dropped, and counted."""
        self.left -= len(data)
        self.last = time.monotonic()
        if self.left <= 0:
            self.transport.close()

    def _over(self) -> None:
        """Close once the client has been quiet for LINGER_IDLE, or LINGER_TOTAL is over."""
        self.timer = None
        transport = self.transport
        if transport.is_closing():
            return
        end = min(self.last + LINGER_IDLE, self.until)
        now = time.monotonic()
        if now >= end:
            transport.close()
        else:
            self.timer = asyncio.get_running_loop().call_later(end - now, self._over)

    def cancel(self) -> None:
        """The connection is gone."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def start(transport: asyncio.Transport) -> Linger | None:
    """Close `transport` after what was written to it: with a lingering close (the
    caller then reads on, and hands what comes to the Linger), or, when it cannot
    half-close, at once (None)."""
    if transport.is_closing():
        return None
    if not transport.can_write_eof():
        transport.close()
        return None
    transport.write_eof()
    return Linger(transport)

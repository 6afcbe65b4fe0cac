"""X-Request-Id: one id per request, the same in the backend's request, the client's
answer and the access log line.

An id is this process's random prefix and a counter (`5f3a9c0e12ab-1f`): unique across
processes and restarts without a random draw per request. The client's own id is kept
only from a trusted hop (`--trusted-hops` > 0), as X-Forwarded-For is, and only when it
is a sane token; otherwise it is replaced, so a client cannot forge another request's id.
"""

from __future__ import annotations

import secrets

HEADER = b"X-Request-Id"
_LOWER = b"x-request-id"
MAX_LENGTH = 200
_ALLOWED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:+/=@")


class RequestIds:
    """Makes the ids of one process."""

    __slots__ = ("count", "prefix")

    def __init__(self, prefix: bytes | None = None) -> None:
        self.prefix = prefix if prefix is not None else secrets.token_hex(6).encode()
        self.count = 0

    def new(self) -> bytes:
        self.count += 1
        return b"%b-%x" % (self.prefix, self.count)

    def assign(self, headers: list[tuple[bytes, bytes]], trusted: bool) -> bytes:
        """The request's id: the client's if `trusted` and sane, else a new one. The
        headers are left with exactly one X-Request-Id, the returned one."""
        received = None
        for name, value in headers:
            if len(name) == 12 and name.lower() == _LOWER:
                received = value if received is None else b""  # two: neither is kept
        if received is not None:
            headers[:] = [(n, v) for n, v in headers if not (len(n) == 12 and n.lower() == _LOWER)]
            if trusted and acceptable(received):
                headers.append((HEADER, received))
                return received
        chosen = self.new()
        headers.append((HEADER, chosen))
        return chosen


def acceptable(value: bytes) -> bool:
    """A non-empty token of at most MAX_LENGTH printable, non-space characters."""
    return 0 < len(value) <= MAX_LENGTH and all(byte in _ALLOWED for byte in value)


def without_request_id(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """A response's headers without the backend's X-Request-Id (the proxy adds its own)."""
    return [(n, v) for n, v in headers if not (len(n) == 12 and n.lower() == _LOWER)]

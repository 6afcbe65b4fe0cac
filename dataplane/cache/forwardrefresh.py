"""Background revalidation on the forward listener (`stale-while-revalidate`).

The client got the stale entry already. The revalidation is a request of its own on
the same listener, on a connection that has no client behind it (`Background`): the
listener authenticates it, checks its destination against the EgressPolicy, resolves
and checks the addresses and reaches the origin exactly as for any request, and its
cache revalidates the entry (a 304 renews it, a new answer replaces it). What it
answers is dropped. It is logged like any request, as the client's whose request found
the entry stale. One revalidation per key is under way at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from kanal.dataplane.cache.policy import CONDITIONAL_FIELDS

_DROPPED = CONDITIONAL_FIELDS | {
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"content-length", b"expect", b"cache-control",
    b"pragma",
}
"""Fields of the client's request not repeated: its own conditions and cache directives
(the cache adds the entry's validators), and those about its connection."""

_refreshing: set[str] = set()
"""Keys with a background revalidation under way (this process's)."""


class Background(asyncio.Transport):
    """The transport of a connection without a client: what is written is dropped;
    closing it ends the connection as a client's leaving would."""

    def __init__(self, protocol: asyncio.Protocol, key: str, peer: Any) -> None:
        super().__init__()
        self._protocol = protocol
        self._key = key
        self._peer = peer
        self._closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._peer if name == "peername" else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            asyncio.get_running_loop().call_soon(self._lost)

    def abort(self) -> None:
        self.close()

    def _lost(self) -> None:
        _refreshing.discard(self._key)
        self._protocol.connection_lost(None)

    def can_write_eof(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return 0


def is_background(transport: object) -> bool:
    """Whether a forward connection is a background revalidation's."""
    return isinstance(transport, Background)


def revalidate(client: Any, key: str, target: bytes, headers: list[tuple[bytes, bytes]],
               peer: Any) -> None:
    """Send `GET target` with the client's `headers` on a new connection of the listener
    that `client` (a forward connection) belongs to, unless `key` is being revalidated."""
    if key in _refreshing:
        return
    _refreshing.add(key)
    make = cast(Callable[[Any], asyncio.Protocol], type(client))
    connection = make(client.proxy)
    transport = Background(connection, key, peer)
    connection.connection_made(transport)
    if transport.is_closing():
        return  # refused (the listener's connection limit)
    lines = [b"GET " + target + b" HTTP/1.1"]
    lines += [name + b": " + value for name, value in headers if name.lower() not in _DROPPED]
    lines += [b"Connection: close", b"\r\n"]
    connection.data_received(b"\r\n".join(lines))


__all__ = ["Background", "is_background", "revalidate"]

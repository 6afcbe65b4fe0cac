"""The floor under Kanal: a bare uvloop byte relay, no HTTP at all.

    python bench/run.py --only nginx,kanal --kanal-cmd "python bench/relay.py {listen} {backend}"

Each client connection gets one backend connection and bytes are copied both ways
with transport flow control, nothing parsed. What Kanal spends above this is the
price of HTTP: parsing, routing, rewriting heads, pooling. A tool for people, never
a test. (It answers on the port `bench/run.py` checks; it has no admin port, so the
benchmark falls back to checking GETs.)
"""

from __future__ import annotations

import asyncio
import sys

import uvloop


class _Side(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class _Client(_Side):
    def __init__(self, backend: tuple[str, int]) -> None:
        super().__init__()
        self.backend = backend

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        transport.pause_reading()  # type: ignore[attr-defined]
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        upstream = _Side()
        upstream.peer = self
        try:
            await loop.create_connection(lambda: upstream, *self.backend)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        self.peer = upstream
        if self.pending and upstream.transport is not None:
            # Bytes that arrived before the backend connection was up.
            upstream.transport.write(b"".join(self.pending))
            self.pending.clear()
        if self.transport is not None:
            self.transport.resume_reading()


async def main(listen: str, backend: str) -> None:
    host, _, port = listen.rpartition(":")
    bhost, _, bport = backend.rpartition(":")
    server = await asyncio.get_running_loop().create_server(
        lambda: _Client((bhost, int(bport))), host, int(port))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], sys.argv[2]))

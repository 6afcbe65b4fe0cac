"""Listeners and housekeeping of one dataplane process (the I/O edge of the proxy)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator

from kanal.dataplane.acceptor import ConnectionGate, Listener, listen
from kanal.dataplane.h2front import take_over
from kanal.dataplane.overload import check as check_overload
from kanal.dataplane.proxy import ClientConnection
from kanal.dataplane.runtime import ProxyContext, Runtime

log = logging.getLogger("kanal.server")

SWEEP_INTERVAL = 1.0


def bind_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket; with `reuse_port`, several processes may share the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def start_listener(
    context: ProxyContext,
    sock: socket.socket,
    *,
    ssl_context: ssl.SSLContext | None = None,
    name: str | None = None,
    cap: int | None = None,
    gate: ConnectionGate | None = None,
) -> Listener:
    """Serve a reverse-proxy listener on `sock`; accepting pauses while it holds `cap`
    connections or the process holds the `gate`'s cap (see `kanal.dataplane.acceptor`)."""
    if context.http2 is None:
        context.http2 = take_over  # h2c on plain listeners, ALPN `h2` on TLS ones
    return await listen(name or context.scheme, sock, lambda: ClientConnection(context),
                        ssl_context=ssl_context, cap=cap, gate=gate)


def tune_gc() -> None:
    """After start-up: freeze what exists and collect cycles less often.

    The proxy makes few reference cycles per request; the default thresholds make the
    collector walk young objects every few hundred requests for nothing.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


@contextlib.contextmanager
def configuration_objects() -> Iterator[None]:
    """Build a configuration without the cyclic collector, then freeze what was built.

    A big Snapshot is hundreds of thousands of objects: left to the collector, they make
    the next full collections walk all of them (a pause of a tenth of a second at a
    thousand routes), often while the next configuration is being applied. Frozen, they
    are never walked; they are still freed by reference counting when replaced.
    `housekeeping` unfreezes and collects once in a while for the rare cycle.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        gc.freeze()


FULL_COLLECTION_INTERVAL = 600.0


@contextlib.asynccontextmanager
async def housekeeping(runtime: Runtime) -> AsyncIterator[None]:
    """Close idle upstream connections and idle or stalled client connections."""

    async def sweep_forever() -> None:
        next_full = time.monotonic() + FULL_COLLECTION_INTERVAL
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            if time.monotonic() > next_full:
                next_full = time.monotonic() + FULL_COLLECTION_INTERVAL
                gc.unfreeze()
                gc.collect()
                gc.freeze()
            runtime.sweep()
            check_overload(runtime)
            now = time.monotonic()
            for context in [c for r in (runtime, *runtime.companions) for c in r.contexts]:
                for client in list(context.clients):
                    client.sweep(now)

    task = asyncio.get_running_loop().create_task(sweep_forever())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

"""Accepting client connections under caps: per listener and per process.

asyncio's `create_server` accepts whatever the kernel has queued; a cap checked after
the accept can only answer and close, and holds a socket and its buffers meanwhile.
Here each listening socket is read by an accept loop of the proxy's own: at a cap it
stops watching the socket (`remove_reader`), so further connections wait in the
kernel's backlog, as under HAProxy's maxconn, and it watches it again as soon as one
of its connections closes. The accepted socket is handed to the loop with
`connect_accepted_socket` (TLS and ALPN as `create_server` does them, on asyncio and
uvloop alike).

A connection counts from its accept to the close of its socket, whatever runs on it
(HTTP/1, HTTP/2, a tunnel, a TLS handshake that never ends): the loops close (asyncio)
or detach (uvloop) the socket object they were given when the transport ends, and the
accepted socket here is an object that reports that once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client.core import Metric

log = logging.getLogger("kanal.accept")

ACCEPT_BATCH = 64
"""Connections accepted per wake-up at most, so one busy listener cannot hold the loop."""
ACCEPT_RETRY_DELAY = 1.0
"""Seconds before accepting again after the process ran out of file descriptors."""
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

ProtocolFactory = Callable[[], asyncio.BaseProtocol]


class ConnectionGate:
    """The client connections of one process, over all its listeners, and their cap
    (`--max-total-connections`; None: no cap)."""

    def __init__(self, cap: int | None = None) -> None:
        self.cap = cap
        self.open = 0
        self.listeners: list[Listener] = []

    def full(self) -> bool:
        return self.cap is not None and self.open >= self.cap

    def released(self) -> None:
        """A connection of some listener closed: listeners paused at a cap that now
        has room accept again."""
        self.open -= 1
        for listener in self.listeners:
            if listener.paused is not None and listener.blocked() is None:
                listener.resume()


class Listener(asyncio.AbstractServer):
    """One listening socket served by an accept loop that pauses at its caps."""

    def __init__(self, name: str, sock: socket.socket, factory: ProtocolFactory, *,
                 ssl_context: ssl.SSLContext | None = None, cap: int | None = None,
                 gate: ConnectionGate | None = None) -> None:
        self.name = name  # the `listener` label of its metrics
        self.sock = sock
        self.factory = factory
        self.ssl_context = ssl_context
        self.cap = cap
        self.gate = gate if gate is not None else ConnectionGate()
        self.open = 0
        # Which cap stopped accepting ("listener" or "process"); None while accepting.
        self.paused: str | None = None
        self.pauses = {"listener": 0, "process": 0}
        self.serving = False
        self.loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._retry: asyncio.TimerHandle | None = None
        self.gate.listeners.append(self)

    # --- asyncio.AbstractServer -------------------------------------------------------

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self.sock,) if self.sock.fileno() >= 0 else ()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self.loop

    def is_serving(self) -> bool:
        return self.serving

    async def start_serving(self) -> None:
        if self.serving or self.sock.fileno() < 0:
            return
        self.sock.setblocking(False)
        self.serving = True
        self.loop.add_reader(self.sock.fileno(), self._accept)

    async def serve_forever(self) -> None:
        await self.start_serving()
        while self.serving:
            await asyncio.sleep(3600)

    def close(self) -> None:
        """Stop accepting and close the listening socket; open connections go on."""
        if self.serving:
            self.serving = False
            if self.paused is None:
                self.loop.remove_reader(self.sock.fileno())
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        with contextlib.suppress(ValueError):
            self.gate.listeners.remove(self)
        self.sock.close()

    async def wait_closed(self) -> None:
        return None

    # --- the accept loop --------------------------------------------------------------

    def blocked(self) -> str | None:
        """The cap that forbids one more connection now, or None."""
        if self.cap is not None and self.open >= self.cap:
            return "listener"
        if self.gate.full():
            return "process"
        return None

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            why = self.blocked()
            if why is not None:
                self._pause(why)
                return
            try:
                accepted, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # gone before it was accepted
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    # Out of file descriptors: stop for a while instead of spinning
                    # (the socket stays readable), as asyncio's own accept does.
                    log.error("listener %s cannot accept: %s; retrying in %gs",
                              self.name, exc.strerror or exc, ACCEPT_RETRY_DELAY)
                    self._pause_for(ACCEPT_RETRY_DELAY)
                else:
                    log.warning("listener %s: accept failed: %s", self.name, exc)
                return
            conn = CountedSocket(accepted.family, accepted.type, accepted.proto,
                                 accepted.detach())
            conn.listener = self
            self.open += 1
            self.gate.open += 1
            conn.setblocking(False)
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self.loop.create_task(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: CountedSocket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.factory, conn, ssl=self.ssl_context)
        except Exception as exc:  # a failed handshake, a reset: the connection is over
            log.debug("listener %s: connection not started: %s", self.name, exc)
            conn.close()  # counted off once, whoever closes it first

    def _pause(self, why: str) -> None:
        if self.paused is None:
            self.loop.remove_reader(self.sock.fileno())
            self.paused = why
            self.pauses[why] += 1
            log.debug("listener %s: accepting paused at the %s connection cap", self.name, why)

    def resume(self) -> None:
        if self.paused is not None and self.serving:
            self.paused = None
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def _pause_for(self, delay: float) -> None:
        if self.paused is None:
            self.loop.remove_reader(self.sock.fileno())
            self.paused = "resources"

            def again() -> None:
                self._retry = None
                self.resume()

            self._retry = self.loop.call_later(delay, again)

    def released(self) -> None:
        """One of this listener's connections closed."""
        self.open -= 1
        self.gate.released()


class CountedSocket(socket.socket):
    """An accepted socket that tells its listener, once, when the loop lets it go."""

    __slots__ = ("listener",)

    listener: Listener | None

    def close(self) -> None:
        self._release()
        super().close()

    def detach(self) -> int:
        self._release()
        return super().detach()

    def _release(self) -> None:
        listener = getattr(self, "listener", None)
        if listener is not None:
            self.listener = None
            listener.released()


async def listen(name: str, sock: socket.socket, factory: ProtocolFactory, *,
                 ssl_context: ssl.SSLContext | None = None, cap: int | None = None,
                 gate: ConnectionGate | None = None) -> Listener:
    """Serve `sock` (bound and listening) with `factory`'s protocols, under the caps."""
    listener = Listener(name, sock, factory, ssl_context=ssl_context, cap=cap, gate=gate)
    await listener.start_serving()
    return listener


class ListenerCollector:
    """A prometheus_client collector: connections and accept pauses of each listener."""

    def __init__(self, gate: ConnectionGate) -> None:
        self.gate = gate

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        listeners = sorted(self.gate.listeners, key=lambda listener: listener.name)
        current = GaugeMetricFamily("kanal_listener_connections",
                                    "Client connections open, by listener", labels=["listener"])
        paused = GaugeMetricFamily(
            "kanal_listener_accept_paused",
            "1 while a listener does not accept because a connection cap is reached",
            labels=["listener"])
        pauses = CounterMetricFamily(
            "kanal_listener_accept_pauses",
            "Times a listener stopped accepting at a connection cap, by listener and cap "
            "(listener: --max-connections, process: --max-total-connections)",
            labels=["listener", "cap"])
        for listener in listeners:
            current.add_metric([listener.name], listener.open)
            paused.add_metric([listener.name], 1 if listener.paused is not None else 0)
            for cap, count in sorted(listener.pauses.items()):
                pauses.add_metric([listener.name, cap], count)
        yield current
        yield paused
        yield pauses
        total = GaugeMetricFamily("kanal_connections",
                                  "Client connections open over every listener of the process")
        total.add_metric([], self.gate.open)
        yield total

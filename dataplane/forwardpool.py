"""The forward listener's upstream connections: the reverse proxy's pools, one per
dialed destination, shared by every client of the listener.

A destination is the (address, port) the forward proxy dialed, never a name: a request
may take an idle connection to an address only once that address was checked for its
own host (`egress.check_addresses`), so sharing a connection between clients, or
between names resolving to the same address, never skips a check. The connections are
`pool.UpstreamConnection`s in `pool.EndpointPool`s, as the reverse proxy's are, so
what the upstream side learns (response head limits, HEAD answers that announce a
body, unknown transfer codings, stale pooled connections) holds on both listeners.

Bounded three ways: idle connections per destination (`max_idle`), time idle
(`idle_timeout`, swept), and connections open in all (`max_open`: past it, a
connection whose exchange ended closes instead of waiting idle). A name's resolution
is reused for `resolution_reuse` seconds to find its idle connections without asking
DNS again; after that, or when none is idle, the name is resolved again.
"""

from __future__ import annotations

from collections.abc import Callable

from kanal.dataplane.egress import IPAddress
from kanal.dataplane.limits import UpstreamLimits
from kanal.dataplane.pool import EndpointPool, UpstreamConnection


class Destinations:
    """The pools of one forward listener, by dialed address and port."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        idle_timeout: float,
        max_idle: int,
        max_open: int,
        resolution_reuse: float,
        on_informational: Callable[[UpstreamConnection], None] | None = None,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.max_open = max_open
        self.resolution_reuse = resolution_reuse
        self.on_informational = on_informational
        self.pools: dict[tuple[str, int], EndpointPool] = {}
        # (host, port) -> the pool a resolution of that name led to, the address it
        # was checked as, and when it was resolved.
        self.names: dict[tuple[str, int], tuple[EndpointPool, IPAddress, float]] = {}
        # Counts the open connections of every pool (connect and forget keep it).
        self.limits = UpstreamLimits()
        # Connects in progress, by destination: a sweep keeps their pools.
        self.dialing: dict[tuple[str, int], int] = {}

    @property
    def open(self) -> int:
        """Connections open to every destination, busy or idle."""
        return self.limits.connections

    def pool(self, address: IPAddress, port: int) -> EndpointPool:
        """The pool of one dialed destination, made on first use."""
        key = (str(address), port)
        pool = self.pools.get(key)
        if pool is None:
            pool = EndpointPool(key[0], port, connect_timeout=self.connect_timeout,
                                idle_timeout=self.idle_timeout, max_idle=self.max_idle)
            pool.limits = self.limits
            pool.on_informational = self.on_informational
            self.pools[key] = pool
        return pool

    async def connect(self, pool: EndpointPool) -> UpstreamConnection:
        """A new connection of `pool` (raises `pool.UpstreamConnectError`)."""
        key = (pool.address, pool.port)
        self.dialing[key] = self.dialing.get(key, 0) + 1
        try:
            return await pool.connect()
        finally:
            left = self.dialing.pop(key) - 1
            if left:
                self.dialing[key] = left

    def remembered(self, host: str, port: int, now: float) -> tuple[EndpointPool, IPAddress] | None:
        """The pool and address a recent resolution of `host` led to, if any is fresh."""
        entry = self.names.get((host, port))
        if entry is None:
            return None
        pool, address, resolved = entry
        if now - resolved > self.resolution_reuse or self.pools.get((pool.address, port)) is not pool:
            del self.names[(host, port)]
            return None
        return pool, address

    def remember(self, host: str, port: int, pool: EndpointPool, address: IPAddress,
                 now: float) -> None:
        """`host` resolved (at `now`) to `address`, whose pool served it."""
        self.names[(host, port)] = (pool, address, now)

    def release(self, conn: UpstreamConnection) -> None:
        """An exchange ended cleanly: keep the connection idle, unless too many are open."""
        if self.limits.connections > self.max_open:
            conn.close()
            conn.pool.forget(conn)  # counted off now, not once the close completes
        else:
            conn.release()

    def retire(self, still_allowed: Callable[[str, int, IPAddress], bool]) -> None:
        """The configuration changed: keep the pools of names that are still allowed to
        reach their address; the others close their idle connections now and their busy
        ones once their exchange ends."""
        wanted: set[int] = set()
        for (host, port), (pool, address, _) in list(self.names.items()):
            if still_allowed(host, port, address):
                wanted.add(id(pool))
            else:
                del self.names[(host, port)]
        for key, pool in list(self.pools.items()):
            if id(pool) not in wanted:
                pool.retire()
                del self.pools[key]

    def sweep(self, now: float) -> None:
        """Close idle connections past the idle timeout, time out stalled exchanges,
        and forget destinations with no connection left and stale resolutions."""
        for key, pool in list(self.pools.items()):
            pool.sweep(now)
            if not pool.open and key not in self.dialing:
                del self.pools[key]
        for name, (pool, _, resolved) in list(self.names.items()):
            if now - resolved > self.resolution_reuse or self.pools.get(
                    (pool.address, name[1])) is not pool:
                del self.names[name]

    def close_all(self) -> None:
        for pool in self.pools.values():
            pool.close_all()
        self.pools.clear()
        self.names.clear()

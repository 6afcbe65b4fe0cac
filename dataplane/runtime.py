"""A Snapshot made runnable, and the atomic swap from one to the next.

`Runtime.apply` builds everything a Snapshot needs (route table, splits, balancers,
connection pools) before it publishes the new `Config` with a single assignment. A
request reads `context.config` once, when its head is complete, and keeps that object
to its end: it never sees a mixture of two configurations.

Endpoint state (requests in flight, availability) and connection pools outlive a
reload when the endpoint stays, so a reload drops no warm connection and resets no
health or circuit state.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kanal.dataplane.balancer import Balancer, EndpointState, make_balancer
from kanal.dataplane.metrics import RequestMetrics
from kanal.dataplane.pool import EndpointPool
from kanal.dataplane.router import RouteTable
from kanal.dataplane.snapshot import Snapshot, Upstream, UpstreamTLS

if TYPE_CHECKING:
    from kanal.dataplane.proxy import ClientConnection, Request

log = logging.getLogger("kanal.runtime")


class UpstreamRuntime:
    """One Upstream of the applied configuration: its endpoints, balancer and pools."""

    __slots__ = ("key", "spec", "states", "balancer", "pools", "hashed", "_header", "_cookie")

    def __init__(
        self,
        spec: Upstream,
        states: list[EndpointState],
        balancer: Balancer,
        pools: dict[str, EndpointPool],
    ) -> None:
        self.key = spec.key
        self.spec = spec
        self.states = states
        self.balancer = balancer
        self.pools = pools
        hash_on = spec.hash_on if spec.policy == "RingHash" else None
        self.hashed = hash_on is not None
        self._header = hash_on.header.lower().encode("latin-1") if hash_on and hash_on.header else None
        self._cookie = hash_on.cookie if hash_on and hash_on.cookie else None

    def hash_key(self, request: Request, peer: str) -> str | None:
        """What RingHash hashes for this request; None when the request lacks it."""
        if self._header is not None:
            wanted = self._header
            if wanted == b"host":
                return request.host.decode("latin-1") if request.host else None
            for name, value in request.headers:
                if name.lower() == wanted:
                    return value.decode("latin-1")
            return None
        if self._cookie is not None:
            if request.cookie is None:
                return None
            from kanal.dataplane.proxy import _cookie

            return _cookie(request.cookie, self._cookie)
        return peer


@dataclass(frozen=True, slots=True)
class Config:
    """Everything one Snapshot needs at request time."""

    snapshot: Snapshot
    table: RouteTable
    upstreams: dict[str, UpstreamRuntime]
    applied_at: float = field(default_factory=time.time)

    @property
    def version(self) -> str:
        return self.snapshot.version


class ProxyContext:
    """What every client connection of a process shares: the config, metrics, settings."""

    def __init__(
        self,
        *,
        scheme: str = "http",
        trusted_hops: int = 0,
        metrics: RequestMetrics | None = None,
    ) -> None:
        self.config: Config | None = None
        self.scheme = scheme
        self.trusted_hops = trusted_hops
        self.metrics = metrics or RequestMetrics()
        self.clients: set[ClientConnection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        # HTTPS listener: says whether a request for `host` arrived on a connection
        # whose TLS handshake (SNI `server_name`) chose another Route's certificate.
        self.misdirected: Callable[[str | None, str], bool] | None = None
        # Plain listener: the port of the HTTPS listener, for redirects (None: none).
        self.https_port: int | None = None

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a slow-path coroutine (a connect) and keep a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def for_scheme(self, scheme: str) -> ProxyContext:
        """A context sharing config and metrics, for a listener of another scheme."""
        other = ProxyContext(scheme=scheme, trusted_hops=self.trusted_hops, metrics=self.metrics)
        other.config = self.config
        return other


class Runtime:
    """Builds Configs from Snapshots and publishes them to every listener's context."""

    def __init__(self, *, gateway: str = "ingress", rng: random.Random | None = None) -> None:
        self.gateway = gateway
        self.rng = rng or random.Random()
        self.contexts: list[ProxyContext] = []
        self.config: Config | None = None
        self._states: dict[tuple[str, str], EndpointState] = {}
        self._pools: dict[tuple[str, str], EndpointPool] = {}
        self.metrics = RequestMetrics()
        # Called with each new Config right after it is published (TLS certificates,
        # health checkers, egress policies: whatever else follows the configuration).
        self.on_apply: list[Callable[[Config], None]] = []

    def context(self, scheme: str = "http", trusted_hops: int = 0) -> ProxyContext:
        context = ProxyContext(scheme=scheme, trusted_hops=trusted_hops, metrics=self.metrics)
        context.config = self.config
        self.contexts.append(context)
        return context

    def build(self, snapshot: Snapshot) -> Config:
        """Make a runnable Config; raises ValueError when the Snapshot cannot run."""
        table = RouteTable.build(snapshot, gateway=self.gateway, rng=self.rng)
        upstreams: dict[str, UpstreamRuntime] = {}
        for spec in snapshot.upstreams:
            states: list[EndpointState] = []
            pools: dict[str, EndpointPool] = {}
            ssl_context = upstream_ssl_context(spec.tls) if spec.protocol == "HTTPS" else None
            for endpoint in spec.endpoints:
                state_key = (spec.key, f"{endpoint.address}:{endpoint.port}")
                state = self._states.get(state_key)
                if state is None or state.weight != endpoint.weight:
                    fresh = EndpointState(endpoint)
                    if state is not None:
                        fresh.active = state.active
                        fresh.available = state.available
                    state = fresh
                states.append(state)
                pool = self._pools.get(state_key)
                if pool is None or _pool_changed(pool, spec, ssl_context):
                    pool = EndpointPool(
                        endpoint.address,
                        endpoint.port,
                        ssl_context=ssl_context,
                        server_hostname=(spec.tls.sni if spec.tls else None),
                        connect_timeout=spec.connect_timeout,
                        idle_timeout=spec.idle_timeout,
                        state=state,
                    )
                pools[state.key] = pool
            balancer = make_balancer(spec.policy, states, self.rng, spec.hash_on)
            upstreams[spec.key] = UpstreamRuntime(spec, states, balancer, pools)
        return Config(snapshot=snapshot, table=table, upstreams=upstreams)

    def apply(self, snapshot: Snapshot) -> Config:
        """Build and publish a Snapshot atomically; the old one keeps its in-flight requests."""
        config = self.build(snapshot)
        old_pools = self._pools
        self._states = {
            (key, state.key): state for key, up in config.upstreams.items() for state in up.states
        }
        self._pools = {
            (key, pool_key): pool for key, up in config.upstreams.items() for pool_key, pool in up.pools.items()
        }
        self.config = config
        for context in self.contexts:
            context.config = config
        self.metrics.config_version = snapshot.version
        self.metrics.config_applied += 1
        for listener in self.on_apply:
            listener(config)
        kept = {id(pool) for pool in self._pools.values()}
        for pool in old_pools.values():
            if id(pool) not in kept:
                # Idle connections of endpoints that left go now; busy ones finish their
                # exchange and are then closed, because their pool no longer takes them.
                pool.max_idle = 0
                for conn in pool.idle:
                    conn.close()
                pool.idle.clear()
        return config

    def sweep(self) -> None:
        """Close idle upstream connections past their idle timeout."""
        now = time.monotonic()
        for pool in self._pools.values():
            pool.sweep(now)

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close_all()


def _pool_changed(pool: EndpointPool, spec: Upstream, ssl_context: ssl.SSLContext | None) -> bool:
    return (
        (pool.ssl_context is None) != (ssl_context is None)
        or pool.connect_timeout != spec.connect_timeout
        or pool.idle_timeout != spec.idle_timeout
        or pool.server_hostname != (spec.tls.sni if spec.tls else None)
        or pool.ssl_context is not ssl_context
    )


def upstream_ssl_context(tls: UpstreamTLS | None) -> ssl.SSLContext:
    """The client TLS context for an HTTPS Upstream (one per distinct settings; see tls.py)."""
    from kanal.dataplane.tls import upstream_context

    return upstream_context(tls)

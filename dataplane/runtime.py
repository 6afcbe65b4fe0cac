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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kanal.contract.snapshot import Snapshot, Upstream, UpstreamTLS
from kanal.contract.validate import validate
from kanal.dataplane.acceptor import ConnectionGate
from kanal.dataplane.balancer import EndpointState, make_balancer
from kanal.dataplane.breaker import Breaker
from kanal.dataplane.context import MAX_EJECTION_PERCENT as MAX_EJECTION_PERCENT
from kanal.dataplane.context import MIN_RETRY_CONCURRENCY as MIN_RETRY_CONCURRENCY
from kanal.dataplane.context import RETRY_BUDGET_PERCENT as RETRY_BUDGET_PERCENT
from kanal.dataplane.context import Client as Client
from kanal.dataplane.context import Config as Config
from kanal.dataplane.context import ProxyContext as ProxyContext
from kanal.dataplane.context import RequestHead as RequestHead
from kanal.dataplane.context import UpstreamRuntime as UpstreamRuntime
from kanal.dataplane.h2pool import H2EndpointPool
from kanal.dataplane.health import EndpointChecker
from kanal.dataplane.limits import UpstreamLimits
from kanal.dataplane.mesh import with_mesh_aliases
from kanal.dataplane.metrics import RequestMetrics
from kanal.dataplane.pool import EndpointPool
from kanal.dataplane.router import RouteTable

if TYPE_CHECKING:
    from kanal.dataplane.overloadstate import MemoryOverload

log = logging.getLogger("kanal.runtime")


class Runtime:
    """Builds Configs from Snapshots and publishes them to every listener's context."""

    def __init__(self, *, gateway: str = "ingress", rng: random.Random | None = None,
                 namespace: str | None = None) -> None:
        self.gateway = gateway
        # A sidecar's namespace: its mesh routes answer to every spelling of a
        # Service's name relative to it (kanal.dataplane.mesh). None: names as written.
        self.namespace = namespace
        # Runtimes serving other listeners of this process (a sidecar's inbound one):
        # swept, drained and closed with this one.
        self.companions: list[Runtime] = []
        # Forward proxies serving with this runtime (kanal.dataplane.forward), for drains.
        self.forward_proxies: list[Any] = []
        # Set by a forward proxy: each Config is also built as the mesh gateway's, with
        # Service names relative to this namespace (Config.mesh), inside the same
        # atomic build, so a Snapshot whose mesh routes cannot run is refused whole.
        self.mesh_namespace: str | None = None
        self.rng = rng or random.Random()
        self.contexts: list[ProxyContext] = []
        self.config: Config | None = None
        self.metrics = RequestMetrics()
        self._limits: dict[str, UpstreamLimits] = {}
        self._checkers: dict[tuple[str, str], EndpointChecker] = {}
        # Called with each new Config right after it is published (TLS certificates,
        # health checkers, egress policies: whatever else follows the configuration).
        self.on_apply: list[Callable[[Config], None]] = []
        # --compression: rules without a Compression filter compress with its defaults.
        self.compress_all = False
        # The client connections of every listener of the process, and their cap.
        self.connection_gate = ConnectionGate()
        # --overload-memory (kanal.dataplane.overload); None: off.
        self.overload: MemoryOverload | None = None

    def context(self, scheme: str = "http", trusted_hops: int = 0, *,
                mesh: bool = False) -> ProxyContext:
        """A context for one listener; `mesh` routes it as the mesh gateway (see
        `mesh_namespace`)."""
        context = ProxyContext(scheme=scheme, trusted_hops=trusted_hops, metrics=self.metrics,
                               mesh=mesh)
        context.config = self._config_for(context)
        self.contexts.append(context)
        return context

    def _config_for(self, context: ProxyContext) -> Config | None:
        if context.mesh and self.config is not None:
            return self.config.mesh
        return self.config

    def build(self, snapshot: Snapshot) -> Config:
        """Make a runnable Config; raises ValueError when the Snapshot cannot run."""
        problems = validate(snapshot)
        if problems:
            raise ValueError("; ".join(problems))
        routed = snapshot
        if self.gateway == "mesh" and self.namespace is not None:
            routed = with_mesh_aliases(snapshot, self.namespace)
        table = RouteTable.build(routed, gateway=self.gateway, rng=self.rng,
                                 compress_all=self.compress_all)
        mesh_routed: Snapshot | None = None
        mesh_table: RouteTable | None = None
        if self.mesh_namespace is not None:
            if self.gateway == "mesh" and self.namespace == self.mesh_namespace:
                mesh_routed, mesh_table = routed, table  # a sidecar: the same table
            else:
                mesh_routed = with_mesh_aliases(snapshot, self.mesh_namespace)
                mesh_table = RouteTable.build(mesh_routed, gateway="mesh", rng=self.rng,
                                              compress_all=self.compress_all)
        upstreams: dict[str, UpstreamRuntime] = {}
        previous = self.config.upstreams if self.config is not None else {}
        for spec in snapshot.upstreams:
            before = previous.get(spec.key)
            if before is not None and (before.spec is spec or before.spec == spec):
                # Same Upstream as before: keep its balancer, states and pools as they are
                # (a one-Route change must not cost a rebuild of every upstream).
                upstreams[spec.key] = before
                continue
            states: list[EndpointState] = []
            pools: dict[str, EndpointPool] = {}
            # Endpoint states and pools outlive a change of their Upstream: health,
            # circuits, requests in flight and warm connections carry over.
            old_states = {state.key: state for state in before.states} if before else {}
            old_pools = before.pools if before is not None else {}
            limits = self._limits.get(spec.key)
            if limits is None:
                limits = self._limits[spec.key] = UpstreamLimits()
            ssl_context = upstream_ssl_context(spec.tls) if spec.protocol == "HTTPS" else None
            http2 = spec.protocol in ("H2C", "H2")
            if spec.protocol == "H2":
                ssl_context = upstream_h2_context(spec.tls)
            for endpoint in spec.endpoints:
                endpoint_key = f"{endpoint.address}:{endpoint.port}"
                state = old_states.get(endpoint_key)
                if state is None or state.weight != endpoint.weight:
                    fresh = EndpointState(endpoint)
                    if state is not None:
                        fresh.active = state.active
                        fresh.healthy = state.healthy
                        fresh.breaker = state.breaker
                    state = fresh
                if state.breaker is None:
                    state.breaker = Breaker(spec.circuit_breaker)
                else:
                    state.breaker.settings = spec.circuit_breaker
                state.refresh(time.monotonic())
                states.append(state)
                pool = old_pools.get(endpoint_key)
                if pool is None or _pool_changed(pool, spec, ssl_context):
                    pool = (H2EndpointPool if http2 else EndpointPool)(
                        endpoint.address,
                        endpoint.port,
                        ssl_context=ssl_context,
                        server_hostname=(spec.tls.sni if spec.tls else None),
                        connect_timeout=spec.connect_timeout,
                        idle_timeout=spec.idle_timeout,
                        state=state,
                    )
                pool.limits = limits
                pools[state.key] = pool
            balancer = make_balancer(spec.policy, states, self.rng, spec.hash_on)
            upstreams[spec.key] = UpstreamRuntime(spec, states, balancer, pools, limits, self.metrics)
        mesh = None
        if mesh_routed is not None and mesh_table is not None:
            mesh = Config(snapshot=mesh_routed, table=mesh_table, upstreams=upstreams)
        return Config(snapshot=snapshot, table=table, upstreams=upstreams, mesh=mesh)

    def apply(self, snapshot: Snapshot) -> Config:
        """Build and publish a Snapshot atomically; the old one keeps its in-flight requests."""
        return self.publish(self.build(snapshot))

    def publish(self, config: Config) -> Config:
        """Swap in a Config `build` made (on the loop: one assignment per listener), and
        retire what the old one had that the new one has not."""
        snapshot = config.snapshot
        previous = self.config.upstreams if self.config is not None else {}
        self.config = config
        for context in self.contexts:
            context.config = self._config_for(context)
        self.metrics.config_version = snapshot.version
        self.metrics.config_applied += 1
        self._limits = {key: limits for key, limits in self._limits.items() if key in config.upstreams}
        for listener in self.on_apply:
            listener(config)
        for key, old in previous.items():
            new = config.upstreams.get(key)
            if new is old:
                continue
            kept = {id(pool) for pool in new.pools.values()} if new is not None else set()
            for pool in old.pools.values():
                if id(pool) not in kept:
                    pool.retire()
        return config

    def _all_pools(self) -> list[EndpointPool]:
        if self.config is None:
            return []
        return [pool for upstream in self.config.upstreams.values() for pool in upstream.pools.values()]

    def start_health_checks(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start (on `loop`) or stop checkers so that each endpoint of an Upstream with
        `healthCheck` in the applied configuration has exactly one."""
        config = self.config
        if config is None:
            return
        wanted: dict[tuple[str, str], tuple[UpstreamRuntime, EndpointState]] = {}
        for upstream in config.upstreams.values():
            if upstream.spec.health_check is None:
                continue
            for state in upstream.states:
                wanted[(upstream.key, state.key)] = (upstream, state)
        for key in list(self._checkers):
            checker = self._checkers[key]
            entry = wanted.get(key)
            if entry is None or checker.settings != entry[0].spec.health_check:
                checker.stop()
                del self._checkers[key]
                if entry is None:
                    continue
        for key, (upstream, state) in wanted.items():
            existing = self._checkers.get(key)
            if existing is not None:
                if existing.state is not state:
                    existing.adopt(state)
                continue
            settings = upstream.spec.health_check
            assert settings is not None
            pool = upstream.pools[state.key]
            checker = EndpointChecker(
                upstream.key, state, settings, on_change=self._health_changed(upstream),
                ssl_context=pool.ssl_context, server_hostname=pool.server_hostname, rng=self.rng,
            )
            self._checkers[key] = checker
            checker.start(loop)

    def _health_changed(self, upstream: UpstreamRuntime) -> Callable[[EndpointState, bool, str], None]:
        def changed(state: EndpointState, healthy: bool, detail: str) -> None:
            if healthy:
                log.info("endpoint %s of upstream %s is healthy again", state.key, upstream.key)
            else:
                log.warning("endpoint %s of upstream %s is unhealthy: %s", state.key, upstream.key, detail)
            self.metrics.count_event("healthy" if healthy else "unhealthy", upstream.key)
        return changed

    def sweep(self) -> None:
        """Close idle upstream connections past their idle timeout."""
        now = time.monotonic()
        for pool in self._all_pools():
            pool.sweep(now)
        for companion in self.companions:
            companion.sweep()

    def close(self) -> None:
        for companion in self.companions:
            companion.close()
        for checker in self._checkers.values():
            checker.stop()
        self._checkers.clear()
        for pool in self._all_pools():
            pool.close_all()


def _pool_changed(pool: EndpointPool, spec: Upstream, ssl_context: ssl.SSLContext | None) -> bool:
    return (
        (pool.ssl_context is None) != (ssl_context is None)
        or pool.connect_timeout != spec.connect_timeout
        or pool.idle_timeout != spec.idle_timeout
        or pool.server_hostname != (spec.tls.sni if spec.tls else None)
        or pool.ssl_context is not ssl_context
        or isinstance(pool, H2EndpointPool) != (spec.protocol in ("H2C", "H2"))
    )


def upstream_ssl_context(tls: UpstreamTLS | None) -> ssl.SSLContext:
    """The client TLS context for an HTTPS Upstream (one per distinct settings; see tls.py)."""
    from kanal.dataplane.tls import upstream_context

    return upstream_context(tls)


def upstream_h2_context(tls: UpstreamTLS | None) -> ssl.SSLContext:
    """The client TLS context for an H2 Upstream (ALPN h2)."""
    from kanal.dataplane.tls import upstream_h2_context as build

    return build(tls)

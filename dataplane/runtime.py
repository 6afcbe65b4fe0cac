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
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from kanal.contract.snapshot import Snapshot, Upstream, UpstreamTLS
from kanal.contract.validate import validate
from kanal.dataplane.acceptor import ConnectionGate
from kanal.dataplane.balancer import Balancer, EndpointState, make_balancer
from kanal.dataplane.breaker import Breaker
from kanal.dataplane.h2pool import H2EndpointPool
from kanal.dataplane.headers import cookie_value
from kanal.dataplane.health import EndpointChecker
from kanal.dataplane.http1 import BODY_IDLE_TIMEOUT, HEAD_TIMEOUT
from kanal.dataplane.limits import UpstreamLimits
from kanal.dataplane.mesh import with_mesh_aliases
from kanal.dataplane.metrics import RequestMetrics
from kanal.dataplane.pool import EndpointPool
from kanal.dataplane.router import RouteTable

if TYPE_CHECKING:
    from kanal.dataplane.accesslog import AccessLog
    from kanal.dataplane.overloadstate import MemoryOverload
    from kanal.dataplane.requestid import RequestIds
    from kanal.dataplane.tracing import Tracing

log = logging.getLogger("kanal.runtime")


class RequestHead(Protocol):
    """What a balancer's hash reads of a request (the proxy's `Request` is one)."""

    host: bytes | None
    headers: list[tuple[bytes, bytes]]
    cookie: bytes | None


class Client(Protocol):
    """A client connection as the housekeeping and the drain see it."""

    def sweep(self, now: float) -> None: ...

    def close_if_idle(self) -> bool: ...


class UpstreamRuntime:
    """One Upstream of the applied configuration: its endpoints, balancer and pools."""

    __slots__ = (
        "key", "spec", "states", "balancer", "pools", "hashed", "_header", "_cookie", "limits",
        "metrics", "max_open",
    )

    def __init__(
        self,
        spec: Upstream,
        states: list[EndpointState],
        balancer: Balancer,
        pools: dict[str, EndpointPool],
        limits: UpstreamLimits | None = None,
        metrics: RequestMetrics | None = None,
    ) -> None:
        self.key = spec.key
        self.spec = spec
        self.states = states
        self.balancer = balancer
        self.pools = pools
        self.limits = limits or UpstreamLimits()
        self.metrics = metrics or RequestMetrics()
        # Like Envoy's max ejection percent: at most this many circuits open at once,
        # and always at least one, so one bad setting cannot eject every endpoint.
        self.max_open = max(1, len(states) * MAX_EJECTION_PERCENT // 100)
        hash_on = spec.hash_on if spec.policy == "RingHash" else None
        self.hashed = hash_on is not None
        self._header = hash_on.header.lower().encode("latin-1") if hash_on and hash_on.header else None
        self._cookie = hash_on.cookie if hash_on and hash_on.cookie else None

    # --- endpoints, circuits and outcomes ---------------------------------------------

    def pick(self, hash_key: str | None, exclude: EndpointState | None = None) -> EndpointState | None:
        """An endpoint whose circuit lets one more request through, or None."""
        for _ in range(3):
            state = self.balancer.pick(hash_key, exclude)
            if state is None:
                return None
            breaker = state.breaker
            if breaker is None or breaker.state == "closed":
                return state
            if self._acquire(state, breaker, time.monotonic()):
                return state
            exclude = state
        return None

    def acquire(self, state: EndpointState) -> bool:
        """Take a request's place through `state`'s circuit (a probe when half-open)."""
        breaker = state.breaker
        return breaker is None or self._acquire(state, breaker, time.monotonic())

    def _acquire(self, state: EndpointState, breaker: Breaker, now: float) -> bool:
        before = breaker.state
        allowed = breaker.acquire(now)
        if breaker.state != before:
            self._changed(state, breaker.state)
        state.refresh(now)
        return allowed

    def report(
        self, state: EndpointState, ok: bool | None, duration: float, *, refused: bool = False
    ) -> None:
        """The outcome of one request to `state`: success, failure, or none (client left).

        `refused`: the endpoint could not be reached at all. Such a circuit may always
        open: the share cap guards against settings that call answers failures, and an
        endpoint that refuses connections is down whatever the settings say.
        """
        breaker = state.breaker
        if breaker is None:
            return
        now = time.monotonic()
        if ok:
            slow = breaker.settings.slow_call_duration
            if breaker.state == "closed" and not breaker.consecutive and (slow is None or duration <= slow):
                breaker.record(True, duration, now)  # the common case: count it, no more
                return
            open_now = sum(1 for s in self.states if s.breaker is not None and s.breaker.state == "open")
            changed = breaker.record(True, duration, now, may_open=open_now < self.max_open)
        elif ok is None:
            breaker.release_probe()
            changed = None
        else:
            self.metrics.count_event("failure", self.key)
            open_now = sum(1 for s in self.states if s.breaker is not None and s.breaker.state == "open")
            changed = breaker.record(False, duration, now, may_open=refused or open_now < self.max_open)
        if changed is not None:
            self._changed(state, changed)
        state.refresh(now)

    def _changed(self, state: EndpointState, new_state: str) -> None:
        key = (self.key, state.key, new_state)
        changes = self.metrics.circuit_changes
        changes[key] = changes.get(key, 0) + 1
        if new_state == "open":
            self.metrics.count_event("ejection", self.key)
            breaker = state.breaker
            log.warning(
                "circuit of %s in upstream %s opened for %.1fs",
                state.key, self.key, breaker.open_duration() if breaker else 0.0,
            )
            with contextlib.suppress(RuntimeError):
                loop = asyncio.get_running_loop()
                delay = max((breaker.open_until if breaker else 0.0) - time.monotonic(), 0.0)
                loop.call_later(delay, self._wake, state)
        else:
            log.info("circuit of %s in upstream %s is %s", state.key, self.key, new_state)

    def _wake(self, state: EndpointState) -> None:
        """The open time of a circuit is over: half-open, so probes may go."""
        breaker = state.breaker
        if breaker is None:
            return
        now = time.monotonic()
        changed = breaker.poll(now)
        if changed is not None:
            self._changed(state, changed)
        state.refresh(now)

    def retry_allowed(self) -> bool:
        """The retry budget: retries in flight stay under a share of requests in flight."""
        active = sum(state.active for state in self.states)
        return self.limits.active_retries < max(MIN_RETRY_CONCURRENCY, active * RETRY_BUDGET_PERCENT // 100)

    def hash_key(self, request: RequestHead, peer: str) -> str | None:
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
            return cookie_value(request.cookie, self._cookie)
        return peer


MAX_EJECTION_PERCENT = 50
RETRY_BUDGET_PERCENT = 20
MIN_RETRY_CONCURRENCY = 3


@dataclass(frozen=True, slots=True)
class Config:
    """Everything one Snapshot needs at request time."""

    snapshot: Snapshot
    table: RouteTable
    upstreams: dict[str, UpstreamRuntime]
    applied_at: float = field(default_factory=time.time)
    mesh: Config | None = None
    """The same configuration routed as the mesh gateway for `Runtime.mesh_namespace`
    (what a forward proxy hands mesh requests to); its snapshot carries the Service
    name aliases. None when no listener of the process routes mesh requests."""

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
        mesh: bool = False,
    ) -> None:
        self.config: Config | None = None
        # Whether this context routes as the mesh gateway (takes `Config.mesh`).
        self.mesh = mesh
        self.scheme = scheme
        self.trusted_hops = trusted_hops
        self.metrics = metrics or RequestMetrics()
        self.clients: set[Client] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        # HTTPS listener: says whether a request for `host` arrived on a connection
        # whose TLS handshake (SNI `server_name`) chose another Route's certificate.
        self.misdirected: Callable[[str | None, str], bool] | None = None
        # Plain listener: the port of the HTTPS listener, for redirects (None: none).
        self.https_port: int | None = None
        # Deadlines of a client's head (from its first byte) and body (between bytes).
        self.head_timeout = HEAD_TIMEOUT
        self.body_idle_timeout = BODY_IDLE_TIMEOUT
        # Set while the process is overloaded (kanal.dataplane.overload): new requests
        # are answered 503.
        self.overloaded = False
        # Observability (kanal.dataplane.accesslog): None when off, one check a request.
        self.access_log: AccessLog | None = None
        self.request_ids: RequestIds | None = None  # X-Request-Id (requestid.py); None: off
        self.tracing: Tracing | None = None  # tracing.py; None: off
        # access_log or tracing set: the one check at the end of each exchange.
        self.observing = False
        self.listener = "reverse"  # the access log's name of this listener
        self.policy = ""  # the access log's policy outcome of every request here
        # Hands a client connection over to HTTP/2 (kanal.dataplane.h2front.take_over):
        # after ALPN `h2`, or on the h2c preface; False when it is not HTTP/2. None: off.
        self.http2: Callable[[Any, asyncio.BaseTransport, bytes], bool] | None = None

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
            limits = self._limits.setdefault(spec.key, UpstreamLimits())
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

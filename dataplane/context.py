"""What a listener's client connections share (`ProxyContext`), the configuration they
route by (`Config`) and each Upstream's endpoints, balancer and pools at request time
(`UpstreamRuntime`).

All are read on every request, so this module is compiled with the request path
(`compiled.py`): their attributes are then plain loads, not dictionary lookups.
`Runtime` (runtime.py) builds the Configs and publishes them to the contexts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from kanal.contract.snapshot import Snapshot, Upstream
from kanal.dataplane.balancer import Balancer, EndpointState
from kanal.dataplane.breaker import Breaker
from kanal.dataplane.headers import cookie_value
from kanal.dataplane.http1 import BODY_IDLE_TIMEOUT, HEAD_TIMEOUT
from kanal.dataplane.limits import UpstreamLimits
from kanal.dataplane.metrics import RequestMetrics
from kanal.dataplane.pool import EndpointPool
from kanal.dataplane.router import RouteTable

if TYPE_CHECKING:
    from kanal.dataplane.accesslog import AccessLog
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


class Config:
    """Everything one Snapshot needs at request time."""

    def __init__(self, snapshot: Snapshot, table: RouteTable,
                 upstreams: dict[str, UpstreamRuntime], applied_at: float | None = None,
                 mesh: Config | None = None) -> None:
        self.snapshot = snapshot
        self.table = table
        self.upstreams = upstreams
        self.applied_at = time.time() if applied_at is None else applied_at
        self.mesh = mesh
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

"""One dataplane process: listeners, admin endpoints, housekeeping, and a configuration feed.

`kanal run` (files) and `kanal dataplane` (a control plane) differ only in where
Snapshots come from: each passes a *feed*, a coroutine that applies Snapshots to the
Runtime (through `apply_snapshot`) until the stop event is set. Everything else,
including the order of a graceful stop (listeners closed, requests in flight
drained, admin last), is here once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kanal.contract.snapshot import Snapshot
from kanal.dataplane.cache.store import configure_cache
from kanal.dataplane.http1 import BODY_IDLE_TIMEOUT, HEAD_TIMEOUT
from kanal.dataplane.overload import check as check_overload
from kanal.dataplane.overloadstate import MemoryOverload
from kanal.dataplane.runtime import Config, ProxyContext, Runtime

if TYPE_CHECKING:
    from kanal.dataplane.accesslog import AccessLog
    from kanal.dataplane.requestid import RequestIds
    from kanal.dataplane.tracing import Tracing

log = logging.getLogger("kanal.dataplane")

Address = tuple[str, int]
Feed = Callable[[Runtime, asyncio.Event], Coroutine[Any, Any, None]]


@dataclass
class DataplaneOptions:
    listen: Address | None = ("127.0.0.1", 8080)
    tls_listen: Address | None = None
    default_certificate: str | None = None  # `namespace/name` of a Route's TLS Secret
    forward_listen: Address | None = None
    admin: Address | None = ("127.0.0.1", 9901)
    trusted_hops: int = 0
    reuse_port: bool = False
    gateway: str = "ingress"
    drain_timeout: float = 10.0
    quiet_admin: bool = False
    namespace: str = "default"  # whose EgressPolicies the forward listener applies
    # A sidecar's inbound listener, proxying to the app on 127.0.0.1:app_port.
    inbound_listen: Address | None = None
    app_port: int | None = None
    head_timeout: float = HEAD_TIMEOUT  # a client's whole request head, from its first byte
    body_idle_timeout: float = BODY_IDLE_TIMEOUT  # between two bytes of a request body
    max_connections: int | None = None  # client connections per listener (None: no cap)
    max_total_connections: int | None = None  # over every listener of the process
    overload_memory: int | None = None  # resident bytes above which requests get 503
    compression: bool = False  # every rule without a Compression filter compresses
    # --access-log: the writer of each listener that writes lines (reverse, inbound,
    # forward; listeners may share one); absent: none. Closed by run_dataplane.
    access_logs: dict[str, AccessLog] = field(default_factory=dict)
    request_ids: RequestIds | None = None  # --request-id (None: off)
    tracing: Tracing | None = None  # --tracing-endpoint (None: off); closed by run_dataplane

    def access_log_for(self, listener: str) -> AccessLog | None:
        return self.access_logs.get(listener)

    def access_log_writers(self) -> list[AccessLog]:
        """Each writer once."""
        from kanal.dataplane.accesslog import distinct

        return distinct(self.access_logs.values())
    cache_size: int = 64 * 1024 * 1024  # memory for cached answers (the process's store)
    cache_dir: str | None = None  # where cached answers spill when memory is full
    cache_disk_size: int = 1024 * 1024 * 1024  # bytes cache_dir may hold

    def configure(self, context: ProxyContext) -> ProxyContext:
        """Give a listener's context the limits these options set."""
        context.head_timeout = self.head_timeout
        context.body_idle_timeout = self.body_idle_timeout
        context.access_log = self.access_log_for(context.listener)
        context.request_ids = self.request_ids
        context.tracing = self.tracing
        context.observing = context.access_log is not None or self.tracing is not None
        return context


def apply_snapshot(runtime: Runtime, snapshot: Snapshot) -> str | None:
    """Validate and swap in a Snapshot; None when applied (or already current), else why not."""
    from kanal.dataplane.server import configuration_objects

    if runtime.config is not None and runtime.config.version == snapshot.version:
        return None
    try:
        with configuration_objects():
            runtime.apply(snapshot)
    except (ValueError, TypeError) as exc:
        runtime.metrics.config_rejected += 1
        log.error("configuration %s rejected: %s", snapshot.version, exc)
        return str(exc)
    log.info(
        "applied configuration %s: %d routes, %d upstreams",
        snapshot.version, len(snapshot.routes), len(snapshot.upstreams),
    )
    return None


async def apply_snapshot_off_loop(runtime: Runtime, snapshot: Snapshot) -> str | None:
    """`apply_snapshot`, with the build in a worker thread and only the swap on the loop.

    A Snapshot of thousands of Routes takes long to build; built on the loop, it would
    hold every request of the process until done. In a thread, the loop keeps serving
    (Python hands the interpreter over every few milliseconds) and the old Config stays
    in use until the new one is swapped in, whole. Builds are never concurrent: each
    feed applies one Snapshot after another.
    """
    from kanal.dataplane.server import configuration_objects

    if runtime.config is not None and runtime.config.version == snapshot.version:
        return None

    def build() -> Config:
        with configuration_objects():
            return runtime.build(snapshot)

    try:
        config = await asyncio.to_thread(build)
    except (ValueError, TypeError) as exc:
        runtime.metrics.config_rejected += 1
        log.error("configuration %s rejected: %s", snapshot.version, exc)
        return str(exc)
    runtime.publish(config)
    log.info(
        "applied configuration %s: %d routes, %d upstreams",
        snapshot.version, len(snapshot.routes), len(snapshot.upstreams),
    )
    return None


async def start_listeners(
    runtime: Runtime, options: DataplaneOptions
) -> list[asyncio.AbstractServer]:
    """The proxy listeners the options ask for."""
    from kanal.dataplane.server import bind_socket, start_listener

    servers: list[asyncio.AbstractServer] = []
    # Accepting pauses at a listener's cap and at the process's, over every listener.
    gate = runtime.connection_gate
    gate.cap = options.max_total_connections
    cap = options.max_connections
    if options.listen is not None:
        host, port = options.listen
        context = options.configure(runtime.context("http", options.trusted_hops))
        if options.tls_listen is not None:
            context.https_port = options.tls_listen[1]
        sock = bind_socket(host, port, reuse_port=options.reuse_port)
        servers.append(await start_listener(context, sock, name="http", cap=cap, gate=gate))
        log.info("listening on http://%s:%d", host, port)
    if options.tls_listen is not None:
        from kanal.dataplane.tls import TlsTerminator

        host, port = options.tls_listen
        terminator = TlsTerminator(gateway=runtime.gateway,
                                   default_certificate=options.default_certificate)
        if runtime.config is not None:
            terminator.update(runtime.config)
        runtime.on_apply.append(terminator.update)
        context = options.configure(runtime.context("https", options.trusted_hops))
        context.misdirected = terminator.misdirected
        sock = bind_socket(host, port, reuse_port=options.reuse_port)
        servers.append(await start_listener(context, sock, ssl_context=terminator.server_context,
                                            name="https", cap=cap, gate=gate))
        log.info("listening on https://%s:%d", host, port)
    if options.forward_listen is not None:
        from kanal.dataplane.forward import ForwardProxy

        host, port = options.forward_listen
        # Follows the configuration through runtime.on_apply.
        forward = ForwardProxy(runtime, namespace=options.namespace,
                               head_timeout=options.head_timeout,
                               max_connections=options.max_connections)
        forward.access_log = options.access_log_for("forward")
        # Mesh requests are routed by a reverse proxy inside it, which gives them ids,
        # traces and their access log line (with the route, upstream and endpoint).
        mesh = forward.mesh_context
        mesh.access_log, mesh.request_ids, mesh.tracing = (
            options.access_log_for("forward"), options.request_ids, options.tracing)
        mesh.observing = mesh.access_log is not None or options.tracing is not None
        mesh.listener, mesh.policy = "forward", "mesh"
        runtime.forward_proxies.append(forward)
        sock = bind_socket(host, port, reuse_port=options.reuse_port)
        servers.append(await forward.start(sock))
        log.info("forward proxy on %s:%d (EgressPolicies of namespace %s)",
                 host, port, forward.namespace)
    if options.inbound_listen is not None and options.app_port is not None:
        host, port = options.inbound_listen
        inbound = inbound_runtime(runtime, options.app_port)
        context = inbound.context("http", options.trusted_hops)
        context.listener = "inbound"
        options.configure(context)
        sock = bind_socket(host, port, reuse_port=options.reuse_port)
        servers.append(await start_listener(context, sock, name="inbound", cap=cap, gate=gate))
        log.info("inbound on http://%s:%d to the app on 127.0.0.1:%d",
                 host, port, options.app_port)
    return servers


INBOUND_ROUTE = "kanal-sidecar/inbound"
INBOUND_UPSTREAM = "kanal-sidecar/app"


INBOUND_GRPC_UPSTREAM = "kanal-sidecar/app-grpc"


def inbound_snapshot(app_port: int) -> Snapshot:
    """A sidecar's inbound configuration: any request, to the app on 127.0.0.1:app_port,
    with the default circuit breaker, limits and timeouts of an Upstream. gRPC requests
    (`content-type: application/grpc...`, which only HTTP/2 carries) reach the app over
    h2c, everything else over HTTP/1.1: an app serving gRPC needs no setting."""
    from kanal.contract.snapshot import (
        Backend,
        Endpoint,
        Match,
        Route,
        Rule,
        Upstream,
        ValueMatch,
    )

    app = (Endpoint(address="127.0.0.1", port=app_port),)
    grpc_match = Match(headers=(ValueMatch(name="content-type", value="application/grpc.*",
                                           type="RegularExpression"),))
    return Snapshot(
        routes=(Route(key=INBOUND_ROUTE, rules=(
            Rule(index=0, matches=(grpc_match,), backends=(Backend(upstream=INBOUND_GRPC_UPSTREAM),)),
            Rule(index=1, backends=(Backend(upstream=INBOUND_UPSTREAM),)),
        )),),
        upstreams=(Upstream(key=INBOUND_UPSTREAM, endpoints=app),
                   Upstream(key=INBOUND_GRPC_UPSTREAM, endpoints=app, protocol="H2C")),
    ).with_version()


def inbound_runtime(runtime: Runtime, app_port: int) -> Runtime:
    """A second Runtime with the fixed inbound Snapshot, a companion of `runtime` (drained,
    swept and closed with it), counting its requests in the same metrics."""
    inbound = Runtime(gateway="ingress", rng=runtime.rng)
    metrics = inbound.metrics = runtime.metrics
    version, applied = metrics.config_version, metrics.config_applied
    inbound.apply(inbound_snapshot(app_port))
    metrics.config_version, metrics.config_applied = version, applied
    runtime.companions.append(inbound)
    return inbound


async def run_dataplane(
    options: DataplaneOptions, feed: Feed, runtime: Runtime | None = None
) -> int:
    """Serve until SIGINT or SIGTERM, then stop gracefully."""
    from aiohttp import web

    from kanal.dataplane.admin import admin_app
    from kanal.dataplane.server import housekeeping, tune_gc

    runtime = runtime or Runtime(gateway=options.gateway)
    if options.overload_memory is not None:
        runtime.overload = MemoryOverload(options.overload_memory)
    writers = options.access_log_writers()
    for writer in writers:
        writer.metrics = runtime.metrics  # drops are counted in /metrics
    configure_cache(options.cache_size, options.cache_dir, options.cache_disk_size)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    if writers:  # after a rotation: every file is opened again by its path
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGHUP, reopen_all, writers)
    # Active health checkers follow each applied configuration, on this loop.
    runtime.on_apply.append(lambda _config: runtime.start_health_checks(loop))
    runtime.start_health_checks(loop)

    servers = await start_listeners(runtime, options)
    check_overload(runtime)  # then once a second, by the housekeeping
    runner: web.AppRunner | None = None
    if options.admin is not None:
        runner = web.AppRunner(admin_app(runtime), access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, options.admin[0], options.admin[1]).start()
        if not options.quiet_admin:
            log.info("admin on http://%s:%d", *options.admin)

    feeding = loop.create_task(feed(runtime, stop))
    tune_gc()
    async with housekeeping(runtime):
        stopped = loop.create_task(stop.wait())
        await asyncio.wait({feeding, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stop.set()
        if feeding.done() and not feeding.cancelled() and feeding.exception() is not None:
            log.error("configuration feed failed", exc_info=feeding.exception())
        feeding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeding
        for server in servers:
            server.close()
        await drain(runtime, timeout=options.drain_timeout)
        if runner is not None:
            await runner.cleanup()
        runtime.close()
        for writer in writers:
            await asyncio.to_thread(writer.close)
        if options.tracing is not None:
            await asyncio.to_thread(options.tracing.close)
    return 0


def reopen_all(writers: list[AccessLog]) -> None:
    for writer in writers:
        writer.reopen()


async def drain(runtime: Runtime, timeout: float) -> None:
    """Let requests in flight finish, up to `timeout` seconds; idle connections close now."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        busy = False
        for context in [c for r in (runtime, *runtime.companions) for c in r.contexts]:
            for client in list(context.clients):
                if not client.close_if_idle():
                    busy = True
        for forward in runtime.forward_proxies:
            # Requests and tunnels of the forward listener get the same grace.
            for conn in list(forward.connections):
                if conn.current is None and conn.mode != "tunnel" and conn.transport is not None:
                    conn.transport.close()
                else:
                    busy = True
        if not busy or loop.time() >= deadline:
            break
        await asyncio.sleep(0.05)
    for forward in runtime.forward_proxies:
        await forward.close()

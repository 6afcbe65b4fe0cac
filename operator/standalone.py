"""`kanal run`: serve Route, Upstream, EgressPolicy and Secret manifests from files.

The files are the source; the same compiler as the operator turns them into a
Snapshot, and the dataplane serves it. Edits are applied within a second. A bad edit
is logged with file, document and field, and the last good version of each object it
broke keeps serving (see `kanal.operator.filesource`).

With `--workers N` (N > 1) this process supervises N worker processes that share the
listening ports (SO_REUSEPORT) and each read the files themselves; this process serves
the admin endpoints and collects the workers' metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from kanal.operator.filesource import FileSource

log = logging.getLogger("kanal.run")


def run_command(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    missing = [path for path in args.paths if not Path(path).exists()]
    if missing:
        for path in missing:
            print(f"kanal run: {path}: no such file or directory", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("kanal run: --workers must be at least 1", file=sys.stderr)
        return 2
    _install_uvloop()
    if args.workers > 1 and not getattr(args, "worker", False):
        from kanal.operator.supervisor import supervise

        return asyncio.run(supervise(args))
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 0


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(args: argparse.Namespace) -> int:
    """One process that reads the files and serves traffic (and admin, unless a worker)."""
    from aiohttp import web

    from kanal.dataplane.admin import admin_app
    from kanal.dataplane.runtime import Runtime
    from kanal.dataplane.server import bind_socket, housekeeping, start_listener, tune_gc

    worker = bool(getattr(args, "worker", False))
    runtime = Runtime()
    source = FileSource(args.paths)
    _reload(source, runtime)

    servers = []
    reuse_port = worker
    listen_host, listen_port = args.listen
    servers.append(
        await start_listener(
            runtime.context("http", args.trusted_hops),
            bind_socket(listen_host, listen_port, reuse_port=reuse_port),
        )
    )
    log.info("listening on http://%s:%d", listen_host, listen_port)
    if args.tls_listen is not None:
        log.warning("--tls-listen: TLS termination is not available yet; listener not started")
    if args.forward_listen is not None:
        log.warning("--forward-listen: the forward proxy is not available yet; listener not started")

    runner: web.AppRunner | None = None
    admin_port = getattr(args, "worker_admin", None)
    if not worker or admin_port is not None:
        runner = web.AppRunner(admin_app(runtime), access_log=None, handle_signals=False)
        await runner.setup()
        admin_host, port = args.admin if not worker else ("127.0.0.1", admin_port)
        await web.TCPSite(runner, admin_host, port).start()
        if not worker:
            log.info("admin on http://%s:%d", admin_host, port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    tune_gc()
    async with housekeeping(runtime):
        watcher = loop.create_task(_watch(source, runtime, stop))
        await stop.wait()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        for server in servers:
            server.close()
        await _drain(runtime, timeout=10.0)
        if runner is not None:
            await runner.cleanup()
        runtime.close()
    return 0


def _reload(source: FileSource, runtime: object) -> None:
    from kanal.dataplane.runtime import Runtime

    assert isinstance(runtime, Runtime)
    result = source.reload()
    for error in result.errors:
        log.error("%s", error)
    if result.snapshot is None:
        return
    if runtime.config is not None and runtime.config.version == result.snapshot.version:
        return
    try:
        runtime.apply(result.snapshot)
    except ValueError as exc:
        runtime.metrics.config_rejected += 1
        log.error("configuration %s rejected by the dataplane: %s", result.snapshot.version, exc)
        return
    log.info(
        "applied configuration %s: %d routes, %d upstreams",
        result.snapshot.version, len(result.snapshot.routes), len(result.snapshot.upstreams),
    )


async def _watch(source: FileSource, runtime: object, stop: asyncio.Event) -> None:
    import watchfiles

    watched = source.watch_roots()
    async for changes in watchfiles.awatch(
        *watched, debounce=50, step=25, stop_event=stop, recursive=True,
        watch_filter=lambda _, path: source.is_relevant(path),
    ):
        log.debug("files changed: %s", sorted(path for _, path in changes))
        _reload(source, runtime)


async def _drain(runtime: object, timeout: float) -> None:
    """Let requests in flight finish, up to `timeout` seconds."""
    from kanal.dataplane.runtime import Runtime

    assert isinstance(runtime, Runtime)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        busy = [c for ctx in runtime.contexts for c in ctx.clients if c.current is not None]
        idle = [c for ctx in runtime.contexts for c in ctx.clients if c.current is None]
        for client in idle:
            if client.transport is not None:
                client.transport.close()
        if not busy:
            return
        await asyncio.sleep(0.05)


def worker_argv(args: argparse.Namespace, admin_port: int) -> Sequence[str]:
    """The command line of one worker process."""
    argv = [sys.executable, "-m", "kanal.operator.cli", "run", *args.paths]
    argv += ["--listen", f"{args.listen[0]}:{args.listen[1]}"]
    argv += ["--trusted-hops", str(args.trusted_hops), "--log-level", args.log_level]
    argv += ["--worker", "--worker-admin", str(admin_port)]
    return argv


def environment() -> dict[str, str]:
    return dict(os.environ)

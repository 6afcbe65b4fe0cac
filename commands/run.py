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
import errno
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kanal.commands.options import EXIT_CANNOT_BIND, limit_flags, observability_flags
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
    worker = bool(getattr(args, "worker", False))
    if worker:
        die_with_parent(getattr(args, "worker_parent", None))
    supervising = args.workers > 1 and not worker
    # Busy addresses are said plainly, before anything starts (workers share the proxy
    # ports with SO_REUSEPORT, so they check them as they will bind them).
    busy = unbindable(listen_addresses(args, admin=not worker), reuse_port=worker or supervising)
    if busy:
        for line in busy:
            print(f"kanal run: {line}", file=sys.stderr)
        return EXIT_CANNOT_BIND
    _install_uvloop()
    if supervising:
        from kanal.commands.supervisor import supervise

        return asyncio.run(supervise(args))
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        # Taken between the check and the bind: still a line, not a traceback.
        if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            print(f"kanal run: cannot listen: {exc.strerror or exc}", file=sys.stderr)
            # A worker's proxy ports were checked above: what failed is most likely its
            # private admin port, which the supervisor picks anew when it starts it again.
            return 1 if worker else EXIT_CANNOT_BIND
        raise


Address = tuple[str, int]


def listen_addresses(args: argparse.Namespace, *, admin: bool) -> list[tuple[str, Address]]:
    """The addresses `kanal run` binds, each with the flag that asked for it."""
    found: list[tuple[str, Address]] = [("--listen", args.listen)]
    for flag, address in (("--tls-listen", args.tls_listen),
                          ("--forward-listen", args.forward_listen)):
        if address is not None:
            found.append((flag, address))
    if admin:
        found.append(("--admin", args.admin))
    return found


def unbindable(addresses: list[tuple[str, Address]], *, reuse_port: bool) -> list[str]:
    """One line for each address that cannot be bound now, naming it and its flag."""
    lines: list[str] = []
    for flag, (host, port) in addresses:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port and flag != "--admin":
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind((host, port))
        except OSError as exc:
            shown = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
            lines.append(f"cannot listen on {shown} ({flag}): {exc.strerror or exc}")
    return lines


def die_with_parent(parent: int | None) -> None:
    """A worker ends when its supervisor does, even by SIGKILL, so no worker keeps the port.

    On Linux the kernel sends SIGTERM when the parent dies (PR_SET_PDEATHSIG); if the
    parent is already gone (it died before this call), the worker stops now.
    `watch_parent` covers other systems, and is a second line on Linux.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        log.error("the supervisor (pid %d) is gone; this worker stops", parent)
        raise SystemExit(1)


async def watch_parent(parent: int, interval: float = 0.5) -> None:
    """Return when this process's parent is no longer `parent`."""
    while os.getppid() == parent:
        await asyncio.sleep(interval)
    log.error("the supervisor (pid %d) is gone; this worker stops", parent)


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(args: argparse.Namespace) -> int:
    """One process that reads the files and serves traffic (and admin, unless a worker)."""
    from kanal.dataplane.process import DataplaneOptions, apply_snapshot, run_dataplane
    from kanal.dataplane.runtime import Runtime

    worker = bool(getattr(args, "worker", False))
    admin_port = getattr(args, "worker_admin", None)
    if worker:
        admin = ("127.0.0.1", admin_port) if admin_port is not None else None
    else:
        admin = args.admin
    options = DataplaneOptions(
        listen=args.listen,
        tls_listen=args.tls_listen,
        default_certificate=getattr(args, "default_certificate", None),
        forward_listen=args.forward_listen,
        admin=admin,
        **limit_flags(args),
        **observability_flags(args),
        trusted_hops=args.trusted_hops,
        reuse_port=worker,
        quiet_admin=worker,
    )
    source = FileSource(args.paths)
    runtime = Runtime(gateway=options.gateway)
    runtime.compress_all = options.compression
    # The first configuration is in place before any listener opens.
    _reload(source, runtime, apply_snapshot)

    parent = getattr(args, "worker_parent", None) if worker else None

    async def feed(runtime: Runtime, stop: asyncio.Event) -> None:
        if parent is None:
            await _watch(source, runtime, stop)
            return
        # The dataplane stops when the feed ends: when the files' watch does, or when
        # the supervisor is gone.
        tasks = {asyncio.ensure_future(_watch(source, runtime, stop)),
                 asyncio.ensure_future(watch_parent(parent))}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
        for task in done:
            task.result()

    return await run_dataplane(options, feed, runtime)


def _reload(source: FileSource, runtime: Any, apply: Callable[[Any, Any], str | None]) -> None:
    result = source.reload()
    for error in result.errors:
        log.error("%s", error)
    if result.snapshot is not None:
        apply(runtime, result.snapshot)


async def _watch(source: FileSource, runtime: Any, stop: asyncio.Event) -> None:
    """Follow the files: each change is read, compiled and built off the loop (requests
    keep flowing during a reload of any size) and swapped in on it."""
    import watchfiles

    from kanal.dataplane.process import apply_snapshot_off_loop

    async for changes in watchfiles.awatch(
        *source.watch_roots(), debounce=100, step=100, stop_event=stop, recursive=True,
        watch_filter=lambda _, path: source.is_relevant(path),
    ):
        log.debug("files changed: %s", sorted(path for _, path in changes))
        result = await asyncio.to_thread(source.reload)
        for error in result.errors:
            log.error("%s", error)
        if result.snapshot is not None:
            await apply_snapshot_off_loop(runtime, result.snapshot)

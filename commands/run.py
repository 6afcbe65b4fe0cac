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
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kanal.commands.options import limit_flags
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
        from kanal.commands.supervisor import supervise

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
        trusted_hops=args.trusted_hops,
        reuse_port=worker,
        quiet_admin=worker,
    )
    source = FileSource(args.paths)
    runtime = Runtime(gateway=options.gateway)
    # The first configuration is in place before any listener opens.
    _reload(source, runtime, apply_snapshot)

    async def feed(runtime: Runtime, stop: asyncio.Event) -> None:
        await _watch(source, runtime, stop, apply_snapshot)

    return await run_dataplane(options, feed, runtime)


def _reload(source: FileSource, runtime: Any, apply: Callable[[Any, Any], str | None]) -> None:
    result = source.reload()
    for error in result.errors:
        log.error("%s", error)
    if result.snapshot is not None:
        apply(runtime, result.snapshot)


async def _watch(
    source: FileSource, runtime: Any, stop: asyncio.Event, apply: Callable[[Any, Any], str | None]
) -> None:
    import watchfiles

    async for changes in watchfiles.awatch(
        *source.watch_roots(), debounce=100, step=100, stop_event=stop, recursive=True,
        watch_filter=lambda _, path: source.is_relevant(path),
    ):
        log.debug("files changed: %s", sorted(path for _, path in changes))
        _reload(source, runtime, apply)

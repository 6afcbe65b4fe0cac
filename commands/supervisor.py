"""`kanal run --workers N`: N proxy processes on one port, one admin address for all.

Each worker is a full `kanal run` of its own that reads the same files (so every
worker compiles the same Snapshot, with the same version) and binds the listening
port with SO_REUSEPORT, so the kernel spreads connections over them. Each worker
serves its admin endpoints on a private loopback port; this process serves `--admin`
for the whole group: `/ready` when every worker is ready, `/config` and `/explain`
from a worker, and `/metrics` and the dashboard merged over the workers
(`kanal.commands.dashmerge`).

A worker that dies is started again, after a pause that grows while it keeps dying;
one that cannot bind a listening address (exit code `EXIT_CANNOT_BIND`) is not: the
group stops with that code, since a busy port stays busy. Workers die with this
process, even when it is killed with SIGKILL (see `kanal.commands.run.die_with_parent`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from kanal.commands.dashmerge import merge_views
from kanal.commands.options import EXIT_CANNOT_BIND, limit_argv, observability_argv
from kanal.commands.splitmerge import merged_split_samples
from kanal.dataplane.access.sharedlimits import share_between_workers
from kanal.dataplane.dashboard import headers as dashboard_headers
from kanal.dataplane.dashboard import render_page
from kanal.dataplane.dashview import render_tables

log = logging.getLogger("kanal.supervisor")


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Worker:
    def __init__(self, index: int, args: argparse.Namespace) -> None:
        self.index = index
        self.args = args
        self.admin_port = _free_loopback_port()
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    async def start(self) -> None:
        if self.process is not None:
            self.admin_port = _free_loopback_port()  # the old one may have been taken
        argv = list(worker_argv(self.args, self.admin_port))
        self.process = await asyncio.create_subprocess_exec(*argv)
        log.info("worker %d started (pid %d)", self.index, self.process.pid)

    async def keep_running(self, stopping: asyncio.Event) -> int:
        """Start the worker again whenever it exits; return its code if it cannot bind."""
        delay = 0.5
        while not stopping.is_set():
            assert self.process is not None
            code = await self.process.wait()
            if stopping.is_set():
                return 0
            if code == EXIT_CANNOT_BIND:
                log.error("worker %d cannot listen (see above); stopping every worker",
                          self.index)
                stopping.set()
                return code
            log.error("worker %d exited with %s; starting it again in %.1fs", self.index, code, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
            self.restarts += 1
            await self.start()
        return 0

    def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)

    def hangup(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGHUP)


def merge_metrics(texts: Iterable[str]) -> str:
    """Sum the workers' Prometheus samples that share a name and labels.

    `kanal_config_info` is an info gauge: the workers' series are kept, not summed;
    split shares are weighted by the workers' windows (`kanal.commands.splitmerge`).
    """
    texts = list(texts)
    families: dict[str, tuple[str, str]] = {}
    samples: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            families.setdefault(family.name, (family.type, family.documentation))
            for sample in family.samples:
                labels = tuple(sorted(sample.labels.items()))
                key = (family.name, sample.name, labels)
                if family.name == "kanal_config_info":
                    samples[key] = 1.0
                else:
                    samples[key] = samples.get(key, 0.0) + sample.value
    samples.update(merged_split_samples(texts))
    lines: list[str] = []
    for name, (kind, documentation) in families.items():
        lines.append(f"# HELP {name} {documentation}")
        lines.append(f"# TYPE {name} {kind}")
        for (family_name, sample_name, labels), value in samples.items():
            if family_name != name:
                continue
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(f"{sample_name}{{{label_text}}} {_number(value)}" if labels
                         else f"{sample_name} {_number(value)}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)


def group_admin_app(workers: list[Worker]) -> web.Application:
    session_holder: dict[str, aiohttp.ClientSession] = {}

    async def session() -> aiohttp.ClientSession:
        if "s" not in session_holder:
            session_holder["s"] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        return session_holder["s"]

    async def fetch(worker: Worker, path_qs: str) -> tuple[int, bytes, str]:
        client = await session()
        async with client.get(worker.admin + path_qs) as answer:
            return answer.status, await answer.read(), answer.headers.get("Content-Type", "")

    async def live(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def ready(_: web.Request) -> web.Response:
        versions = set()
        for worker in workers:
            try:
                status, body, _type = await fetch(worker, "/ready")
            except (aiohttp.ClientError, OSError):
                return web.Response(status=503, text=f"not ready: worker {worker.index} not up\n")
            if status != 200:
                return web.Response(status=503, text=f"not ready: worker {worker.index}\n")
            versions.add(body.decode().strip())
        if len(versions) != 1:
            return web.Response(status=503, text="not ready: workers disagree on the version\n")
        return web.Response(text=f"{versions.pop()}\n")

    async def forward(request: web.Request) -> web.Response:
        last_error = "no worker answered"
        for worker in workers:
            try:
                status, body, content_type = await fetch(worker, request.path_qs)
            except (aiohttp.ClientError, OSError) as exc:
                last_error = str(exc)
                continue
            return web.Response(status=status, body=body,
                                headers={"Content-Type": content_type or "application/json"})
        return web.json_response({"error": last_error}, status=503)

    async def metrics(_: web.Request) -> web.Response:
        texts = []
        for worker in workers:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                status, body, _type = await fetch(worker, "/metrics")
                if status == 200:
                    texts.append(body.decode())
        return web.Response(text=merge_metrics(texts), content_type="text/plain")

    async def dashboard_state() -> dict[str, Any]:
        views = []
        for worker in workers:
            with contextlib.suppress(aiohttp.ClientError, OSError, ValueError):
                status, body, _type = await fetch(worker, "/ui/state.json")
                if status == 200:
                    views.append(json.loads(body))
        return merge_views(views, len(workers))

    async def dashboard_page(_: web.Request) -> web.Response:
        return web.Response(text=render_page(await dashboard_state()), content_type="text/html",
                            headers=dashboard_headers())

    async def dashboard_tables(_: web.Request) -> web.Response:
        return web.Response(text=render_tables(await dashboard_state()),
                            content_type="text/html", headers=dashboard_headers())

    async def dashboard_json(_: web.Request) -> web.Response:
        return web.json_response(await dashboard_state(), headers=dashboard_headers())

    async def purge(request: web.Request) -> web.Response:
        # Each worker has its own cache: the purge goes to every one, counts summed.
        client = await session()
        total, answer, status = 0, {}, 200
        for worker in workers:
            try:
                async with client.request(request.method, worker.admin + request.path_qs) as reply:
                    answer, status = await reply.json(), reply.status
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                return web.json_response({"error": f"worker {worker.index}: {exc}"}, status=503)
            if status != 200:
                return web.json_response(answer, status=status)
            total += int(answer.get("purged", 0))
        return web.json_response({**answer, "purged": total}, status=status)

    async def close_session(_: web.Application) -> None:
        if "s" in session_holder:
            await session_holder["s"].close()

    app = web.Application()
    app.router.add_post("/cache/purge", purge)
    app.router.add_delete("/cache/purge", purge)
    app.router.add_get("/live", live)
    app.router.add_get("/ready", ready)
    app.router.add_get("/config", forward)
    app.router.add_get("/explain", forward)
    app.router.add_get("/metrics", metrics)
    # The dashboard: every worker's data, merged.
    app.router.add_get("/", dashboard_page)
    app.router.add_get("/ui", dashboard_page)
    app.router.add_get("/ui/tables", dashboard_tables)
    app.router.add_get("/ui/state.json", dashboard_json)
    app.on_cleanup.append(close_session)
    return app


async def supervise(args: argparse.Namespace) -> int:
    workers = [Worker(index, args) for index in range(args.workers)]
    # The admin address is taken first: if it is busy, no worker is left behind.
    runner = web.AppRunner(group_admin_app(workers), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, args.admin[0], args.admin[1]).start()
    except OSError as exc:
        print(f"kanal run: cannot listen on {args.admin[0]}:{args.admin[1]} (--admin): "
              f"{exc.strerror or exc}", file=sys.stderr)
        await runner.cleanup()
        return EXIT_CANNOT_BIND
    share_between_workers()  # local rate limits count for the whole group
    for worker in workers:
        await worker.start()
    log.info("admin for %d workers on http://%s:%d", len(workers), *args.admin)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stopping.set)
    with contextlib.suppress(NotImplementedError):  # access logs reopen (workers' own)
        loop.add_signal_handler(signal.SIGHUP, hangup_all, workers)
    keepers = [loop.create_task(worker.keep_running(stopping)) for worker in workers]
    await stopping.wait()
    for worker in workers:
        worker.stop()
    for worker in workers:
        if worker.process is not None:
            try:
                await asyncio.wait_for(worker.process.wait(), timeout=15)
            except TimeoutError:
                worker.process.kill()
                await worker.process.wait()
    code = 0
    for keeper in keepers:
        if keeper.done() and not keeper.cancelled() and keeper.exception() is None:
            code = max(code, keeper.result())
        keeper.cancel()
    await runner.cleanup()
    return code


def hangup_all(workers: list[Worker]) -> None:
    for worker in workers:
        worker.hangup()


def worker_argv(args: argparse.Namespace, admin_port: int) -> Sequence[str]:
    """The command line of one worker process."""
    argv = [sys.executable, "-m", "kanal", "run", *args.paths]
    argv += ["--listen", f"{args.listen[0]}:{args.listen[1]}"]
    if getattr(args, "default_certificate", None):
        argv += ["--default-certificate", args.default_certificate]
    for flag, address in (("--tls-listen", args.tls_listen), ("--forward-listen", args.forward_listen)):
        if address is not None:
            argv += [flag, f"{address[0]}:{address[1]}"]
    argv += ["--trusted-hops", str(args.trusted_hops), "--log-level", args.log_level]
    argv += limit_argv(args)
    argv += observability_argv(args)
    argv += ["--worker", "--worker-admin", str(admin_port), "--worker-parent", str(os.getpid())]
    return argv

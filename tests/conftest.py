"""Shared fixtures: real backends on 127.0.0.1 and a real `kanal run` process in front.

Nothing here is mocked. Backends are aiohttp servers that say who they are and echo
what they received; `kanal` starts the command line exactly as a user would, on free
ports, waits for `/ready` with a bounded deadline, and ends the process it started by
its PID.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> None:
    """Poll `predicate` until it holds, failing the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s: {predicate}")


async def async_wait_until(
    predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0, interval: float = 0.02
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


# --------------------------------------------------------------------------- backends


@dataclass
class Backend:
    """A running aiohttp backend: `name` is in every answer, `received` logs requests."""

    name: str
    port: int
    received: list[dict[str, Any]] = field(default_factory=list)
    runner: web.AppRunner | None = None

    @property
    def address(self) -> str:
        return "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


def backend_app(backend: Backend) -> web.Application:
    async def echo(request: web.Request) -> web.StreamResponse:
        if request.path == "/ws":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for message in ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    await ws.send_str(f"{backend.name}:{message.data}")
                elif message.type == aiohttp.WSMsgType.BINARY:
                    await ws.send_bytes(message.data)
            return ws
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        record = {
            "method": request.method,
            "path": request.path_qs,
            "raw_path": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_size": size,
            "chunked": request.headers.get("Transfer-Encoding", "").lower() == "chunked",
        }
        backend.received.append(record)
        if request.path.startswith("/sleep/"):
            await asyncio.sleep(float(request.path.rsplit("/", 1)[1]))
        if request.path.startswith("/status/"):
            return web.Response(status=int(request.path.rsplit("/", 1)[1]), text=backend.name)
        if request.path.startswith("/bytes/"):
            total = int(request.path.rsplit("/", 1)[1])
            response = web.StreamResponse(headers={"X-Backend": backend.name})
            response.content_length = total
            await response.prepare(request)
            block = b"x" * 65536
            left = total
            while left > 0:
                piece = block[: min(left, len(block))]
                await response.write(piece)
                left -= len(piece)
            return response
        return web.json_response(
            {"backend": backend.name, **record},
            headers={"X-Backend": backend.name},
        )

    app = web.Application(client_max_size=1024**4)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


@pytest.fixture
async def backends() -> AsyncIterator[Callable[..., Awaitable[Backend]]]:
    """Start named backends: `v1 = await backends("v1")`."""
    started: list[Backend] = []

    async def start(name: str, port: int | None = None) -> Backend:
        backend = Backend(name=name, port=port or free_port())
        runner = web.AppRunner(backend_app(backend), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", backend.port).start()
        backend.runner = runner
        started.append(backend)
        return backend

    yield start
    for backend in started:
        await backend.stop()


# --------------------------------------------------------------------------- kanal run


@dataclass
class Kanal:
    """A `kanal run` process and its manifests folder."""

    folder: Path
    port: int
    admin_port: int
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def write(self, name: str, text: str) -> Path:
        """Write a manifest file atomically (as editors that save by renaming do)."""
        path = self.folder / name
        tmp = self.folder / f".{name}.tmp"
        tmp.write_text(textwrap.dedent(text))
        os.replace(tmp, path)
        return path

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def config(self) -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(self.admin + "/config", timeout=5) as answer:
            return json.loads(answer.read())  # type: ignore[no-any-return]

    def version(self) -> str | None:
        try:
            return self.config().get("version")
        except OSError:
            return None

    def wait_for_new_version(self, old: str | None, timeout: float = 5.0) -> str:
        wait_until(lambda: self.version() not in (None, old), timeout=timeout)
        version = self.version()
        assert version is not None
        return version


def upstream_yaml(name: str, *backends: Backend, extra: str = "") -> str:
    endpoints = ", ".join(f"{{address: 127.0.0.1, port: {b.port}}}" for b in backends)
    text = f"""\
        apiVersion: kanal.dev/v1alpha1
        kind: Upstream
        metadata: {{name: {name}}}
        spec:
          endpoints: [{endpoints}]
        """
    return textwrap.dedent(text) + textwrap.dedent(extra)


@pytest.fixture
def kanal(tmp_path: Path) -> Iterator[Callable[..., Kanal]]:
    """Start `kanal run` on a folder: `k = kanal({"app.yaml": text}, "--trusted-hops", "1")`."""
    started: list[Kanal] = []

    def start(files: dict[str, str] | None = None, *flags: str, wait_ready: bool = True) -> Kanal:
        folder = tmp_path / f"manifests-{len(started)}"
        folder.mkdir()
        instance = Kanal(folder=folder, port=free_port(), admin_port=free_port())
        for name, text in (files or {}).items():
            instance.write(name, text)
        instance.log_path = tmp_path / f"kanal-{len(started)}.log"
        command = [
            sys.executable, "-m", "kanal", "run", str(folder),
            "--listen", f"127.0.0.1:{instance.port}",
            "--admin", f"127.0.0.1:{instance.admin_port}",
            *flags,
        ]
        with open(instance.log_path, "wb") as log:
            instance.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        started.append(instance)
        if wait_ready:
            wait_ready_fn(instance)
        return instance

    def wait_ready_fn(instance: Kanal) -> None:
        import urllib.error
        import urllib.request

        def ready() -> bool:
            assert instance.process is not None
            if instance.process.poll() is not None:
                raise AssertionError(f"kanal run exited early:\n{instance.log()}")
            try:
                with urllib.request.urlopen(instance.admin + "/ready", timeout=1) as answer:
                    return bool(answer.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        wait_until(ready, timeout=20)

    yield start
    for instance in started:
        process = instance.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# --------------------------------------------------------------------------- shared per module
#
# Starting `kanal run` costs a second or more (imports), so scenario modules that only
# read share one process and one set of backends. The backends then run on an event
# loop of their own, in a thread, so that every test's loop can reach them.


class BackendThread:
    """Backends served by an event loop in a thread: one set serves a whole module."""

    def __init__(self) -> None:
        import threading

        self.loop = asyncio.new_event_loop()
        self.started: list[Backend] = []
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[Any], timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def start(self, name: str, port: int | None = None) -> Backend:
        async def go() -> Backend:
            backend = Backend(name=name, port=port or free_port())
            runner = web.AppRunner(backend_app(backend), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", backend.port).start()
            backend.runner = runner
            return backend

        backend = self.run(go())
        self.started.append(backend)
        return backend  # type: ignore[no-any-return]

    def close(self) -> None:
        for backend in self.started:
            self.run(backend.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def module_backends() -> Iterator[Callable[..., Backend]]:
    """Like `backends`, but synchronous and shared by a module: `v1 = module_backends("v1")`."""
    pool = BackendThread()
    yield pool.start
    pool.close()


def launch_kanal(folder: Path, log_path: Path, files: dict[str, str] | None, flags: Sequence[str],
                 *, wait_ready: bool = True) -> Kanal:
    """Start `kanal run` on `folder` (created) exactly as the `kanal` fixture does."""
    import urllib.error
    import urllib.request

    folder.mkdir(parents=True)
    instance = Kanal(folder=folder, port=free_port(), admin_port=free_port())
    for name, text in (files or {}).items():
        instance.write(name, text)
    instance.log_path = log_path
    command = [
        sys.executable, "-m", "kanal", "run", str(folder),
        "--listen", f"127.0.0.1:{instance.port}",
        "--admin", f"127.0.0.1:{instance.admin_port}",
        *flags,
    ]
    with open(log_path, "wb") as log:
        instance.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def ready() -> bool:
        assert instance.process is not None
        if instance.process.poll() is not None:
            raise AssertionError(f"kanal run exited early:\n{instance.log()}")
        try:
            with urllib.request.urlopen(instance.admin + "/ready", timeout=1) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    if wait_ready:
        try:
            wait_until(ready, timeout=30)
        except AssertionError:
            stop_kanal(instance)
            raise
    return instance


def stop_kanal(instance: Kanal) -> None:
    process = instance.process
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def module_kanal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Kanal]]:
    """Like `kanal`, but shared by a module: `k = module_kanal({"a.yaml": text}, *flags)`."""
    started: list[Kanal] = []
    root = tmp_path_factory.mktemp("kanal-module")

    def start(files: dict[str, str] | None = None, *flags: str, wait_ready: bool = True) -> Kanal:
        index = len(started)
        instance = launch_kanal(root / f"manifests-{index}", root / f"kanal-{index}.log",
                                files, flags, wait_ready=wait_ready)
        started.append(instance)
        return instance

    yield start
    for instance in started:
        stop_kanal(instance)


# --------------------------------------------------------------------------- byte-level HTTP


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def json(self) -> Any:
        return json.loads(self.body)


async def read_response(reader: asyncio.StreamReader, *, head_request: bool = False) -> RawResponse:
    """Read one HTTP/1.x response: framed by Content-Length, chunked, or the connection's end."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    _, status, *reason = lines[0].split(" ", 2)
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
    response = RawResponse(int(status), reason[0] if reason else "", headers, b"")
    code = response.status
    if head_request or code in (204, 304) or 100 <= code < 200:
        return response
    if (response.header("transfer-encoding") or "").lower() == "chunked":
        body = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers are expected
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        response.body = bytes(body)
    elif response.header("content-length") is not None:
        response.body = await reader.readexactly(int(response.header("content-length") or 0))
    else:
        response.body = await reader.read()
    return response


async def raw_request(port: int, data: bytes, *, responses: int = 1,
                      timeout: float = 10.0) -> list[RawResponse]:
    """Send raw bytes to 127.0.0.1:port and read `responses` answers on that connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        answers = []
        async with asyncio.timeout(timeout):
            for _ in range(responses):
                answers.append(await read_response(reader))
        return answers
    finally:
        writer.close()


async def answer_while_sending(port: int, head: bytes, size: int, chunk: bytes = b"x" * 65536,
                               timeout: float = 30.0) -> RawResponse:
    """A client that writes its whole body (`size` bytes of `chunk`s) before it reads, as
    many do: the proxy's answer must survive the bytes still coming (lingering close),
    and the proxy closes its end after it. Returns that answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        async with asyncio.timeout(timeout):
            for _ in range(size // len(chunk)):
                writer.write(chunk)
                await writer.drain()
            answer = await read_response(reader)
            assert await reader.read() == b""  # then the proxy's end of the connection
        return answer
    finally:
        writer.close()


def header_values(record: dict[str, Any], name: str) -> list[str]:
    """Every value of header `name` in a backend's record of a request."""
    return [value for key, value in record["headers"] if key.lower() == name.lower()]


def process_rss(pid: int) -> int:
    """Resident memory of a process in bytes (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


# --------------------------------------------------------------------------- kanal dataplane


@dataclass
class DataplaneProcess:
    """`kanal dataplane` as a subprocess, started as a user would, ended by its PID."""

    port: int
    admin_port: int
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    async def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, 15)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)

    async def admin(self, path: str) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{self.admin_port}{path}", timeout=aiohttp.ClientTimeout(total=5)
        ) as answer:
            if answer.content_type == "application/json":
                return answer.status, await answer.json()
            return answer.status, await answer.text()

    async def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"kanal dataplane exited early:\n{self.log()}")
        try:
            status, _ = await self.admin("/ready")
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False
        return status == 200

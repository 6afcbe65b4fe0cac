"""Resident memory per idle keep-alive client connection of a Kanal dataplane.

    python bench/idle_conns.py [--connections 10000] [--kanal-cmd "python -m kanal"]

Starts `kanal run` (one worker) in front of a tiny backend served by this script,
opens N client connections, sends one request on each and reads its answer, then
leaves them open and idle (keep-alive). The dataplane's resident memory (VmRSS of its
process tree, Linux /proc) is read before and after; the difference over N is the
cost of one idle connection, the figure docs/performance.md holds to 10 KiB. Traffic
stays on 127.0.0.1; everything started here is stopped at the end. A tool for
people, never a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (bench/run.py: ports, readiness, process trees)

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


def rss_kib(root: int) -> int:
    """VmRSS of `root` and its descendants, in KiB."""
    total = 0
    pids = [root]
    while pids:
        pid = pids.pop()
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
        pids.extend(int(c) for c in children)
    return total


async def backend_server() -> tuple[asyncio.AbstractServer, int]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not head:
                    break
                writer.write(ANSWER)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def open_idle(port: int, count: int, batch: int = 500) -> list[asyncio.StreamWriter]:
    writers: list[asyncio.StreamWriter] = []

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: idle.test\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        if b" 200 " not in head.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"unexpected answer: {head[:80]!r}")
        await reader.readexactly(2)
        writers.append(writer)

    for start in range(0, count, batch):
        await asyncio.gather(*(one() for _ in range(min(batch, count - start))))
    return writers


async def measure(args: argparse.Namespace) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.connections + 200
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, need), hard))
    server, backend = await backend_server()
    tmp = Path(tempfile.mkdtemp(prefix="kanal-idle-"))
    port, admin = bench.free_port(), bench.free_port()
    cmd = bench.kanal_command(args.kanal_cmd, bench.kanal_manifests(tmp, backend), port, admin,
                              backend, 1)
    print(f"kanal command: {shlex.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    writers: list[asyncio.StreamWriter] = []
    try:
        deadline = time.monotonic() + 30
        while not bench.port_open(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("kanal did not start listening")
            await asyncio.sleep(0.05)
        await open_idle(port, 50)  # warm: the upstream pool and first allocations
        before = rss_kib(proc.pid)
        writers = await open_idle(port, args.connections)
        await asyncio.sleep(1.0)  # let the dataplane settle its buffers before reading RSS
        after = rss_kib(proc.pid)
        per = (after - before) / args.connections
        print(f"dataplane RSS: {before / 1024:.1f} MiB before, {after / 1024:.1f} MiB with "
              f"{args.connections:,} idle keep-alive connections: {per:.2f} KiB per connection")
        return 0
    finally:
        # Quiet teardown: the backend's handlers end with the loop.
        asyncio.get_running_loop().set_exception_handler(lambda _loop, _ctx: None)
        for writer in writers:
            writer.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        server.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=10_000)
    ap.add_argument("--kanal-cmd", default=f"{sys.executable} -m kanal",
                    help="as bench/run.py's --kanal-cmd")
    args = ap.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return asyncio.run(measure(args))


if __name__ == "__main__":
    sys.exit(main())

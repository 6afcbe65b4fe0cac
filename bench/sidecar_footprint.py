"""Resident memory (VmRSS) of a `kanal dataplane --mode sidecar`: idle, and with N Routes.

    python bench/sidecar_footprint.py [--routes 1000]

A real Publisher on 127.0.0.1 serves first an empty mesh, then N mesh Routes (one
Upstream of one endpoint each); the sidecar (forward and inbound listeners on, as the
chart injects it) is measured once ready with each. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from kanal.contract.snapshot import Backend, Endpoint, Route, Rule, Snapshot, Upstream
from kanal.operator.publisher import Publisher, serve_publisher, shared_token_authenticator


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mesh(count: int) -> Snapshot:
    upstreams = tuple(Upstream(key=f"shop/svc-{i}", endpoints=(Endpoint("10.0.0.1", 8080),))
                      for i in range(count))
    routes = tuple(Route(key=f"shop/svc-{i}", hostnames=(f"svc-{i}",), gateways=("mesh",),
                         rules=(Rule(index=0, backends=(Backend(f"shop/svc-{i}"),)),))
                   for i in range(count))
    return Snapshot(routes=routes, upstreams=upstreams).with_version()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def applied(admin: int, version: str, deadline: float) -> None:
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"http://127.0.0.1:{admin}/config") as answer:
                    if answer.status == 200 and (await answer.json()).get("version") == version:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"version {version} not applied")


async def main(count: int) -> dict[str, float]:
    publisher = Publisher(shared_token_authenticator("t"))
    port = free_port()
    runner = await serve_publisher(publisher, "127.0.0.1", port)
    admin = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        token = Path(tmp) / "token"
        token.write_text("t")
        empty = Snapshot().with_version()
        publisher.publish(empty)
        process = subprocess.Popen([
            sys.executable, "-m", "kanal", "dataplane", "--mode", "sidecar",
            "--control-plane", f"http://127.0.0.1:{port}", "--token-file", str(token),
            "--namespace", "shop", "--log-level", "warning",
            "--listen", f"127.0.0.1:{free_port()}", "--forward-listen", f"127.0.0.1:{free_port()}",
            "--inbound-listen", f"127.0.0.1:{free_port()}", "--app-port", str(free_port()),
            "--admin", f"127.0.0.1:{admin}"])
        try:
            await applied(admin, empty.version, time.monotonic() + 30)
            await asyncio.sleep(1.0)  # let start-up garbage settle before reading
            idle = rss_kib(process.pid)
            big = mesh(count)
            publisher.publish(big)
            await applied(admin, big.version, time.monotonic() + 60)
            await asyncio.sleep(1.0)
            loaded = rss_kib(process.pid)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(15)
    publisher.close()
    await runner.cleanup()
    return {"idle_mib": round(idle / 1024, 1), f"routes_{count}_mib": round(loaded / 1024, 1)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--routes", type=int, default=1000)
    print(json.dumps(asyncio.run(main(parser.parse_args().routes))))

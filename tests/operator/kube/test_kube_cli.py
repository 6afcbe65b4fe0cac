"""`kanal operator` as a real process (kubeconfig pointing at the emulator): restart, and
a control plane that goes away while a real dataplane keeps serving."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import async_wait_until, free_port
from tests.operator.kube.conftest import (
    TOKEN,
    Cluster,
    Dataplane,
    endpoint_slice,
    route,
    service,
    upstream,
)


class OperatorProcess:
    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path,
                 admin_port: int) -> None:
        self.argv, self.env, self.log_path, self.admin_port = argv, env, log_path, admin_port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    async def admin(self, path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as session, session.get(
                f"http://127.0.0.1:{self.admin_port}{path}",
                timeout=aiohttp.ClientTimeout(total=5)) as answer:
            return answer.status, await answer.text()

    async def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"kanal operator exited early:\n{self.log()}")
        try:
            return (await self.admin("/ready"))[0] == 200
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False

    async def stop(self) -> int:
        process = self.process
        assert process is not None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(process.wait, 20)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)
        return process.returncode


@pytest.fixture
async def kanal_operator(cluster: Cluster, tmp_path: Path
                         ) -> AsyncIterator[Callable[..., Awaitable[OperatorProcess]]]:
    started: list[OperatorProcess] = []
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig")
    token_file = tmp_path / "operator-token"
    token_file.write_text(TOKEN + "\n")
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}

    async def start(config_port: int, *flags: str) -> OperatorProcess:
        admin_port = free_port()
        argv = [sys.executable, "-m", "kanal", "operator",
                "--config-listen", f"127.0.0.1:{config_port}",
                "--admin", f"127.0.0.1:{admin_port}", "--token-file", str(token_file), *flags]
        instance = OperatorProcess(argv, env, tmp_path / f"operator-{len(started)}.log",
                                   admin_port)
        instance.start()
        started.append(instance)
        await async_wait_until(instance.ready, timeout=30)
        return instance

    yield start
    for instance in started:
        await instance.stop()


async def test_restart_and_a_control_plane_that_goes_away(
    cluster: Cluster, kanal_operator: Callable[..., Awaitable[OperatorProcess]],
    dataplane: Callable[..., Awaitable[Dataplane]], backends: Any,
) -> None:
    v1, v2 = await backends("v1"), await backends("v2")
    await cluster.create(service("web", 80))
    await cluster.create(endpoint_slice("web-1", "web", v1.port, ["127.0.0.1"]))
    await cluster.create(upstream("web", service=("web", 80)))
    await cluster.create(route("shop", "web"))
    config_port = free_port()
    first = await kanal_operator(config_port)
    dp = await dataplane(f"http://127.0.0.1:{config_port}")
    await dp.wait_for({"v1"})
    _, ready = await first.admin("/ready")
    version = ready.split()[-1]

    # The control plane goes away: the dataplane keeps serving what it has.
    assert await first.stop() == 0
    for _ in range(10):
        assert await dp.get() == (200, "v1")
    # Meanwhile the endpoints move to v2.
    await cluster.patch("EndpointSlice", "default", "web-1", {"ports": [
        {"name": "http", "port": v2.port, "protocol": "TCP"}]})
    await asyncio.sleep(0.3)
    assert await dp.get() == (200, "v1")

    # A new operator (same port) lists everything before it serves: the dataplane
    # gets the complete new configuration, never a partial one.
    second = await kanal_operator(config_port)
    await dp.wait_for({"v2"}, timeout=30)
    _, ready = await second.admin("/ready")
    assert ready.split()[-1] != version

    # Put back as it was: the same inputs give the same version as the first operator's.
    await cluster.patch("EndpointSlice", "default", "web-1", {"ports": [
        {"name": "http", "port": v1.port, "protocol": "TCP"}]})
    await dp.wait_for({"v1"}, timeout=30)

    async def same_version() -> bool:
        return (await second.admin("/ready"))[1].split()[-1] == version

    await async_wait_until(same_version, timeout=20)
    condition: dict[str, Any] = {}

    def programmed() -> bool:
        for item in (cluster.stored("Route", "default", "shop") or {}).get(
                "status", {}).get("conditions", []):
            if item["type"] == "Programmed":
                condition.update(item)
        return condition.get("message") == f"1 of 1 dataplanes at version {version}"

    await async_wait_until(lambda: asyncio.sleep(0, programmed()), timeout=10)
    assert await second.stop() == 0
    assert "Traceback" not in second.log(), second.log()

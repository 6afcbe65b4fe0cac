"""Scenario: Global rate limits counted in a real Redis, shared by two dataplanes.

`redis-server` (Debian's package) is started on a free port of 127.0.0.1 and ended by
its PID; the test is skipped, saying so, where the binary is not installed. Outages
are real: the server is stopped and started again on the same port.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests.access.helpers import api_manifests
from tests.conftest import free_port, raw_request, wait_until

REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS is None, reason="redis-server is not installed "
                                "(apt-get install -y redis-server)")


class RedisServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS is not None
        self.process = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.answers, timeout=10)

    def answers(self) -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


def manifests(backend, limit: str, failure_mode: str = "Open") -> dict[str, str]:
    return api_manifests(backend, f"""\
    rateLimit:
      type: Global
      failureMode: {failure_mode}
      limits: [{limit}]
""")


async def get(k) -> int:
    (answer,) = await raw_request(k.port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    return answer.status


async def test_two_dataplanes_hold_one_limit(backends, kanal, redis_server, monkeypatch) -> None:
    monkeypatch.setenv("KANAL_REDIS_URL", redis_server.url)
    backend = await backends("api")
    files = manifests(backend, "{name: all, requests: 50, unit: Hour}")
    first, second = kanal(files), kanal(files, "--workers", "2")
    statuses = await asyncio.gather(*(get(k) for _ in range(60) for k in (first, second)))
    assert statuses.count(200) == 50, statuses
    assert statuses.count(429) == 70
    assert len(backend.received) == 50


async def test_failure_mode_decides_during_an_outage_logged_once(backends, kanal, redis_server,
                                                                 monkeypatch) -> None:
    monkeypatch.setenv("KANAL_REDIS_URL", redis_server.url)
    backend = await backends("api")
    limit = "{name: all, requests: 100, unit: Second}"
    open_k = kanal(manifests(backend, limit, "Open"))
    closed_k = kanal(manifests(backend, limit, "Closed"))
    assert (await get(open_k), await get(closed_k)) == (200, 200)

    redis_server.stop()
    started = time.monotonic()
    assert [await get(open_k) for _ in range(3)] == [200] * 3
    assert [await get(closed_k) for _ in range(3)] == [503] * 3
    assert time.monotonic() - started < 5  # an outage is decided fast, not waited out
    assert open_k.log().count("is unavailable") == 1
    with urllib.request.urlopen(open_k.admin + "/metrics", timeout=5) as answer:
        assert "kanal_ratelimit_redis_failures_total 3.0" in answer.read().decode()

    redis_server.start()  # same port: the dataplanes find it again
    deadline = time.monotonic() + 10
    while await get(closed_k) != 200:
        assert time.monotonic() < deadline
    assert "reachable again" in closed_k.log()

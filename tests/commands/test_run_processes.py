"""`kanal run` as a process: a busy port, a killed supervisor. Each case runs the real
command line, as a user would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import REPO, free_port, upstream_yaml, wait_until

EXIT_CANNOT_BIND = 3


def route(name: str, host: str, upstream: str) -> str:
    return (f"apiVersion: kanal.dev/v1alpha1\nkind: Route\nmetadata: {{name: {name}}}\n"
            f"spec:\n  hostnames: [{host}]\n  rules: [{{backends: [{{upstream: {upstream}}}]}}]\n")


async def backend_of(url: str, host: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url, headers={"Host": host}) as answer:
        assert answer.status == 200, await answer.text()
        return str((await answer.json())["backend"])


# --------------------------------------------------------------------------- busy ports


@pytest.fixture
def manifests(tmp_path: Path) -> Path:
    folder = tmp_path / "manifests"
    folder.mkdir()
    (folder / "web.yaml").write_text(route("web", "app.test", "web"))
    return folder


@pytest.fixture
def busy() -> Iterator[int]:
    """A port some other program listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def kanal_run(folder: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kanal", "run", str(folder), *flags],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.mark.parametrize("flag", ["--listen", "--tls-listen", "--forward-listen", "--admin"])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_busy_port_is_named_with_its_flag_and_exits_non_zero(manifests, busy, flag, workers):
    addresses = {"--listen": f"127.0.0.1:{free_port()}", "--admin": f"127.0.0.1:{free_port()}",
                 flag: f"127.0.0.1:{busy}"}
    flags = [item for pair in addresses.items() for item in pair]
    if flag in ("--tls-listen", "--forward-listen"):
        flags += [flag, f"127.0.0.1:{busy}"]
    result = kanal_run(manifests, *flags, "--workers", workers)
    assert result.returncode == EXIT_CANNOT_BIND, result.stderr
    assert f"cannot listen on 127.0.0.1:{busy} ({flag})" in result.stderr, result.stderr
    assert "Address already in use" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


# --------------------------------------------------------------------------- a killed supervisor


def children(pid: int) -> list[int]:
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_workers_die_with_a_killed_supervisor_and_free_the_port(kanal, backends):
    web = await backends("web")
    k = kanal({"web.yaml": upstream_yaml("web", web), "route.yaml": route("web", "app.test", "web")},
              "--workers", "2")
    assert k.process is not None
    workers = children(k.process.pid)
    assert len(workers) == 2, workers
    assert await backend_of(k.url + "/", "app.test") == "web"

    os.kill(k.process.pid, signal.SIGKILL)
    k.process.wait(timeout=10)
    wait_until(lambda: not any(alive(pid) for pid in workers), timeout=10)
    wait_until(lambda: bindable(k.port), timeout=5)



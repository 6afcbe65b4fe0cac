"""`kanal dataplane` as a real process, subscribed to a real Publisher served on 127.0.0.1.

The Publisher runs on the test's event loop, so every wait here is asynchronous
(bounded polls with deadlines); the dataplane is a subprocess started as a user would,
with real aiohttp backends behind it and real HTTP clients in front.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kanal.contract.snapshot import (
    Backend as BackendRef,
)
from kanal.contract.snapshot import (
    Endpoint,
    Match,
    PathMatch,
    Route,
    Rule,
    Snapshot,
    Upstream,
)
from kanal.operator.publisher import Publisher, serve_publisher, shared_token_authenticator
from tests.conftest import Backend, DataplaneProcess, async_wait_until, free_port

TOKEN = "s3cret-token"


def snapshot_to(*backends: Backend, gateways: tuple[str, ...] = ("ingress",),
                regex: str | None = None) -> Snapshot:
    """One Route for any host and path, split over `backends` (one Upstream each)."""
    upstreams = tuple(
        Upstream(key=f"default/{b.name}", endpoints=(Endpoint("127.0.0.1", b.port),)) for b in backends
    )
    matches = (Match(path=PathMatch(type="RegularExpression", value=regex)),) if regex else (Match(),)
    route = Route(
        key="default/app",
        gateways=gateways,  # type: ignore[arg-type]
        rules=(Rule(index=0, matches=matches,
                    backends=tuple(BackendRef(u.key) for u in upstreams)),),
    )
    return Snapshot(routes=(route,), upstreams=upstreams).with_version()


@dataclass
class ControlPlane:
    """A Publisher served on 127.0.0.1:port; `stop` and `start` again on the same port."""

    publisher: Publisher
    port: int = field(default_factory=free_port)
    runner: Any = None
    acks: list[tuple[str, str, bool, str | None, float | None]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.runner = await serve_publisher(self.publisher, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def control_plane() -> AsyncIterator[ControlPlane]:
    publisher = Publisher(shared_token_authenticator(TOKEN))
    plane = ControlPlane(publisher)
    publisher.on_ack.append(lambda *report: plane.acks.append(report))
    await plane.start()
    yield plane
    await plane.stop()


class Dataplane(DataplaneProcess):
    async def version(self) -> str | None:
        try:
            _, config = await self.admin("/config")
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None
        return config.get("version") if isinstance(config, dict) else None

    async def wait_version(self, version: str, timeout: float = 10.0) -> None:
        async def at_version() -> bool:
            return await self.version() == version

        try:
            await async_wait_until(at_version, timeout=timeout)
        except AssertionError:
            raise AssertionError(f"dataplane not at {version}:\n{self.log()}") from None

    async def get(self, path: str = "/") -> tuple[int, str | None]:
        async with aiohttp.ClientSession() as session, session.get(
            self.url + path, timeout=aiohttp.ClientTimeout(total=5)
        ) as answer:
            await answer.read()
            return answer.status, answer.headers.get("X-Backend")


@pytest.fixture
async def dataplane(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Dataplane]]]:
    """Start `kanal dataplane`: `dp = await dataplane(control_plane.url, "--mode", "sidecar")`."""
    started: list[Dataplane] = []
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")

    async def start(url: str, *flags: str, state_dir: Path | None = None,
                    token: Path | None = token_file, wait_ready: bool = True) -> Dataplane:
        index = len(started)
        port, admin_port = free_port(), free_port()
        argv = [
            sys.executable, "-m", "kanal", "dataplane", "--control-plane", url,
            "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin_port}",
            "--state-dir", str(state_dir or tmp_path / f"state-{index}"),
            "--dataplane-id", f"dp-{index}",
            *(["--token-file", str(token)] if token else []),
            *flags,
        ]
        instance = Dataplane(port, admin_port, argv, tmp_path / f"dataplane-{index}.log")
        instance.start()
        started.append(instance)
        if wait_ready:
            try:
                await async_wait_until(instance.ready, timeout=20)
            except AssertionError:
                raise AssertionError(f"kanal dataplane not ready:\n{instance.log()}") from None
        return instance

    yield start
    for instance in started:
        await instance.stop()


async def test_publish_apply_ack_change_and_nack(
    control_plane: ControlPlane, dataplane: Callable[..., Awaitable[Dataplane]], backends: Any,
) -> None:
    v1, v2 = await backends("v1"), await backends("v2")
    publisher = control_plane.publisher
    first = snapshot_to(v1)
    publisher.publish(first)

    dp = await dataplane(control_plane.url)
    assert await dp.get("/anything") == (200, "v1")
    await async_wait_until(lambda: _true(publisher.programmed(first.version) == (1, 1)))
    [status] = publisher.dataplanes()
    assert (status.id, status.mode, status.acked_version) == ("dp-0", "ingress", first.version)

    # A change takes effect, and the ACK names its version.
    second = snapshot_to(v2)
    publisher.publish(second)
    await dp.wait_version(second.version)
    assert await dp.get("/") == (200, "v2")
    await async_wait_until(lambda: _true(publisher.programmed(second.version) == (1, 1)))
    report = next(a for a in control_plane.acks if a[1] == second.version)
    assert report[0] == "dp-0" and report[2] is True and report[3] is None
    assert report[4] is not None and 0 <= report[4] < 5

    # A Snapshot the dataplane cannot run is refused; the previous one keeps serving.
    broken = snapshot_to(v1, regex="/(")
    publisher.publish(broken)
    await async_wait_until(lambda: _true(publisher.dataplanes()[0].nack is not None))
    [status] = publisher.dataplanes()
    assert status.nack is not None and status.nack[0] == broken.version
    assert "invalid path regular expression" in status.nack[1]
    assert status.acked_version == second.version
    assert publisher.programmed(broken.version) == (0, 1)
    nack = next(a for a in control_plane.acks if a[1] == broken.version)
    assert nack[2] is False and "regular expression" in (nack[3] or "")
    assert await dp.version() == second.version
    assert await dp.get("/") == (200, "v2")

    # The refused version is not fetched again; the next good one is applied.
    third = snapshot_to(v1, v2)
    publisher.publish(third)
    await dp.wait_version(third.version)
    assert {(await dp.get("/"))[1] for _ in range(6)} == {"v1", "v2"}


async def test_token_is_required_and_re_read_after_rotation(
    control_plane: ControlPlane, dataplane: Callable[..., Awaitable[Dataplane]], backends: Any,
    tmp_path: Path,
) -> None:
    v1 = await backends("v1")
    publisher = control_plane.publisher
    publisher.publish(snapshot_to(v1))
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token")

    dp = await dataplane(control_plane.url, token=wrong, wait_ready=False)
    await async_wait_until(lambda: _true(publisher.rejected >= 2), timeout=15)
    assert not await dp.ready()
    assert publisher.dataplanes() == []
    assert "401" in dp.log()

    # The dataplane reads the token file again before each request: a rotated token works.
    tmp = tmp_path / "wrong-token.tmp"
    tmp.write_text(TOKEN)
    os.replace(tmp, wrong)
    await async_wait_until(dp.ready, timeout=15)
    assert await dp.get("/") == (200, "v1")


async def test_keeps_serving_without_control_plane_and_restarts_from_state_dir(
    control_plane: ControlPlane, dataplane: Callable[..., Awaitable[Dataplane]], backends: Any,
    tmp_path: Path,
) -> None:
    v1, v2 = await backends("v1"), await backends("v2")
    publisher = control_plane.publisher
    first = snapshot_to(v1)
    publisher.publish(first)
    state = tmp_path / "kept"
    dp = await dataplane(control_plane.url, state_dir=state)
    await dp.wait_version(first.version)
    # Kept on disk right after it is applied.
    await async_wait_until(lambda: _true(_kept(state) == first.to_json().encode()))

    # The control plane goes away: the dataplane keeps serving what it has.
    await control_plane.stop()
    for _ in range(5):
        assert await dp.get("/") == (200, "v1")

    # Restarted while the control plane is still away: serves the kept Snapshot, ready.
    await dp.stop()
    again = await dataplane(control_plane.url, state_dir=state)
    status, text = await again.admin("/ready")
    assert status == 200 and first.version in text
    assert await again.version() == first.version
    assert await again.get("/") == (200, "v1")

    # The control plane comes back with a change: the dataplane reconnects and takes it.
    second = snapshot_to(v2)
    publisher.publish(second)
    await control_plane.start()
    await again.wait_version(second.version, timeout=15)
    assert await again.get("/") == (200, "v2")
    await async_wait_until(lambda: _true(_kept(state) == second.to_json().encode()))


async def test_sidecar_mode_serves_mesh_routes_and_reports_itself(
    control_plane: ControlPlane, dataplane: Callable[..., Awaitable[Dataplane]], backends: Any,
) -> None:
    v1 = await backends("v1")
    publisher = control_plane.publisher
    publisher.publish(snapshot_to(v1, gateways=("ingress",)))
    dp = await dataplane(control_plane.url, "--mode", "sidecar", "--namespace", "shop")
    # Ready (a configuration is applied) but the ingress Route is not the mesh's.
    assert (await dp.get("/"))[0] == 404
    mesh = snapshot_to(v1, gateways=("mesh",))
    publisher.publish(mesh)
    await dp.wait_version(mesh.version)
    assert await dp.get("/") == (200, "v1")
    [status] = publisher.dataplanes()
    assert (status.id, status.mode, status.namespace) == ("dp-0", "sidecar", "shop")
    await async_wait_until(lambda: _true(publisher.dataplanes()[0].polling == 1))


async def _true(value: bool) -> bool:
    return value


def _kept(state: Path) -> bytes | None:
    path = state / "snapshot.json"
    return path.read_bytes() if path.exists() else None

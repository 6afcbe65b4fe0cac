"""The Publisher over real HTTP on 127.0.0.1: long polls, ACKs, tokens, bookkeeping.

Timing is asserted on virtual time (`looptime`): the Publisher is given the loop's
clock, so "held 25 s" and "forgotten after 60 s" are exact and take no real time.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from kanal.contract.snapshot import Backend, Endpoint, Route, Rule, Snapshot, Upstream
from kanal.operator.compiler import compile_snapshot
from kanal.operator.models import Route as RouteModel
from kanal.operator.models import Upstream as UpstreamModel
from kanal.operator.publisher import (
    Publisher,
    serve_publisher,
    shared_token_authenticator,
    snapshot_body,
)
from tests.conftest import async_wait_until, free_port

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def snapshot(port: int = 9001) -> Snapshot:
    return Snapshot(
        routes=(Route(key="default/app", rules=(Rule(index=0, backends=(Backend("default/v1"),)),)),),
        upstreams=(Upstream(key="default/v1", endpoints=(Endpoint("127.0.0.1", port),)),),
    ).with_version()


class Served:
    def __init__(self, publisher: Publisher, session: aiohttp.ClientSession, port: int) -> None:
        self.publisher = publisher
        self.session = session
        self.url = f"http://127.0.0.1:{port}"

    async def poll(self, headers: dict[str, str] | None = AUTH, **params: str) -> tuple[int, Any, bytes]:
        params.setdefault("dataplane", "dp-1")
        async with self.session.get(self.url + "/v1/snapshot", params=params,
                                    headers=headers or {}) as answer:
            return answer.status, answer.headers, await answer.read()

    async def ack(self, payload: Any, headers: dict[str, str] | None = AUTH) -> int:
        async with self.session.post(self.url + "/v1/ack", json=payload, headers=headers or {}) as answer:
            return answer.status


@pytest.fixture
async def served() -> AsyncIterator[Any]:
    runners = []

    async def serve(**kwargs: Any) -> Served:
        kwargs.setdefault("clock", asyncio.get_running_loop().time)
        publisher = Publisher(shared_token_authenticator(TOKEN), **kwargs)
        port = free_port()
        runners.append(await serve_publisher(publisher, "127.0.0.1", port))
        return Served(publisher, session, port)

    async with aiohttp.ClientSession() as session:
        yield serve
        for runner in runners:
            await runner.cleanup()


async def test_two_publishers_serve_the_same_bytes_and_version(served: Any) -> None:
    def objects() -> list[Any]:
        return [
            UpstreamModel.model_validate({
                "apiVersion": "kanal.dev/v1alpha1", "kind": "Upstream",
                "metadata": {"name": "v1", "namespace": "shop"},
                "spec": {"endpoints": [{"address": "10.0.0.1", "port": 80}]}}),
            RouteModel.model_validate({
                "apiVersion": "kanal.dev/v1alpha1", "kind": "Route",
                "metadata": {"name": "shop", "namespace": "shop"},
                "spec": {"rules": [{"backends": [{"upstream": "v1"}]}]}}),
        ]

    # Two replicas compile the same objects (seen in another order) and publish.
    one, two = await served(), await served()
    one.publisher.publish(compile_snapshot(objects()).snapshot)
    two.publisher.publish(compile_snapshot(list(reversed(objects()))).snapshot)

    status_one, headers_one, body_one = await one.poll()
    status_two, headers_two, body_two = await two.poll()
    assert status_one == status_two == 200
    assert body_one == body_two
    assert headers_one["X-Kanal-Version"] == headers_two["X-Kanal-Version"]
    assert Snapshot.from_json(body_one).version == headers_one["X-Kanal-Version"]


@pytest.mark.parametrize("headers", [
    None,
    {"Authorization": "Bearer wrong"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": "Bearer "},
    {"Authorization": f"Bearer {TOKEN}x"},
])
async def test_no_config_without_the_token(served: Any, headers: dict[str, str] | None) -> None:
    server = await served()
    server.publisher.publish(snapshot())

    status, answer_headers, body = await server.poll(headers=headers)
    assert status == 401
    assert "X-Kanal-Version" not in answer_headers
    assert b"routes" not in body and server.publisher.current is not None
    assert server.publisher.current.version.encode() not in body
    ack = await server.ack({"dataplane": "dp-1", "version": server.publisher.current.version,
                            "ok": True, "error": None}, headers=headers)
    assert ack == 401
    assert server.publisher.dataplanes() == []
    assert server.publisher.rejected == 2


async def test_an_authenticator_that_fails_lets_nobody_in(served: Any) -> None:
    server = await served()

    async def broken(token: str) -> bool:
        raise RuntimeError("TokenReview unavailable")

    server.publisher.authenticate = broken
    server.publisher.publish(snapshot())
    assert (await server.poll())[0] == 401


def test_the_shared_token_may_not_be_empty() -> None:
    with pytest.raises(ValueError):
        shared_token_authenticator(" \n")


@pytest.mark.looptime
async def test_answers_at_once_when_behind_and_holds_the_poll_otherwise(served: Any) -> None:
    loop = asyncio.get_running_loop()
    server = await served()
    publisher = server.publisher
    first = snapshot(9001)

    # Nothing published yet: held for the poll timeout, then 503 (retry later).
    start = loop.time()
    assert (await server.poll())[0] == 503
    assert loop.time() - start == pytest.approx(25.0)

    publisher.publish(first)
    start = loop.time()
    status, headers, body = await server.poll()
    assert (status, headers["X-Kanal-Version"], loop.time() - start) == (200, first.version, 0)
    assert body == first.to_json().encode()

    # Up to date: held until a new Snapshot is published, answered at once with it.
    second = snapshot(9002)
    start = loop.time()
    poll = loop.create_task(server.poll(known=first.version))
    await asyncio.sleep(3)
    assert not poll.done()
    assert [p.polling for p in publisher.dataplanes()] == [1]
    publisher.publish(second)
    status, headers, body = await poll
    assert (status, headers["X-Kanal-Version"]) == (200, second.version)
    assert loop.time() - start == pytest.approx(3.0)
    assert Snapshot.from_json(body) == second

    # Nothing new for the whole poll: 304 after 25 s.
    start = loop.time()
    status, headers, _ = await server.poll(known=second.version)
    assert (status, headers["X-Kanal-Version"]) == (304, second.version)
    assert loop.time() - start == pytest.approx(25.0)


@pytest.mark.looptime
async def test_acks_and_nacks_are_recorded_with_the_time_since_publish(served: Any) -> None:
    server = await served()
    publisher = server.publisher
    reports: list[tuple[Any, ...]] = []
    publisher.on_ack.append(lambda *report: reports.append(report))
    good, bad = snapshot(9001), snapshot(9002)

    publisher.publish(good)
    await server.poll(dataplane="a", mode="ingress", namespace="shop", pod="a-pod")
    await server.poll(dataplane="b", mode="sidecar")
    await asyncio.sleep(1.5)
    assert await server.ack({"dataplane": "a", "version": good.version, "ok": True, "error": None}) == 204
    assert publisher.programmed(good.version) == (1, 2)

    publisher.publish(bad)
    await asyncio.sleep(0.25)
    assert await server.ack({"dataplane": "b", "version": bad.version, "ok": False,
                             "error": "cannot run"}) == 204
    assert reports == [
        ("a", good.version, True, None, pytest.approx(1.5)),
        ("b", bad.version, False, "cannot run", pytest.approx(0.25)),
    ]
    a, b = publisher.dataplanes()
    assert (a.id, a.mode, a.namespace, a.pod, a.acked_version, a.nack) == (
        "a", "ingress", "shop", "a-pod", good.version, None)
    assert (b.id, b.mode, b.acked_version, b.nack) == ("b", "sidecar", None, (bad.version, "cannot run"))
    assert publisher.programmed(bad.version) == (0, 2)
    assert a.to_dict()["ackedVersion"] == good.version
    assert b.to_dict()["nack"] == {"version": bad.version, "error": "cannot run"}


async def test_a_replica_learns_what_a_dataplane_runs_from_its_poll(served: Any) -> None:
    """A replica that started after the ACK still counts the dataplane as programmed."""
    server = await served(poll_timeout=0.01)
    current = snapshot()
    server.publisher.publish(current)
    reports: list[tuple[Any, ...]] = []
    server.publisher.on_ack.append(lambda *report: reports.append(report))

    status, _, _ = await server.poll(dataplane="old", known=current.version, applied=current.version)
    assert status == 304
    assert server.publisher.programmed(current.version) == (1, 1)
    assert reports == [("old", current.version, True, None, pytest.approx(0, abs=5))]


@pytest.mark.looptime
async def test_dataplanes_not_seen_for_a_minute_are_forgotten(served: Any) -> None:
    server = await served(poll_timeout=90)
    publisher = server.publisher
    forgotten: list[str] = []
    publisher.on_forget.append(forgotten.append)
    current = snapshot()
    publisher.publish(current)

    await server.ack({"dataplane": "quiet", "version": current.version, "ok": True, "error": None})
    # "holding" keeps a poll open for 90 s: connected all along, never forgotten.
    holding = asyncio.get_running_loop().create_task(server.poll(dataplane="holding", known=current.version))
    await asyncio.sleep(59)
    assert [p.id for p in publisher.dataplanes()] == ["holding", "quiet"]
    await asyncio.sleep(2)
    assert [p.id for p in publisher.dataplanes()] == ["holding"]
    assert forgotten == ["quiet"]
    assert publisher.programmed(current.version) == (0, 1)
    assert (await holding)[0] == 304
    await asyncio.sleep(59)
    assert [p.id for p in publisher.dataplanes()] == ["holding"]
    await asyncio.sleep(2)
    assert publisher.dataplanes() == [] and forgotten == ["quiet", "holding"]


async def test_bad_requests_are_refused(served: Any) -> None:
    server = await served()
    server.publisher.publish(snapshot())
    assert (await server.poll(dataplane=""))[0] == 400
    assert (await server.poll(mode="gateway"))[0] == 400
    assert await server.ack({"dataplane": "dp-1", "version": "v"}) == 400
    assert await server.ack({"dataplane": "dp-1", "version": "v", "ok": "yes"}) == 400
    assert await server.ack(["not", "an", "object"]) == 400
    assert server.publisher.dataplanes() == []


async def test_publish_checks_the_version_and_ignores_a_repeat() -> None:
    publisher = Publisher(shared_token_authenticator(TOKEN))
    current = snapshot()
    with pytest.raises(ValueError, match="not the hash of its content"):
        publisher.publish(dataclasses.replace(current, version="0123456789abcdef"))
    with pytest.raises(ValueError):
        publisher.publish(dataclasses.replace(current, version=""))
    assert publisher.current is None
    publisher.publish(current)
    publisher.publish(dataclasses.replace(current))
    assert publisher.current is current
    assert snapshot_body(current) == current.to_json().encode()


async def test_a_stopping_replica_releases_held_polls(served: Any) -> None:
    server = await served(poll_timeout=30)
    current = snapshot()
    server.publisher.publish(current)
    poll = asyncio.get_running_loop().create_task(server.poll(known=current.version))

    async def held() -> bool:
        return [p.polling for p in server.publisher.dataplanes()] == [1]

    await async_wait_until(held, timeout=5)
    server.publisher.close()
    async with asyncio.timeout(5):
        assert (await poll)[0] == 503


def test_serialising_again_reuses_unchanged_items_and_gives_the_same_bytes() -> None:
    fragments: dict[Any, str] = {}
    first = snapshot(9001)
    assert snapshot_body(first, fragments) == first.to_json().encode()
    upstream = first.upstreams[0]
    second = dataclasses.replace(first, upstreams=(
        upstream, Upstream(key="default/v2", endpoints=(Endpoint("127.0.0.1", 9002),)))).with_version()
    assert snapshot_body(second, fragments) == second.to_json().encode()
    assert set(fragments) == {*second.routes, *second.upstreams}
    # Equal values of another type (2 == 2.0) serialise differently: never a stale fragment.
    odd = dataclasses.replace(second, upstreams=(
        dataclasses.replace(upstream, connect_timeout=int(upstream.connect_timeout)),
        *second.upstreams[1:])).with_version()
    assert snapshot_body(odd, fragments) == odd.to_json().encode()
    with pytest.raises(ValueError):
        snapshot_body(dataclasses.replace(odd, version="0" * 16), fragments)

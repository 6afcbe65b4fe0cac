"""The Route's SplitObserved condition in a cluster: from a real dataplane's requests
to the status the operator writes (kopf against kmock's emulator, a real `kanal
dataplane`, real backends). The status must say what the dataplane itself says.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from tests.operator.kube.conftest import (
    TOKEN,
    Cluster,
    Dataplane,
    RunningOperator,
    route,
    upstream,
)
from tests.operator.kube.test_kube_operator import eventually

Operator = Callable[..., Awaitable[RunningOperator]]
Dataplanes = Callable[..., Awaitable[Dataplane]]


async def explained_split(dp: Dataplane) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(
        f"http://127.0.0.1:{dp.admin_port}/explain",
        params={"url": "http://shop.example.com/"},
    ) as answer:
        body = await answer.json()
    split: dict[str, Any] = body["split"]
    return split


async def test_the_route_status_says_what_the_dataplane_observed(
    cluster: Cluster, operator: Operator, dataplane: Dataplanes, backends: Any,
) -> None:
    v1, v2 = await backends("v1"), await backends("v2")
    op = await operator(allow_loopback_endpoints=True)
    await cluster.create(upstream("v1", endpoints=[("127.0.0.1", v1.port)]))
    await cluster.create(upstream("v2", endpoints=[("127.0.0.1", v2.port)]))
    await cluster.create(route("shop", "v1", "v2", weights=(90, 10)))
    dp = await dataplane(op.config_url, "--split-report-interval", "0.2")
    await dp.wait_for({"v1", "v2"}, tries=20)
    for _ in range(200):
        status, _ = await dp.get()
        assert status == 200

    # No request after this: the dataplane's own window is final (under 1000 requests,
    # it covers every request since the weights were applied).
    split = await explained_split(dp)
    assert split["window"] >= 220
    assert split["message"].startswith("declared 90/10, observed ")

    def written() -> bool:
        condition = cluster.condition("Route", "default", "shop", "SplitObserved")
        assert condition is not None
        assert condition["message"] == split["message"] + " on 1 dataplane", condition
        assert (condition["status"], condition["reason"]) == ("True", "ObservedMatchesDeclared")
        assert condition["observedGeneration"] == 1
        return True

    await eventually(written, timeout=15)

    # A weight flip starts a new window: the old shares answered another declaration.
    await cluster.patch("Route", "default", "shop", {"spec": {"rules": [{"backends": [
        {"upstream": "v1", "weight": 0}, {"upstream": "v2", "weight": 100}]}]}})
    await dp.wait_for({"v2"}, tries=10)

    def flipped() -> bool:
        condition = cluster.condition("Route", "default", "shop", "SplitObserved")
        assert condition is not None
        assert condition["message"].startswith("declared 0/100, observed 0.0/100.0 over the "
                                               "last "), condition
        assert condition["observedGeneration"] == 2
        return True

    await eventually(flipped, timeout=15)


async def test_with_replicas_the_leader_counts_the_dataplanes_of_every_replica(
    cluster: Cluster, operator: Operator, dataplane: Dataplanes, backends: Any,
) -> None:
    from kanal.contract.splits import SplitObservation, merge_observations
    from kanal.operator.kube.election import ElectionSettings

    def replica(identity: str) -> ElectionSettings:
        return ElectionSettings("default", "kanal-operator", identity,
                                lease_duration=2.0, retry_period=0.2)

    v1, v2 = await backends("v1"), await backends("v2")
    leader = await operator(allow_loopback_endpoints=True, leader_election=replica("a"))
    assert leader.control_plane.leading
    other = await operator(allow_loopback_endpoints=True, leader_election=replica("b"))
    assert not other.control_plane.leading
    await cluster.create(upstream("v1", endpoints=[("127.0.0.1", v1.port)]))
    await cluster.create(upstream("v2", endpoints=[("127.0.0.1", v2.port)]))
    await cluster.create(route("shop", "v1", "v2", weights=(70, 30)))
    # One dataplane on each replica (as a Service would spread them), with unequal
    # traffic: the status must weigh each by its requests.
    near = await dataplane(leader.config_url, "--split-report-interval", "0.2")
    far = await dataplane(other.config_url, "--split-report-interval", "0.2")
    await near.wait_for({"v1", "v2"}, tries=10)
    await far.wait_for({"v1", "v2"}, tries=10)
    for _ in range(150):
        assert (await far.get())[0] == 200
    for _ in range(40):
        assert (await near.get())[0] == 200

    # No request after this: each dataplane's window is final.
    windows = [await explained_split(dp) for dp in (near, far)]
    assert windows[0]["window"] != windows[1]["window"]
    (both,) = merge_observations(SplitObservation.from_dict(w) for w in windows)
    assert both.window == windows[0]["window"] + windows[1]["window"]

    def counted() -> bool:
        condition = cluster.condition("Route", "default", "shop", "SplitObserved")
        assert condition is not None
        assert condition["message"] == both.message() + " on 2 dataplanes", condition
        assert condition["status"] == "True"
        return True

    await eventually(counted, timeout=20)


async def test_a_report_without_the_token_or_in_another_shape_is_refused(
    cluster: Cluster, operator: Operator,
) -> None:
    op = await operator()
    url = op.config_url + "/v1/report"
    good = {"dataplane": "dp-x", "version": None, "splits": []}
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=good) as answer:
            assert answer.status == 401
        headers = {"Authorization": f"Bearer {TOKEN}"}
        for bad in ({"dataplane": "dp-x"}, {"dataplane": "", "splits": []},
                    {"dataplane": "dp-x", "splits": [{"route": "a"}]}, ["not", "a", "map"]):
            async with session.post(url, json=bad, headers=headers) as answer:
                assert answer.status == 400, bad
        async with session.post(url, json=good, headers=headers) as answer:
            assert answer.status == 204

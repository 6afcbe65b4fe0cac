"""Endpoint choice inside one Upstream: every policy, with a fixed random source."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kanal.contract.snapshot import Endpoint, HashOn, LoadBalancerPolicy
from kanal.dataplane.balancer import (
    Balancer,
    EndpointState,
    LeastRequestBalancer,
    RandomBalancer,
    RingHashBalancer,
    RoundRobinBalancer,
    make_balancer,
    stable_hash,
)

POLICIES: list[LoadBalancerPolicy] = ["RoundRobin", "LeastRequest", "Random", "RingHash"]


def states(*weights: int) -> list[EndpointState]:
    return [EndpointState(Endpoint("10.0.0.1", 8000 + i, w)) for i, w in enumerate(weights)]


def balancer(policy: LoadBalancerPolicy, endpoints: list[EndpointState]) -> Balancer:
    return make_balancer(policy, endpoints, random.Random(1234))


def key_for(policy: LoadBalancerPolicy, i: int) -> str | None:
    return f"user-{i}" if policy == "RingHash" else None


def count(b: Balancer, n: int, policy: LoadBalancerPolicy) -> Counter[str]:
    counter: Counter[str] = Counter()
    for i in range(n):
        picked = b.pick(key_for(policy, i))
        assert picked is not None
        counter[picked.key] += 1
    return counter


def test_endpoint_state_defaults() -> None:
    state = EndpointState(Endpoint("10.0.0.7", 80, 3))
    assert (state.key, state.weight, state.active, state.available) == ("10.0.0.7:80", 3, 0, True)


def test_make_balancer_policies_and_hash_on() -> None:
    kinds = [type(balancer(p, states(1, 1))) for p in POLICIES]
    assert kinds == [RoundRobinBalancer, LeastRequestBalancer, RandomBalancer, RingHashBalancer]
    hash_on = HashOn(header="x-user")
    assert make_balancer("RingHash", states(1), random.Random(1), hash_on).hash_on is hash_on
    with pytest.raises(ValueError, match="unknown load balancer policy"):
        make_balancer("Sticky", states(1), random.Random(1))  # type: ignore[arg-type]


@pytest.mark.parametrize("policy", POLICIES)
def test_single_endpoint_fast_path(policy: LoadBalancerPolicy) -> None:
    only = states(1)
    b = balancer(policy, only)
    assert b.pick("k") is only[0]
    assert b.pick("k", exclude=only[0]) is only[0]  # no other to go to
    only[0].available = False
    assert b.pick("k") is None


@pytest.mark.parametrize("policy", POLICIES)
def test_nothing_available_gives_none(policy: LoadBalancerPolicy) -> None:
    endpoints = states(1, 2, 3)
    for state in endpoints:
        state.available = False
    b = balancer(policy, endpoints)
    assert all(b.pick(key_for(policy, i)) is None for i in range(20))
    assert balancer(policy, []).pick("k") is None


@pytest.mark.parametrize("policy", POLICIES)
def test_weight_zero_is_never_picked(policy: LoadBalancerPolicy) -> None:
    endpoints = states(0, 1, 0, 1)
    counts = count(balancer(policy, endpoints), 400, policy)
    assert set(counts) == {endpoints[1].key, endpoints[3].key}
    assert balancer(policy, states(0, 0)).pick("k") is None


@pytest.mark.parametrize("policy", POLICIES)
def test_unavailable_endpoints_are_skipped(policy: LoadBalancerPolicy) -> None:
    endpoints = states(1, 1, 1, 1)
    endpoints[1].available = False
    endpoints[2].available = False
    counts = count(balancer(policy, endpoints), 400, policy)
    assert set(counts) == {endpoints[0].key, endpoints[3].key}


@pytest.mark.parametrize("policy", POLICIES)
def test_exclude_is_avoided_while_another_is_available(policy: LoadBalancerPolicy) -> None:
    endpoints = states(1, 1, 1)
    b = balancer(policy, endpoints)
    for i in range(100):
        first = b.pick(key_for(policy, i))
        assert first is not None
        retry = b.pick(key_for(policy, i), exclude=first)
        assert retry is not None and retry is not first
    endpoints[1].available = endpoints[2].available = False
    assert b.pick("k", exclude=endpoints[0]) is endpoints[0]  # the only one left
    endpoints[0].available = False
    assert b.pick("k", exclude=endpoints[0]) is None


def test_round_robin_is_exact_and_smooth() -> None:
    endpoints = states(3, 1)
    b = balancer("RoundRobin", endpoints)
    order = [b.pick() for _ in range(40)]
    assert Counter(s.key for s in order if s) == {endpoints[0].key: 30, endpoints[1].key: 10}
    assert all(order[i] is not order[i + 1] or order[i] is endpoints[0] for i in range(39))


def test_round_robin_skipping_does_not_double_the_next_one() -> None:
    endpoints = states(1, 1, 1, 1)
    endpoints[1].available = False
    counts = count(balancer("RoundRobin", endpoints), 300, "RoundRobin")
    assert counts == {endpoints[0].key: 100, endpoints[2].key: 100, endpoints[3].key: 100}


def test_round_robin_huge_weights_keep_their_ratio() -> None:
    endpoints = states(1_000_000, 3_000_000, 1)
    counts = count(balancer("RoundRobin", endpoints), 8_000, "RoundRobin")
    ratio = counts[endpoints[1].key] / counts[endpoints[0].key]
    assert 2.9 < ratio < 3.1 and counts[endpoints[2].key] >= 1


@pytest.mark.parametrize("policy", ["Random", "LeastRequest", "RingHash"])
def test_statistical_weights(policy: LoadBalancerPolicy) -> None:
    endpoints = states(1, 2, 7)
    counts = count(balancer(policy, endpoints), 20_000, policy)
    shares = [counts[s.key] / 20_000 for s in endpoints]
    for share, expected in zip(shares, (0.1, 0.2, 0.7), strict=True):
        assert abs(share - expected) < 0.03, (shares, policy)


def test_least_request_prefers_the_less_loaded_per_weight() -> None:
    endpoints = states(1, 1)
    endpoints[0].active = 10
    counts = count(balancer("LeastRequest", endpoints), 1_000, "LeastRequest")
    # it loses every draw where it meets the other: it only wins when drawn twice
    assert 200 < counts[endpoints[0].key] < 300
    weighted = states(1, 4)
    weighted[0].active, weighted[1].active = 2, 4  # 2/1 > 4/4: the heavy one is lighter
    b = balancer("LeastRequest", weighted)
    picked = Counter(s.key for s in (b.pick() for _ in range(1_000)) if s)
    assert picked[weighted[1].key] > 900


def test_ring_hash_is_stable_for_a_key() -> None:
    endpoints = states(1, 1, 1, 1)
    b = balancer("RingHash", endpoints)
    again = make_balancer("RingHash", states(1, 1, 1, 1), random.Random(99))
    for i in range(200):
        first, second = b.pick(f"user-{i}"), again.pick(f"user-{i}")
        assert first is not None and second is not None
        assert first.key == second.key  # same ring in another process or after a reload


def test_ring_hash_adding_an_endpoint_moves_about_one_in_n() -> None:
    before = balancer("RingHash", states(*[1] * 9))
    after = balancer("RingHash", states(*[1] * 10))
    keys = [f"session-{i}" for i in range(10_000)]
    moved = 0
    for key in keys:
        a, b = before.pick(key), after.pick(key)
        assert a is not None and b is not None
        if a.key != b.key:
            moved += 1
            assert b.key == "10.0.0.1:8009"  # keys only move to the new endpoint
    assert 0.06 < moved / len(keys) < 0.14  # about 1/10


def test_ring_hash_unavailable_endpoint_moves_only_its_keys() -> None:
    endpoints = states(1, 1, 1, 1)
    b = balancer("RingHash", endpoints)
    keys = [f"k{i}" for i in range(2_000)]
    home = {key: b.pick(key) for key in keys}
    endpoints[2].available = False
    for key in keys:
        now = b.pick(key)
        if home[key] is endpoints[2]:
            assert now is not None and now is not endpoints[2]
        else:
            assert now is home[key]


def test_ring_hash_without_key_falls_back_to_random() -> None:
    endpoints = states(1, 1)
    b = balancer("RingHash", endpoints)
    assert {s.key for s in (b.pick(None) for _ in range(50)) if s} == {e.key for e in endpoints}


def test_ring_size_is_capped() -> None:
    b = balancer("RingHash", states(*[100] * 50))
    assert isinstance(b, RingHashBalancer)
    assert len(b._points) <= 16_384 + 50


def test_stable_hash_is_the_same_in_every_process() -> None:
    # a fixed value: Python's salted hash() would differ from run to run
    assert stable_hash("abc") == 0xD8BB14D833D59559


@settings(max_examples=60, deadline=None)
@given(
    policy=st.sampled_from(POLICIES),
    weights=st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=6),
    availability=st.lists(st.booleans(), min_size=6, max_size=6),
    key=st.one_of(st.none(), st.text(max_size=20)),
    exclude_index=st.integers(min_value=-1, max_value=5),
)
def test_pick_only_returns_eligible_endpoints(
    policy: LoadBalancerPolicy,
    weights: list[int],
    availability: list[bool],
    key: str | None,
    exclude_index: int,
) -> None:
    endpoints = states(*weights)
    for state, available in zip(endpoints, availability, strict=False):
        state.available = available
    exclude = endpoints[exclude_index] if 0 <= exclude_index < len(endpoints) else None
    eligible = [s for s in endpoints if s.available and s.weight > 0]
    picked = balancer(policy, endpoints).pick(key, exclude)
    if not eligible:
        assert picked is None
    else:
        assert picked in eligible
        if any(s is not exclude for s in eligible):
            assert picked is not exclude

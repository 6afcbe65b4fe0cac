"""Weighted splits and cookie session affinity (pure, deterministic)."""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from kanal.contract.snapshot import Backend, Rule, SessionAffinity
from kanal.dataplane.split import (
    Split,
    affinity_token,
    format_set_cookie,
    smooth_weighted_order,
)

CANARY = (Backend("shop/v1", 95), Backend("shop/v2", 5))
AFFINITY = SessionAffinity("kanal-affinity", 3600.0)


def picks(split: Split, count: int) -> list[str | None]:
    return [split.next() for _ in range(count)]


def test_95_5_over_100_requests_is_exact() -> None:
    assert Counter(picks(Split(CANARY), 100)) == {"shop/v1": 95, "shop/v2": 5}


def test_95_5_is_interleaved_not_bursty() -> None:
    order = picks(Split(CANARY), 100)
    positions = [i for i, key in enumerate(order) if key == "shop/v2"]
    gaps = [b - a for a, b in pairwise(positions)]
    assert gaps == [20, 20, 20, 20]


def test_smooth_interleaving_matches_nginx() -> None:
    # nginx's documented example: weights 5, 1, 1 give a a b a c a a
    order = smooth_weighted_order([5, 1, 1], 7)
    assert "".join("abc"[i] for i in order) == "aabacaa"


def test_weight_zero_is_never_chosen() -> None:
    split = Split((Backend("blue", 100), Backend("green", 0)))
    assert set(picks(split, 500)) == {"blue"}


def test_all_weights_zero_gives_none() -> None:
    split = Split((Backend("blue", 0), Backend("green", 0)))
    assert split.next() is None
    assert Split(()).next() is None
    assert Split((Backend("blue", 0),), AFFINITY).choose("whatever") == (None, None)


def test_single_backend_fast_path() -> None:
    split = Split((Backend("only", 3),))
    assert picks(split, 3) == ["only"] * 3


def test_rng_starts_inside_the_cycle_but_keeps_exact_shares() -> None:
    split = Split(CANARY, rng=random.Random(1234))
    assert Counter(picks(split, 100)) == {"shop/v1": 95, "shop/v2": 5}
    starts = {Split(CANARY, rng=random.Random(seed)).next() for seed in range(200)}
    assert starts == {"shop/v1", "shop/v2"}  # a reload does not always restart on v1


def test_huge_weights_fall_back_to_running_swrr_with_the_same_shares() -> None:
    split = Split((Backend("a", 1_000_003), Backend("b", 999_983)))
    counts = Counter(picks(split, 2_000))
    assert abs(counts["a"] - counts["b"]) <= 2


@given(st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=8))
def test_full_cycle_gives_exact_weights(weights: list[int]) -> None:
    backends = tuple(Backend(f"u{i}", w) for i, w in enumerate(weights))
    split = Split(backends, rng=random.Random(1234))
    total = sum(weights)
    if total == 0:
        assert split.next() is None
        return
    counts = Counter(picks(split, total * 2))
    assert counts == {f"u{i}": 2 * w for i, w in enumerate(weights) if w > 0}


# -- session affinity ------------------------------------------------------------------


def test_token_is_a_stable_hash_not_the_key() -> None:
    token = affinity_token("shop/v2")
    assert token == hashlib.sha256(b"shop/v2").hexdigest()[:12]
    assert "shop" not in token


def test_without_affinity_no_cookie_is_set() -> None:
    assert Split(CANARY).choose("anything")[1] is None


def test_new_client_gets_a_token_and_keeps_its_backend() -> None:
    split = Split(CANARY, AFFINITY)
    key, token = split.choose(None)
    assert key is not None and token == affinity_token(key)
    for _ in range(50):
        assert split.choose(token) == (key, None)


def test_unknown_or_garbage_cookie_is_replaced() -> None:
    split = Split(CANARY, AFFINITY)
    key, token = split.choose("not-a-token")
    assert key in {"shop/v1", "shop/v2"} and token == affinity_token(key)


def test_affinity_survives_a_rebuilt_split() -> None:
    rule = Rule(0, backends=CANARY, session_affinity=AFFINITY)
    first = Split.from_rule(rule, random.Random(1))
    clients = [first.choose(None) for _ in range(100)]
    rebuilt = Split.from_rule(rule, random.Random(2))  # a new object from a new snapshot
    for key, token in clients:
        assert rebuilt.choose(token) == (key, None)


def test_weight_change_moves_only_new_clients() -> None:
    old = Split(CANARY, AFFINITY)
    clients = [old.choose(None) for _ in range(100)]
    new = Split((Backend("shop/v1", 50), Backend("shop/v2", 50)), AFFINITY)
    assert all(new.choose(token) == (key, None) for key, token in clients)
    newcomers = Counter(new.choose(None)[0] for _ in range(100))
    assert newcomers == {"shop/v1": 50, "shop/v2": 50}


def test_drained_backend_moves_its_clients() -> None:
    split = Split((Backend("blue", 0), Backend("green", 100)), AFFINITY)
    key, token = split.choose(affinity_token("blue"))
    assert key == "green" and token == affinity_token("green")
    removed = Split((Backend("green", 1),), AFFINITY)
    assert removed.choose(affinity_token("blue")) == ("green", affinity_token("green"))


def test_set_cookie_header() -> None:
    split = Split(CANARY, SessionAffinity("sticky", 5400.0))
    _, token = split.choose(None)
    assert token is not None
    assert split.set_cookie_header(token) == (
        f"sticky={token}; Max-Age=5400; Path=/; HttpOnly; SameSite=Lax"
    )
    assert format_set_cookie("c", "t", 1.9) == "c=t; Max-Age=1; Path=/; HttpOnly; SameSite=Lax"
    assert format_set_cookie("c", "t", 0) == "c=t; Path=/; HttpOnly; SameSite=Lax"


def test_describe_lists_weights_and_shares() -> None:
    assert Split(CANARY).describe() == [
        {"upstream": "shop/v1", "weight": 95, "share": 0.95},
        {"upstream": "shop/v2", "weight": 5, "share": 0.05},
    ]

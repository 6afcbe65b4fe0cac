"""Token buckets without sockets: exact counts, refill, joint limits, bounded memory,
and the IETF draft's headers."""

from __future__ import annotations

from kanal.contract.access import RateLimit, RateLimitKey, RateLimitPolicy
from kanal.dataplane.access.ratelimit import SLOT, BucketTable, RateLimiter

PER_CLIENT = RateLimit("per-client", requests=5, per=60.0, burst=5,
                       key=RateLimitKey(client_address=True))
OVERALL = RateLimit("overall", requests=8, per=60.0, burst=8)


def table(slots: int = 1024) -> BucketTable:
    return BucketTable(bytearray(slots * SLOT.size))


def limiter(*limits: RateLimit) -> RateLimiter:
    return RateLimiter("default/api/0", RateLimitPolicy(limits=limits))


def run(buckets: BucketTable, rate: RateLimiter, client: str, now: float,
        headers: list[tuple[bytes, bytes]] | None = None) -> bool:
    allowed, _ = buckets.take_all(rate.keys(client, headers or [], None), rate.limits, now)
    return allowed


def test_a_burst_passes_exactly_the_bucket() -> None:
    buckets, rate = table(), limiter(PER_CLIENT)
    results = [run(buckets, rate, "10.0.0.1", 100.0) for _ in range(8)]
    assert results == [True] * 5 + [False] * 3


def test_tokens_come_back_at_the_rate() -> None:
    buckets, rate = table(), limiter(PER_CLIENT)  # 5 a minute: one every 12 s
    for _ in range(5):
        assert run(buckets, rate, "a", 0.0)
    assert not run(buckets, rate, "a", 11.9)
    assert run(buckets, rate, "a", 12.1)
    assert not run(buckets, rate, "a", 12.2)


def test_joint_limits_take_tokens_only_when_all_allow() -> None:
    buckets, rate = table(), limiter(PER_CLIENT, OVERALL)
    assert [run(buckets, rate, "a", 0.0) for _ in range(6)] == [True] * 5 + [False]
    assert [run(buckets, rate, "b", 0.0) for _ in range(4)] == [True] * 3 + [False]
    # b was refused by the overall limit only: its own bucket still holds 2 tokens.
    allowed, levels = buckets.take_all(rate.keys("b", [], None), rate.limits, 0.0)
    assert not allowed and levels[0] == 2.0


def test_keys_by_header_and_claim_split_buckets() -> None:
    by_user = RateLimit("per-user", 1, 60.0, 1, RateLimitKey(header="x-user"))
    buckets, rate = table(), limiter(by_user)
    assert run(buckets, rate, "a", 0.0, [(b"X-User", b"ann")])
    assert run(buckets, rate, "a", 0.0, [(b"X-User", b"bob")])
    assert not run(buckets, rate, "a", 0.0, [(b"x-user", b"ann")])
    by_claim = limiter(RateLimit("per-sub", 1, 60.0, 1, RateLimitKey(claim="sub")))
    first = by_claim.keys("a", [], {"sub": "u1"})
    assert first != by_claim.keys("a", [], {"sub": "u2"})
    assert first == by_claim.keys("b", [], {"sub": "u1"})


def test_a_flood_of_clients_fits_in_the_fixed_table() -> None:
    buckets, rate = table(slots=4096), limiter(RateLimit("c", 3, 60.0, 3,
                                                         RateLimitKey(client_address=True)))
    size = len(buckets.buffer)
    assert run(buckets, rate, "203.0.113.9", 0.0)
    for i in range(50_000):  # a flood of one-shot addresses (a million costs the same)
        run(buckets, rate, f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 1.0 + i * 1e-6)
    assert len(buckets.buffer) == size
    # The flooded table evicted idle and old buckets, never grew; a key may start over
    # with a full bucket at worst, never with fewer tokens than it had.
    assert [run(buckets, rate, "203.0.113.9", 2.0) for _ in range(4)].count(True) <= 3


def test_headers_follow_the_ietf_draft_and_name_only_this_requests_buckets() -> None:
    buckets, rate = table(), limiter(PER_CLIENT, OVERALL)
    allowed, levels = buckets.take_all(rate.keys("a", [], None), rate.limits, 0.0)
    verdict = rate.verdict(allowed, levels)
    assert verdict.headers == (b'RateLimit-Policy: "per-client";q=5;w=60, "overall";q=8;w=60'
                               b'\r\nRateLimit: "per-client";r=4;t=12, "overall";r=7;t=8')
    for _ in range(4):
        buckets.take_all(rate.keys("a", [], None), rate.limits, 0.0)
    allowed, levels = buckets.take_all(rate.keys("a", [], None), rate.limits, 0.0)
    refused = rate.verdict(allowed, levels)
    assert not refused.allowed and refused.retry_after == 12 and refused.limit == "per-client"
    assert b'"per-client";r=0;t=12' in refused.headers


def test_counts_survive_a_reload_unless_the_limit_changed() -> None:
    buckets = table()
    before = limiter(PER_CLIENT)
    for _ in range(5):
        assert run(buckets, before, "a", 0.0)
    reloaded = limiter(PER_CLIENT)  # a new configuration, the same limit: same buckets
    assert not run(buckets, reloaded, "a", 0.0)
    changed = limiter(RateLimit("per-client", 6, 60.0, 6, RateLimitKey(client_address=True)))
    assert run(buckets, changed, "a", 0.0)  # new settings start afresh

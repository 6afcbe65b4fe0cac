"""GET and HEAD through `kanal run` with a cached rule: hits never reach the origin,
and every answer of the rule says what the cache did (`X-Cache`)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.cache.helpers import get, q, upstream
from tests.cache.origin import Origin
from tests.conftest import Kanal, raw_request


@pytest.fixture(scope="module")
def proxy(origin: Origin, module_kanal: Callable[..., Kanal]) -> Kanal:
    manifests = {
        "origin.yaml": upstream(origin),
        "route.yaml": """\
            apiVersion: kanal.dev/v1alpha1
            kind: Route
            metadata: {name: site}
            spec:
              rules:
                - matches: [{path: {type: PathPrefix, value: /nocache}}]
                  backends: [{upstream: origin}]
                - matches: [{path: {type: PathPrefix, value: /ttl}}]
                  backends: [{upstream: origin}]
                  cache: {defaultTTL: 60s}
                - matches: [{path: {type: PathPrefix, value: /keyed}}]
                  backends: [{upstream: origin}]
                  cache: {key: {headers: [X-Tenant], cookies: [lang]}}
                - matches: [{path: {type: PathPrefix, value: /cookies}}]
                  backends: [{upstream: origin}]
                  cache: {allowSetCookie: true, statuses: [200]}
                - matches: [{path: {type: PathPrefix, value: /small}}]
                  backends: [{upstream: origin}]
                  cache: {maxObjectSize: 1Ki}
                - backends: [{upstream: origin}]
                  cache: {}
            """,
    }
    return module_kanal(manifests)


async def test_a_fresh_answer_is_served_from_the_cache_with_age(proxy: Kanal, origin: Origin):
    target = "/a?" + q(cc="max-age=60")
    first = await get(proxy, target)
    second = await get(proxy, target)
    assert first.status == second.status == 200
    assert first.header("X-Cache") == "MISS" and second.header("X-Cache") == "HIT"
    assert second.body == first.body == b"/a #1 "
    assert second.header("Age") is not None and int(second.header("Age") or "x") >= 0
    assert first.header("Age") is None
    assert origin.count("/a") == 1
    head = await get(proxy, target, method="HEAD")
    assert head.status == 200 and head.header("X-Cache") == "HIT"
    assert head.header("Content-Length") == str(len(first.body)) and head.body == b""
    assert origin.count("/a") == 1


@pytest.mark.parametrize("cc", ["no-store", "private", "max-age=0"])
async def test_answers_a_shared_cache_must_not_reuse_go_to_the_origin(proxy, origin, cc):
    path = "/never-" + cc.replace("=", "")
    for number in (1, 2):
        answer = await get(proxy, path + "?" + q(cc=cc))
        assert answer.header("X-Cache") == "MISS"
        assert answer.body.startswith(f"{path} #{number}".encode())
    assert origin.count(path) == 2


async def test_authorization_and_set_cookie_answers_are_not_stored(proxy, origin):
    for number in (1, 2):
        answer = await get(proxy, "/auth?" + q(cc="max-age=60"), "Authorization: Bearer x")
        assert answer.body.startswith(f"/auth #{number}".encode())
        answer = await get(proxy, "/cookie?" + q(cc="max-age=60", cookie="sid=1"))
        assert answer.body.startswith(f"/cookie #{number}".encode())
        assert answer.header("Set-Cookie") == "sid=1"
    # ...unless the answer allows it explicitly (public) for Authorization.
    for _ in (1, 2):
        answer = await get(proxy, "/auth-public?" + q(cc="public, max-age=60"),
                           "Authorization: Bearer x")
    assert origin.count("/auth-public") == 1
    later = await get(proxy, "/auth-public?" + q(cc="public, max-age=60"))
    assert later.header("X-Cache") == "HIT"


async def test_expires_and_heuristic_freshness(proxy, origin):
    past = "Thu, 01 Jan 2015 00:00:00 GMT"
    for _ in (1, 2):
        await get(proxy, "/expired?" + q(expires=past))
        await get(proxy, "/future?" + q(expires="Fri, 01 Jan 2100 00:00:00 GMT"))
        await get(proxy, "/modified?" + q(lm="Thu, 01 Jan 2015 00:00:00 GMT"))
        await get(proxy, "/bare")
    assert origin.count("/expired") == 2
    assert origin.count("/future") == 1
    assert origin.count("/modified") == 1  # 10% of years since Last-Modified: a day
    assert origin.count("/bare") == 2  # no freshness information, no defaultTTL
    for _ in (1, 2):
        await get(proxy, "/ttl/bare")
    assert origin.count("/ttl/bare") == 1  # defaultTTL


async def test_keys_normalise_the_path_and_keep_the_query(proxy, origin):
    await get(proxy, "/n/a/./b/../%63?" + q(cc="max-age=60"))
    again = await get(proxy, "/n/a/c?" + q(cc="max-age=60"))
    assert again.header("X-Cache") == "HIT"
    other = await get(proxy, "/n/a/c?" + q(cc="max-age=60") + "&x=1")
    assert other.header("X-Cache") == "MISS"


async def test_vary_keeps_one_variant_per_request_value(proxy, origin):
    target = "/vary?" + q(cc="max-age=60", vary="X-Variant")
    a1 = await get(proxy, target, "X-Variant: a")
    b1 = await get(proxy, target, "X-Variant: b")
    a2 = await get(proxy, target, "X-Variant: a")
    b2 = await get(proxy, target, "X-Variant: b")
    assert (a1.body, b1.body) == (b"/vary #1 a", b"/vary #2 b")
    assert (a2.body, b2.body) == (a1.body, b1.body)
    assert a2.header("X-Cache") == b2.header("X-Cache") == "HIT"
    encoding = "/vary-ae?" + q(cc="max-age=60", vary="Accept-Encoding")
    await get(proxy, encoding, "Accept-Encoding: gzip, br")
    hit = await get(proxy, encoding, "Accept-Encoding: gzip,br")
    miss = await get(proxy, encoding, "Accept-Encoding: identity")
    assert hit.header("X-Cache") == "HIT" and miss.header("X-Cache") == "MISS"


async def test_vary_star_is_never_served(proxy, origin):
    for number in (1, 2):
        answer = await get(proxy, "/star?" + q(cc="max-age=60", vary="*"))
        assert answer.body.startswith(f"/star #{number}".encode())


async def test_extra_key_parts_separate_tenants(proxy, origin):
    target = "/keyed?" + q(cc="max-age=60")
    one = await get(proxy, target, "X-Tenant: one")
    two = await get(proxy, target, "X-Tenant: two")
    assert one.body != two.body
    assert (await get(proxy, target, "X-Tenant: one")).body == one.body
    french = await get(proxy, target, "X-Tenant: one", "Cookie: lang=fr")
    assert french.header("X-Cache") == "MISS"


async def test_every_answer_of_a_cached_rule_says_x_cache(proxy, origin):
    post = await get(proxy, "/post", method="POST")
    assert post.header("X-Cache") == "BYPASS"
    plain = await get(proxy, "/nocache/x?" + q(cc="max-age=60"))
    assert plain.header("X-Cache") is None  # a rule without a cache adds nothing


async def test_objects_over_the_maximum_are_passed_whole_and_not_stored(proxy, origin):
    for number in (1, 2):
        answer = await get(proxy, "/small/big?" + q(cc="max-age=60", size="4096"))
        assert len(answer.body) == 4096 and answer.body.startswith(f"/small/big #{number}".encode())
        streamed = await get(proxy, "/small/chunked?" + q(cc="max-age=60", size="4096",
                                                           chunked="1"))
        assert streamed.header("Transfer-Encoding") == "chunked" and len(streamed.body) == 4096
        assert streamed.body.startswith(f"/small/chunked #{number}".encode())
    small = "/small/fits?" + q(cc="max-age=60", size="900", chunked="1")
    await get(proxy, small)
    again = await get(proxy, small)
    assert again.header("X-Cache") == "HIT" and len(again.body) == 900


async def test_a_lying_content_length_is_never_stored(proxy, origin):
    target = "/lie?" + q(cc="max-age=60", lie="10")
    with pytest.raises((ConnectionError, EOFError, OSError)):
        await get(proxy, target)
    answer = await get(proxy, "/lie?" + q(cc="max-age=60"))
    assert answer.header("X-Cache") == "MISS"


async def test_hits_keep_the_connection_open_and_pipelined_requests_in_order(proxy, origin):
    target = "/pipelined?" + q(cc="max-age=60")
    request = f"GET {target} HTTP/1.1\r\nHost: site.test\r\n\r\n".encode()
    answers = await raw_request(proxy.port, request * 3 + request.replace(
        b"/pipelined", b"/pipelined-other"), responses=4)
    assert [a.header("X-Cache") for a in answers] == ["MISS", "HIT", "HIT", "MISS"]
    assert all(a.header("Connection") is None for a in answers)
    assert [a.body for a in answers[:3]] == [b"/pipelined #1 "] * 3
    assert answers[3].body == b"/pipelined-other #1 "


async def test_age_from_upstream_counts_and_s_maxage_wins(proxy: Kanal, origin: Origin):
    aged = "/aged?" + q(cc="max-age=60", age="50")
    await get(proxy, aged)
    hit = await get(proxy, aged)
    assert hit.header("X-Cache") == "HIT" and 50 <= int(hit.header("Age") or "0") < 60
    too_old = "/too-old?" + q(cc="max-age=60", age="100")
    await get(proxy, too_old)
    assert (await get(proxy, too_old)).header("X-Cache") == "MISS"
    shared = "/shared?" + q(cc="s-maxage=0, max-age=600")
    await get(proxy, shared)
    assert (await get(proxy, shared)).header("X-Cache") == "MISS"
    assert origin.count("/shared") == 2


async def test_client_cache_control_is_honoured(proxy: Kanal, origin: Origin):
    target = "/client-cc?" + q(cc="max-age=600")
    await get(proxy, target)
    assert (await get(proxy, target, "Cache-Control: no-cache")).header("X-Cache") == "MISS"
    assert (await get(proxy, target, "Pragma: no-cache")).header("X-Cache") == "MISS"
    assert (await get(proxy, target, "Cache-Control: max-age=0")).header("X-Cache") == "MISS"
    assert (await get(proxy, target)).header("X-Cache") == "HIT"
    missing = await get(proxy, "/never-seen", "Cache-Control: only-if-cached")
    assert missing.status == 504 and origin.count("/never-seen") == 0


async def test_only_if_cached_never_revalidates_a_stale_answer(proxy: Kanal, origin: Origin):
    """A stored answer that would have to be revalidated is not served, and the origin
    is not asked for it either: 504 (RFC 9111 5.2.1.7)."""
    target = "/client-oic-stale?" + q(cc="max-age=0", etag='"o"')
    await get(proxy, target)
    refused = await get(proxy, target, "Cache-Control: only-if-cached")
    assert refused.status == 504 and refused.header("X-Cache") == "MISS"
    assert origin.count("/client-oic-stale") == 1


async def test_set_cookie_answers_stored_by_policy_are_served_without_the_cookie(proxy, origin):
    target = "/cookies/a?" + q(cc="max-age=60", cookie="sid=secret")
    first = await get(proxy, target)
    second = await get(proxy, target)
    assert first.header("Set-Cookie") == "sid=secret" and first.header("X-Cache") == "MISS"
    assert second.header("X-Cache") == "HIT" and second.header("Set-Cookie") is None
    assert second.body == first.body
    missing = "/cookies/missing?" + q(cc="max-age=60", status="404")
    await get(proxy, missing)
    assert (await get(proxy, missing)).header("X-Cache") == "MISS"  # 404 not listed here


async def test_cacheable_statuses(proxy: Kanal, origin: Origin):
    gone = "/gone?" + q(cc="max-age=60", status="404")
    assert (await get(proxy, gone)).status == 404
    again = await get(proxy, gone)
    assert again.status == 404 and again.header("X-Cache") == "HIT"
    broken = "/broken?" + q(cc="max-age=60", status="500")
    await get(proxy, broken)
    assert (await get(proxy, broken)).header("X-Cache") == "MISS"
    assert origin.count("/broken") == 2

"""RFC 9111 decisions without sockets: storability, freshness, age, keys, validation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kanal.dataplane.cache import policy
from kanal.dataplane.cache.policy import CacheControl, parse_cache_control

STATUSES = frozenset({200, 404})


def cc(text: str) -> CacheControl:
    return parse_cache_control([text.encode()])


def refusal(response: str = "", request: str = "", **overrides: object) -> str | None:
    fields: dict[str, object] = dict(
        method=b"GET", status=200, statuses=STATUSES, request_cc=cc(request),
        response_cc=cc(response), authorization=False, set_cookie=False,
        allow_set_cookie=False, vary=[])
    fields.update(overrides)
    return policy.not_storable(**fields)  # type: ignore[arg-type]


def test_cache_control_directives_are_parsed_case_insensitively() -> None:
    parsed = parse_cache_control([b'Public, MAX-AGE=60, s-maxage="30"', b"stale-if-error=5"])
    assert parsed.public and parsed.max_age == 60 and parsed.s_maxage == 30
    assert parsed.stale_if_error == 5
    assert cc("max-age=abc").max_age == 0  # malformed: stale
    assert cc("max-age=60, max-age=10").max_age == 10
    assert cc('private="Set-Cookie"').private
    assert cc("max-stale").max_stale == policy.UNLIMITED


@pytest.mark.parametrize(("response", "request_cc", "overrides", "reason"), [
    ("no-store", "", {}, "no-store"),
    ("", "no-store", {}, "no-store"),
    ("private", "", {}, "private"),
    ("max-age=60", "", {"method": b"HEAD"}, "method"),
    ("max-age=60", "", {"status": 500}, "status"),
    ("max-age=60", "", {"authorization": True}, "authorization"),
    ("max-age=60", "", {"set_cookie": True}, "set-cookie"),
    ("max-age=60", "", {"vary": [b"*"]}, "vary"),
    ("max-age=60", "", {"vary": [b",".join(b"x-h%d" % i for i in range(40))]}, "vary"),
])
def test_what_a_shared_cache_must_not_store(response, request_cc, overrides, reason) -> None:
    assert refusal(response, request_cc, **overrides) == reason


def test_what_may_be_stored_with_explicit_permission() -> None:
    assert refusal("max-age=60") is None
    for allowing in ("public", "s-maxage=5", "must-revalidate"):
        assert refusal(allowing, authorization=True) is None
    assert refusal("max-age=60", set_cookie=True, allow_set_cookie=True) is None


def lifetime(response: str = "", **fields: object) -> float:
    values: dict[str, object] = dict(status=200, date=1000.0, expires=None, last_modified=None,
                                     response_time=1000.0, default_ttl=None)
    values.update(fields)
    return policy.freshness_lifetime(cc(response), **values)  # type: ignore[arg-type]


def test_freshness_follows_rfc_9111_order() -> None:
    assert lifetime("max-age=60, s-maxage=5") == 5
    assert lifetime("max-age=60", expires=b"Thu, 01 Jan 1970 00:00:00 GMT") == 60
    assert lifetime(expires=b"garbage") == 0
    assert lifetime(expires=b"Thu, 01 Jan 1970 00:26:40 GMT") == 600  # 1600 - 1000
    assert lifetime(default_ttl=30.0) == 30
    assert lifetime(last_modified=0.0) == 100  # 10% of the time since Last-Modified
    assert lifetime(last_modified=0.0, status=500) == 0  # not heuristically cacheable
    assert lifetime(last_modified=0.0, date=10.0 ** 9) == policy.HEURISTIC_CAP
    assert lifetime() == 0


@given(age=st.integers(0, 10**6), delay=st.floats(0, 100), resident=st.floats(0, 10**5))
def test_age_never_shrinks_and_counts_the_delay(age: int, delay: float, resident: float) -> None:
    initial = policy.initial_age(age=float(age), date=None, request_time=0.0, response_time=delay)
    assert initial >= age + delay - 1e-9


def test_lookup_verdicts() -> None:
    fresh = policy.lookup_verdict(cc("max-age=60"), cc(""), age=10, lifetime=60)
    assert fresh == "fresh"
    assert policy.lookup_verdict(cc("no-cache"), cc(""), age=0, lifetime=60) == "revalidate"
    assert policy.lookup_verdict(cc(""), cc("no-cache"), age=0, lifetime=60) == "revalidate"
    assert policy.lookup_verdict(cc(""), cc("max-age=5"), age=10, lifetime=60) == "revalidate"
    swr = cc("max-age=1, stale-while-revalidate=30")
    assert policy.lookup_verdict(swr, cc(""), age=10, lifetime=1) == "stale-while-revalidate"
    assert policy.lookup_verdict(swr, cc(""), age=100, lifetime=1) == "revalidate"
    strict = cc("max-age=1, must-revalidate, stale-while-revalidate=30")
    assert policy.lookup_verdict(strict, cc(""), age=10, lifetime=1) == "revalidate"
    assert policy.lookup_verdict(cc(""), cc("max-stale=20"), age=10, lifetime=1) == "fresh"


def test_stale_if_error_windows() -> None:
    sie = cc("max-age=1, stale-if-error=60")
    assert policy.may_serve_on_error(sie, cc(""), age=30, lifetime=1)
    assert not policy.may_serve_on_error(sie, cc(""), age=100, lifetime=1)
    assert not policy.may_serve_on_error(cc("max-age=1, stale-if-error=60, must-revalidate"),
                                         cc(""), age=30, lifetime=1)
    assert policy.may_serve_on_error(cc("max-age=1"), cc("stale-if-error=60"), age=30, lifetime=1)


def test_keys_normalise_like_rfc_3986() -> None:
    assert policy.url_key("http", "Shop.Example.COM.:80", b"/a/./b/../%7e%2f?q=1") == \
        "http://shop.example.com/a/~%2F?q=1"
    assert policy.url_key("https", "h:443", b"/") == "https://h/"
    assert policy.url_key("http", "h:8080", b"/x/..") == "http://h:8080/"
    assert policy.url_key("http", "[::1]:80", b"/") == "http://[::1]/"
    assert policy.url_of("http://h:80/a/../b") == "http://h/b"


@given(st.text(alphabet="ab/.%2F~", max_size=30))
def test_path_normalisation_is_idempotent(path: str) -> None:
    once = policy.normalize_path(("/" + path).encode())
    assert policy.normalize_path(once.encode()) == once


def test_conditionals_and_304_merge() -> None:
    assert policy.not_modified(if_none_match=b'W/"a", "b"', if_modified_since=None,
                               etag=b'"a"', last_modified=None)
    assert not policy.not_modified(if_none_match=b'"c"', if_modified_since=None,
                                   etag=b'"a"', last_modified=None)
    assert policy.not_modified(if_none_match=None,
                               if_modified_since=b"Thu, 01 Jan 2015 00:00:00 GMT",
                               etag=None, last_modified=b"Wed, 31 Dec 2014 00:00:00 GMT")
    merged = policy.merge_not_modified(
        [(b"ETag", b'"a"'), (b"Cache-Control", b"max-age=1"), (b"Content-Length", b"5")],
        [(b"Cache-Control", b"max-age=60"), (b"Content-Length", b"0")])
    assert merged == [(b"ETag", b'"a"'), (b"Content-Length", b"5"),
                      (b"Cache-Control", b"max-age=60")]


def test_unsafe_methods_invalidate_their_url_and_same_origin_locations() -> None:
    urls = policy.invalidated_urls(method=b"POST", status=201, request_url="http://h/items",
                                   location=b"/items/7", content_location=b"http://other/x")
    assert urls == ["http://h/items", "http://h/items/7"]
    assert policy.invalidated_urls(method=b"POST", status=500, request_url="http://h/items",
                                   location=None, content_location=None) == []
    assert policy.invalidated_urls(method=b"GET", status=200, request_url="http://h/",
                                   location=None, content_location=None) == []


@pytest.mark.parametrize(("value", "expected"), [
    (b"bytes=0-4", (0, 4)), (b"bytes=5-", (5, 9)), (b"bytes=-3", (7, 9)),
    (b"bytes=8-100", (8, 9)), (b"bytes=10-", "unsatisfiable"), (b"bytes=0-1,3-4", None),
    (b"items=0-1", None), (b"bytes=4-2", None),
])
def test_single_byte_ranges(value: bytes, expected: object) -> None:
    assert policy.byte_range(value, 10) == expected


def test_vary_fields_and_variants() -> None:
    assert policy.vary_fields([b"Accept-Encoding, X-A", b"x-a"]) == ("accept-encoding", "x-a")
    assert policy.vary_fields([b"*"]) is None
    headers = [(b"Accept-Encoding", b"gzip,  br"), (b"X-A", b"1")]
    assert policy.variant_of(("accept-encoding", "x-a"), headers) == ("gzip, br", "1")

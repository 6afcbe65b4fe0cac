"""What the cache keeps of one exchange, and how an upstream answer becomes an entry.

Shared by the client side (`exchange`) and background revalidations (`refresh`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from kanal.dataplane.cache import policy
from kanal.dataplane.cache.client import CacheExchange
from kanal.dataplane.cache.policy import header, header_values
from kanal.dataplane.cache.rule import RuleCache
from kanal.dataplane.cache.store import CacheStore, Entry, Fill

if TYPE_CHECKING:
    from kanal.dataplane.cache.client import CachedRequest

HIT = b"HIT"
MISS = b"MISS"
STALE = b"STALE"
REVALIDATED = b"REVALIDATED"
BYPASS = b"BYPASS"

_STORED_OUT = frozenset({b"age", b"x-cache", b"set-cookie", b"set-cookie2"})
"""Fields of an upstream answer never kept in a stored copy (Age is recomputed)."""
NO_BODY_STATUSES = frozenset({204, 304})


def request_fields(request: CachedRequest) -> list[tuple[bytes, bytes]]:
    """The request's fields as Vary reads them (the proxy keeps Cookie apart)."""
    if request.cookie is None:
        return request.headers
    return [*request.headers, (b"Cookie", request.cookie)]


class AnswerHead(Protocol):
    """An upstream answer's head as the cache reads it (a pooled upstream connection's,
    or the forward proxy's origin connection's)."""

    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> list[tuple[bytes, bytes]]: ...
    @property
    def content_length(self) -> bytes | None: ...
    @property
    def chunked(self) -> bool: ...
    @property
    def no_body(self) -> bool: ...


def start_fill(exchange: CacheExchange, fill: Fill, upstream: AnswerHead,
               headers: list[tuple[bytes, bytes]], now: float) -> str | None:
    """Give the fill its entry if the answer may be stored; else why it may not.

    `headers` are the answer's end-to-end fields (those named by Connection removed).
    """
    request = exchange.request
    rule = exchange.rule
    response_cc = policy.parse_cache_control(header_values(headers, b"cache-control"))
    vary = header_values(headers, b"vary")
    set_cookie = header(headers, b"set-cookie") is not None
    reason = policy.not_storable(
        method=request.method, status=upstream.status, statuses=rule.statuses,
        request_cc=exchange.request_cc, response_cc=response_cc,
        authorization=header(request.headers, b"authorization") is not None,
        set_cookie=set_cookie, allow_set_cookie=rule.allow_set_cookie, vary=vary)
    if reason == "vary":
        exchange.store.log_once("vary", f"{exchange.key}: answer with Vary * or a Vary of more "
                                        "fields than the cache keeps is not stored")
    if reason is not None:
        return reason
    date = policy.parse_http_date(header(headers, b"date"))
    last_modified = header(headers, b"last-modified")
    etag = header(headers, b"etag")
    lifetime = policy.freshness_lifetime(
        response_cc, status=upstream.status, date=date, expires=header(headers, b"expires"),
        last_modified=policy.parse_http_date(last_modified), response_time=now,
        default_ttl=rule.default_ttl)
    if (lifetime <= 0 and etag is None and last_modified is None
            and response_cc.stale_if_error is None and response_cc.stale_while_revalidate is None):
        return "no-freshness"  # nothing could ever be done with it
    expected: int | None = None
    if upstream.no_body or upstream.status in NO_BODY_STATUSES:
        expected = 0
    elif upstream.content_length is not None and not upstream.chunked:
        try:
            expected = int(upstream.content_length)
        except ValueError:
            return "bad-length"
        if expected > rule.max_object_size:
            exchange.store.log_once("too-large", f"{exchange.key}: answer larger than "
                                                 f"maxObjectSize ({rule.max_object_size} "
                                                 "bytes) is not stored")
            return "too-large"
    fields = policy.vary_fields(vary) or ()
    stored = [(name, value) for name, value in headers if name.lower() not in _STORED_OUT]
    entry = Entry(
        exchange.key, fields, policy.variant_of(fields, request_fields(request)), upstream.status,
        stored, b"", response_cc=response_cc, lifetime=lifetime,
        initial_age=policy.initial_age(age=policy.parse_age(header(headers, b"age")), date=date,
                                       request_time=exchange.request_time, response_time=now),
        response_time=now, etag=etag, last_modified=last_modified)
    fill.start(entry, limit=rule.max_object_size, expected=expected)
    return None


def refresh(exchange: CacheExchange, entry: Entry, upstream: AnswerHead,
            now: float) -> None:
    """A 304 confirmed the entry: its fields and freshness are renewed (RFC 9111 4.3.4)."""
    refresh_entry(exchange.store, exchange.rule, entry, upstream.headers,
                  exchange.request_time, now)


def refresh_entry(store: CacheStore, rule: RuleCache, entry: Entry,
                  fresh: list[tuple[bytes, bytes]], request_time: float, now: float) -> None:
    """Merge a 304's fields into a stored entry and recompute its freshness."""
    update = [(name, value) for name, value in fresh if name.lower() not in _STORED_OUT]
    merged = policy.merge_not_modified(entry.headers, update)
    response_cc = policy.parse_cache_control(header_values(merged, b"cache-control"))
    date = policy.parse_http_date(header(merged, b"date"))
    last_modified = header(merged, b"last-modified")
    entry.response_cc = response_cc
    entry.lifetime = policy.freshness_lifetime(
        response_cc, status=entry.status, date=date, expires=header(merged, b"expires"),
        last_modified=policy.parse_http_date(last_modified), response_time=now,
        default_ttl=rule.default_ttl)
    entry.initial_age = policy.initial_age(
        age=policy.parse_age(header(fresh, b"age")), date=date, request_time=request_time,
        response_time=now)
    entry.response_time = now
    entry.etag = header(merged, b"etag")
    entry.last_modified = last_modified
    store.refresh(entry, merged)


def upstream_fields(headers: list[tuple[bytes, bytes]],
                    entry: Entry | None) -> list[tuple[bytes, bytes]]:
    """A GET's fields as the cache sends them upstream: without the client's own
    conditions and ranges (the whole answer is fetched, to store), with the entry's
    validators when it revalidates one."""
    if any(name.lower() in policy.CONDITIONAL_FIELDS for name, _ in headers):
        headers = [(name, value) for name, value in headers
                   if name.lower() not in policy.CONDITIONAL_FIELDS]
    if entry is not None:
        headers = headers + policy.revalidation_fields(entry.etag, entry.last_modified)
    return headers

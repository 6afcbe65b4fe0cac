"""The cache's part in one reverse-proxy exchange: the hooks `proxy.py` calls.

`proxy.ClientConnection` calls these only for rules with a cache (a `RuleCache` on
the Selection), and only through the request's `cache_exchange` afterwards, so a rule
without a cache pays one attribute test per step. The decisions are `policy`'s; this
module does what they say on the request's exchange and its client connection:

- `begin`, after route selection: answer a fresh hit from the store (no upstream is
  touched), wait for a fill of the same key in progress (bounded), or prepare the
  upstream request (conditional fields of a revalidation, or none of the client's on
  a miss, so the answer is complete and storable);
- `head`: a 304 to a revalidation is merged into the entry and the entry is served; a
  failed upstream with a stale entry allowed by `stale-if-error` serves the entry;
  otherwise a storable answer starts a `Fill`, and the answer goes on to the client
  with `X-Cache`;
- `body` / `done` / `upstream_failed`: tee the body into the fill, commit it when the
  answer ended intact, drop it when not;
- `error`: the proxy's own 5xx (upstream down, circuit open, timeout) is replaced by a
  stale entry when `stale-if-error` allows.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from kanal.dataplane.cache import policy
from kanal.dataplane.cache.client import (
    CacheExchange,
    abort_fill,
    entry_body,
    feed_body,
    finish_fill,
)
from kanal.dataplane.cache.entries import (
    BYPASS,
    HIT,
    MISS,
    NO_BODY_STATUSES,
    REVALIDATED,
    STALE,
    refresh,
    request_fields,
    start_fill,
    upstream_fields,
)
from kanal.dataplane.cache.policy import header
from kanal.dataplane.cache.refresh import refresh_in_background
from kanal.dataplane.cache.store import FILL_LOCK, PROCESS_STORE, Entry, Fill, lookup
from kanal.dataplane.http1 import status_line

if TYPE_CHECKING:
    from kanal.contract.snapshot import Rule
    from kanal.dataplane.cache.client import CacheClient, ProxiedRequest
    from kanal.dataplane.pool import UpstreamConnection
    from kanal.dataplane.router import Selection


# --------------------------------------------------------------------------- begin


def begin(conn: CacheClient, request: ProxiedRequest, selection: Selection) -> bool:
    """After route selection; True when the request was answered (or is waiting)."""
    store = PROCESS_STORE
    rule = selection.cache
    assert rule is not None
    exchange = CacheExchange(store, rule, request, request.route_key)
    exchange.timeout = selection.rule.timeout
    request.cache_exchange = exchange
    method = request.method
    if method == b"GET" or method == b"HEAD":
        if (request.upgrade or request.chunked or request.content_length not in (None, b"0")
                or request.host is None):
            store.stats.count("bypass", exchange.route)
            return False
    else:
        if method in policy.UNSAFE_METHODS and request.host is not None:
            exchange.url = policy.url_key(conn.context.scheme, request.host.decode("latin-1"),
                                          request.target)
        store.stats.count("bypass", exchange.route)
        return False
    url = policy.url_key(conn.context.scheme, request.host.decode("latin-1"), request.target)
    exchange.url = url
    key = exchange.key = url + rule.extra_key(request.headers, request.cookie)
    fields = exchange.fields = policy.RequestFields(request.headers)
    exchange.request_cc = policy.parse_cache_control(fields.cache_control)
    exchange.request_time = time.time()
    # Whatever is stored may be used for any request (RFC 9111 3.5): an answer to a
    # request with Authorization was stored only if it said a shared cache may.
    entry = lookup(store, key, request_fields(request))
    if entry is not None and entry.body is None:
        _load(conn, request, exchange, entry)  # on disk: read off the loop, then decide
        return True
    return _decide(conn, request, exchange, entry, entry.body if entry is not None else None)


def _decide(conn: CacheClient, request: ProxiedRequest, exchange: CacheExchange,
            entry: Entry | None, body: bytes | None) -> bool:
    """What to do with the stored entry (its body at hand) or with none; True when the
    request was answered (or is waiting for a fill)."""
    store = exchange.store
    request_cc = exchange.request_cc
    fields = exchange.fields
    assert fields is not None
    if entry is not None:
        exchange.hold(entry, body)  # kept for this exchange, wherever the entry goes
        now = exchange.request_time
        age = entry.age(now)
        verdict = policy.lookup_verdict(entry.response_cc, request_cc, age=age,
                                        lifetime=entry.lifetime,
                                        pragma_no_cache=fields.pragma_no_cache)
        if verdict == "fresh":
            if serve(conn, request, entry, HIT, now):
                return True
        elif verdict == "stale-while-revalidate":
            refresh_in_background(conn, request, entry, exchange)
            if serve(conn, request, entry, STALE, now):
                return True
        elif not request_cc.only_if_cached:
            exchange.entry = entry
    if request_cc.only_if_cached:  # nothing that may be served without the upstream
        store.stats.count("miss", exchange.route)
        exchange.outcome = MISS  # the cache was asked: nothing stored
        conn._fail_request(504, "only-if-cached: no stored answer")
        return True
    if entry is None and request.method == b"GET" and (
            pending := store.active_fill(exchange.key)) is not None:
        _wait(conn, request, exchange, pending)
        return True
    _go_upstream(request, exchange)
    return False


def _load(conn: CacheClient, request: ProxiedRequest, exchange: CacheExchange,
          entry: Entry) -> None:
    """A disk hit: the body is read on a worker thread; the request goes on with it
    once read (answered from it, or revalidating it), or as a miss if it is unreadable."""
    exchange.outcome = MISS  # until answered: an error meanwhile comes from a lookup

    def loaded(read: asyncio.Future[bytes | None]) -> None:
        if conn.current is not request or conn.closed or request.cache_exchange is not exchange:
            return  # answered meanwhile (a timeout), or the client left
        body = read.result()
        if not _decide(conn, request, exchange, entry if body is not None else None, body):
            _proceed(conn, request, exchange)

    exchange.store.load(entry).add_done_callback(loaded)


EVENTS = {HIT: "hit", MISS: "miss", STALE: "stale", REVALIDATED: "revalidated",
          BYPASS: "bypass"}


def _go_upstream(request: ProxiedRequest, exchange: CacheExchange) -> None:
    """Ready the upstream request: the client's own conditions and ranges are left out
    (the whole answer is fetched, to store), a revalidation adds the entry's."""
    exchange.outcome = MISS
    if request.method != b"GET":
        return
    exchange.client_headers = request.headers
    request.headers = upstream_fields(request.headers, exchange.entry)
    if exchange.fill is None and exchange.store.active_fill(exchange.key) is None:
        exchange.fill = exchange.store.start_fill(exchange.key)


def _wait(conn: CacheClient, request: ProxiedRequest, exchange: CacheExchange, fill: Fill) -> None:
    """Concurrent miss: wait for the fill in progress (bounded), then look again."""
    loop = asyncio.get_running_loop()
    woken = False
    exchange.outcome = MISS  # the cache was asked: nothing stored yet

    def wake(stored: bool) -> None:
        nonlocal woken
        if woken:
            return
        woken = True
        timer.cancel()
        if conn.current is not request or conn.closed or request.cache_exchange is not exchange:
            return
        if stored:
            entry = lookup(exchange.store, exchange.key, request_fields(request))
            if entry is not None and entry.body is None:
                _load(conn, request, exchange, entry)  # spilled at once: read it first
                return
            if entry is not None and serve(conn, request, entry, HIT, time.time()):
                return
        _go_upstream(request, exchange)
        _proceed(conn, request, exchange)

    def timed_out() -> None:
        if fill.waiters and wake in fill.waiters:
            fill.waiters.remove(wake)
        wake(False)

    timer = loop.call_later(max(0.0, FILL_LOCK - (time.monotonic() - fill.started)), timed_out)
    fill.waiters.append(wake)


def _proceed(conn: CacheClient, request: ProxiedRequest, exchange: CacheExchange) -> None:
    """What `ClientConnection` does after the cache hook, for a request that waited for
    a fill and now goes upstream itself (its route timeout has run since it began)."""
    if conn.context.config is None:
        conn._fail_request(503, "no configuration applied yet")
        return
    conn._send_upstream(request)


# --------------------------------------------------------------------------- answering


def serve(conn: CacheClient, request: ProxiedRequest, entry: Entry, outcome: bytes,
          now: float, *, finish: bool = True) -> bool:
    """Answer the request from a stored entry; False when its body cannot be read."""
    exchange = request.cache_exchange
    store = exchange.store if exchange is not None else PROCESS_STORE
    body = entry_body(exchange, entry)
    if body is None:
        return False
    if not request.complete and not request.chunked and request.content_length in (None, b"0"):
        # Answered from the route selection, inside the parser's head callback: a request
        # without a body is whole, though llhttp reports its end only after this returns.
        request.complete = True
    status = entry.status
    head_only = request.method == b"HEAD"
    extra = b""
    if exchange is not None and exchange.client_headers is not None:
        fields = policy.RequestFields(exchange.client_headers)  # what the client sent
    elif exchange is not None and exchange.fields is not None:
        fields = exchange.fields
    else:
        fields = policy.RequestFields(request.headers)
    if status == 200 and fields.conditional:
        if policy.not_modified(
                if_none_match=fields.if_none_match, if_modified_since=fields.if_modified_since,
                etag=entry.etag, last_modified=entry.last_modified):
            status = 304
        elif fields.range is not None and policy.if_range_holds(
                fields.if_range, entry.etag, entry.last_modified):
            span = policy.byte_range(fields.range, len(body))
            if span == "unsatisfiable":
                status = 416
                extra = b"Content-Range: bytes */%d\r\n" % len(body)
                body = b""
            elif span is not None:
                first, last = span
                status = 206
                extra = b"Content-Range: bytes %d-%d/%d\r\n" % (first, last, len(body))
                body = body[first:last + 1]
    lines = [status_line(status), b"\r\n", entry.head_block, extra]
    lines.append(b"Age: %d\r\nX-Cache: %b\r\n" % (int(entry.age(now)), outcome))
    if status not in NO_BODY_STATUSES:
        lines.append(b"Content-Length: %d\r\n" % len(body))
    if request.hsts is not None:
        lines.append(b"Strict-Transport-Security: " + request.hsts + b"\r\n")
    close = not request.keep_alive or conn.close_after or not request.complete
    if close:
        lines.append(b"Connection: close\r\n")
    elif not request.http11:
        lines.append(b"Connection: keep-alive\r\n")
    lines.append(b"\r\n")
    request.response_close = close
    request.response_started = True
    if not head_only and status not in NO_BODY_STATUSES:
        lines.append(body)
        request.body_sent = len(body)
    request.cache_outcome = outcome
    conn._write(b"".join(lines))
    store.stats.count(EVENTS[outcome], request.route_key)
    if finish:
        request.cache_exchange = None
        conn._end_exchange(status)
    elif exchange is not None:
        exchange.swallow = True
        exchange.served = status
    return True


# --------------------------------------------------------------------------- the answer


def head(conn: CacheClient, request: ProxiedRequest, upstream: UpstreamConnection) -> bool:
    """The upstream's answer head to `request`, the connection's current one; True when
    the cache answered instead (the upstream's answer is then read to its end and
    dropped)."""
    exchange = request.cache_exchange
    if exchange is None or exchange.request is not request:
        return False
    store = exchange.store
    status = upstream.status
    if request.method in policy.UNSAFE_METHODS:
        _invalidate(exchange, request.method, status, upstream.headers)
        _mark(upstream, exchange.outcome)
        return False
    if exchange.outcome == BYPASS:
        _mark(upstream, BYPASS)
        return False
    now = time.time()
    entry = exchange.entry
    if entry is not None:
        # A 304 confirms the entry only when the cache asked with the entry's validators
        # (a GET); one that answers the client's own validators (a HEAD) says nothing of it.
        if status == 304 and exchange.client_headers is not None:
            refresh(exchange, entry, upstream, now)
            if exchange.fill is not None:
                exchange.fill.abort(None)
            if not serve(conn, request, entry, REVALIDATED, now, finish=False):
                conn._abort()  # the entry's body went missing: no answer can be made
            return True
        if status >= 500 and policy.may_serve_on_error(
                entry.response_cc, exchange.request_cc, age=entry.age(now),
                lifetime=entry.lifetime):
            if exchange.fill is not None:
                exchange.fill.abort("upstream-error")
            if serve(conn, request, entry, STALE, now, finish=False):
                return True
    store.stats.count("miss", exchange.route)
    fill = exchange.fill
    if fill is None and request.method == b"GET" and store.active_fill(exchange.key) is None:
        # A retried try (the first one's fill was dropped with it) may still be stored.
        fill = exchange.fill = store.start_fill(exchange.key)
    if fill is not None:
        headers = upstream.headers
        if upstream.connection_named:
            named = upstream.connection_named
            headers = [(name, value) for name, value in headers if name.lower() not in named]
        reason = start_fill(exchange, fill, upstream, headers, now)
        if reason is not None:
            fill.abort(reason)
            exchange.fill = None
    _mark(upstream, MISS)
    return False


def _mark(upstream: UpstreamConnection, outcome: bytes) -> None:
    """Put X-Cache on the answer going to the client (an upstream's own is replaced)."""
    headers = upstream.headers
    if any(name.lower() == b"x-cache" for name, _ in headers):
        headers = [(name, value) for name, value in headers if name.lower() != b"x-cache"]
    headers.append((b"X-Cache", outcome))
    upstream.headers = headers


def _invalidate(exchange: CacheExchange, method: bytes, status: int,
                headers: list[tuple[bytes, bytes]]) -> None:
    """An unsafe request succeeded: its URL and Location / Content-Location are purged."""
    if not exchange.url:
        return
    for url in policy.invalidated_urls(
            method=method, status=status, request_url=exchange.url,
            location=header(headers, b"location"),
            content_location=header(headers, b"content-location")):
        if exchange.store.purge(url):
            exchange.store.stats.count("invalidation", exchange.route)


def body(request: ProxiedRequest, chunk: bytes) -> bool:
    """A piece of the upstream's body; True when it is dropped (the cache answered)."""
    return feed_body(request.cache_exchange, chunk)


def done(conn: CacheClient, request: ProxiedRequest, upstream: UpstreamConnection) -> bool:
    """The upstream's answer ended; True when the exchange was finished here."""
    exchange = request.cache_exchange
    if exchange is None:
        return False
    if exchange.swallow:
        request.cache_exchange = None
        conn.upstream = None
        if exchange.request.complete:
            upstream.release()
        else:
            upstream.close()
        conn._end_exchange(exchange.served)
        return True
    finish_fill(exchange)
    return False


def upstream_failed(conn: CacheClient, request: ProxiedRequest) -> bool:
    """The upstream's answer broke off; True when the client already has its answer."""
    exchange = request.cache_exchange
    if exchange is None:
        return False
    if exchange.swallow:
        request.cache_exchange = None
        conn.upstream = None
        conn._end_exchange(exchange.served)
        return True
    over(request)
    return False


def over(request: ProxiedRequest) -> None:
    """The exchange ends another way (an error, an abort, the client left): a fill that
    did not finish is dropped, and those waiting for it go on."""
    abort_fill(request.cache_exchange)


_NOT_ASKED = b"X-Cache: " + BYPASS + b"\r\n"


def not_asked(rule: Rule | None) -> bytes:
    """The X-Cache line of an answer the proxy made before its rule's cache was asked
    (refused by the access policy, rate limited, a body too large, no backend...):
    BYPASS on a rule with a cache, none on another."""
    settings = rule.cache if rule is not None else None
    return _NOT_ASKED if settings is not None and settings.enabled else b""


def error(conn: CacheClient, request: ProxiedRequest, status: int) -> bytes | None:
    """The proxy answers with an error of its own: serve a stale entry instead when
    `stale-if-error` allows (None: answered), else the X-Cache line to add."""
    exchange = request.cache_exchange
    if exchange is None or exchange.request is not request:
        return b""
    entry = exchange.entry
    if status >= 500 and entry is not None:
        now = time.time()
        if policy.may_serve_on_error(entry.response_cc, exchange.request_cc,
                                     age=entry.age(now), lifetime=entry.lifetime):
            # _fail_request has let go of the upstream; the answer ends here.
            if serve(conn, request, entry, STALE, now):
                return None
    return b"X-Cache: " + exchange.outcome + b"\r\n"


__all__ = ["BYPASS", "CacheExchange", "begin", "body", "done", "error", "head", "not_asked", "over",
           "serve", "upstream_failed"]

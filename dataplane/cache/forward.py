"""The cache's part in the forward proxy: plain-HTTP absolute-form GET and HEAD
requests, under the `cache` section of the listener's EgressPolicy.

The same store, keys (`http://host:port/path?query`), storability and freshness as
the reverse proxy's; CONNECT tunnels are never looked into, so never cached. A stale
entry is revalidated (`If-None-Match` / `If-Modified-Since`, a 304 answers from the
entry), stands in for a failed origin within `stale-if-error`, and within
`stale-while-revalidate` is served at once while `forwardrefresh` revalidates it in the
background. Concurrent misses for one key wait for the first one's answer (bounded by
`FILL_LOCK`), as on the reverse listener. `begin` is a coroutine: the forward proxy
decides each request in a task of its own, so waiting for a fill or for a disk read
holds nothing else up. Misses and revalidations (background ones included) reach the
origin as any forward request does: on the listener's pooled connections to origins,
shared by all its clients (`kanal.dataplane.forwardpool`), not on a connection of the
client's own.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

from kanal.contract.snapshot import Snapshot
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
    AnswerHead,
    refresh,
    request_fields,
    start_fill,
    upstream_fields,
)
from kanal.dataplane.cache.forwardrefresh import is_background, revalidate
from kanal.dataplane.cache.policy import header, header_values
from kanal.dataplane.cache.rule import RuleCache, rule_cache
from kanal.dataplane.cache.store import FILL_LOCK, PROCESS_STORE, Entry, Fill, lookup
from kanal.dataplane.http1 import error_head, status_line


def egress_cache(snapshot: Snapshot, namespace: str) -> RuleCache | None:
    """The cache settings of the forward listener: the first EgressPolicy of its
    namespace (in key order) with a `cache` section."""
    for policy_spec in sorted(snapshot.egress_policies, key=lambda p: p.key):
        if policy_spec.key.startswith(namespace + "/") and policy_spec.cache is not None:
            return rule_cache(policy_spec.cache)
    return None


class ForwardRequestView(Protocol):
    """The forward proxy's request, as the cache reads it."""

    headers: list[tuple[bytes, bytes]]
    status: int
    down: int
    decision: str
    reason: str

    @property
    def method(self) -> bytes: ...
    @property
    def target(self) -> bytes: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def complete(self) -> bool: ...
    @property
    def keep_alive(self) -> bool: ...
    @property
    def http11(self) -> bool: ...
    @property
    def chunked(self) -> bool: ...
    @property
    def content_length(self) -> bytes | None: ...


class ForwardClient(Protocol):
    """The forward proxy's client connection, as the cache answers on it."""

    cache_exchange: CacheExchange | None
    response_close: bool
    response_started: bool
    response_chunked: bool

    @property
    def transport(self) -> asyncio.Transport | None: ...
    @property
    def closed(self) -> bool: ...
    @property
    def proxy(self) -> Any: ...

    def _end_exchange(self, request: Any) -> None: ...


class _Request:
    """A forward request seen through the reverse proxy's request shape (`CachedRequest`)."""

    __slots__ = ("chunked", "complete", "content_length", "cookie", "headers", "host",
                 "http11", "keep_alive", "method", "target", "upgrade")

    def __init__(self, request: ForwardRequestView, path: bytes) -> None:
        self.method = request.method
        self.target = path
        self.headers = request.headers
        self.host: bytes | None = f"{request.host}:{request.port}".encode("latin-1")
        self.cookie: bytes | None = None  # in `headers`: Vary on Cookie reads it there
        self.complete = request.complete
        self.keep_alive = request.keep_alive
        self.http11 = request.http11
        self.upgrade = False
        self.chunked = request.chunked
        self.content_length = request.content_length


async def begin(conn: ForwardClient, request: ForwardRequestView, path: bytes,
                rule: RuleCache) -> bool:
    """An allowed plain-HTTP request: True when answered from the cache (or when its
    client left while it waited)."""
    view = _Request(request, path)
    exchange = CacheExchange(PROCESS_STORE, rule, view, "egress")
    conn.cache_exchange = exchange
    store = exchange.store
    assert view.host is not None
    url = policy.url_key("http", view.host.decode("latin-1"), path)
    exchange.url = url
    if view.method not in (b"GET", b"HEAD") or view.chunked or view.content_length not in (
            None, b"0"):
        store.stats.count("bypass", exchange.route)
        return False
    key = exchange.key = url + rule.extra_key(view.headers, None)
    cc_values = header_values(view.headers, b"cache-control")
    exchange.request_cc = policy.parse_cache_control(cc_values)
    pragma = not cc_values and b"no-cache" in (header(view.headers, b"pragma") or b"").lower()
    exchange.outcome = MISS
    entry = lookup(store, key, request_fields(view))
    only_if_cached = exchange.request_cc.only_if_cached
    if entry is None and only_if_cached:
        return unavailable(conn, request, exchange)
    if entry is None and view.method == b"GET" and (pending := store.active_fill(key)):
        # Concurrent misses: wait for the one under way (bounded), then look again.
        await _wait_for(pending)
        if conn.closed:
            return True
        entry = lookup(store, key, request_fields(view))
    body = entry.body if entry is not None else None
    if entry is not None and body is None:
        body = await store.load(entry)  # on disk: read off the event loop
        if conn.closed:
            return True
        if body is None:
            entry = None  # unreadable (dropped): a miss
    if entry is None and only_if_cached:
        return unavailable(conn, request, exchange)
    now = exchange.request_time = time.time()
    if entry is not None:
        exchange.hold(entry, body)
        verdict = policy.lookup_verdict(entry.response_cc, exchange.request_cc,
                                        age=entry.age(now), lifetime=entry.lifetime,
                                        pragma_no_cache=pragma)
        if verdict == "stale-while-revalidate" and is_background(conn.transport):
            verdict = "revalidate"  # this is the revalidation
        if verdict == "fresh" and serve(conn, request, exchange, entry, HIT, now):
            conn._end_exchange(request)
            return True
        if verdict == "stale-while-revalidate" and serve(conn, request, exchange, entry,
                                                         STALE, now):
            if view.method == b"GET":
                revalidate(conn, key, request.target, request.headers,
                           conn.transport.get_extra_info("peername") if conn.transport else None)
            conn._end_exchange(request)
            return True
        if only_if_cached:  # stored, but not to be served without asking the origin
            return unavailable(conn, request, exchange)
        exchange.entry = entry
    if view.method == b"GET":
        exchange.client_headers = request.headers
        request.headers = upstream_fields(request.headers, exchange.entry)
        if store.active_fill(key) is None:
            exchange.fill = store.start_fill(key)
    return False


ONLY_IF_CACHED = "only-if-cached: no stored answer"


def unavailable(conn: ForwardClient, request: ForwardRequestView,
                exchange: CacheExchange) -> bool:
    """`Cache-Control: only-if-cached` and no stored answer that may be served: 504,
    and the origin is never asked (RFC 9111 5.2.1.7). True: answered."""
    exchange.store.stats.count("miss", exchange.route)
    exchange.outcome = MISS  # the cache was asked: nothing to answer with
    request.status = 504
    request.reason = ONLY_IF_CACHED
    request.decision = "cache"
    transport = conn.transport
    if transport is None:
        conn._end_exchange(request)
        return True
    text = b"kanal: 504 " + ONLY_IF_CACHED.encode() + b"\n"
    close = not request.keep_alive or not request.complete or conn.response_close
    data = error_head(504, len(text), keep_alive=not close, extra=b"X-Cache: " + MISS + b"\r\n")
    if request.method != b"HEAD":
        data += text
    request.down += len(data)
    conn.response_close = close
    conn.response_started = True
    conn.response_chunked = False
    transport.write(data)
    conn._end_exchange(request)
    return True


async def _wait_for(fill: Fill) -> bool:
    """Wait for a fill in progress, at most what is left of FILL_LOCK; whether it stored."""
    woken: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def wake(stored: bool) -> None:
        if not woken.done():
            woken.set_result(stored)

    fill.waiters.append(wake)
    try:
        async with asyncio.timeout(max(0.0, FILL_LOCK - (time.monotonic() - fill.started))):
            return await woken
    except TimeoutError:
        return False
    finally:
        if wake in fill.waiters:
            fill.waiters.remove(wake)


def serve(conn: ForwardClient, request: ForwardRequestView, exchange: CacheExchange,
          entry: Entry, outcome: bytes, now: float) -> bool:
    """Write a stored answer to the client; False when its body cannot be read."""
    transport = conn.transport
    body = entry_body(exchange, entry)
    if body is None or transport is None:
        return False
    fields = exchange.client_headers if exchange.client_headers is not None else request.headers
    status = entry.status
    if status == 200 and policy.not_modified(
            if_none_match=header(fields, b"if-none-match"),
            if_modified_since=header(fields, b"if-modified-since"),
            etag=entry.etag, last_modified=entry.last_modified):
        status = 304
    lines = [status_line(status)]
    lines += [name + b": " + value for name, value in entry.headers]
    lines.append(b"Age: %d" % int(entry.age(now)))
    lines.append(b"X-Cache: " + outcome)
    if status not in NO_BODY_STATUSES:
        lines.append(b"Content-Length: %d" % len(body))
    close = not request.keep_alive or not request.complete or conn.response_close
    if close:
        lines.append(b"Connection: close")
    elif not request.http11:
        lines.append(b"Connection: keep-alive")
    lines.append(b"\r\n")
    data = b"\r\n".join(lines)
    if request.method != b"HEAD" and status not in NO_BODY_STATUSES:
        data += body
    request.status = status
    request.decision = "cache"
    request.down += len(data)
    conn.response_close = close
    conn.response_started = True
    conn.response_chunked = False
    transport.write(data)
    exchange.swallow = True
    exchange.store.stats.count(outcome.decode().lower(), exchange.route)
    return True


def head(conn: ForwardClient, request: ForwardRequestView, origin: AnswerHead) -> bool:
    """The origin's answer head; True when the cache answered instead (a 304 to a
    revalidation: the stored answer). Otherwise the answer is marked and, if it may
    be, stored as it streams."""
    exchange = conn.cache_exchange
    if exchange is None:
        return False
    store = exchange.store
    status = origin.status
    if request.method in policy.UNSAFE_METHODS:
        for url in policy.invalidated_urls(
                method=request.method, status=status, request_url=exchange.url,
                location=header(origin.headers, b"location"),
                content_location=header(origin.headers, b"content-location")):
            if store.purge(url):
                store.stats.count("invalidation", exchange.route)
    if exchange.outcome == BYPASS:
        origin.headers.append((b"X-Cache", BYPASS))
        return False
    now = time.time()
    entry = exchange.entry
    if entry is not None and status == 304 and exchange.client_headers is not None:
        refresh(exchange, entry, origin, now)
        if exchange.fill is not None:
            exchange.fill.abort(None)
            exchange.fill = None
        return serve(conn, request, exchange, entry, REVALIDATED, now)
    if entry is not None and status >= 500 and policy.may_serve_on_error(
            entry.response_cc, exchange.request_cc, age=entry.age(now), lifetime=entry.lifetime):
        failed(conn)
        if serve(conn, request, exchange, entry, STALE, now):
            return True
    store.stats.count("miss", exchange.route)
    fill = exchange.fill
    if fill is not None:
        reason = start_fill(exchange, fill, origin, origin.headers, now)
        if reason is not None:
            fill.abort(reason)
            exchange.fill = None
    origin.headers.append((b"X-Cache", MISS))
    return False


def body(conn: ForwardClient, chunk: bytes) -> bool:
    """A piece of the origin's body; True when it is dropped (the cache answered)."""
    return feed_body(conn.cache_exchange, chunk)


def done(conn: ForwardClient) -> None:
    """The origin's answer ended cleanly: store what streamed, if it may be."""
    finish_fill(conn.cache_exchange)


def error(conn: ForwardClient, request: ForwardRequestView, status: int) -> bool:
    """The proxy answers an error of its own (the origin unreachable, cut off, slow):
    True when a stale entry answered instead (`stale-if-error`)."""
    exchange = conn.cache_exchange
    if exchange is None or status < 500 or exchange.entry is None or conn.response_started:
        return False
    entry = exchange.entry
    now = time.time()
    if not policy.may_serve_on_error(entry.response_cc, exchange.request_cc,
                                     age=entry.age(now), lifetime=entry.lifetime):
        return False
    failed(conn)
    if not serve(conn, request, exchange, entry, STALE, now):
        return False
    conn._end_exchange(request)
    return True


def failed(conn: ForwardClient) -> None:
    """The origin's answer broke off (or the client left): nothing is stored."""
    abort_fill(conn.cache_exchange)


__all__ = ["begin", "body", "done", "egress_cache", "error", "failed", "head"]

"""Background revalidation (`stale-while-revalidate`): the client got the stale entry
already; one request per key goes upstream on its own and renews the entry.

`Refresh` is a `ResponseSink` of its own, so the upstream connection reports to it as
it would to a client connection: a 304 renews the entry's fields and freshness, a
storable answer replaces the entry through a `Fill`, anything else leaves the entry
as it was.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from kanal.dataplane.cache.client import CacheExchange
from kanal.dataplane.cache.entries import refresh, start_fill, upstream_fields
from kanal.dataplane.cache.store import Entry, Fill
from kanal.dataplane.pool import UpstreamConnectError, UpstreamConnection

if TYPE_CHECKING:
    from kanal.dataplane.cache.client import CacheClient, ProxiedRequest
    from kanal.dataplane.runtime import UpstreamRuntime

log = logging.getLogger("kanal.cache")


class Refresh:
    """The sink of one background revalidation."""

    def __init__(self, exchange: CacheExchange, fill: Fill) -> None:
        self.exchange = exchange
        self.fill = fill
        self.batch: list[bytes] | None = None

    def response_head(self, conn: UpstreamConnection) -> None:
        exchange = self.exchange
        entry = exchange.entry
        now = time.time()
        if conn.status == 304 and entry is not None:
            refresh(exchange, entry, conn, now)
            self.fill.abort(None)
        elif conn.status < 500:
            headers = conn.headers
            if conn.connection_named:
                named = conn.connection_named
                headers = [(name, value) for name, value in headers if name.lower() not in named]
            reason = start_fill(exchange, self.fill, conn, headers, now)
            if reason is not None:
                self.fill.abort(reason)
        else:
            self.fill.abort("upstream-error")

    def response_body(self, chunk: bytes) -> None:
        self.fill.feed(chunk)

    def response_done(self, conn: UpstreamConnection) -> None:
        if self.fill.entry is not None:
            self.fill.finish()
        else:
            self.fill.abort(None)
        conn.release()

    def upstream_failed(self, conn: UpstreamConnection, reason: str,
                        exc: BaseException | None) -> None:
        self.fill.abort()
        log.debug("background revalidation of %s failed: %s", self.exchange.key, reason)

    def upstream_upgraded(self, conn: UpstreamConnection, rest: bytes) -> None:
        self.fill.abort()
        conn.abort()

    def upstream_pause_writing(self) -> None:
        pass

    def upstream_resume_writing(self) -> None:
        pass

    def end_batch(self) -> None:
        self.batch = None

    def flush(self, batch: list[bytes]) -> None:
        pass


def refresh_in_background(conn: CacheClient, request: ProxiedRequest, entry: Entry,
                          exchange: CacheExchange) -> None:
    """Start one revalidation of `entry` unless one for its key is under way."""
    store = exchange.store
    upstream = request.upstream_runtime
    config = conn.context.config
    if (request.method != b"GET" or upstream is None or config is None
            or store.active_fill(exchange.key) is not None):
        return
    background = CacheExchange(store, exchange.rule, request, exchange.route)
    background.key = exchange.key
    background.url = exchange.url
    background.entry = entry
    background.request_cc = exchange.request_cc
    background.request_time = time.time()
    fill = store.start_fill(exchange.key)
    sent = request.headers
    request.headers = upstream_fields(request.headers, entry)
    head = conn._request_head(request, config)
    request.headers = sent
    conn.context.spawn(_send(upstream, head, Refresh(background, fill)))


async def _send(upstream: UpstreamRuntime, head: bytes, sink: Refresh) -> None:
    state = upstream.pick(None)
    if state is None:
        sink.fill.abort("upstream-unavailable")
        return
    pool = upstream.pools[state.key]
    conn = pool.take_idle()
    if conn is None:
        try:
            conn = await pool.connect()
        except UpstreamConnectError as exc:
            sink.fill.abort("upstream-unavailable")
            log.debug("background revalidation of %s: %s", sink.exchange.key, exc)
            return
    conn.start(sink, head, False)

"""The cache's state of an exchange, and what it reads and does of a client connection.

Protocols, so the cache's modules need not import `proxy` (which imports them): the
reverse proxy's `ClientConnection` and `Request` (which holds the exchange's state,
`ProxiedRequest` here) are the implementations, checked by mypy where proxy.py hands
itself and its request to the hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from kanal.dataplane.cache import policy
from kanal.dataplane.cache.rule import RuleCache
from kanal.dataplane.cache.store import CacheStore, Entry, Fill

if TYPE_CHECKING:
    from kanal.dataplane.pool import UpstreamConnection
    from kanal.dataplane.runtime import ProxyContext, UpstreamRuntime


class CacheExchange:
    """The cache's state for the request in progress on a client connection."""

    __slots__ = ("entry", "fill", "key", "outcome", "request", "request_cc", "request_time",
                 "route", "rule", "served", "store", "swallow", "timeout", "url",
                 "client_headers", "fields", "held")

    def __init__(self, store: CacheStore, rule: RuleCache, request: CachedRequest, route: str) -> None:
        self.store = store
        self.rule = rule
        self.request = request
        self.route = route
        self.key = ""
        self.url = ""
        self.outcome = b"BYPASS"
        self.entry: Entry | None = None
        self.fill: Fill | None = None
        self.request_cc = policy.NO_DIRECTIVES
        self.request_time = 0.0
        self.swallow = False
        self.served = 0
        self.timeout: float | None = None
        self.fields: policy.RequestFields | None = None
        self.client_headers: list[tuple[bytes, bytes]] | None = None
        """The request's fields as the client sent them, when the cache changed them."""
        self.held: tuple[Entry, bytes] | None = None
        """The entry this exchange looked up and its body (read from disk if it was
        there), kept so the entry may be served whether it stays in memory or not."""

    def hold(self, entry: Entry, body: bytes | None) -> None:
        self.held = (entry, body) if body is not None else None


def entry_body(exchange: CacheExchange | None, entry: Entry) -> bytes | None:
    """The body to serve `entry` with: in memory, or as the exchange read it."""
    if exchange is None:
        return entry.body
    body = exchange.store.body(entry)
    if body is None and exchange.held is not None and exchange.held[0] is entry:
        body = exchange.held[1]
    return body


def feed_body(exchange: CacheExchange | None, chunk: bytes) -> bool:
    """A piece of the upstream's body for the exchange in progress (the reverse proxy's
    or the forward listener's); True when it is dropped (the cache answered)."""
    if exchange is None:
        return False
    if exchange.swallow:
        return True
    if exchange.fill is not None:
        exchange.fill.feed(chunk)
    return False


def finish_fill(exchange: CacheExchange | None) -> None:
    """The upstream's answer ended cleanly: the exchange's fill, if any, stores what
    streamed (if it may be)."""
    if exchange is not None and exchange.fill is not None:
        fill = exchange.fill
        exchange.fill = None
        fill.finish()


def abort_fill(exchange: CacheExchange | None) -> None:
    """The exchange ends another way: its fill, if any, is dropped (nothing is stored),
    and those waiting for it go on."""
    if exchange is not None and exchange.fill is not None:
        fill = exchange.fill
        exchange.fill = None
        fill.abort()


class CachedRequest(Protocol):
    """A parsed request, as the cache reads it (and rewrites its fields)."""

    headers: list[tuple[bytes, bytes]]
    complete: bool

    @property
    def method(self) -> bytes: ...
    @property
    def target(self) -> bytes: ...
    @property
    def host(self) -> bytes | None: ...
    @property
    def cookie(self) -> bytes | None: ...
    @property
    def keep_alive(self) -> bool: ...
    @property
    def http11(self) -> bool: ...
    @property
    def upgrade(self) -> bool: ...
    @property
    def chunked(self) -> bool: ...
    @property
    def content_length(self) -> bytes | None: ...


class ProxiedRequest(CachedRequest, Protocol):
    """A reverse-proxy request with its exchange (`proxy.Request`): the cache's state
    of it, and how its answer is going (for an answer served from the store)."""

    cache_exchange: CacheExchange | None
    response_close: bool
    response_started: bool
    body_sent: int  # the access log's and /metrics' response body bytes
    cache_outcome: bytes  # the access log's `cache` field, for an answer served here

    @property
    def route_key(self) -> str: ...
    @property
    def hsts(self) -> bytes | None: ...
    @property
    def upstream_runtime(self) -> UpstreamRuntime | None: ...


class CacheClient(Protocol):
    """A client connection, as the cache answers on it or lets it go upstream."""

    upstream: UpstreamConnection | None

    @property
    def context(self) -> ProxyContext: ...
    @property
    def current(self) -> Any: ...
    @property
    def closed(self) -> bool: ...
    @property
    def close_after(self) -> bool: ...

    def _write(self, data: bytes) -> None: ...
    def _end_exchange(self, status: int) -> None: ...
    def _fail_request(self, status: int, reason: str) -> None: ...
    def _abort(self) -> None: ...
    def _request_head(self, request: Any, config: Any) -> bytes: ...
    def _send_upstream(self, request: Any) -> None: ...

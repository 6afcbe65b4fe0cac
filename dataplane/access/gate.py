"""Where the proxy meets a rule's access policy: the I/O edge of `kanal.dataplane.access`.

`admit` is called by `ClientConnection._begin` for a rule whose `Selection.access` is
set, after the route and backend are chosen and before the request head for the
backend is made. It returns True when the exchange is taken over here: refused (the
proxy's own answer, counted in `kanal_access_refused`), or suspended while keys are
fetched. A suspended request keeps its place on the connection: body bytes that arrive
meanwhile are held by the connection (reading pauses past its buffer), as they are
while a connection to the backend is opened, and `ClientConnection._access_passed`
goes on where `_begin` stopped once the policy lets the request through.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

from kanal.dataplane import headers as hdrs
from kanal.dataplane.access.counters import count_refusal
from kanal.dataplane.access.extauth import ExtAuthUnavailable
from kanal.dataplane.access.extauth import ask as ask_ext_auth
from kanal.dataplane.access.extauthpolicy import Allowed, Denied
from kanal.dataplane.access.jwks import KEYS
from kanal.dataplane.access.policy import Access, Grant, NeedKeys, Refusal
from kanal.dataplane.access.ratelimit import RateLimiter
from kanal.dataplane.access.redislimits import RedisUnavailable, redis_limits
from kanal.dataplane.access.sharedlimits import local_buckets
from kanal.dataplane.runtime import ProxyContext


class Request(Protocol):
    """What the gate reads and rewrites of `kanal.dataplane.proxy.Request`, and what it
    leaves on the request's exchange: RateLimit lines for the answer, and a waiter for
    the body while an authorization service needs it."""

    method: bytes
    complete: bool
    body: list[bytes]
    body_size: int
    headers: list[tuple[bytes, bytes]]
    target: bytes
    cookie: bytes | None
    host: bytes | None
    forwarded: dict[bytes, list[bytes]] | None
    decoded: dict[str, str] | None
    access_headers: bytes | None
    body_waiter: Callable[[], None] | None


class ClientConnection(Protocol):
    """What the gate uses of `kanal.dataplane.proxy.ClientConnection` (named by shape,
    so the proxy can import the gate)."""

    context: ProxyContext
    peer: str
    closed: bool

    @property
    def current(self) -> Any: ...

    def _fail_request(self, status: int, reason: str, *, close: bool = ...,
                      location: bytes | None = ..., overloaded: bool = ...,
                      extra_headers: bytes = ..., body: bytes | None = ...) -> None: ...

    def _access_passed(self, request: Any) -> None: ...


def client_address(conn: ClientConnection, request: Request) -> str:
    """The client's address as `--trusted-hops` defines it (X-Real-IP's value)."""
    context = conn.context
    if context.trusted_hops <= 0 or request.forwarded is None:
        return conn.peer
    return hdrs.forwarded_for(peer=conn.peer, scheme=context.scheme, host=request.host,
                              received=request.forwarded,
                              trusted_hops=context.trusted_hops).client


def admit(conn: ClientConnection, request: Request, access: Access) -> bool:
    """Judge `request`; True when it was answered or suspended here."""
    return _decide(conn, request, access, refetched=False)


def _decide(conn: ClientConnection, request: Request, access: Access, *, refetched: bool
            ) -> bool:
    uri = access.jwks_uri
    if uri is not None and access.spec.jwt is not None:
        now = time.monotonic()
        if (uri in KEYS.sets and KEYS.stale(uri, access.spec.jwt.jwks_cache_duration, now)
                and KEYS.may_refetch(uri, now)):
            conn.context.spawn(KEYS.refresh(uri))  # served with the held keys meanwhile
    query = request.target.partition(b"?")[2].decode("latin-1")
    client = client_address(conn, request)
    decision = access.check(request.headers, query, request.cookie, client, time.time(),
                            KEYS.sets)
    if isinstance(decision, Grant):
        rate = access.rate
        if access.spec.ext_auth is not None or (rate is not None
                                                and rate.spec.type == "Global"):
            conn.context.spawn(_finish(conn, request, access, client, decision))
            return True
        if rate is not None:
            keys = rate.keys(client, request.headers, decision.claims)
            allowed, levels = local_buckets().take_all(keys, rate.limits, time.monotonic())
            if _judged(conn, request, access, rate, allowed, levels):
                return True
        _apply(request, decision)
        return False
    if isinstance(decision, Refusal):
        _refuse(conn, access, decision)
        return True
    if refetched or (decision.uri in KEYS.sets and not KEYS.may_refetch(decision.uri,
                                                                       time.monotonic())):
        why = ("the token's key is not known" if decision.kid is not None
               else "the token issuer's keys cannot be fetched")
        _refuse(conn, access, Refusal(
            401, why, "jwt", "key",
            b'WWW-Authenticate: Bearer realm="kanal", error="invalid_token"\r\n'))
        return True
    conn.context.spawn(_fetch_and_resume(conn, request, access, decision))
    return True


async def _fetch_and_resume(conn: ClientConnection, request: Request, access: Access,
                            need: NeedKeys) -> None:
    await KEYS.refresh(need.uri)
    if conn.current is not request or conn.closed:
        return  # answered meanwhile (the rule's timeout) or the client left
    if not _decide(conn, request, access, refetched=True):
        conn._access_passed(request)


async def _body_for_auth(conn: ClientConnection, request: Request, limit: int) -> bytes:
    """The body's first `limit` bytes, waiting for them (or the body's end) while the
    connection buffers the body as it does for a request not yet sent."""

    def enough() -> bool:
        return request.complete or request.body_size >= limit

    if not enough():
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if enough() and not waiter.done():
                waiter.set_result(None)

        request.body_waiter = wake
        try:
            # A body that stalls is answered 408 by the connection's sweep; this bound
            # only ends the wait then.
            await asyncio.wait_for(waiter, conn.context.body_idle_timeout + 1)
        except TimeoutError:
            pass
        finally:
            if request.body_waiter is wake:
                request.body_waiter = None
    return b"".join(request.body)


def _judged(conn: ClientConnection, request: Request, access: Access, rate: RateLimiter,
            allowed: bool, levels: list[float]) -> bool:
    verdict = rate.verdict(allowed, levels)
    if allowed:
        request.access_headers = verdict.headers  # RateLimit on the backend's answer too
        return False
    _refuse(conn, access, Refusal(
        429, f"rate limit {verdict.limit} exceeded; retry in {verdict.retry_after}s",
        "rateLimit", verdict.limit,
        b"Retry-After: %d\r\n%b\r\n" % (verdict.retry_after, verdict.headers)))
    return True


async def _finish(conn: ClientConnection, request: Request, access: Access, client: str,
                  grant: Grant) -> None:
    """The checks that wait for a service: external auth, then a Global rate limit."""
    ext = access.spec.ext_auth
    if ext is not None:
        verdict: Allowed | Denied | None = None
        body = None
        if ext.max_request_bytes:
            body = await _body_for_auth(conn, request, ext.max_request_bytes)
            if conn.current is not request or conn.closed:
                return
        try:
            verdict = await ask_ext_auth(ext, request.method, request.target, request.headers,
                                         client, conn.context.scheme, request.host, body)
        except ExtAuthUnavailable:
            if conn.current is not request or conn.closed:
                return
            if ext.failure_mode == "Closed":
                _refuse(conn, access, Refusal(
                    503, "the authorization service is unavailable", "extAuth", "unavailable"))
                return
        if conn.current is not request or conn.closed:
            return
        if isinstance(verdict, Denied):
            count_refusal(access.name, "extAuth", str(verdict.status))
            conn._fail_request(verdict.status, "refused by the authorization service",
                               extra_headers=verdict.headers, body=verdict.body)
            return
        if verdict is not None:
            grant.drop.update(verdict.drop)
            grant.add.extend(verdict.add)
    rate = access.rate
    if rate is not None:
        keys = rate.keys(client, request.headers, grant.claims)
        if rate.spec.type == "Global":
            try:
                allowed, levels = await redis_limits().take_all(
                    rate.spec.scope or access.name, keys, rate.limits)
            except RedisUnavailable:
                if conn.current is not request or conn.closed:
                    return
                if rate.spec.failure_mode == "Closed":
                    _refuse(conn, access, Refusal(
                        503, "the rate limit cannot be checked (its Redis is unavailable)",
                        "rateLimit", "redis-unavailable"))
                    return
                allowed, levels = True, []
            if conn.current is not request or conn.closed:
                return
        else:
            allowed, levels = local_buckets().take_all(keys, rate.limits, time.monotonic())
        if levels and _judged(conn, request, access, rate, allowed, levels):
            return
    _apply(request, grant)
    conn._access_passed(request)


def _refuse(conn: ClientConnection, access: Access, refusal: Refusal) -> None:
    count_refusal(access.name, refusal.policy, refusal.cause)
    conn._fail_request(refusal.status, refusal.reason, extra_headers=refusal.headers)


def _apply(request: Request, grant: Grant) -> None:
    """Make the request the backend gets: credentials out, identity in."""
    drop = grant.drop
    cookie = grant.drop_cookie
    if drop or cookie is not None:
        kept: list[tuple[bytes, bytes]] = []
        for name, value in request.headers:
            lower = name.lower()
            if lower in drop:
                continue
            if cookie is not None and lower == b"cookie":
                value = _without_cookie(value, cookie)
                if not value:
                    continue
            kept.append((name, value))
        request.headers = kept
    if grant.add:
        request.headers.extend(grant.add)
    if grant.query is not None:
        path = request.target.partition(b"?")[0]
        query = grant.query.encode("latin-1")
        request.target = path + b"?" + query if query else path
    request.decoded = None


def _without_cookie(header: bytes, name: str) -> bytes:
    wanted = name.encode("latin-1")
    parts = [part.strip() for part in header.split(b";")]
    return b"; ".join(part for part in parts
                      if part and part.partition(b"=")[0].strip() != wanted)

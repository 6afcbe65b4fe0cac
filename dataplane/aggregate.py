"""Request aggregation, the I/O part: an aggregate rule's sub-requests, sent at once,
each to its Upstream with its own timeout, and the merged answer handed back to the
request logic as if an upstream had made it.

Each sub-request takes the Upstream's usual path: its balancer and circuit breakers
choose the endpoint (an open circuit is skipped, a failure is counted), its pool lends
the connection (HTTP/1 or HTTP/2), and the rule's `retries` policy decides, through
`retry.retry_kind`, whether a failed try is tried again on another endpoint. The merged
answer reaches the client through `ResponseSink` like any upstream's, so forwarding,
HSTS, metrics and both HTTP versions treat it the same.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from kanal.contract.snapshot import AggregatePart, Rule
from kanal.dataplane.aggregation import (
    MAX_PART_BODY,
    MissingValue,
    PartResult,
    fill,
    merge,
    path_parameters,
)
from kanal.dataplane.pool import (
    EndpointPool,
    ResponseSink,
    UpstreamConnectError,
    UpstreamConnection,
)
from kanal.dataplane.retry import FailedTry, retry_kind

if TYPE_CHECKING:
    from kanal.dataplane.runtime import Config, UpstreamRuntime


class AggregateClient(ResponseSink, Protocol):
    """What the request logic (`proxy.ClientConnection`) offers an aggregate: the
    client's address, the upstream side it pairs with, and its answer path."""

    peer: str
    upstream: UpstreamConnection | None


class AggregateRequest(Protocol):
    """What an aggregate reads and sets of the request's exchange (`proxy.Request`)."""

    upstream_key: str

    @property
    def target(self) -> bytes: ...
    @property
    def host(self) -> bytes | None: ...

    def get(self, name: str, default: str | None = None) -> str | None: ...


PartHeaders = Callable[[list[tuple[bytes, bytes]]], list[tuple[bytes, bytes]]]
"""The rule's request header filters, applied to a part's own headers."""


def begin(client: AggregateClient, request: AggregateRequest, rule: Rule, config: Config,
          part_headers: PartHeaders | None = None) -> None:
    """Answer `request`, the current one of `client`, with `rule`'s aggregate."""
    answer = AggregateAnswer()
    client.upstream = answer  # a client that leaves aborts it, which cancels the parts
    request.upstream_key = "aggregate"
    answer.task = asyncio.get_running_loop().create_task(
        _run(client, answer, request.target, request.host, request.get, rule, config,
             part_headers))


class AggregateAnswer(UpstreamConnection):
    """The merged answer, in the shape of an upstream's."""

    __slots__ = ("task",)

    def __init__(self) -> None:
        super().__init__(_NO_POOL)
        self.task: asyncio.Task[None] | None = None

    def release(self) -> None:
        self.closed = True

    def close(self) -> None:
        self.abort()

    def abort(self) -> None:
        self.closed = True
        if self.task is not None and not self.task.done():
            self.task.cancel()


_NO_POOL = EndpointPool("127.0.0.1", 0)


async def _run(client: AggregateClient, answer: AggregateAnswer, target: bytes,
               host: bytes | None, header: Callable[[str], str | None], rule: Rule,
               config: Config, part_headers: PartHeaders | None) -> None:
    aggregate = rule.aggregate
    assert aggregate is not None
    path, _, query = target.decode("latin-1").partition("?")
    try:
        params = path_parameters(rule, path)
        targets = [fill(part.path, params, query, header) for part in aggregate.parts]
    except MissingValue as exc:
        status, body = 400, b'{"error": "%s"}' % str(exc).encode().replace(b'"', b"'")
    else:
        authority = host.decode("latin-1") if host is not None else ""
        # The rule's timeout bounds the whole aggregate: past it, parts still running
        # are cancelled and count as late.
        deadline = (asyncio.get_running_loop().time() + rule.timeout if rule.timeout
                    else None)
        results = await asyncio.gather(*(
            _part(part, part_target, rule, config, authority, client.peer, part_headers,
                  deadline)
            for part, part_target in zip(aggregate.parts, targets, strict=True)))
        status, body = merge(results, aggregate.on_error)
    deliver(client, answer, status, body)


def deliver(client: AggregateClient, answer: AggregateAnswer, status: int, body: bytes) -> None:
    """Hand a JSON answer to the request logic, as an upstream's (unless it let go)."""
    if answer.closed or client.upstream is not answer:
        return
    answer.status = status
    answer.headers = [(b"Content-Type", b"application/json")]
    answer.content_length = b"%d" % len(body)
    client.response_head(answer)
    if client.upstream is answer:
        client.response_body(body)
        client.response_done(answer)


async def _part(part: AggregatePart, target: str, rule: Rule, config: Config,
                authority: str, peer: str, part_headers: PartHeaders | None,
                deadline: float | None) -> PartResult:
    upstream = config.upstreams.get(part.upstream)
    if upstream is None:
        return PartResult(part.name, error=f"upstream {part.upstream} does not exist")
    own = asyncio.get_running_loop().time() + part.timeout
    try:
        async with asyncio.timeout_at(own if deadline is None else min(own, deadline)):
            return await _tries(part, target, rule, upstream, authority, peer, part_headers)
    except TimeoutError:
        if deadline is not None and deadline < own:
            assert rule.timeout is not None
            return PartResult(part.name, error=f"no answer within the rule's timeout "
                                               f"({rule.timeout:g}s)", overdue=True)
        return PartResult(part.name, error=f"no answer within {part.timeout:g}s")


async def _tries(part: AggregatePart, target: str, rule: Rule, upstream: UpstreamRuntime,
                 authority: str, peer: str, part_headers: PartHeaders | None) -> PartResult:
    """Tries of one part, as the rule's retry policy allows."""
    fields = [(b"Host", (authority or upstream.key).encode("latin-1")),
              (b"Accept", b"application/json"), (b"X-Forwarded-For", peer.encode("latin-1"))]
    if part_headers is not None:
        fields = part_headers(fields)
    lines = [f"{part.method} {target} HTTP/1.1".encode("latin-1"),
             *(name + b": " + value for name, value in fields)]
    if part.method in ("POST", "PUT", "PATCH"):
        lines.append(b"Content-Length: 0")
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    result, _ = await exchange(part.name, part.method, head, b"", rule, upstream)
    return result


async def exchange(name: str, method: str, head: bytes, body: bytes, rule: Rule,
                   upstream: UpstreamRuntime, *, try_head: Callable[[], bytes] | None = None,
                   ) -> tuple[PartResult, list[tuple[bytes, bytes]]]:
    """One request to `upstream` (its head and whole body), tried as the rule's retry
    policy allows: the answer, and its head's fields and trailers. `try_head`, when
    given, makes each try's head as that try goes out (a gRPC call's time left)."""
    retries = rule.retries
    attempts_left = retries.attempts if retries is not None else 0
    implicit_used = 0
    exclude = None
    last = PartResult(name, error=f"upstream {upstream.key} has no available endpoints")
    fields: list[tuple[bytes, bytes]] = []
    while True:
        state = upstream.pick(None, exclude)
        if state is None:
            return last, fields
        state.active += 1
        started = time.monotonic()
        outcome: bool | None = None
        refused = False
        try:
            try:
                conn = upstream.pools[state.key].take_idle() or await upstream.pools[
                    state.key].connect()
            except UpstreamConnectError as exc:
                outcome, refused = False, True
                condition, reached = "connect-failure", False
                last = PartResult(name, error=str(exc))
            else:
                collector = _Collector(conn)
                conn.start(collector, head if try_head is None else try_head(),
                           method == "HEAD")
                if body:
                    conn.write(body)
                try:
                    status, answer = await collector.future
                except _PartFailed as exc:
                    outcome = False
                    condition, reached = ("timeout" if exc.timeout else "reset"), True
                    last = PartResult(name, error=str(exc))
                else:
                    fields = collector.fields
                    outcome = status < 500
                    if outcome:
                        return PartResult(name, status, answer), fields
                    condition, reached = str(status), True
                    last = PartResult(name, status, answer)
                finally:
                    future = collector.future
                    if not future.done() or future.cancelled():
                        # Late: a timeout ran out (its cancellation cancels the future).
                        conn.sink = None
                        conn.abort()
        finally:
            state.active -= 1
            upstream.report(state, outcome, time.monotonic() - started, refused=refused)
        kind = retry_kind(FailedTry(condition, reached, method.encode(), bool(body), True),
                          retries, endpoints=len(upstream.states), implicit_used=implicit_used,
                          attempts_left=attempts_left, already_retrying=False,
                          budget_allows=upstream.retry_allowed())
        if kind is None:
            return last, fields
        if kind == "implicit":
            implicit_used += 1
        else:
            attempts_left -= 1
        upstream.metrics.count_event("retry", upstream.key)
        exclude = state


class _PartFailed(Exception):
    def __init__(self, reason: str, *, timeout: bool = False) -> None:
        super().__init__(reason)
        self.timeout = timeout


class _Collector:
    """A sub-request's answer, read whole (bounded) for the merge."""

    batch: list[bytes] | None = None

    def __init__(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        self.future: asyncio.Future[tuple[int, bytes]] = (
            asyncio.get_running_loop().create_future())
        self.status = 0
        self.body = bytearray()
        self.fields: list[tuple[bytes, bytes]] = []  # the head's, then the trailers

    def _fail(self, reason: str, *, timeout: bool = False) -> None:
        if not self.future.done():
            self.future.set_exception(_PartFailed(reason, timeout=timeout))

    def response_head(self, conn: UpstreamConnection) -> None:
        self.status = conn.status
        self.fields = list(conn.headers)

    def response_body(self, chunk: bytes) -> None:
        self.body += chunk
        if len(self.body) > MAX_PART_BODY:
            self.conn.sink = None
            self.conn.abort()
            self._fail(f"answer larger than {MAX_PART_BODY} bytes")

    def response_done(self, conn: UpstreamConnection) -> None:
        if conn.trailers:
            self.fields += conn.trailers
        conn.release()
        if not self.future.done():
            self.future.set_result((self.status, bytes(self.body)))

    def upstream_failed(self, conn: UpstreamConnection, reason: str,
                        exc: BaseException | None) -> None:
        self._fail(reason, timeout=isinstance(exc, TimeoutError))

    def upstream_upgraded(self, conn: UpstreamConnection, rest: bytes) -> None:
        conn.abort()
        self._fail("upstream switched protocols")

    def upstream_pause_writing(self) -> None:
        return

    def upstream_resume_writing(self) -> None:
        return

    def end_batch(self) -> None:
        self.batch = None

    def flush(self, batch: list[bytes]) -> None:
        return

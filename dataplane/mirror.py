"""RequestMirror: a copy of a request sent to another Upstream, fire-and-forget.

The copy never touches the client's exchange: it waits for the request's body beside
the real exchange (keeping at most the filter's `maxBodySize`; a larger body is not
mirrored), then goes out on a task of its own through the mirror Upstream's pools and
admission limits. Its answer is read and thrown away; its slowness, failure or absence
is counted (`kanal_upstream_events{event="mirrored"|"mirror_failed"|"mirror_skipped"}`
on the mirror Upstream) and nothing else. A mirror never opens a connection past the
Upstream's `maxConnections`, and never waits for one: it is dropped and counted.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from kanal.dataplane.pool import UpstreamConnectError, UpstreamConnection

if TYPE_CHECKING:
    from kanal.contract.snapshot import RequestMirror
    from kanal.dataplane.metrics import RequestMetrics
    from kanal.dataplane.runtime import Config, ProxyContext, UpstreamRuntime

log = logging.getLogger("kanal.mirror")

_CHUNK_END = b"0\r\n\r\n"


class _Discard:
    """A ResponseSink that reads the mirror's answer and throws it away."""

    __slots__ = ("batch", "key", "metrics")

    def __init__(self, metrics: RequestMetrics, key: str) -> None:
        self.metrics = metrics
        self.key = key
        self.batch: list[bytes] | None = None

    def response_head(self, conn: UpstreamConnection) -> None:
        return None

    def response_body(self, chunk: bytes) -> None:
        return None

    def response_done(self, conn: UpstreamConnection) -> None:
        conn.release()
        self.metrics.count_event("mirrored", self.key)

    def upstream_failed(self, conn: UpstreamConnection, reason: str,
                        exc: BaseException | None) -> None:
        conn.abort()
        self.metrics.count_event("mirror_failed", self.key)
        log.debug("mirror to %s failed: %s", self.key, reason)

    def upstream_upgraded(self, conn: UpstreamConnection, rest: bytes) -> None:
        conn.abort()
        self.metrics.count_event("mirror_failed", self.key)

    def upstream_pause_writing(self) -> None:
        return None

    def upstream_resume_writing(self) -> None:
        return None

    def end_batch(self) -> None:
        self.batch = None

    def flush(self, batch: list[bytes]) -> None:
        return None


class MirrorCopy:
    """One request's copies, waiting for its body (bounded) before they go out."""

    __slots__ = ("chunked", "chunks", "context", "head", "head_only", "size", "targets")

    def __init__(self, context: ProxyContext, targets: list[tuple[UpstreamRuntime, int]],
                 head: bytes, *, chunked: bool, head_only: bool) -> None:
        self.context = context
        self.targets = targets
        self.head = head
        self.chunked = chunked
        self.head_only = head_only
        self.chunks: list[bytes] | None = []
        self.size = 0

    def feed(self, chunk: bytes) -> None:
        """More of the request's body (as decoded by the parser)."""
        chunks = self.chunks
        if chunks is None:
            return
        self.size += len(chunk)
        kept = []
        for target in self.targets:
            if self.size <= target[1]:
                kept.append(target)
            else:
                self.context.metrics.count_event("mirror_skipped", target[0].key)
        self.targets = kept
        if not kept:
            self.chunks = None  # too large for every mirror: nothing more is kept
            return
        chunks.append(chunk)

    def complete(self) -> None:
        """The body is whole: send the copies."""
        chunks = self.chunks
        self.chunks = None
        if chunks is None:
            return
        body = b"".join(chunks)
        if self.chunked:
            body = (b"%x\r\n%b\r\n" % (len(body), body) if body else b"") + _CHUNK_END
        for upstream, _ in self.targets:
            self.context.spawn(_send(upstream, self.head, body, self.context.metrics,
                                     self.head_only))


def start(context: ProxyContext, config: Config, mirrors: list[RequestMirror], head: bytes,
          *, body: list[bytes], complete: bool, chunked: bool, head_only: bool
          ) -> MirrorCopy | None:
    """Begin mirroring a request whose `head` is ready; None once nothing more is needed.

    `body` is what arrived of the body so far; the caller feeds the rest to the copy
    and calls `complete` at the end of the body.
    """
    targets: list[tuple[UpstreamRuntime, int]] = []
    for spec in mirrors:
        upstream = config.upstreams.get(spec.upstream)
        if upstream is None:
            context.metrics.count_event("mirror_failed", spec.upstream)
            continue
        targets.append((upstream, spec.max_body_size))
    if not targets:
        return None
    copy = MirrorCopy(context, targets, head, chunked=chunked, head_only=head_only)
    for chunk in body:
        copy.feed(chunk)
    if complete:
        copy.complete()
        return None
    return copy


async def _send(upstream: UpstreamRuntime, head: bytes, body: bytes, metrics: RequestMetrics,
                head_only: bool) -> None:
    """Send one copy through the mirror Upstream's pools; count how it went."""
    key = upstream.key
    state = upstream.balancer.pick(None, None)
    if state is None or (state.breaker is not None and state.breaker.state != "closed"):
        metrics.count_event("mirror_failed", key)
        return
    pool = upstream.pools[state.key]
    conn = pool.take_idle()
    if conn is None:
        settings = upstream.spec.circuit_breaker
        if upstream.limits.admit(settings.max_connections, 0) != "connect":
            metrics.count_event("mirror_failed", key)
            return
        try:
            conn = await pool.connect()
        except UpstreamConnectError as exc:
            metrics.count_event("mirror_failed", key)
            log.debug("mirror to %s failed: %s", key, exc)
            return
    conn.start(_Discard(metrics, key), head, head_only)
    if body:
        conn.write(body)

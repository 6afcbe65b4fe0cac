"""Whether a failed try is tried again: a pure decision, no sockets, no clock.

Two kinds of retry exist. A connect failure never left the proxy, so another endpoint
is always safe, with or without a retry policy (what nginx's `proxy_next_upstream`
does for errors): that is an *implicit* retry, limited to a few endpoints. Everything
else needs the rule's `retries` policy: a matching condition, attempts left, an
idempotent method once the upstream was reached, and the body kept for replay.
The retry budget (a share of requests in flight) is the caller's to check, as it
depends on live counters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kanal.contract.grpc import STATUS_CODES
from kanal.contract.snapshot import Retries

IMPLICIT_CONNECT_RETRIES = 2
"""Other endpoints tried after a connect failure, even without a retry policy."""
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})

RetryKind = Literal["implicit", "policy"]


@dataclass(frozen=True, slots=True)
class FailedTry:
    """What is known about one failed try, for the decision."""

    condition: str
    """`connect-failure`, `reset`, `timeout`, an answer's status code such as `503`, or
    the name of a gRPC answer's status such as `unavailable`."""
    reached: bool
    """Whether the request may have reached the upstream."""
    method: bytes
    has_body: bool
    body_kept: bool
    """Whether the whole body is kept for replay."""


def retry_kind(failure: FailedTry, retries: Retries | None, *, endpoints: int,
               implicit_used: int, attempts_left: int, already_retrying: bool,
               budget_allows: bool) -> RetryKind | None:
    """How `failure` may be retried (`implicit` or `policy`), or None when it may not.

    `budget_allows` says whether the upstream's retry budget has room; an implicit retry
    of the first try needs no budget (it never reached an upstream).
    """
    implicit_limit = min(endpoints - 1, IMPLICIT_CONNECT_RETRIES)
    if (not failure.reached and failure.condition == "connect-failure"
            and implicit_used < implicit_limit and (budget_allows or not already_retrying)):
        return "implicit"
    if retries is None or attempts_left <= 0 or not retry_matches(retries.retry_on,
                                                                   failure.condition):
        return None
    if (failure.reached and failure.method not in IDEMPOTENT_METHODS
            and failure.condition not in STATUS_CODES):
        # A gRPC status the rule names (every gRPC call is a POST) is retried whatever
        # the method: the server chose to answer it, as Envoy's retry-grpc-on does.
        return None
    if failure.has_body and not failure.body_kept:
        return None
    return "policy"


def retry_matches(retry_on: tuple[str, ...], condition: str) -> bool:
    """Does a failure condition (`connect-failure`, `reset`, `timeout`, or a status) qualify?

    A per-try timeout is what would have been answered 504, so `504` covers it too;
    `5xx` covers every 5xx status, resets and timeouts (Envoy's meaning).
    """
    if condition in retry_on:
        return True
    if condition == "timeout":
        return "504" in retry_on or "5xx" in retry_on
    if condition.isdigit():
        return condition.startswith("5") and "5xx" in retry_on
    return "5xx" in retry_on and condition in ("reset", "connect-failure")

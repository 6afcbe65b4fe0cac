"""The proxy's decisions as pure functions: retries, TLS policy, admission. No sockets."""

from __future__ import annotations

from kanal.contract.snapshot import Hsts, Retries, RouteTLS
from kanal.dataplane.limits import UpstreamLimits
from kanal.dataplane.retry import FailedTry, retry_kind, retry_matches
from kanal.dataplane.tlspolicy import hsts_value, tls_answer


def failed(condition: str, *, reached: bool = True, method: bytes = b"GET",
           has_body: bool = False, body_kept: bool = False) -> FailedTry:
    return FailedTry(condition, reached, method, has_body, body_kept)


def kind(failure: FailedTry, retries: Retries | None, **overrides: object) -> str | None:
    settings: dict[str, object] = dict(endpoints=3, implicit_used=0, attempts_left=1,
                                       already_retrying=False, budget_allows=True)
    settings.update(overrides)
    return retry_kind(failure, retries, **settings)  # type: ignore[arg-type]


def test_a_connect_failure_tries_another_endpoint_without_a_policy() -> None:
    assert kind(failed("connect-failure", reached=False), None) == "implicit"
    # but only while there are other endpoints, and at most two of them
    assert kind(failed("connect-failure", reached=False), None, endpoints=1) is None
    assert kind(failed("connect-failure", reached=False), None, endpoints=9, implicit_used=2) is None


def test_a_policy_retry_needs_a_matching_condition_and_attempts_left() -> None:
    policy = Retries(attempts=2, retry_on=("503",))
    assert kind(failed("503"), policy) == "policy"
    assert kind(failed("502"), policy) is None
    assert kind(failed("503"), policy, attempts_left=0) is None
    assert kind(failed("503"), None) is None


def test_a_request_that_reached_the_upstream_is_retried_only_if_idempotent() -> None:
    policy = Retries(attempts=1, retry_on=("reset",))
    assert kind(failed("reset", method=b"POST"), policy) is None
    assert kind(failed("reset", method=b"PUT"), policy) == "policy"
    assert kind(failed("reset", method=b"PUT", has_body=True), policy) is None
    assert kind(failed("reset", method=b"PUT", has_body=True, body_kept=True), policy) == "policy"


def test_5xx_covers_statuses_resets_and_timeouts_and_504_covers_timeouts() -> None:
    assert retry_matches(("5xx",), "500") and retry_matches(("5xx",), "reset")
    assert retry_matches(("504",), "timeout") and not retry_matches(("503",), "timeout")
    assert not retry_matches(("5xx",), "404")


def test_plain_http_to_a_redirecting_route_is_a_308_to_https() -> None:
    tls = RouteTLS(secret="s", cert_pem="PEM", redirect_http=True)
    answer = tls_answer(scheme="http", route_key="shop/r", tls=tls, host="shop.test:8080",
                        target=b"/cart?x=1", https_port=8443, misdirected=False,
                        server_name=None)
    assert answer is not None and answer.status == 308
    assert answer.location == b"https://shop.test:8443/cart?x=1"
    assert tls_answer(scheme="http", route_key="shop/r", tls=tls, host="shop.test",
                      target=b"/", https_port=443, misdirected=False,
                      server_name=None).location == b"https://shop.test/"  # type: ignore[union-attr]


def test_https_misdirected_is_421_and_hsts_is_spelled() -> None:
    answer = tls_answer(scheme="https", route_key="shop/r", tls=None, host="b.test",
                        target=b"/", https_port=None, misdirected=True, server_name="a.test")
    assert answer is not None and answer.status == 421 and "a.test" in answer.reason
    assert hsts_value(RouteTLS(secret="s", hsts=Hsts(max_age=60, include_sub_domains=True))
                      ) == b"max-age=60; includeSubDomains"
    assert hsts_value(RouteTLS(secret="s")) is None


def test_admission_connects_then_queues_then_refuses() -> None:
    limits = UpstreamLimits()
    assert limits.admit(1, 1) == "connect"
    limits.connection_opened()
    assert limits.admit(1, 1) == "wait"
    limits.wait(lambda: None)
    assert limits.admit(1, 1) == "refuse"
    limits.waiters.clear()
    limits.pending = 0
    limits.connection_closed()
    assert limits.admit(1, 1) == "connect"


def test_a_repeated_header_is_matched_as_the_backend_reads_it() -> None:
    from kanal.dataplane.proxy import Request

    request = Request()
    request.headers = [(b"X-Role", b"admin"), (b"x-role", b"user"), (b"Accept", b"*/*")]
    assert request.get("x-role") == "admin, user"
    assert request.get("accept") == "*/*"

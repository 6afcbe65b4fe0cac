"""The pure parts of HTTP/2 and gRPC: the h2c preface, a stream's head as HTTP/1.1,
flood counters, gRPC statuses and timeouts, and retries on gRPC status names."""

from __future__ import annotations

import pytest

from kanal.contract.snapshot import Retries
from kanal.dataplane import grpc, h2rules
from kanal.dataplane.retry import FailedTry, retry_kind

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@pytest.mark.parametrize("split", range(1, len(PREFACE)))
def test_the_preface_is_found_however_the_reads_split_it(split):
    frames = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    # llhttp pauses in the read that completes `PRI * HTTP/2.0\r\n\r\n`.
    data = PREFACE + frames
    pause_read = data[split:] if split < 18 else data
    if split >= 18:
        assert h2rules.preface_rest(data) == data
    else:
        assert h2rules.preface_rest(pause_read) == data


def test_not_a_preface():
    assert h2rules.preface_rest(b"\r\nXX\r\n") is None
    assert h2rules.preface_rest(b"GET / HTTP/1.1\r\n") is None


def test_request_head_is_http11_with_host_from_authority():
    head = h2rules.request_head([
        (b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"a.test"),
        (b":path", b"/x?y=1"), (b"host", b"other.test"), (b"te", b"trailers"),
        (b"content-type", b"application/grpc"), (b"grpc-timeout", b"250m"),
        (b"cookie", b"a=1"), (b"cookie", b"b=2"),
    ], ended=False)
    assert not isinstance(head, str)
    # grpc-timeout is left out: the proxy writes the time left when it sends upstream.
    assert head.head == (b"POST /x?y=1 HTTP/1.1\r\nhost: a.test\r\ncontent-type: application/grpc"
                         b"\r\ncookie: a=1\r\ncookie: b=2\r\n"
                         b"transfer-encoding: chunked\r\n\r\n")
    assert head.chunked and head.grpc and head.grpc_timeout == 0.25


def test_grpc_timeout_of_a_request_that_is_not_grpc_passes_unchanged():
    head = h2rules.request_head([(b":method", b"GET"), (b":path", b"/"),
                                 (b"grpc-timeout", b"1S")], ended=True)
    assert not isinstance(head, str)
    assert b"grpc-timeout: 1S\r\n" in head.head and head.grpc_timeout is None


@pytest.mark.parametrize("headers", [
    [(b"x", b"a\r\nx-injected: 1")],
    [(b"x", b"a\nb")],
    [(b"x", b"a\x00")],
    [(b"bad name", b"1")],
    [(b"bad:name", b"1")],
])
def test_fields_http1_would_read_otherwise_are_refused(headers):
    base = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")]
    assert isinstance(h2rules.request_head(base + headers, ended=True), str)


def test_a_path_with_spaces_is_refused():
    refused = h2rules.request_head([(b":method", b"GET"), (b":path", b"/a b HTTP/1.1\r\nx")],
                                   ended=True)
    assert isinstance(refused, str)


def test_response_headers_drop_hop_by_hop_and_named_fields():
    block = h2rules.response_headers(200, [(b"Connection", b"x-private"), (b"X-Private", b"1"),
                                           (b"Keep-Alive", b"5"), (b"X-Kept", b"2")])
    assert block == [(b":status", b"200"), (b"x-kept", b"2")]


def test_window_counter_resets_each_window():
    counter = h2rules.WindowCounter(limit=3, window=10)
    assert [counter.hit(100.0) for _ in range(4)] == [False, False, False, True]
    assert counter.hit(111.0) is False


@pytest.mark.parametrize(("value", "seconds"), [
    (b"1S", 1.0), (b"250m", 0.25), (b"2M", 120.0), (b"1H", 3600.0), (b"5000u", 0.005),
    (b"", None), (b"S", None), (b"123456789S", None), (b"1x", None), (b"-1S", None)])
def test_grpc_timeout(value, seconds):
    assert grpc.parse_timeout(value) == (pytest.approx(seconds) if seconds else None)


def test_grpc_statuses_for_the_proxys_answers():
    assert grpc.status_for_http(503) == 14 and grpc.status_for_http(502) == 14
    assert grpc.status_for_http(504) == 4 and grpc.status_for_http(404) == 12
    assert grpc.status_for_http(413) == 8 and grpc.status_for_http(418) == 2
    assert grpc.encode_message("a%b é") == b"a%25b %C3%A9"
    assert grpc.is_grpc(b"application/grpc+proto") and not grpc.is_grpc(b"application/json")
    assert grpc.status_name(b"14") == "unavailable" and grpc.status_name(b"0") is None


def test_grpc_status_names_are_retried_whatever_the_method():
    retries = Retries(attempts=2, retry_on=("unavailable",))
    failure = FailedTry("unavailable", True, b"POST", True, True)
    assert retry_kind(failure, retries, endpoints=2, implicit_used=0, attempts_left=2,
                      already_retrying=False, budget_allows=True) == "policy"
    other = FailedTry("internal", True, b"POST", True, True)
    assert retry_kind(other, retries, endpoints=2, implicit_used=0, attempts_left=2,
                      already_retrying=False, budget_allows=True) is None


def test_grpc_health_messages():
    assert grpc.health_request("") == b"\x00\x00\x00\x00\x00"
    assert grpc.health_request("a.B") == b"\x00\x00\x00\x00\x05\x0a\x03a.B"
    assert grpc.health_status(b"\x00\x00\x00\x00\x02\x08\x01") == grpc.SERVING
    assert grpc.health_status(b"\x00\x00\x00\x00\x02\x08\x02") == 2  # NOT_SERVING
    assert grpc.health_status(b"\x00\x00\x00\x00\x00") == 0  # UNKNOWN: the field's default
    assert grpc.health_status(b"\x01\x00\x00\x00\x02\x08\x01") is None  # compressed
    assert grpc.health_status(b"\x00\x00\x00\x00\x09\x08") is None  # cut short


@pytest.mark.parametrize(("seconds", "wire"), [
    (0.25, b"250m"), (2.0, b"2000m"), (0.0, b"0m"), (-1.0, b"0m"),
    (99_999.999, b"99999999m"), (100_000.0, b"100000S"), (1e9, b"16666666M"),
    (1e12, b"99999999H")])
def test_grpc_timeout_written_in_the_finest_unit_that_fits_eight_digits(seconds, wire):
    assert grpc.format_timeout(seconds) == wire
    assert grpc.parse_timeout(wire) <= max(seconds, 0.0)  # never later than asked


def test_grpc_timeout_is_added_as_the_heads_last_field():
    head = b"POST /a HTTP/1.1\r\nhost: a\r\n\r\n"
    assert grpc.with_timeout(head, 1.5) == b"POST /a HTTP/1.1\r\nhost: a\r\ngrpc-timeout: 1500m\r\n\r\n"

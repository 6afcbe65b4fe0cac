"""The access log's two spellings of a record (pure: no I/O)."""

from __future__ import annotations

import json

import pytest

from kanal.dataplane.logformat import FIELDS, Formatter, select

EPOCH = 1767323045.678  # 2026-01-02T03:04:05.678Z


def record(**changes: object) -> tuple[object, ...]:
    values = {
        "time": EPOCH, "listener": "reverse", "client": "127.0.0.1", "method": b"GET",
        "host": "shop.test", "path": b"/a?b=c", "protocol": "HTTP/1.1", "status": 200,
        "bytesIn": 0, "bytesOut": 12, "duration": 0.0125, "upstreamTime": 0.01,
        "route": "shop/web", "rule": "main", "upstream": "shop/app",
        "endpoint": "127.0.0.1:9", "retries": 1, "cache": "", "policy": "",
        "requestId": b"abc-1", "traceId": 0x4BF92F3577B34DA6A3CE929D0E0E4736,
    }
    values.update(changes)
    return tuple(values[name] for name in FIELDS)


ALL = select(FIELDS)


def test_json_has_every_field_typed() -> None:
    line = json.loads(Formatter(ALL, "json").line(record()))
    assert line == {
        "time": "2026-01-02T03:04:05.678Z", "listener": "reverse", "client": "127.0.0.1",
        "method": "GET", "host": "shop.test", "path": "/a?b=c", "protocol": "HTTP/1.1",
        "status": 200, "bytesIn": 0, "bytesOut": 12, "duration": 0.0125,
        "upstreamTime": 0.01, "route": "shop/web", "rule": "main", "upstream": "shop/app",
        "endpoint": "127.0.0.1:9", "retries": 1, "cache": "", "policy": "",
        "requestId": "abc-1", "traceId": "4bf92f3577b34da6a3ce929d0e0e4736",
    }


@pytest.mark.parametrize("path", [b'/q"uote', b"/back\\slash", b"/new\nline", b"/caf\xe9",
                                  b"/%s%d{}"])
def test_any_path_stays_one_valid_line(path: bytes) -> None:
    text = Formatter(ALL, "json").line(record(path=path))
    assert "\n" not in text
    assert json.loads(text)["path"] == path.decode("latin-1")
    logfmt = Formatter(select(["path", "status"]), "text").line(record(path=path))
    assert "\n" not in logfmt and logfmt.endswith(" status=200")
    shown = logfmt[len("path="):-len(" status=200")]
    assert (json.loads(shown) if shown.startswith('"') else shown) == path.decode("latin-1")


def test_text_is_logfmt_in_the_order_chosen_with_dashes_for_empty_values() -> None:
    chosen = select(["status", "method", "path", "upstreamTime", "rule", "cache", "traceId"])
    assert Formatter(chosen, "text").line(record(upstreamTime=None, rule=0, traceId=None)) == (
        'status=200 method=GET path="/a?b=c" upstreamTime=- rule=0 cache=- traceId=-')


def test_missing_values_are_empty_strings_in_json() -> None:
    line = json.loads(Formatter(select(["upstreamTime", "requestId", "traceId", "rule"]), "json")
                      .line(record(upstreamTime=None, requestId=None, traceId=None, rule=3)))
    assert line == {"upstreamTime": "", "requestId": "", "traceId": "", "rule": 3}


def test_unknown_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown access log field colour"):
        select(["status", "colour"])
    with pytest.raises(ValueError, match="unknown access log format"):
        Formatter(ALL, "xml")

"""REST-to-gRPC transcoding's pure part: path templates, HTTP rules from method
options, and the statuses of gRPC errors."""

from __future__ import annotations

import pytest

from kanal.dataplane.grpcjson import _compile, _http_rules, error_json


@pytest.mark.parametrize(("template", "path", "groups"), [
    ("/v1/shelves/{shelf}/books/{book_id}", "/v1/shelves/a/books/7", ("a", "7")),
    ("/v1/{name=shelves/*}/books", "/v1/shelves/x/books", ("shelves/x",)),
    ("/v1/{path=files/**}", "/v1/files/a/b/c", ("files/a/b/c",)),
    ("/v1/books/{id}:publish", "/v1/books/9:publish", ("9",)),
])
def test_templates(template, path, groups):
    pattern, _ = _compile(template)
    found = pattern.fullmatch(path)
    assert found is not None and found.groups() == groups


def test_a_segment_variable_takes_one_segment():
    pattern, fields = _compile("/v1/shelves/{shelf}")
    assert fields == ("shelf",)
    assert pattern.fullmatch("/v1/shelves/a/b") is None


def _field(number: int, payload: bytes) -> bytes:
    key = (number << 3) | 2
    out = bytearray()
    while True:
        byte = key & 0x7F
        key >>= 7
        out.append(byte | (0x80 if key else 0))
        if not key:
            break
    return bytes(out) + bytes([len(payload)]) + payload


def test_http_rules_with_additional_bindings():
    extra = _field(4, b"/v1/b") + _field(7, b"*")
    rule = _field(2, b"/v1/a") + _field(11, extra)
    assert _http_rules(_field(72295728, rule)) == [("GET", "/v1/a", "", ""),
                                                   ("POST", "/v1/b", "*", "")]
    assert _http_rules(b"") == []


def test_grpc_errors_as_http_statuses():
    assert error_json(5, "gone") == (404, b'{"code": 5, "message": "gone"}')
    assert error_json(14, "")[0] == 503 and error_json(4, "")[0] == 504
    assert error_json(99, "")[0] == 500

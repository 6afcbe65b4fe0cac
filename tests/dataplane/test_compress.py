"""Compression decisions and encoders, without sockets."""

from __future__ import annotations

import gzip

import brotli
import pytest
import zstandard

from kanal.dataplane.compress import (
    accepted_codings,
    choose_coding,
    make_encoder,
    should_compress,
)

ALL = ("br", "zstd", "gzip")


@pytest.mark.parametrize(("accept", "expected"), [
    (None, None),
    ("", None),
    ("identity", None),
    ("gzip", "gzip"),
    ("x-gzip", "gzip"),
    ("GZIP;Q=0.3, br;q=0.2", "gzip"),
    ("gzip;q=0", None),
    ("*;q=0.1, gzip;q=0", "br"),
    ("deflate, zstd;q=0.5, gzip;q=0.5", "zstd"),
    ("gzip;q=bogus, br", "br"),
])
def test_choose_coding(accept: str | None, expected: str | None) -> None:
    assert choose_coding(accept, ALL) == expected


def test_q_values_are_read_and_clamped() -> None:
    assert accepted_codings("gzip;q=2, br ; q=0.25, ,zstd") == {"gzip": 1.0, "br": 0.25,
                                                                  "zstd": 1.0}


def decision(**changes: object) -> bool:
    settings: dict[str, object] = dict(
        status=200, no_body=False, ranged=False, content_type=b"text/html; charset=utf-8",
        content_encoding=None, cache_control=None, content_length=b"5000",
        content_types=frozenset({"text/html"}), min_size=1024)
    settings.update(changes)
    return should_compress(**settings)  # type: ignore[arg-type]


def test_should_compress() -> None:
    assert decision()
    assert decision(content_length=None)  # a stream: its size is unknown
    assert decision(content_encoding=b"identity")
    assert not decision(status=206)
    assert not decision(ranged=True)
    assert not decision(no_body=True)
    assert not decision(status=304)
    assert not decision(content_encoding=b"gzip")
    assert not decision(cache_control=b"max-age=1, No-Transform")
    assert not decision(content_type=b"image/png")
    assert not decision(content_type=None)
    assert not decision(content_length=b"1023")


@pytest.mark.parametrize(("coding", "decode"), [
    ("gzip", gzip.decompress),
    ("br", brotli.decompress),
    ("zstd", lambda data: zstandard.ZstdDecompressor().decompressobj().decompress(data)),
])
def test_streaming_encoders_flush_each_chunk(coding: str, decode) -> None:  # type: ignore[no-untyped-def]
    encoder = make_encoder(coding)
    pieces = [b"event %d\n" % i * 50 for i in range(20)]
    out = [encoder.compress(piece) for piece in pieces]
    assert all(out)  # every chunk yields bytes at once: streams keep streaming
    assert decode(b"".join(out) + encoder.finish()) == b"".join(pieces)

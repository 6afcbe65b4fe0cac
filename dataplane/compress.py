"""Response compression: which coding a client gets, and a streaming encoder for it.

The decision is pure (`choose_coding`, `should_compress`): the client's
`Accept-Encoding` q-values pick among the filter's algorithms (ties go to the order
the filter lists them in), and an answer is compressed only when it is worth it and
safe: a listed content type, at least `minSize` bytes when its length is known, not
already encoded, not a 206 or an answer to a `Range` request, no
`Cache-Control: no-transform`, and a body at all (never HEAD, 204, 304).

The encoders compress each chunk as it comes from the backend and flush it, so a
streamed answer keeps streaming and memory stays at the compressor's window whatever
the answer's size.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Protocol

CODINGS = ("br", "zstd", "gzip")


def accepted_codings(accept_encoding: str) -> dict[str, float]:
    """The codings of an `Accept-Encoding` value with their q-values (RFC 9110 12.5.3)."""
    result: dict[str, float] = {}
    for item in accept_encoding.split(","):
        name, *params = (part.strip() for part in item.split(";"))
        if not name:
            continue
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        result[name.lower()] = max(0.0, min(quality, 1.0))
    return result


def choose_coding(accept_encoding: str | None, algorithms: Sequence[str]) -> str | None:
    """The best of `algorithms` the client accepts, or None (identity)."""
    if not accept_encoding:
        return None
    accepted = accepted_codings(accept_encoding)
    star = accepted.get("*")
    best: str | None = None
    best_q = 0.0
    for name in algorithms:
        quality = accepted.get(name)
        if quality is None and name == "gzip":
            quality = accepted.get("x-gzip")
        if quality is None:
            quality = star
        if quality is not None and quality > best_q:
            best, best_q = name, quality
    return best


def media_type(content_type: bytes | None) -> str:
    if not content_type:
        return ""
    return content_type.split(b";", 1)[0].strip().lower().decode("latin-1")


def should_compress(
    *,
    status: int,
    no_body: bool,
    ranged: bool,
    content_type: bytes | None,
    content_encoding: bytes | None,
    cache_control: bytes | None,
    content_length: bytes | None,
    content_types: frozenset[str],
    min_size: int,
) -> bool:
    """Whether an answer may and should be compressed."""
    if no_body or status == 206 or ranged or status < 200 or status in (204, 304):
        return False
    if content_encoding is not None and content_encoding.strip().lower() != b"identity":
        return False
    if cache_control is not None and b"no-transform" in cache_control.lower():
        return False
    if media_type(content_type) not in content_types:
        return False
    if content_length is not None:
        try:
            if int(content_length) < min_size:
                return False
        except ValueError:
            return False
    return True


class Encoder(Protocol):
    def compress(self, chunk: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class _Gzip:
    __slots__ = ("_z",)

    def __init__(self) -> None:
        self._z = zlib.compressobj(6, zlib.DEFLATED, 31)

    def compress(self, chunk: bytes) -> bytes:
        return self._z.compress(chunk) + self._z.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._z.flush(zlib.Z_FINISH)


class _Brotli:
    __slots__ = ("_c",)

    def __init__(self) -> None:
        import brotli  # type: ignore[import-untyped]

        self._c = brotli.Compressor(quality=4, lgwin=22)

    def compress(self, chunk: bytes) -> bytes:
        data: bytes = self._c.process(chunk) + self._c.flush()
        return data

    def finish(self) -> bytes:
        data: bytes = self._c.finish()
        return data


class _Zstd:
    __slots__ = ("_c", "_flush_block")

    def __init__(self) -> None:
        import zstandard

        self._c = zstandard.ZstdCompressor(level=3).compressobj()
        self._flush_block = zstandard.COMPRESSOBJ_FLUSH_BLOCK

    def compress(self, chunk: bytes) -> bytes:
        return self._c.compress(chunk) + self._c.flush(self._flush_block)

    def finish(self) -> bytes:
        return self._c.flush()


def make_encoder(coding: str) -> Encoder:
    """A fresh streaming encoder for `coding` (one of CODINGS)."""
    if coding == "gzip":
        return _Gzip()
    if coding == "br":
        return _Brotli()
    if coding == "zstd":
        return _Zstd()
    raise ValueError(f"unknown coding {coding!r}")

"""API keys: which client a presented key belongs to (pure).

Keys arrive from the compiler as SHA-256 digests; a presented key is hashed and its
digest looked up. The comparison never touches a key: its timing depends on the digest
of what the client sent, which tells the client nothing about the stored keys (it
cannot steer a digest byte by byte, so the byte-at-a-time guessing a naive `==` on keys
allows is impossible), and no usable key is kept in memory or in a Snapshot. The key is read from the
configured headers, then query parameters, in that order; the first one present is
the one judged (a wrong key is not rescued by a right one elsewhere).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from urllib.parse import parse_qsl

from kanal.contract.access import APIKeyAuth


def key_digest(key: str) -> str:
    """The digest a key is known by (also what the compiler stores)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class APIKeys:
    """One rule's clients and where their keys are read."""

    __slots__ = ("by_digest", "forward_header", "headers", "params")

    def __init__(self, spec: APIKeyAuth) -> None:
        self.by_digest: dict[str, str] = {}
        for client in spec.clients:
            for digest in client.key_digests:
                self.by_digest[digest] = client.client
        self.headers = tuple(name.lower().encode("latin-1") for name in spec.headers)
        self.params = spec.params
        self.forward_header = (None if spec.forward_client_id_header is None
                               else spec.forward_client_id_header.encode("latin-1"))

    def presented(self, headers: Sequence[tuple[bytes, bytes]], query: str
                  ) -> tuple[str | None, str | None]:
        """(key, query parameter it came from, or None for a header) as sent."""
        for wanted in self.headers:
            for name, value in headers:
                if name.lower() == wanted:
                    return value.decode("latin-1").strip(), None
        if self.params and query:
            for param, text in parse_qsl(query, keep_blank_values=True):
                if param in self.params:
                    return text, param
        return None, None

    def client(self, key: str) -> str | None:
        """The client a key belongs to, or None."""
        return self.by_digest.get(key_digest(key))

    def strip_param(self, query: str, params: Iterable[str]) -> str:
        """The query string without the key's parameters (the key is never forwarded)."""
        names = set(params)
        kept = [part for part in query.split("&")
                if part and part.partition("=")[0] not in names]
        return "&".join(kept)

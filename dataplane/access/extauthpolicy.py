"""External authorization: what to ask, and what an answer means (pure).

The service gets the client's method, the configured URL's path followed by the
client's path and query, the chosen request headers, and who asked
(`X-Forwarded-For`, `-Proto`, `-Host`). A 2xx answer lets the request through with the
chosen answer headers copied onto it (any the client sent under those names removed);
any other answer goes back to the client as the service sent it (status, headers and
body, bounded); no answer in time, or no connection, is the policy's `failureMode`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from kanal.contract.access import ExtAuth
from kanal.dataplane.http1 import wire_safe

MAX_DENIAL_BODY = 64 * 1024
"""Bytes of a refusal's body relayed to the client; a longer one is cut there."""

_NOT_RELAYED = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"te",
    b"trailer", b"transfer-encoding", b"upgrade", b"content-length",
})


@dataclass(frozen=True, slots=True)
class Allowed:
    add: list[tuple[bytes, bytes]]
    drop: frozenset[bytes]


@dataclass(frozen=True, slots=True)
class Denied:
    status: int
    headers: bytes  # header lines, each ending in CRLF
    body: bytes


def auth_url(spec: ExtAuth, target: bytes) -> str:
    """The URL asked: the service's path, then the client's path and query."""
    parts = urlsplit(spec.url)
    prefix = parts.path.rstrip("/")
    return f"{parts.scheme}://{parts.netloc}{prefix}{target.decode('latin-1')}"


def auth_headers(spec: ExtAuth, headers: Sequence[tuple[bytes, bytes]], client: str,
                 scheme: str, host: bytes | None) -> list[tuple[str, str]]:
    """The headers sent to the service: the chosen ones and who asked."""
    wanted = {name.encode("latin-1") for name in spec.headers_to_ext_auth}
    chosen = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers
              if name.lower() in wanted]
    chosen += [("X-Forwarded-For", client), ("X-Forwarded-Proto", scheme)]
    if host is not None:
        chosen.append(("X-Forwarded-Host", host.decode("latin-1")))
    return chosen


def judge(spec: ExtAuth, status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes
          ) -> Allowed | Denied:
    """What the service's answer means for the request."""
    if 200 <= status < 300:
        wanted = {name.lower().encode("latin-1") for name in spec.headers_to_backend}
        add = [(name, value) for name, value in headers
               if name.lower() in wanted and wire_safe(value)]
        return Allowed(add, frozenset(wanted))
    lines = b"".join(name + b": " + value + b"\r\n" for name, value in headers
                     if name.lower() not in _NOT_RELAYED and wire_safe(name + value))
    return Denied(status, lines, body[:MAX_DENIAL_BODY])

"""Header rewriting between the client and upstream legs (pure, bytes in, bytes out).

Headers travel as the parser hands them over: a list of `(name, value)` byte pairs with
names as sent. Names are compared in lower case. The rules:

- hop-by-hop headers (RFC 9110 7.6.1) and every header named in `Connection` stop at
  the proxy, in both directions; the proxy frames each leg itself;
- `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host`, `X-Real-IP` and
  `Forwarded` (RFC 7239) are set by the proxy. With `trusted_hops == 0`, whatever the
  client sent is dropped; with `trusted_hops == N`, the N proxies in front are trusted:
  their chain is kept and extended, and the client address is the one N hops back;
- `Host` passes through untouched.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

HeaderList = list[tuple[bytes, bytes]]

HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
FORWARDING: Final = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-real-ip", b"forwarded"}
)
# Request headers the proxy handles itself: Expect is answered by the proxy (it sends
# `100 Continue` to the client), so the upstream never waits on it.
REQUEST_DROPPED = HOP_BY_HOP | FORWARDING | {b"expect", b"content-length"}
RESPONSE_DROPPED: Final = HOP_BY_HOP | {b"content-length"}


def connection_tokens(value: bytes) -> set[bytes]:
    """The header names a `Connection` header lists (lower case)."""
    return {token.strip().lower() for token in value.split(b",") if token.strip()}


@dataclass(frozen=True, slots=True)
class ForwardedFor:
    """What the proxy tells the upstream about the client."""

    client: str
    x_forwarded_for: bytes
    x_forwarded_proto: bytes
    x_forwarded_host: bytes
    forwarded: bytes


def _forwarded_node(address: str) -> str:
    """An address as RFC 7239 `for=` wants it: IPv6 quoted and bracketed."""
    if ":" in address:
        return f'"[{address}]"'
    return address


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _forwarded_value(text: str) -> str:
    """A token, or a quoted string when it holds characters a token may not."""
    if _TOKEN.fullmatch(text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _split_list(values: Sequence[bytes]) -> list[str]:
    items: list[str] = []
    for value in values:
        items.extend(
            part.strip() for part in value.decode("latin-1").split(",") if part.strip()
        )
    return items


def _valid_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


def forwarded_for(
    *,
    peer: str,
    scheme: str,
    host: bytes | None,
    received: dict[bytes, list[bytes]],
    trusted_hops: int,
) -> ForwardedFor:
    """Compute the forwarding headers for one request.

    `received` maps lower-case forwarding header names to the values the client sent.
    """
    host_text = (host or b"").decode("latin-1")
    if trusted_hops <= 0:
        chain = [peer]
        client = peer
        proto = scheme
        forwarded_host = host_text
        earlier_forwarded = ""
    else:
        chain = _split_list(received.get(b"x-forwarded-for", ())) + [peer]
        # chain[-1] is the peer, itself the nearest trusted hop; the client is the
        # address trusted_hops entries further back, or the farthest one we know of.
        index = max(len(chain) - 1 - trusted_hops, 0)
        client = chain[index]
        if not _valid_address(client):
            client = peer
        sent_proto = _split_list(received.get(b"x-forwarded-proto", ()))
        proto = sent_proto[0] if sent_proto else scheme
        sent_host = _split_list(received.get(b"x-forwarded-host", ()))
        forwarded_host = sent_host[0] if sent_host else host_text
        earlier_forwarded = ", ".join(_split_list(received.get(b"forwarded", ())))
    element = f"for={_forwarded_node(peer)};proto={scheme}"
    if host_text:
        element += f";host={_forwarded_value(host_text)}"
    forwarded = f"{earlier_forwarded}, {element}" if earlier_forwarded else element
    return ForwardedFor(
        client=client,
        x_forwarded_for=", ".join(chain).encode("latin-1"),
        x_forwarded_proto=proto.encode("latin-1"),
        x_forwarded_host=forwarded_host.encode("latin-1"),
        forwarded=forwarded.encode("latin-1"),
    )


CONNECTION_PROTECTED = frozenset({
    b"host", b"content-length", b"transfer-encoding", b"cookie", b"authorization",
    b"proxy-authorization", b"content-type", b"upgrade",
})
"""End-to-end fields that `Connection` may not nominate for removal: naming them there
is ignored (RFC 9110 §7.6.1 allows only hop-by-hop fields)."""


def filter_headers(headers: Iterable[tuple[bytes, bytes]], dropped: frozenset[bytes]) -> HeaderList:
    """Drop `dropped` names and every name listed in `Connection` (but never an
    end-to-end framing or routing field, see CONNECTION_PROTECTED)."""
    named: set[bytes] | None = None
    kept: HeaderList = []
    for name, value in headers:
        lower = name.lower()
        if lower in dropped:
            if lower == b"connection":
                tokens = connection_tokens(value) - dropped - CONNECTION_PROTECTED
                if tokens:
                    named = tokens if named is None else named | tokens
            continue
        kept.append((name, value))
    if named:
        kept = [(name, value) for name, value in kept if name.lower() not in named]
    return kept


def cookie_value(header: bytes, name: str) -> str | None:
    """The value of cookie `name` in a `Cookie` header, unquoted; None when absent."""
    wanted = name.encode("latin-1")
    for part in header.split(b";"):
        key, sep, value = part.strip().partition(b"=")
        if sep and key == wanted:
            return value.strip(b'"').decode("latin-1")
    return None

"""What a Route's TLS settings ask of one request: a pure decision, no sockets.

On the HTTPS listener a request for a host the connection's certificate does not serve
is misdirected (421, RFC 9110 §15.5.20), and a Route with `hsts` adds
Strict-Transport-Security. On the plain listener a Route with `redirectHTTP` is
answered with a 308 to its https:// address.
"""

from __future__ import annotations

from dataclasses import dataclass

from kanal.contract.snapshot import RouteTLS


@dataclass(frozen=True, slots=True)
class TlsAnswer:
    """Answer the request at once instead of proxying it."""

    status: int
    reason: str
    location: bytes | None = None


def hsts_value(tls: RouteTLS | None) -> bytes | None:
    """The Strict-Transport-Security value a Route's answers over TLS carry, if any."""
    if tls is None or tls.hsts is None:
        return None
    value = b"max-age=%d" % tls.hsts.max_age
    if tls.hsts.include_sub_domains:
        value += b"; includeSubDomains"
    return value


def tls_answer(*, scheme: str, route_key: str, tls: RouteTLS | None, host: str,
               target: bytes, https_port: int | None, misdirected: bool,
               server_name: str | None) -> TlsAnswer | None:
    """The answer TLS policy gives a request for `host` on `route_key`, or None to proxy it.

    `misdirected` says (HTTPS listener) whether the connection's certificate was chosen
    for another Route than `host`'s.
    """
    if scheme == "https":
        if misdirected:
            return TlsAnswer(421, f"host {host} is not served by the certificate of this "
                                  f"connection (TLS server name {server_name or '-'})")
        return None
    if tls is not None and tls.redirect_http and tls.cert_pem:
        name, _, port = host.rpartition(":")
        bare = name if port.isdigit() else host
        if https_port not in (None, 443):
            bare = f"{bare}:{https_port}"
        location = f"https://{bare}".encode("latin-1") + target
        return TlsAnswer(308, f"{route_key} is served over HTTPS: {location.decode('latin-1')}",
                         location)
    return None

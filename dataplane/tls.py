"""TLS termination: one listener, many certificates, chosen by SNI, swapped on every apply.

The listener's SSLContext carries only the policy (TLS 1.2 and 1.3, forward-secret
AEAD ciphers, ALPN `h2` and `http/1.1`) and an `sni_callback`. The callback looks the client's
server name up in the current `SniMap` and switches the connection to that
certificate's own SSLContext. An `SniMap` is built from each applied Snapshot
(`TlsTerminator.update`, subscribed to `Runtime.on_apply`) and published with one
assignment, so new handshakes use a rotated certificate at once and connections
already open carry on with the one they got.

Which certificate a server name gets (the same order as the router's host names):

1. the Route whose host names contain it exactly;
2. the Route with the longest wildcard (`*.example.com`) that covers it, at any depth;
3. a TLS Route without host names (it serves every host);
4. the default certificate (`--default-certificate NAMESPACE/NAME`): the certificate
   of the Route(s) terminating TLS with that Secret;
5. otherwise the handshake fails (alert `unrecognized_name`). Another tenant's
   certificate is never presented.

A server name claimed by Routes none of which has a usable certificate (its Secret is
missing, so the compiler dropped `spec.tls`; or its PEM does not load) is *not* served
on TLS: its handshake fails rather than falling through to a wildcard or the default.
A host name is served on TLS when any of its Routes terminates TLS.

A request whose Host would have chosen another certificate than the one its
connection's handshake chose is misdirected (`ProxyContext.misdirected`: 421).

Certificate contexts are cached by the hash of their PEMs: an apply that leaves a
certificate alone does not reload it. A PEM that does not load is logged and skipped;
it never fails the Snapshot.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
from dataclasses import dataclass, field

from kanal.contract.pem import load_pem_pair
from kanal.contract.snapshot import Route, Snapshot, UpstreamTLS

log = logging.getLogger("kanal.tls")

CIPHERS_TLS12 = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!PSK"
"""TLS 1.2: ECDHE key exchange with AES-GCM or ChaCha20-Poly1305 only (TLS 1.3's
suites are all AEAD and forward secret)."""

ALPN = ["http/1.1"]
SERVER_ALPN = ["h2", "http/1.1"]
"""Offered to clients: HTTP/2 first (kanal.dataplane.h2front), HTTP/1.1 otherwise."""

SERVER_NAME_ATTRIBUTE = "kanal_server_name"
"""Set on each server-side SSLObject by the SNI callback: Python exposes no SNI there."""


def apply_policy(context: ssl.SSLContext) -> ssl.SSLContext:
    """Kanal's server TLS policy, on the listener's context and on every certificate's."""
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.set_ciphers(CIPHERS_TLS12)
    context.options |= (
        ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    )
    context.set_alpn_protocols(SERVER_ALPN)
    return context


def pem_fingerprint(cert_pem: str, key_pem: str) -> str:
    return hashlib.sha256(f"{cert_pem}\0{key_pem}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Certificate:
    """What a server name resolves to: a Secret's certificate, or a refusal."""

    secret: str                      # `namespace/name`; "" when no Route has TLS for the name
    context: ssl.SSLContext | None   # None: the handshake fails
    reason: str = ""                 # why there is no context


@dataclass(slots=True)
class SniMap:
    """Server name to Certificate, built once per Snapshot; read by every handshake."""

    exact: dict[str, Certificate] = field(default_factory=dict)
    wildcard: dict[str, Certificate] = field(default_factory=dict)  # ".example.com" -> ...
    catch_all: Certificate | None = None
    default: Certificate | None = None

    def lookup(self, server_name: str | None) -> Certificate | None:
        if server_name:
            name = normalise(server_name)
            found = self.exact.get(name)
            if found is not None:
                return found
            if self.wildcard:
                dot = name.find(".")
                while dot != -1:
                    found = self.wildcard.get(name[dot:])
                    if found is not None:
                        return found
                    dot = name.find(".", dot + 1)
            if self.catch_all is not None:
                return self.catch_all
        return self.default


def normalise(name: str) -> str:
    """Lower case, no trailing dot, no port (a Host header's `name:port`, `[v6]:port`)."""
    name = name.strip().lower()
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    return name.rstrip(".")


class TlsTerminator:
    """The HTTPS listener's certificates: an SSLContext with SNI, and the misdirected check."""

    def __init__(self, *, gateway: str = "ingress", default_certificate: str | None = None) -> None:
        self.gateway = gateway
        if default_certificate and "/" not in default_certificate:
            default_certificate = f"default/{default_certificate}"
        self.default_certificate = default_certificate
        self.sni = SniMap()
        self._cache: dict[str, ssl.SSLContext | str] = {}
        self.server_context = apply_policy(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        self.server_context.sni_callback = self._select
        self.loads = 0  # certificate contexts built (not served from the cache)

    # --- configuration ------------------------------------------------------------------

    def update(self, config: object) -> None:
        """`Runtime.on_apply` listener: takes a Config (or a Snapshot)."""
        snapshot = getattr(config, "snapshot", config)
        assert isinstance(snapshot, Snapshot)
        self.sni = self.build(snapshot)

    def build(self, snapshot: Snapshot) -> SniMap:
        cache: dict[str, ssl.SSLContext | str] = {}
        certificates: dict[str, Certificate] = {}  # by Secret key
        claims: list[tuple[Route, Certificate]] = []
        refused = Certificate("", None, "no Route terminates TLS for this name")
        for route in snapshot.routes:
            if self.gateway not in route.gateways:
                continue
            tls = route.tls
            if tls is None:
                claims.append((route, refused))
                continue
            certificate = certificates.get(tls.secret)
            if certificate is None:
                certificate = self._certificate(route, cache)
                certificates[tls.secret] = certificate
            claims.append((route, certificate))
        self._cache = cache

        sni = SniMap()
        for route, certificate in claims:
            if not route.hostnames:
                # A Route for every host: its certificate answers names no other claims;
                # a plain one claims nothing (the default certificate still applies).
                if certificate.secret and sni.catch_all is None:
                    sni.catch_all = certificate
                continue
            for host in route.hostnames:
                host = host.lower()
                table, key = (sni.wildcard, host[1:]) if host.startswith("*.") else (sni.exact, host)
                held = table.get(key)
                # A name with TLS on any of its Routes is served on TLS; between two
                # certificates the older Route wins (the compiler rejects the newer).
                if held is None or (not held.secret and certificate.secret):
                    table[key] = certificate
        if self.default_certificate:
            default = certificates.get(self.default_certificate)
            if default is None:
                log.warning(
                    "default certificate: no Route terminates TLS with Secret %s; handshakes "
                    "without a known server name fail", self.default_certificate)
            elif default.context is None:
                log.warning("default certificate %s is not usable: %s",
                            self.default_certificate, default.reason)
            else:
                sni.default = default
        return sni

    def _certificate(self, route: Route, cache: dict[str, ssl.SSLContext | str]) -> Certificate:
        tls = route.tls
        assert tls is not None
        if not tls.cert_pem or not tls.key_pem:
            return Certificate(tls.secret, None, f"Secret {tls.secret} has no certificate and key")
        digest = pem_fingerprint(tls.cert_pem, tls.key_pem)
        built = cache.get(digest)
        if built is None:
            built = self._cache.get(digest)
            if built is None:
                built = self._load(tls.secret, tls.cert_pem, tls.key_pem)
            cache[digest] = built
        if isinstance(built, str):
            log.error("TLS Secret %s (Route %s) is not usable, its hosts are not served on TLS: %s",
                      tls.secret, route.key, built)
            return Certificate(tls.secret, None, built)
        return Certificate(tls.secret, built)

    def _load(self, secret: str, cert_pem: str, key_pem: str) -> ssl.SSLContext | str:
        self.loads += 1
        context = apply_policy(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        try:
            load_pem_pair(context, cert_pem, key_pem)
        except (ssl.SSLError, OSError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"
        log.info("TLS certificate of Secret %s loaded", secret)
        return context

    # --- handshakes and requests ------------------------------------------------------------

    def _select(self, ssl_object: ssl.SSLObject, server_name: str | None,
                _context: ssl.SSLContext) -> int | None:
        """The SNI callback: switch to the name's certificate, or refuse the handshake."""
        certificate = self.sni.lookup(server_name)
        if certificate is None or certificate.context is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        ssl_object.context = certificate.context
        setattr(ssl_object, SERVER_NAME_ATTRIBUTE, server_name)
        return None

    def misdirected(self, server_name: str | None, host: str) -> bool:
        """True when `host` would have got another certificate than `server_name` got."""
        sni = self.sni
        chosen = sni.lookup(server_name)
        if chosen is None or chosen.context is None:
            return True
        wanted = sni.lookup(host) if host else sni.default
        return wanted is None or wanted.secret != chosen.secret


def server_name_of(ssl_object: object) -> str | None:
    """The SNI a client sent on a connection this module's callback handled."""
    return getattr(ssl_object, SERVER_NAME_ATTRIBUTE, None)


# --------------------------------------------------------------------------- upstream TLS

_CLIENT_CONTEXTS: dict[UpstreamTLS | None, ssl.SSLContext] = {}
_CLIENT_CONTEXTS_MAX = 1024


def upstream_context(tls: UpstreamTLS | None) -> ssl.SSLContext:
    """The client SSLContext for an HTTPS Upstream, built once per distinct TLS settings.

    The same settings give the same context object on every apply, so pools (and their
    warm connections) survive reloads that leave an Upstream's TLS alone. The server's
    certificate is verified against `ca_pem` (else the system store) and its name
    against the SNI (else the endpoint address). `insecure_skip_verify` turns that off
    and says so at every load. A CA bundle that does not load trusts nothing (every
    handshake fails: fail closed); a client certificate that does not load is left
    out (a server that requires one refuses the handshake). Both are logged.
    """
    if tls is not None and tls.insecure_skip_verify:
        log.warning("upstream TLS: server certificates are NOT verified (insecureSkipVerify)%s",
                    f" for SNI {tls.sni}" if tls.sni else "")
    context = _CLIENT_CONTEXTS.get(tls)
    if context is not None:
        return context
    context, usable = _build_client_context(tls)
    if usable:
        if len(_CLIENT_CONTEXTS) >= _CLIENT_CONTEXTS_MAX:
            _CLIENT_CONTEXTS.pop(next(iter(_CLIENT_CONTEXTS)))
        _CLIENT_CONTEXTS[tls] = context
    return context


_H2_CLIENT_CONTEXTS: dict[UpstreamTLS | None, ssl.SSLContext] = {}


def upstream_h2_context(tls: UpstreamTLS | None) -> ssl.SSLContext:
    """The client SSLContext for an H2 Upstream: as `upstream_context`, offering ALPN
    `h2` only (an endpoint that does not agree is a connect failure)."""
    context = _H2_CLIENT_CONTEXTS.get(tls)
    if context is not None:
        return context
    context, usable = _build_client_context(tls)
    context.set_alpn_protocols(["h2"])
    if usable:
        if len(_H2_CLIENT_CONTEXTS) >= _CLIENT_CONTEXTS_MAX:
            _H2_CLIENT_CONTEXTS.clear()
        _H2_CLIENT_CONTEXTS[tls] = context
    return context


def _build_client_context(tls: UpstreamTLS | None) -> tuple[ssl.SSLContext, bool]:
    usable = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies certificate and host name
    if tls is not None and tls.ca_pem:
        try:
            context.load_verify_locations(cadata=tls.ca_pem)
        except (ssl.SSLError, ValueError) as exc:
            usable = False
            log.error("upstream TLS: the CA bundle (caSecretName) does not load, no endpoint "
                      "certificate will be trusted: %s", exc)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    context.set_alpn_protocols(ALPN)
    if tls is not None and tls.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls is not None and tls.client_cert_pem and tls.client_key_pem:
        try:
            load_pem_pair(context, tls.client_cert_pem, tls.client_key_pem)
        except (ssl.SSLError, OSError, ValueError) as exc:
            usable = False
            log.error("upstream TLS: the client certificate (clientCertSecretName) does not "
                      "load and is not presented: %s", exc)
    return context, usable

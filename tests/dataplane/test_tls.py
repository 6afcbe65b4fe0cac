"""TLS termination in-process: real handshakes against `TlsTerminator.server_context`.

A plain asyncio server uses the terminator's SSLContext exactly as the HTTPS listener
does; real `ssl` clients (and `openssl s_client`) connect with a server name and look
at which certificate they got. Certificates are made by trustme.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess

import pytest
import trustme
from cryptography import x509

from kanal.contract.snapshot import Route, RouteTLS, Snapshot, UpstreamTLS
from kanal.dataplane.tls import SniMap, TlsTerminator, normalise, server_name_of, upstream_context


def serial(cert: trustme.LeafCert) -> int:
    return x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()).serial_number


def route(name: str, hosts: tuple[str, ...], cert: trustme.LeafCert | None, *,
          secret: str | None = None, cert_pem: str | None = None, key_pem: str | None = None,
          gateways: tuple[str, ...] = ("ingress",)) -> Route:
    tls = None
    if cert is not None or cert_pem is not None:
        tls = RouteTLS(
            secret=secret or f"default/{name}-tls",
            cert_pem=cert_pem if cert_pem is not None else cert.cert_chain_pems[0].bytes().decode(),  # type: ignore[union-attr]
            key_pem=key_pem if key_pem is not None else cert.private_key_pem.bytes().decode(),  # type: ignore[union-attr]
        )
    return Route(key=f"default/{name}", hostnames=hosts, gateways=gateways, tls=tls)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def certs(ca: trustme.CA) -> dict[str, trustme.LeafCert]:
    return {
        "a": ca.issue_cert("a.example.com"),
        "wild": ca.issue_cert("*.example.com"),
        "deep": ca.issue_cert("*.deep.example.com"),
        "dflt": ca.issue_cert("default.example.com"),
        "any": ca.issue_cert("any.example.net"),
    }


class Listener:
    """An asyncio TLS server on the terminator's context; answers with the SNI it saw."""

    def __init__(self, terminator: TlsTerminator) -> None:
        self.terminator = terminator
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def __aenter__(self) -> Listener:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            name = server_name_of(writer.get_extra_info("ssl_object"))
            writer.write((name or "-").encode())
            await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(
            answer, "127.0.0.1", 0, ssl=self.terminator.server_context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def client_context(ca: trustme.CA, **settings: object) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no system store: cheap per connection
    ca.configure_trust(context)
    context.check_hostname = False  # which certificate came is what the tests look at
    context.set_alpn_protocols(["http/1.1"])
    for name, value in settings.items():
        setattr(context, name, value)
    return context


async def handshake(port: int, server_name: str | None, ca: trustme.CA,
                    **settings: object) -> tuple[int, str, str | None]:
    """(serial of the server certificate, the SNI the server saw, ALPN) or an exception."""
    context = client_context(ca, **settings)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname=server_name or ""), 5)
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        peer = ssl_object.getpeercert()
        seen = (await asyncio.wait_for(reader.read(), 5)).decode()
        return int(peer["serialNumber"], 16), seen, ssl_object.selected_alpn_protocol()
    finally:
        writer.close()


# --------------------------------------------------------------------------- selection


async def test_sni_picks_exact_then_longest_wildcard(ca, certs):
    terminator = TlsTerminator()
    terminator.update(Snapshot(routes=(
        route("a", ("a.example.com",), certs["a"]),
        route("wild", ("*.example.com",), certs["wild"]),
        route("deep", ("*.deep.example.com",), certs["deep"]),
    )))
    async with Listener(terminator) as listener:
        got, seen, alpn = await handshake(listener.port, "a.example.com", ca)
        assert (got, seen, alpn) == (serial(certs["a"]), "a.example.com", "http/1.1")
        assert (await handshake(listener.port, "B.Example.COM", ca))[0] == serial(certs["wild"])
        # Wildcards cover subdomains at any depth (as the router does); the longest wins.
        assert (await handshake(listener.port, "x.y.example.com", ca))[0] == serial(certs["wild"])
        assert (await handshake(listener.port, "x.deep.example.com", ca))[0] == serial(certs["deep"])
        # Not the bare domain, and not another domain: no default configured, so no handshake.
        for name in ("example.com", "a.example.org", None):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await handshake(listener.port, name, ca)


async def test_unknown_or_missing_sni_gets_the_default_certificate(ca, certs):
    terminator = TlsTerminator(default_certificate="default/dflt-tls")
    terminator.update(Snapshot(routes=(
        route("a", ("a.example.com",), certs["a"]),
        route("dflt", ("default.example.com",), certs["dflt"]),
    )))
    async with Listener(terminator) as listener:
        assert (await handshake(listener.port, "a.example.com", ca))[0] == serial(certs["a"])
        assert (await handshake(listener.port, "elsewhere.test", ca))[0] == serial(certs["dflt"])
        got, seen, _ = await handshake(listener.port, None, ca)
        assert (got, seen) == (serial(certs["dflt"]), "-")


def test_default_certificate_without_namespace_is_in_default():
    assert TlsTerminator(default_certificate="dflt-tls").default_certificate == "default/dflt-tls"


async def test_a_default_secret_no_route_uses_leaves_unknown_names_refused(ca, certs, caplog):
    terminator = TlsTerminator(default_certificate="default/absent")
    terminator.update(Snapshot(routes=(route("a", ("a.example.com",), certs["a"]),)))
    assert "default/absent" in caplog.text
    async with Listener(terminator) as listener:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await handshake(listener.port, "elsewhere.test", ca)


async def test_a_tls_route_without_hostnames_answers_every_unclaimed_name(ca, certs):
    terminator = TlsTerminator(default_certificate="default/dflt-tls")
    terminator.update(Snapshot(routes=(
        route("a", ("a.example.com",), certs["a"]),
        route("any", (), certs["any"]),
        route("dflt", ("default.example.com",), certs["dflt"]),
    )))
    async with Listener(terminator) as listener:
        assert (await handshake(listener.port, "a.example.com", ca))[0] == serial(certs["a"])
        assert (await handshake(listener.port, "whatever.test", ca))[0] == serial(certs["any"])
        # Without a server name, the default certificate (a catch-all Route needs a name).
        assert (await handshake(listener.port, None, ca))[0] == serial(certs["dflt"])


async def test_routes_of_another_gateway_are_not_served(ca, certs):
    terminator = TlsTerminator(gateway="ingress")
    terminator.update(Snapshot(routes=(
        route("a", ("a.example.com",), certs["a"], gateways=("mesh",)),)))
    async with Listener(terminator) as listener:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await handshake(listener.port, "a.example.com", ca)


# --------------------------------------------------------------------------- bad certificates


async def test_a_bad_pem_is_skipped_and_its_hosts_are_not_served_on_tls(ca, certs, caplog):
    garbage = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"
    other_key = ca.issue_cert("x.test").private_key_pem.bytes().decode()
    terminator = TlsTerminator()
    terminator.update(Snapshot(routes=(
        route("a", ("a.example.com",), certs["a"]),
        route("wild", ("*.example.com",), certs["wild"]),
        route("garbage", ("garbage.example.com",), certs["a"], cert_pem=garbage),
        route("mismatch", ("mismatch.example.com",), certs["a"], key_pem=other_key),
        route("nosecret", ("nosecret.example.com",), None),  # its Secret was missing
    )))
    assert "default/garbage-tls" in caplog.text and "default/mismatch-tls" in caplog.text
    async with Listener(terminator) as listener:
        assert (await handshake(listener.port, "a.example.com", ca))[0] == serial(certs["a"])
        assert (await handshake(listener.port, "b.example.com", ca))[0] == serial(certs["wild"])
        # Not the wildcard's certificate instead: these hosts are not served on TLS at all.
        for name in ("garbage.example.com", "mismatch.example.com", "nosecret.example.com"):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await handshake(listener.port, name, ca)
    for host in ("garbage.example.com", "nosecret.example.com"):
        assert terminator.misdirected("b.example.com", host)


def test_unchanged_certificates_are_not_reloaded(certs):
    terminator = TlsTerminator()
    routes = (route("a", ("a.example.com",), certs["a"]),
              route("wild", ("*.example.com",), certs["wild"]))
    terminator.update(Snapshot(routes=routes))
    assert terminator.loads == 2
    first = terminator.sni.lookup("a.example.com")
    terminator.update(Snapshot(routes=(*routes, route("a2", ("a2.example.com",), certs["a"],
                                                      secret="default/a-tls"))))
    assert terminator.loads == 2
    assert terminator.sni.lookup("a.example.com").context is first.context  # type: ignore[union-attr]
    terminator.update(Snapshot(routes=(route("a", ("a.example.com",), certs["dflt"]),)))
    assert terminator.loads == 3
    assert terminator.sni.lookup("b.example.com") is None


# --------------------------------------------------------------------------- misdirected


def test_misdirected_when_the_host_would_have_chosen_another_certificate(certs):
    terminator = TlsTerminator(default_certificate="default/dflt-tls")
    terminator.update(Snapshot(routes=(
        route("a", ("a.example.com", "a2.example.com"), certs["a"]),
        route("wild", ("*.example.com",), certs["wild"]),
        route("dflt", ("default.example.com",), certs["dflt"]),
        route("plain", ("plain.example.com",), None),
    )))
    m = terminator.misdirected
    assert not m("a.example.com", "a.example.com")
    assert not m("a.example.com", "A.example.com:8443")
    assert not m("a.example.com", "a2.example.com")      # same certificate
    assert m("a.example.com", "b.example.com")           # the wildcard's
    assert m("b.example.com", "a.example.com")
    assert m("b.example.com", "plain.example.com")       # no TLS for that host
    assert m(None, "a.example.com")                      # default certificate, tenant's host
    assert not m(None, "default.example.com")
    assert not m("unknown.test", "other-unknown.test")   # both the default's
    assert not m(None, "")


def test_normalise():
    assert normalise("A.Example.com.") == "a.example.com"
    assert normalise("a.example.com:8443") == "a.example.com"
    assert normalise("[::1]:8443") == "::1"
    assert SniMap().lookup("a") is None


# --------------------------------------------------------------------------- protocol policy


# Offering TLS 1.0 and 1.1 is the point of this test; Python warns that they are old.
@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
async def test_tls_1_2_with_an_aead_cipher_works_and_old_protocols_fail(ca, certs):
    terminator = TlsTerminator()
    terminator.update(Snapshot(routes=(route("a", ("a.example.com",), certs["a"]),)))
    async with Listener(terminator) as listener:
        tls12 = client_context(ca, maximum_version=ssl.TLSVersion.TLSv1_2)
        _, writer = await asyncio.open_connection(
            "127.0.0.1", listener.port, ssl=tls12, server_hostname="a.example.com")
        ssl_object = writer.get_extra_info("ssl_object")
        name, version, _ = ssl_object.cipher()
        assert version == "TLSv1.2" and name.startswith("ECDHE-") and ("GCM" in name or "CHACHA" in name)
        writer.close()
        # Python refuses TLS 1.1 at OpenSSL's default security level on the client side
        # too; whichever side says no, the handshake must fail.
        with pytest.raises((ssl.SSLError, ConnectionError, ValueError)):
            old = client_context(ca)
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
            old.set_ciphers("ALL:@SECLEVEL=0")
            await handshake(listener.port, "a.example.com", ca, minimum_version=old.minimum_version,
                            maximum_version=old.maximum_version)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            weak = client_context(ca, maximum_version=ssl.TLSVersion.TLSv1_2)
            weak.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384")  # CBC only
            _, writer = await asyncio.open_connection(
                "127.0.0.1", listener.port, ssl=weak, server_hostname="a.example.com")
            writer.close()


@pytest.fixture(scope="module")
def rsa_cert(ca: trustme.CA) -> trustme.LeafCert:
    """An RSA certificate: RSA key exchange and DHE need one to be offered at all."""
    return ca.issue_cert("a.example.com", key_type=trustme.KeyType.RSA)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
@pytest.mark.parametrize("flags, works", [
    (["-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"], True),
    (["-tls1_2", "-cipher", "ECDHE-RSA-AES256-GCM-SHA384"], True),
    (["-tls1_2", "-cipher", "ECDHE-RSA-CHACHA20-POLY1305"], True),
    (["-tls1_3"], True),
    (["-tls1_1", "-cipher", "ALL:@SECLEVEL=0"], False),
    (["-tls1", "-cipher", "ALL:@SECLEVEL=0"], False),
    (["-tls1_2", "-cipher", "AES128-GCM-SHA256"], False),           # RSA key exchange: no FS
    (["-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA256"], False),     # CBC
    (["-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA"], False),        # CBC, SHA-1
    (["-tls1_2", "-cipher", "DHE-RSA-AES128-GCM-SHA256"], False),   # finite-field DH
    (["-tls1_2", "-cipher", "ALL:@SECLEVEL=0:!ECDHE"], False),
], ids=lambda value: " ".join(value) if isinstance(value, list) else str(value))
async def test_openssl_s_client(ca, rsa_cert, flags, works):
    terminator = TlsTerminator()
    terminator.update(Snapshot(routes=(route("a", ("a.example.com",), rsa_cert),)))
    async with Listener(terminator) as listener:
        command = ["openssl", "s_client", "-connect", f"127.0.0.1:{listener.port}",
                   "-servername", "a.example.com", "-alpn", "http/1.1", *flags]
        process = await asyncio.create_subprocess_exec(
            *command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = await asyncio.wait_for(process.communicate(), 10)
    text = out.decode(errors="replace")
    if works:
        assert process.returncode == 0, text
        assert "ALPN protocol: http/1.1" in text, text
    else:
        assert process.returncode != 0 or "Cipher is (NONE)" in text, text


# --------------------------------------------------------------------------- upstream contexts


def test_upstream_contexts_are_built_once_per_settings(ca):
    pem = ca.cert_pem.bytes().decode()
    first = upstream_context(UpstreamTLS(sni="a.test", ca_pem=pem))
    assert upstream_context(UpstreamTLS(sni="a.test", ca_pem=pem)) is first
    assert upstream_context(UpstreamTLS(sni="b.test", ca_pem=pem)) is not first
    assert first.verify_mode == ssl.CERT_REQUIRED and first.check_hostname
    assert first.minimum_version == ssl.TLSVersion.TLSv1_2


def test_insecure_skip_verify_warns_at_every_load(caplog):
    for _ in range(2):
        context = upstream_context(UpstreamTLS(insecure_skip_verify=True))
    assert context.verify_mode == ssl.CERT_NONE
    assert caplog.text.count("NOT verified") == 2


def test_an_unloadable_ca_bundle_trusts_nothing(caplog):
    garbage = "-----BEGIN CERTIFICATE-----\nbm9wZQ==\n-----END CERTIFICATE-----\n"
    context = upstream_context(UpstreamTLS(ca_pem=garbage))
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.cert_store_stats()["x509_ca"] == 0
    assert "CA bundle" in caplog.text

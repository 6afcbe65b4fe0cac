"""Scenario: TLS through a real `kanal run --tls-listen`, with real clients.

Certificates are trustme's, Secrets are manifests in the served folder, clients are
Python's ssl, aiohttp, curl and openssl. Termination: SNI, wildcard, default
certificate, 421, redirect and HSTS, Secrets missing or broken, rotation under load.
Upstream TLS: verification against a CA Secret with an SNI, failures answered 502
with the reason, client certificates.
"""

from __future__ import annotations

import asyncio
import datetime
import shutil
import ssl
import subprocess
import textwrap
import time
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web
from cryptography import x509

from tests.conftest import (
    Backend,
    backend_app,
    free_port,
    header_values,
    read_response,
    upstream_yaml,
)


def serial(cert: trustme.LeafCert) -> int:
    return x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()).serial_number


def indent(text: str, by: int) -> str:
    return textwrap.indent(text, " " * by)


def tls_secret(name: str, cert: trustme.LeafCert, *, cert_pem: str | None = None) -> str:
    chain = cert_pem or "".join(blob.bytes().decode() for blob in cert.cert_chain_pems)
    key = cert.private_key_pem.bytes().decode()
    return (f"apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}}}\n"
            f"type: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{indent(chain, 4)}"
            f"  tls.key: |\n{indent(key, 4)}")


def ca_secret(name: str, ca: trustme.CA) -> str:
    return (f"apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}}}\nstringData:\n"
            f"  ca.crt: |\n{indent(ca.cert_pem.bytes().decode(), 4)}")


def tls_route(name: str, hosts: list[str], upstream: str, secret: str | None,
              extra: str = "") -> str:
    tls = f"\n  tls: {{secretName: {secret}{extra}}}" if secret else ""
    return (f"apiVersion: kanal.dev/v1alpha1\nkind: Route\nmetadata: {{name: {name}}}\n"
            f"spec:\n  hostnames: [{', '.join(hosts)}]{tls}\n"
            f"  rules: [{{backends: [{{upstream: {upstream}}}]}}]\n")


def client_context(ca: trustme.CA, **settings: object) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no system store: cheap per connection
    ca.configure_trust(context)
    context.set_alpn_protocols(["http/1.1"])
    for name, value in settings.items():
        setattr(context, name, value)
    return context


async def https(port: int, server_name: str | None, ca: trustme.CA, *, host: str | None = None,
                path: str = "/", check_hostname: bool = True):
    """One request on a new TLS connection: (response, serial of the server certificate)."""
    context = client_context(ca, check_hostname=check_hostname and server_name is not None)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname=server_name or ""), 5)
    try:
        peer = writer.get_extra_info("ssl_object").getpeercert()
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host or server_name}\r\n"
                     f"Connection: close\r\n\r\n".encode())
        response = await asyncio.wait_for(read_response(reader), 5)
        return response, int(peer["serialNumber"], 16)
    finally:
        writer.close()


async def plain(port: int, host: str, path: str = "/"):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return await asyncio.wait_for(read_response(reader), 5)
    finally:
        writer.close()


# --------------------------------------------------------------------------- one shared kanal


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def certs(ca):
    return {
        "shop": ca.issue_cert("shop.tls.test"),
        "wild": ca.issue_cert("*.wild.test"),
        "dflt": ca.issue_cert("fallback.tls.test"),
        "bad": ca.issue_cert("bad.tls.test"),
    }


@pytest.fixture(scope="module")
def ca_file(ca, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    path.write_bytes(ca.cert_pem.bytes())
    return path


@pytest.fixture(scope="module")
def tls_kanal(module_kanal, module_backends, certs):
    echo = module_backends("echo")
    garbage = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
    files = {
        "up.yaml": upstream_yaml("echo", echo),
        "secrets.yaml": "---\n".join([
            tls_secret("shop-tls", certs["shop"]),
            tls_secret("wild-tls", certs["wild"]),
            tls_secret("fallback-tls", certs["dflt"]),
            tls_secret("bad-tls", certs["bad"], cert_pem=garbage),
        ]),
        "routes.yaml": "---\n".join([
            tls_route("shop", ["shop.tls.test"], "echo", "shop-tls",
                      ", redirectHTTP: true, hsts: {maxAge: 600, includeSubDomains: true}"),
            tls_route("wild", ['"*.wild.test"'], "echo", "wild-tls"),
            tls_route("fallback", ["fallback.tls.test"], "echo", "fallback-tls"),
            tls_route("bad", ["bad.tls.test"], "echo", "bad-tls"),
            tls_route("missing", ["missing.tls.test"], "echo", "no-such-secret"),
            tls_route("plain", ["plain.tls.test"], "echo", None),
        ]),
    }
    tls_port = free_port()
    k = module_kanal(files, "--tls-listen", f"127.0.0.1:{tls_port}",
                     "--default-certificate", "default/fallback-tls")
    k.tls_port = tls_port  # type: ignore[attr-defined]
    return k


async def test_sni_chooses_the_routes_certificate_and_forwarding_says_https(tls_kanal, ca, certs):
    response, got = await https(tls_kanal.tls_port, "shop.tls.test", ca, path="/x")
    assert response.status == 200, response.body
    assert got == serial(certs["shop"])
    record = response.json()
    assert header_values(record, "x-forwarded-proto") == ["https"]
    assert "proto=https" in header_values(record, "forwarded")[0]
    assert response.header("strict-transport-security") == "max-age=600; includeSubDomains"


async def test_wildcard_certificate(tls_kanal, ca, certs):
    for name in ("a.wild.test", "b.c.wild.test"):
        response, got = await https(tls_kanal.tls_port, name, ca, check_hostname=False)
        assert (response.status, got) == (200, serial(certs["wild"])), name
        assert response.header("strict-transport-security") is None


async def test_unknown_and_missing_sni_get_the_default_certificate(tls_kanal, ca, certs):
    response, got = await https(tls_kanal.tls_port, "fallback.tls.test", ca)
    assert (response.status, got) == (200, serial(certs["dflt"]))
    response, got = await https(tls_kanal.tls_port, "unknown.test", ca, check_hostname=False)
    assert got == serial(certs["dflt"])
    assert response.status == 404  # no Route for that host, but never another tenant's cert
    response, got = await https(tls_kanal.tls_port, None, ca, host="fallback.tls.test")
    assert (response.status, got) == (200, serial(certs["dflt"]))


async def test_a_host_of_another_certificate_is_misdirected(tls_kanal, ca, certs):
    response, got = await https(tls_kanal.tls_port, "shop.tls.test", ca, host="a.wild.test")
    assert (response.status, got) == (421, serial(certs["shop"]))
    assert b"a.wild.test" in response.body and b"shop.tls.test" in response.body
    # On the default certificate, a tenant's host is misdirected too.
    response, _ = await https(tls_kanal.tls_port, None, ca, host="shop.tls.test")
    assert response.status == 421
    # A host served on plain HTTP only is not served on TLS.
    response, _ = await https(tls_kanal.tls_port, "shop.tls.test", ca, host="plain.tls.test")
    assert response.status == 421


async def test_missing_or_broken_secrets_are_not_served_on_tls_and_the_rest_works(tls_kanal, ca):
    for name in ("missing.tls.test", "bad.tls.test"):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await https(tls_kanal.tls_port, name, ca, check_hostname=False)
        assert (await plain(tls_kanal.port, name)).status == 200  # plain HTTP still serves
    log = tls_kanal.log()
    assert "default/no-such-secret not found" in log   # the Route's status, as kanal run logs it
    assert "default/bad-tls" in log and "not usable" in log
    response, _ = await https(tls_kanal.tls_port, "shop.tls.test", ca)
    assert response.status == 200


async def test_plain_http_is_redirected_and_https_gets_hsts(tls_kanal):
    response = await plain(tls_kanal.port, "shop.tls.test", "/a/b?c=d")
    assert response.status == 308
    assert response.header("location") == f"https://shop.tls.test:{tls_kanal.tls_port}/a/b?c=d"
    assert response.header("strict-transport-security") is None  # never over plain HTTP
    assert (await plain(tls_kanal.port, "a.wild.test")).status == 200  # no redirect asked


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_curl_follows_the_redirect_to_https(tls_kanal, ca_file):
    out = subprocess.run(
        ["curl", "-sS", "-L", "-o", "/dev/null", "-D", "-", "--max-time", "10",
         "--cacert", str(ca_file),
         "--resolve", f"shop.tls.test:{tls_kanal.port}:127.0.0.1",
         "--resolve", f"shop.tls.test:{tls_kanal.tls_port}:127.0.0.1",
         "-w", "%{http_code} %{scheme} %{http_version}\n",
         f"http://shop.tls.test:{tls_kanal.port}/hello"],
        capture_output=True, text=True, timeout=20, check=False)
    assert out.returncode == 0, out.stderr
    assert "HTTP/1.1 308" in out.stdout
    assert "strict-transport-security: max-age=600; includesubdomains" in out.stdout.lower()
    # ALPN: curl and the TLS listener agree on HTTP/2.
    assert out.stdout.strip().splitlines()[-1] == "200 HTTPS 2"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
@pytest.mark.parametrize("flags", [["-tls1_1", "-cipher", "ALL:@SECLEVEL=0"],
                                   ["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA"]],
                         ids=["tls1.1", "cbc-cipher"])
def test_old_protocols_and_weak_ciphers_fail_the_handshake(tls_kanal, flags):
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{tls_kanal.tls_port}",
         "-servername", "shop.tls.test", *flags],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20, check=False)
    assert out.returncode != 0 or "Cipher is (NONE)" in out.stdout, out.stdout


async def test_aiohttp_client(tls_kanal, ca):
    resolver_host = {"shop.tls.test": "127.0.0.1"}

    class Resolver(aiohttp.abc.AbstractResolver):
        async def resolve(self, host, port=0, family=0):
            return [{"hostname": host, "host": resolver_host[host], "port": port,
                     "family": family, "proto": 0, "flags": 0}]

        async def close(self) -> None:
            pass

    connector = aiohttp.TCPConnector(resolver=Resolver(), ssl=client_context(ca))
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(3):  # keep-alive: one connection, several requests
            async with session.get(f"https://shop.tls.test:{tls_kanal.tls_port}/k") as answer:
                assert answer.status == 200
                assert answer.headers["Strict-Transport-Security"].startswith("max-age=600")


# --------------------------------------------------------------------------- rotation


async def test_rotation_under_load_fails_no_request(kanal, backends, ca):
    echo = await backends("echo")
    old, new = ca.issue_cert("rot.tls.test"), ca.issue_cert("rot.tls.test")
    tls_port = free_port()
    k = kanal({"up.yaml": upstream_yaml("echo", echo),
               "secret.yaml": tls_secret("rot-tls", old),
               "route.yaml": tls_route("rot", ["rot.tls.test"], "echo", "rot-tls")},
              "--tls-listen", f"127.0.0.1:{tls_port}")
    response, got = await https(tls_port, "rot.tls.test", ca)
    assert (response.status, got) == (200, serial(old))

    # A keep-alive connection opened before the rotation carries on after it.
    context = client_context(ca)
    reader, writer = await asyncio.open_connection("127.0.0.1", tls_port, ssl=context,
                                                   server_hostname="rot.tls.test")
    request = b"GET /kept HTTP/1.1\r\nHost: rot.tls.test\r\n\r\n"
    writer.write(request)
    assert (await read_response(reader)).status == 200

    results: list[tuple[float, int, int]] = []
    failures: list[BaseException] = []
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            try:
                response, got = await https(tls_port, "rot.tls.test", ca)
                results.append((time.monotonic(), response.status, got))
            except Exception as exc:
                failures.append(exc)

    clients = [asyncio.create_task(loop()) for _ in range(4)]
    try:
        deadline = time.monotonic() + 5
        while len(results) < 20 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        written = time.monotonic()
        k.write("secret.yaml", tls_secret("rot-tls", new))
        deadline = written + 5
        while not any(s == serial(new) and t > written for t, _, s in results):
            assert time.monotonic() < deadline, "the new certificate never appeared"
            await asyncio.sleep(0.01)
        seen_at = min(t for t, _, s in results if s == serial(new) and t > written)
        count = len(results)
        # Twenty more answers, and at least half a second of them: a fast machine can
        # serve twenty within the 0.2 s grace period the check below skips.
        settled = seen_at + 0.5
        while (len(results) < count + 20 or time.monotonic() < settled) and time.monotonic() < deadline + 2:
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.gather(*clients)
    assert not failures, failures[:3]
    assert all(status == 200 for _, status, _ in results)
    print(f"rotation: {len(results)} requests, new certificate after {seen_at - written:.3f}s")
    assert seen_at - written < 1.0, f"new certificate after {seen_at - written:.2f}s"
    after = [s for t, _, s in results if t > seen_at + 0.2]
    assert after and set(after) == {serial(new)}

    writer.write(request)
    assert (await read_response(reader)).status == 200
    assert int(writer.get_extra_info("ssl_object").getpeercert()["serialNumber"], 16) == serial(old)
    writer.close()


# --------------------------------------------------------------------------- upstream TLS


async def start_tls_backend(name: str, cert: trustme.LeafCert,
                            client_ca: trustme.CA | None = None,
                            maximum_version: ssl.TLSVersion | None = None) -> Backend:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    if maximum_version is not None:
        context.maximum_version = maximum_version
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        client_ca.configure_trust(context)
    backend = Backend(name=name, port=free_port())
    runner = web.AppRunner(backend_app(backend), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", backend.port, ssl_context=context).start()
    backend.runner = runner
    return backend


def https_upstream(name: str, backend: Backend, tls: str) -> str:
    return (f"apiVersion: kanal.dev/v1alpha1\nkind: Upstream\nmetadata: {{name: {name}}}\n"
            f"spec:\n  endpoints: [{{address: 127.0.0.1, port: {backend.port}}}]\n"
            f"  protocol: HTTPS\n  tls: {tls}\n")


async def test_upstream_tls_verification_and_client_certificates(kanal, ca):
    other_ca = trustme.CA()
    now = datetime.datetime.now(datetime.UTC)
    client_ca = trustme.CA()
    client = client_ca.issue_cert("kanal.client")
    started = {
        "good": await start_tls_backend("good", ca.issue_cert("orders.internal")),
        "foreign": await start_tls_backend("foreign", other_ca.issue_cert("orders.internal")),
        "misnamed": await start_tls_backend("misnamed", ca.issue_cert("other.internal")),
        "expired": await start_tls_backend("expired", ca.issue_cert(
            "orders.internal", not_before=now - datetime.timedelta(days=2),
            not_after=now - datetime.timedelta(days=1))),
        "mtls": await start_tls_backend("mtls", ca.issue_cert("orders.internal"), client_ca),
        "mtls12": await start_tls_backend("mtls12", ca.issue_cert("orders.internal"), client_ca,
                                          maximum_version=ssl.TLSVersion.TLSv1_2),
    }
    try:
        verified = "{sni: orders.internal, caSecretName: upstream-ca}"
        upstreams = [
            https_upstream("good", started["good"], verified),
            https_upstream("foreign", started["foreign"], verified),
            https_upstream("misnamed", started["misnamed"], verified),
            https_upstream("expired", started["expired"], verified),
            https_upstream("mtls", started["mtls"], "{sni: orders.internal, caSecretName: upstream-ca,"
                                                    " clientCertSecretName: client-tls}"),
            https_upstream("mtls-nocert", started["mtls"], verified),
            https_upstream("mtls12-nocert", started["mtls12"], verified),
            https_upstream("insecure", started["foreign"], "{insecureSkipVerify: true}"),
        ]
        routes = [tls_route(name, [f"{name}.up.test"], name, None)
                  for name in ("good", "foreign", "misnamed", "expired", "mtls", "mtls-nocert",
                               "mtls12-nocert", "insecure")]
        k = kanal({"ups.yaml": "---\n".join(upstreams),
                   "secrets.yaml": ca_secret("upstream-ca", ca) + "---\n"
                                   + tls_secret("client-tls", client),
                   "routes.yaml": "---\n".join(routes)})
        expected = {
            "good": (200, "good"),
            "mtls": (200, "mtls"),
            "insecure": (200, "foreign"),
            "foreign": (502, "unable to get local issuer certificate"),
            "misnamed": (502, "Hostname mismatch"),
            "expired": (502, "certificate has expired"),
            "mtls12-nocert": (502, "TLS handshake"),  # the server just resets
            # TLS 1.3: the server refuses the client after the client's handshake is done;
            # the refusal arrives as the connection's end, not as a handshake error.
            "mtls-nocert": (502, "upstream"),
        }
        for name, (status, text) in expected.items():
            response = await plain(k.port, f"{name}.up.test")
            assert response.status == status, (name, response.body)
            assert text.encode() in response.body, (name, response.body)
            if status == 502 and name != "mtls-nocert":
                assert b"TLS" in response.body and f"default/{name}".encode() in response.body
        assert "NOT verified (insecureSkipVerify)" in k.log()
        # X-Forwarded-Proto towards an HTTPS upstream is the client's scheme (here http).
        record = (await plain(k.port, "good.up.test")).json()
        assert header_values(record, "x-forwarded-proto") == ["http"]
    finally:
        for backend in started.values():
            await backend.stop()

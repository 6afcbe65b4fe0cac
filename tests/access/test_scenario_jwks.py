"""Scenario: JWT keys fetched from a JWKS URL, cached, and rotated.

The issuer is a real HTTP server on 127.0.0.1 whose key set the test changes; it counts
its fetches, so the test can tell a refetch from a cache hit.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from tests.access.helpers import api_manifests, serve_app
from tests.access.keys import claims, jwks, rsa_key
from tests.conftest import free_port, raw_request


class Issuer:
    def __init__(self) -> None:
        self.keys = [rsa_key("k1")]
        self.fetches = 0
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def serve(_: web.Request) -> web.Response:
            self.fetches += 1
            return web.Response(text=jwks(*self.keys), content_type="application/json")

        app = web.Application()
        app.router.add_get("/jwks", serve)
        self.runner = await serve_app(app, self.port)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


def manifests(backend, issuer_port: int, cache: str = "1h") -> dict[str, str]:
    return api_manifests(backend, f"""\
    jwt:
      audiences: [shop]
      remoteJWKS: {{uri: "http://127.0.0.1:{issuer_port}/jwks", cacheDuration: {cache}}}
""")


async def call(k, token: str) -> int:
    (answer,) = await raw_request(
        k.port, f"GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    return answer.status


async def test_keys_are_fetched_once_and_rotation_is_followed(backends, kanal) -> None:
    backend = await backends("api")
    issuer = Issuer()
    await issuer.start()
    try:
        k = kanal(manifests(backend, issuer.port))
        first = issuer.keys[0]
        assert await call(k, first.sign(claims())) == 200  # waited for the first fetch
        assert await call(k, first.sign(claims())) == 200
        assert issuer.fetches == 1

        # Rotation: the issuer publishes k2; a token signed by k2 triggers one refetch.
        issuer.keys.append(rsa_key("k2"))
        deadline = time.monotonic() + 10
        status = await call(k, issuer.keys[1].sign(claims()))
        while status != 200 and time.monotonic() < deadline:  # refetches are 1 s apart
            status = await call(k, issuer.keys[1].sign(claims()))
        assert status == 200
        fetched = issuer.fetches
        assert fetched >= 2

        # Made-up kids cannot hammer the issuer: a burst costs at most one fetch.
        before = len(backend.received)
        forger = rsa_key("bogus")
        tokens = [forger.sign(claims(), kid=f"bogus-{i}") for i in range(20)]
        started = time.monotonic()
        statuses = await asyncio.gather(*(call(k, token) for token in tokens))
        elapsed = time.monotonic() - started
        assert set(statuses) == {401}
        assert issuer.fetches <= fetched + 1 + int(elapsed)  # at most one a second
        assert len(backend.received) == before
    finally:
        await issuer.stop()


async def test_an_unreachable_issuer_refuses_tokens(backends, kanal) -> None:
    backend = await backends("api")
    k = kanal(manifests(backend, free_port()))  # nothing listens there
    assert await call(k, rsa_key("k1").sign(claims())) == 401
    assert backend.received == []


async def test_a_body_sent_while_keys_are_fetched_reaches_the_backend_whole(backends,
                                                                           kanal) -> None:
    backend = await backends("api")
    issuer = Issuer()
    await issuer.start()
    try:
        k = kanal(manifests(backend, issuer.port))
        token = issuer.keys[0].sign(claims())
        body = b"x" * 300_000
        (answer,) = await raw_request(
            k.port, b"POST /upload HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer "
            + token.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        assert answer.status == 200
        assert answer.json()["body_size"] == len(body)
        assert issuer.fetches == 1
    finally:
        await issuer.stop()


async def test_keys_older_than_the_cache_duration_are_refreshed_in_the_background(
        backends, kanal) -> None:
    backend = await backends("api")
    issuer = Issuer()
    await issuer.start()
    try:
        k = kanal(manifests(backend, issuer.port, cache="1s"))
        token = issuer.keys[0].sign(claims())
        assert await call(k, token) == 200
        assert issuer.fetches == 1
        deadline = time.monotonic() + 10
        while issuer.fetches < 2:  # each request past the duration may start a refresh
            assert time.monotonic() < deadline, "keys were never refreshed"
            assert await call(k, token) == 200  # served with the held keys meanwhile
    finally:
        await issuer.stop()

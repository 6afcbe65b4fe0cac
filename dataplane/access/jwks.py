"""Keys from JWKS URLs: fetched, cached per URL for the whole process, refreshed.

Kept across reloads (a new configuration naming the same URL finds its keys), so a
reload never makes every token wait for a fetch. A token naming a `kid` the cache does
not hold causes one refetch, and refetches of one URL are at least `REFETCH_INTERVAL`
apart: a flood of tokens with made-up `kid`s costs the key server one request a second
at most. Concurrent requests waiting for the same URL share one fetch.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from kanal.dataplane.access.jwtauth import KeySet

log = logging.getLogger("kanal.access")

REFETCH_INTERVAL = 1.0
FETCH_TIMEOUT = 5.0
MAX_JWKS_BYTES = 1024 * 1024


class JWKSCache:
    """URL -> the keys last fetched from it."""

    def __init__(self) -> None:
        self.sets: dict[str, KeySet] = {}
        self.fetched_at: dict[str, float] = {}
        self._attempted_at: dict[str, float] = {}
        self._inflight: dict[str, asyncio.Task[None]] = {}

    def stale(self, uri: str, max_age: float, now: float) -> bool:
        return now - self.fetched_at.get(uri, 0.0) > max_age

    def may_refetch(self, uri: str, now: float) -> bool:
        """Whether a fetch of `uri` may start now (bounded rate)."""
        return now - self._attempted_at.get(uri, -REFETCH_INTERVAL) >= REFETCH_INTERVAL

    async def refresh(self, uri: str) -> None:
        """Fetch `uri` (or wait for the fetch under way); failures keep the old keys."""
        task = self._inflight.get(uri)
        if task is None:
            self._attempted_at[uri] = time.monotonic()
            task = asyncio.get_running_loop().create_task(self._fetch(uri))
            self._inflight[uri] = task
            task.add_done_callback(lambda _: self._inflight.pop(uri, None))
        await asyncio.shield(task)

    async def _fetch(self, uri: str) -> None:
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session, \
                    session.get(uri, allow_redirects=False) as answer:
                if answer.status != 200:
                    raise ValueError(f"answered {answer.status}")
                body = await answer.content.read(MAX_JWKS_BYTES + 1)
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError(f"larger than {MAX_JWKS_BYTES} bytes")
            keys = KeySet.parse(body.decode("utf-8"))
        except (aiohttp.ClientError, TimeoutError, ValueError, UnicodeDecodeError) as exc:
            log.warning("JWKS %s could not be fetched: %s; keeping the keys held", uri, exc)
            return
        self.sets[uri] = keys
        self.fetched_at[uri] = time.monotonic()
        log.info("JWKS %s fetched: %d keys", uri, len(keys.keys))


KEYS = JWKSCache()
"""The process's one cache: every rule naming a URL shares its keys."""

"""Cluster-wide rate limits: token buckets in Redis, shared by every dataplane.

One Lua script judges all of a request's buckets atomically, on Redis' clock (so the
dataplanes' clocks do not matter): each bucket is refilled, a token is taken from each
only if every one has a token, and each key expires once its bucket would be full
again, so Redis holds only buckets in use. A request's keys share one hash tag (its
rule), so they live on one shard of a Redis Cluster.

The server is `KANAL_REDIS_URL` (`redis://host:6379/0`, `rediss://` for TLS), read
by each dataplane process. A call that fails or takes longer than twice `CALL_TIMEOUT`
is an outage: the policy's `failureMode` decides (Open lets requests through, Closed answers
503), the first failure is logged once and so is the recovery, and
`kanal_ratelimit_redis_failures_total` counts the calls that failed.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from typing import Any

from kanal.contract.access import RateLimit
from kanal.dataplane.access import counters

log = logging.getLogger("kanal.access")

ENV = "KANAL_REDIS_URL"
CALL_TIMEOUT = 0.5
"""Bound of a connect or a reply; a whole call (waiting for a pooled connection
included) is bounded by twice that."""
MAX_CONNECTIONS = 32

_SCRIPT = """
local now_t = redis.call('TIME')
local now = tonumber(now_t[1]) + tonumber(now_t[2]) / 1000000
local n = #KEYS
local levels = {}
local allowed = 1
for i = 1, n do
  local rate = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local held = redis.call('HMGET', KEYS[i], 't', 'l')
  local tokens = burst
  if held[1] then
    tokens = math.min(burst, tonumber(held[1]) + math.max(0, now - tonumber(held[2])) * rate)
  end
  levels[i] = tokens
  if tokens < 1 then allowed = 0 end
end
local answer = {allowed}
for i = 1, n do
  local rate = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  if allowed == 1 then levels[i] = levels[i] - 1 end
  redis.call('HSET', KEYS[i], 't', tostring(levels[i]), 'l', tostring(now))
  redis.call('PEXPIRE', KEYS[i], math.ceil((burst - levels[i]) / rate * 1000) + 1000)
  answer[i + 1] = tostring(levels[i])
end
return answer
"""


class RedisUnavailable(Exception):
    """Redis could not judge the request (unreachable, slow, not configured)."""


class RedisLimits:
    """The process's connection to the rate-limit Redis, and whether it is down."""

    def __init__(self, url: str | None) -> None:
        self.url = url
        self.down = False
        self._client: Any = None
        self._script: Any = None

    def _connect(self, url: str) -> None:
        import redis.asyncio as aioredis

        # A burst of requests shares MAX_CONNECTIONS connections (they wait for one,
        # within the call's bound) instead of opening one each.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=CALL_TIMEOUT * 2,
            socket_timeout=CALL_TIMEOUT, socket_connect_timeout=CALL_TIMEOUT)
        self._client = aioredis.Redis(connection_pool=pool)
        self._script = self._client.register_script(_SCRIPT)

    async def take_all(self, tag: str, keys: Sequence[bytes], limits: Sequence[RateLimit]
                       ) -> tuple[bool, list[float]]:
        """Judge the buckets in Redis; raises RedisUnavailable on an outage."""
        if self.url is None:
            self._failed("no Redis is configured (KANAL_REDIS_URL)")
            raise RedisUnavailable("no Redis configured")
        if self._client is None:
            self._connect(self.url)
        names = [f"kanal:rl:{{{tag}}}:{key.hex()}" for key in keys]
        args: list[float] = []
        for limit in limits:
            args += [limit.requests / limit.per, float(limit.burst)]
        try:
            async with asyncio.timeout(CALL_TIMEOUT * 2):
                answer = await self._script(keys=names, args=args)
        except Exception as exc:  # any failure of the client is an outage
            self._failed(f"{type(exc).__name__}: {exc}")
            raise RedisUnavailable(str(exc)) from None
        if self.down:
            self.down = False
            log.info("rate-limit Redis %s is reachable again", self.url)
        return bool(int(answer[0])), [float(level) for level in answer[1:]]

    def _failed(self, why: str) -> None:
        counters.count_redis_failure()
        if not self.down:
            self.down = True
            log.error("rate-limit Redis %s is unavailable (%s); Global limits apply their "
                      "failureMode until it is back", self.url, why)


_redis: RedisLimits | None = None


def redis_limits() -> RedisLimits:
    global _redis
    if _redis is None:
        _redis = RedisLimits(os.environ.get(ENV) or None)
    return _redis

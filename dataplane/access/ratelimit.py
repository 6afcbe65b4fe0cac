"""Token-bucket rate limits (pure: the clock and the bucket memory are handed in).

A limit allows `requests` per `per` seconds with at most `burst` tokens in its bucket;
a request takes one token from the bucket of each limit of its rule, or from none:
the buckets are judged together and only a request every limit allows takes its
tokens, so a request refused by the overall limit does not use up its client's share.

Buckets live in a `BucketTable`: fixed-size slots in one buffer (a bytearray for one
process, a shared memory file for `--workers N`), 32 bytes each: a 16-byte key digest,
the tokens and the time they were counted. A key's slot is found among `PROBES` slots
from its hash; a new key takes a free slot, else the slot whose bucket is full again
(an idle bucket: forgetting it changes nothing), else the least recently used one.
Memory is bounded by construction, whatever the number of distinct keys: a million
client addresses cost the same `slots * 32` bytes as ten. The price of a full table
under a key flood is that an evicted key starts over with a full bucket.

Answers carry the IETF httpapi draft's fields (draft-ietf-httpapi-ratelimit-headers):
`RateLimit-Policy: "name";q=requests;w=seconds` and `RateLimit: "name";r=remaining;
t=seconds`, for this request's own buckets only; a refusal also has `Retry-After`.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kanal.contract.access import RateLimit, RateLimitPolicy
from kanal.dataplane.access.jwtauth import claim_text

SLOT = struct.Struct("<16sdd")
PROBES = 8
EMPTY_KEY = bytes(16)


class BucketTable:
    """Token buckets in a fixed buffer of `len(buffer) // 32` slots."""

    __slots__ = ("buffer", "slots")

    def __init__(self, buffer: Any) -> None:
        self.buffer = buffer  # bytearray, mmap: anything with the buffer protocol
        self.slots = len(buffer) // SLOT.size

    def _find(self, key: bytes, now: float, rate: float, burst: float) -> int:
        """The offset of `key`'s slot, claiming one if the key has none."""
        buffer = self.buffer
        start = int.from_bytes(key[:8], "little") % self.slots
        free = idle = oldest = -1
        oldest_time = math.inf
        for probe in range(PROBES):
            offset = ((start + probe) % self.slots) * SLOT.size
            slot_key, tokens, last = SLOT.unpack_from(buffer, offset)
            if slot_key == key:
                return offset
            if slot_key == EMPTY_KEY:
                if free < 0:
                    free = offset
            elif idle < 0 and tokens + (now - last) * rate >= burst:
                idle = offset
            elif last < oldest_time:
                oldest, oldest_time = offset, last
        offset = free if free >= 0 else idle if idle >= 0 else oldest
        SLOT.pack_into(buffer, offset, key, burst, now)
        return offset

    def peek(self, keys: Sequence[bytes], limits: Sequence[RateLimit], now: float
             ) -> list[float]:
        """The tokens each key's bucket holds now, taking and claiming nothing."""
        levels = []
        for key, limit in zip(keys, limits, strict=True):
            tokens = float(limit.burst)
            start = int.from_bytes(key[:8], "little") % self.slots
            for probe in range(PROBES):
                offset = ((start + probe) % self.slots) * SLOT.size
                slot_key, held, last = SLOT.unpack_from(self.buffer, offset)
                if slot_key == key:
                    rate = limit.requests / limit.per
                    tokens = min(tokens, held + max(now - last, 0.0) * rate)
                    break
            levels.append(tokens)
        return levels

    def take_all(self, keys: Sequence[bytes], limits: Sequence[RateLimit], now: float
                 ) -> tuple[bool, list[float]]:
        """Take a token from each key's bucket if every one has a token; the tokens
        left in each (after taking, or as they are when refused)."""
        offsets: list[int] = []
        levels: list[float] = []
        allowed = True
        for key, limit in zip(keys, limits, strict=True):
            rate = limit.requests / limit.per
            offset = self._find(key, now, rate, limit.burst)
            _, tokens, last = SLOT.unpack_from(self.buffer, offset)
            tokens = min(float(limit.burst), tokens + max(now - last, 0.0) * rate)
            offsets.append(offset)
            levels.append(tokens)
            if tokens < 1.0:
                allowed = False
        if allowed:
            levels = [tokens - 1.0 for tokens in levels]
        for key, offset, tokens in zip(keys, offsets, levels, strict=True):
            SLOT.pack_into(self.buffer, offset, key, tokens, now)
        return allowed, levels


@dataclass(frozen=True, slots=True)
class RateVerdict:
    allowed: bool
    headers: bytes  # RateLimit-Policy and RateLimit lines, CRLF-joined, no final CRLF
    retry_after: int = 0
    limit: str = ""  # the first limit that refused


class RateLimiter:
    """One rule's limits, compiled: names, rates and key recipes."""

    __slots__ = ("idents", "limits", "policy_line", "spec")

    def __init__(self, rule_name: str, spec: RateLimitPolicy) -> None:
        self.spec = spec
        self.limits = spec.limits
        # A bucket's identity: its owner (the Route, for limits all its rules share) and
        # the settings, so a changed limit starts afresh.
        self.idents = tuple(
            f"{spec.scope or rule_name}\x00{limit.name}\x00{limit.requests}/{limit.per}/{limit.burst}\x00"
            for limit in spec.limits)
        self.policy_line = b"RateLimit-Policy: " + b", ".join(
            b'"%b";q=%d;w=%d' % (limit.name.encode("latin-1"), limit.requests,
                                 max(1, round(limit.per)))
            for limit in spec.limits)

    def keys(self, client: str, headers: Sequence[tuple[bytes, bytes]],
             claims: Mapping[str, Any] | None) -> list[bytes]:
        """The bucket key digest of each limit for this request."""
        digests = []
        for ident, limit in zip(self.idents, self.limits, strict=True):
            parts = [ident]
            key = limit.key
            if key.client_address:
                parts.append(client)
            if key.header is not None:
                wanted = key.header.encode("latin-1")
                parts.append(next((value.decode("latin-1") for name, value in headers
                                   if name.lower() == wanted), ""))
            if key.claim is not None:
                value = None if claims is None else claims.get(key.claim)
                parts.append("" if value is None else claim_text(value))
            digests.append(hashlib.blake2b("\x00".join(parts).encode("utf-8", "replace"),
                                           digest_size=16).digest())
        return digests

    def verdict(self, allowed: bool, levels: Sequence[float]) -> RateVerdict:
        """The answer's headers for the buckets' levels after `take_all`."""
        states = []
        refused_by = ""
        retry = 0
        for limit, tokens in zip(self.limits, levels, strict=True):
            rate = limit.requests / limit.per
            if allowed:
                reset = math.ceil((limit.burst - tokens) / rate)
            else:
                reset = math.ceil((1.0 - tokens) / rate) if tokens < 1.0 else 0
                if tokens < 1.0 and reset >= retry:
                    retry, refused_by = max(reset, 1), refused_by or limit.name
            states.append(b'"%b";r=%d;t=%d' % (limit.name.encode("latin-1"),
                                                max(0, math.floor(tokens)), reset))
        headers = self.policy_line + b"\r\nRateLimit: " + b", ".join(states)
        return RateVerdict(allowed, headers, retry, refused_by)

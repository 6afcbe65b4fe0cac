"""The call to an external authorization service (the I/O half of `extauthpolicy`).

One aiohttp session per process and event loop keeps connections to the services
alive between requests. The call is bounded by the policy's `timeout`; a timeout, a
refused connection or a broken answer is `ExtAuthUnavailable`, and the caller applies
the policy's `failureMode`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import aiohttp

from kanal.contract.access import ExtAuth
from kanal.dataplane.access.extauthpolicy import (
    MAX_DENIAL_BODY,
    Allowed,
    Denied,
    auth_headers,
    auth_url,
    judge,
)

log = logging.getLogger("kanal.access")


class ExtAuthUnavailable(Exception):
    """The service gave no usable answer in time."""


_sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}


def _session() -> aiohttp.ClientSession:
    loop = asyncio.get_running_loop()
    session = _sessions.get(loop)
    if session is None or session.closed:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256), auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"))
        _sessions[loop] = session
    return session


async def ask(spec: ExtAuth, method: bytes, target: bytes,
              headers: Sequence[tuple[bytes, bytes]], client: str, scheme: str,
              host: bytes | None, body: bytes | None = None) -> Allowed | Denied:
    """The service's verdict on one request; raises ExtAuthUnavailable."""
    url = auth_url(spec, target)
    sent = auth_headers(spec, headers, client, scheme, host)
    if body is not None and len(body) > spec.max_request_bytes:
        body = body[:spec.max_request_bytes]
        sent.append(("X-Kanal-Auth-Partial-Body", "true"))
    try:
        async with asyncio.timeout(spec.timeout), _session().request(
                method.decode("latin-1"), url, allow_redirects=False, data=body,
                headers=sent) as answer:
            body = await answer.content.read(MAX_DENIAL_BODY)
            raw = [(bytes(name), bytes(value)) for name, value in answer.raw_headers]
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
        if spec.url not in _down:
            _down.add(spec.url)
            log.error("external auth %s is unavailable (%s); its policies apply their "
                      "failureMode until it answers", spec.url, type(exc).__name__)
        raise ExtAuthUnavailable(str(exc)) from None
    if spec.url in _down:
        _down.discard(spec.url)
        log.info("external auth %s answers again", spec.url)
    return judge(spec, answer.status, raw, body)


_down: set[str] = set()
"""Services whose last call failed: an outage is logged once, and so is its end."""

"""Active health checks: one small loop per endpoint of an Upstream with `healthCheck`.

Each check is an HTTP GET of the configured path, answered within `timeout` with a
2xx or 3xx, or (`grpc` set) a grpc.health.v1 `Check` answered SERVING (grpchealth.py). `unhealthyThreshold` failures in a row take the endpoint out of rotation;
`healthyThreshold` passes in a row bring it back. Checks start at once and then run
every `interval`, with up to 10% jitter so many dataplanes do not check in lockstep.
Every endpoint has its own task: a slow check of one upstream never delays another.

Endpoints start healthy (a restart or reload must not turn traffic away), so the
first failures count down from there. Checkers live across reloads while the endpoint
and its settings stay the same.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Callable

from kanal.contract.snapshot import HealthCheck
from kanal.dataplane.balancer import EndpointState
from kanal.dataplane.grpchealth import check_grpc
from kanal.dataplane.http1 import wire_safe

log = logging.getLogger("kanal.health")

JITTER = 0.1


class HealthState:
    """The pure part: consecutive results against the thresholds."""

    __slots__ = ("settings", "healthy", "passes", "failures")

    def __init__(self, settings: HealthCheck, healthy: bool = True) -> None:
        self.settings = settings
        self.healthy = healthy
        self.passes = 0
        self.failures = 0

    def record(self, ok: bool) -> bool | None:
        """Count one check; returns the new health when it changed."""
        if ok:
            self.passes += 1
            self.failures = 0
            if not self.healthy and self.passes >= self.settings.healthy_threshold:
                self.healthy = True
                return True
        else:
            self.failures += 1
            self.passes = 0
            if self.healthy and self.failures >= self.settings.unhealthy_threshold:
                self.healthy = False
                return False
        return None


async def check_once(
    address: str,
    port: int,
    settings: HealthCheck,
    *,
    host: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> tuple[bool, str]:
    """One HTTP check; (passed, what happened)."""
    target, authority = settings.path.encode("latin-1", "replace"), (host or address).encode(
        "latin-1", "replace")
    if not (wire_safe(target) and wire_safe(authority)) or b" " in target:
        # Refused at load already (contract/validate.py); never written, whatever the source.
        return False, f"health check path or host is not safe to send: {settings.path!r}"
    writer = None
    try:
        async with asyncio.timeout(settings.timeout):
            if ssl_context is not None:
                reader, writer = await asyncio.open_connection(
                    address, port, ssl=ssl_context, server_hostname=server_hostname or address
                )
            else:
                reader, writer = await asyncio.open_connection(address, port)
            writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: " + authority
                         + b"\r\nUser-Agent: kanal-health-check\r\nConnection: close\r\n\r\n")
            status_line = await reader.readline()
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[1].isdigit():
            return False, f"not an HTTP answer: {status_line[:60]!r}"
        status = int(parts[1])
        return 200 <= status < 400, f"status {status}"
    except TimeoutError:
        return False, f"no answer within {settings.timeout:g}s"
    except (OSError, ssl.SSLError) as exc:
        return False, str(exc) or type(exc).__name__
    finally:
        if writer is not None:
            writer.close()


class EndpointChecker:
    """Runs the checks of one endpoint and flips its EndpointState."""

    def __init__(
        self,
        upstream_key: str,
        state: EndpointState,
        settings: HealthCheck,
        *,
        on_change: Callable[[EndpointState, bool, str], None],
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.upstream_key = upstream_key
        self.state = state
        self.settings = settings
        self.health = HealthState(settings, healthy=state.healthy)
        self.on_change = on_change
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.rng = rng or random.Random()
        self.task: asyncio.Task[None] | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.task = loop.create_task(self._run())

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None

    def adopt(self, state: EndpointState) -> None:
        """Keep checking for a new EndpointState object of the same endpoint (a reload)."""
        state.healthy = self.state.healthy
        self.state = state
        state.refresh(time.monotonic())

    async def _run(self) -> None:
        settings = self.settings
        while True:
            check = check_once if settings.grpc_service is None else check_grpc
            ok, detail = await check(
                self.state.endpoint.address, self.state.endpoint.port, settings,
                ssl_context=self.ssl_context, server_hostname=self.server_hostname,
            )
            changed = self.health.record(ok)
            if changed is not None:
                self.state.healthy = changed
                self.state.refresh(time.monotonic())
                self.on_change(self.state, changed, detail)
            jitter = settings.interval * JITTER * (2 * self.rng.random() - 1)
            await asyncio.sleep(max(settings.interval + jitter, 0.05))

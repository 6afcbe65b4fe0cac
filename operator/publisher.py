"""The control plane's side of the configuration protocol: serve Snapshots to dataplanes.

Dataplanes subscribe; the control plane never has to find them (as with Envoy's xDS).

    GET  /v1/snapshot?known=V&applied=A&dataplane=ID&mode=M&namespace=NS&pod=P
         200 + the Snapshot JSON (header X-Kanal-Version) at once when the current
         version differs from `known`; otherwise the request is held (long poll) until
         a new Snapshot is published (200) or `poll_timeout` passes (304). `applied`
         is the version the dataplane runs (it differs from `known` after a NACK): a
         replica that started after the dataplane applied it learns its state this way.
         503 while no Snapshot exists yet or while this replica shuts down.
    POST /v1/ack  {"dataplane": ID, "version": V, "ok": true|false, "error": "..."}
         204; the dataplane applied V (ok) or refused it (error says why).
    POST /v1/report  {"dataplane": ID, "version": V, "splits": [observation, ...]}
         204; what the dataplane's weighted rules did lately (kanal.contract.splits),
         kept with the dataplane for the Routes' SplitObserved condition.

Every request carries `Authorization: Bearer <token>`, checked by the `authenticate`
coroutine the Publisher is given (Kubernetes TokenReview in a cluster, or
`shared_token_authenticator` for `--token-file`); anything else gets 401 and no
configuration.

The bytes served are a pure function of the Snapshot (canonical JSON: sorted keys, no
spaces), so several replicas given the same objects serve the same bytes and version,
and a dataplane may switch between them freely. A replica keeps no state a dataplane
depends on: what it knows about dataplanes it learns from their polls and ACKs.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from kanal.contract.plain import to_plain
from kanal.contract.protocol import ACK_PATH, REPORT_PATH, SNAPSHOT_PATH, VERSION_HEADER
from kanal.contract.snapshot import Snapshot, content_version
from kanal.contract.splits import SplitObservation

log = logging.getLogger("kanal.publisher")

Authenticator = Callable[[str], Awaitable[bool]]
"""Called with the bearer token of a request; True lets the request in."""

AckListener = Callable[[str, str, bool, "str | None", "float | None"], None]
"""Called with (dataplane id, version, ok, error, seconds from publish to this report)."""

MODES = ("ingress", "sidecar")


@dataclass
class DataplaneStatus:
    """What a Publisher knows about one subscribed dataplane."""

    id: str
    mode: str = "ingress"
    namespace: str | None = None
    pod: str | None = None
    acked_version: str | None = None
    acked_at: float | None = None
    """Wall-clock time (time.time()) of the last ACK."""
    nack: tuple[str, str] | None = None
    """The last refused (version, error); kept after later ACKs, as history."""
    nacked_at: float | None = None
    last_seen: float = 0.0
    """Wall-clock time of the dataplane's last request (start or end of a poll)."""
    polling: int = 0
    """Long polls this dataplane holds open right now."""
    peer: str | None = None
    splits: tuple[SplitObservation, ...] = ()
    """What its weighted rules did lately, from its last split report."""
    _seen_mono: float = field(default=0.0, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "mode": self.mode,
            "namespace": self.namespace,
            "pod": self.pod,
            "ackedVersion": self.acked_version,
            "ackedAt": self.acked_at,
            "nack": ({"version": self.nack[0], "error": self.nack[1]} if self.nack else None),
            "nackedAt": self.nacked_at,
            "lastSeen": self.last_seen,
            "polling": self.polling,
            "peer": self.peer,
        }


@dataclass(frozen=True)
class _Published:
    snapshot: Snapshot
    body: bytes
    published_at: float  # monotonic


def shared_token_authenticator(token: str) -> Authenticator:
    """An authenticator that accepts exactly `token` (compared in constant time)."""
    expected = token.strip().encode()
    if not expected:
        raise ValueError("the shared token is empty")

    async def authenticate(presented: str) -> bool:
        return hmac.compare_digest(presented.encode(), expected)

    return authenticate


def snapshot_body(snapshot: Snapshot, fragments: dict[Any, str] | None = None) -> bytes:
    """The bytes served for a Snapshot: canonical JSON (`snapshot.to_json()`), the same on
    every replica.

    `fragments` maps Routes, Upstreams and EgressPolicies to their JSON text, from the
    previous call: items equal to one there are not serialised again (a change to one
    Route of a thousand serialises one Route). It is updated to the items of this
    Snapshot. Raises ValueError when the Snapshot's version is not the hash of its
    content (a dataplane would refuse it anyway).
    """
    if fragments is not None:
        body = _assemble(snapshot, fragments)
        if body is not None:
            return body
        fragments.clear()  # equal but differently typed values (1 == 1.0): start afresh
    body = _assemble(snapshot, {})
    if body is None:
        raise ValueError(
            f"snapshot version {snapshot.version!r} is not the hash of its content "
            f"({content_version(snapshot)}); use Snapshot.with_version()"
        )
    return body


def _assemble(snapshot: Snapshot, fragments: dict[Any, str]) -> bytes | None:
    """Canonical JSON of `snapshot` from per-item fragments; None if the version is wrong."""
    dump = json.dumps
    used: dict[Any, str] = {}
    parts = []
    # Sorted keys: egress_policies, routes, upstreams, version; lists keep their order.
    for name, items in (("egress_policies", snapshot.egress_policies),
                        ("routes", snapshot.routes), ("upstreams", snapshot.upstreams)):
        texts = []
        for item in items:
            text = fragments.get(item)
            if text is None:
                text = dump(to_plain(item), sort_keys=True, separators=(",", ":"))
            used[item] = text
            texts.append(text)
        parts.append(f'"{name}":[{",".join(texts)}]')
    content = ("{" + ",".join(parts) + ',"version":""}').encode()
    if hashlib.sha256(content).hexdigest()[:16] != snapshot.version:
        return None
    fragments.clear()
    fragments.update(used)
    return content[: -len(b'""}')] + b'"' + snapshot.version.encode() + b'"}'


class Publisher:
    """Holds the current Snapshot and serves it to subscribed dataplanes.

    Use from one event loop: `publish` wakes the long polls held on that loop.
    """

    def __init__(
        self,
        authenticate: Authenticator,
        *,
        poll_timeout: float = 25.0,
        forget_after: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        keep_versions: int = 64,
    ) -> None:
        self.authenticate = authenticate
        self.poll_timeout = poll_timeout
        self.forget_after = forget_after
        self.clock = clock
        self.wall_clock = wall_clock
        self.on_ack: list[AckListener] = []
        self.on_forget: list[Callable[[str], None]] = []
        self.on_report: list[Callable[[str], None]] = []
        """Called with a dataplane's id when it reported its splits."""
        self.rejected = 0
        """Requests refused for want of a valid token."""
        self._current: _Published | None = None
        self._published_at: OrderedDict[str, float] = OrderedDict()
        self._keep_versions = keep_versions
        self._dataplanes: dict[str, DataplaneStatus] = {}
        self._changed: asyncio.Event | None = None
        self._fragments: dict[Any, str] = {}
        self._closing = False

    # ------------------------------------------------------------------ the operator's side

    @property
    def current(self) -> Snapshot | None:
        return self._current.snapshot if self._current is not None else None

    def publish(self, snapshot: Snapshot) -> None:
        """Make `snapshot` current and answer every held poll with it at once.

        Publishing the current version again does nothing. Raises ValueError when the
        Snapshot's version is not the hash of its content.
        """
        if self._current is not None and self._current.snapshot.version == snapshot.version:
            return
        now = self.clock()  # propagation times count from here, serialising included
        body = snapshot_body(snapshot, self._fragments)
        self._current = _Published(snapshot, body, now)
        self._published_at[snapshot.version] = now
        self._published_at.move_to_end(snapshot.version)
        while len(self._published_at) > self._keep_versions:
            self._published_at.popitem(last=False)
        log.info("published configuration %s (%d bytes)", snapshot.version, len(body))
        self._wake()

    def dataplanes(self) -> list[DataplaneStatus]:
        """The connected dataplanes (seen within `forget_after`, or holding a poll), by id."""
        self._sweep()
        return [self._dataplanes[key] for key in sorted(self._dataplanes)]

    def programmed(self, version: str) -> tuple[int, int]:
        """(dataplanes that applied `version`, connected dataplanes)."""
        planes = self.dataplanes()
        return sum(1 for p in planes if p.acked_version == version), len(planes)

    def close(self) -> None:
        """Answer every held poll now (503) and refuse new ones: this replica is going away."""
        self._closing = True
        self._wake()

    # ------------------------------------------------------------------ HTTP

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(SNAPSHOT_PATH, self._get_snapshot)
        app.router.add_post(ACK_PATH, self._post_ack)
        app.router.add_post(REPORT_PATH, self._post_report)

        async def on_startup(_: web.Application) -> None:
            self._closing = False  # served again after a stop

        async def on_shutdown(_: web.Application) -> None:
            self.close()

        app.on_startup.append(on_startup)
        app.on_shutdown.append(on_shutdown)
        return app

    async def _authorized(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            ok = False
        else:
            try:
                ok = bool(await self.authenticate(token))
            except Exception:  # an authenticator that fails lets nobody in
                log.exception("token authentication failed")
                ok = False
        if not ok:
            self.rejected += 1
            log.warning("refused %s %s from %s: no valid bearer token",
                        request.method, request.path, request.remote)
        return ok

    @staticmethod
    def _unauthorized() -> web.Response:
        return web.Response(status=401, text="401: a valid bearer token is required\n",
                            headers={"WWW-Authenticate": 'Bearer realm="kanal"'})

    async def _get_snapshot(self, request: web.Request) -> web.StreamResponse:
        if not await self._authorized(request):
            return self._unauthorized()
        query = request.query
        dataplane_id = query.get("dataplane", "").strip()
        mode = query.get("mode", "ingress")
        if not dataplane_id:
            return web.Response(status=400, text="400: the dataplane parameter is required\n")
        if mode not in MODES:
            return web.Response(status=400, text=f"400: mode must be one of {', '.join(MODES)}\n")
        plane = self._seen(dataplane_id, request)
        plane.mode = mode
        plane.namespace = query.get("namespace") or plane.namespace
        plane.pod = query.get("pod") or plane.pod
        applied = query.get("applied")
        if applied and applied != plane.acked_version:
            self._record(plane, applied, True, None)
        known = query.get("known") or None

        plane.polling += 1
        try:
            deadline = self.clock() + self.poll_timeout
            while True:
                if self._closing:
                    return web.Response(status=503, text="503: this control plane is stopping\n")
                current = self._current
                if current is not None and current.snapshot.version != known:
                    return web.Response(
                        body=current.body,
                        content_type="application/json",
                        headers={VERSION_HEADER: current.snapshot.version},
                    )
                left = deadline - self.clock()
                if left <= 0:
                    if current is None:
                        return web.Response(status=503, text="503: no configuration yet\n")
                    return web.Response(status=304, headers={VERSION_HEADER: current.snapshot.version})
                if self._changed is None:
                    self._changed = asyncio.Event()
                changed = self._changed
                try:
                    async with asyncio.timeout(left):
                        await changed.wait()
                except TimeoutError:
                    pass
        finally:
            plane.polling -= 1
            self._touch(plane)

    async def _post_ack(self, request: web.Request) -> web.Response:
        if not await self._authorized(request):
            return self._unauthorized()
        try:
            data = await request.json()
            dataplane_id = data["dataplane"]
            version = data["version"]
            ok = data["ok"]
            error = data.get("error")
            if not (isinstance(dataplane_id, str) and dataplane_id and isinstance(version, str)
                    and isinstance(ok, bool) and (error is None or isinstance(error, str))):
                raise TypeError("bad field types")
        except (ValueError, KeyError, TypeError) as exc:
            return web.Response(
                status=400,
                text=f"400: expected JSON {{dataplane, version, ok, error}}: {exc}\n",
            )
        plane = self._seen(dataplane_id, request)
        self._record(plane, version, ok, error if not ok else None)
        return web.Response(status=204)

    async def _post_report(self, request: web.Request) -> web.Response:
        if not await self._authorized(request):
            return self._unauthorized()
        try:
            data = await request.json()
            dataplane_id = data["dataplane"]
            raw = data["splits"]
            if not (isinstance(dataplane_id, str) and dataplane_id and isinstance(raw, list)):
                raise TypeError("bad field types")
            splits = tuple(SplitObservation.from_dict(item) for item in raw)
        except (ValueError, KeyError, TypeError) as exc:
            return web.Response(
                status=400, text=f"400: expected JSON {{dataplane, version, splits}}: {exc}\n")
        plane = self._seen(dataplane_id, request)
        plane.splits = splits
        for listener in list(self.on_report):
            try:
                listener(plane.id)
            except Exception:
                log.exception("an on_report listener failed")
        return web.Response(status=204)

    # ------------------------------------------------------------------ bookkeeping

    def _seen(self, dataplane_id: str, request: web.Request) -> DataplaneStatus:
        self._sweep()
        plane = self._dataplanes.get(dataplane_id)
        if plane is None:
            plane = self._dataplanes[dataplane_id] = DataplaneStatus(id=dataplane_id)
            log.info("dataplane %s subscribed from %s", dataplane_id, request.remote)
        plane.peer = request.remote
        self._touch(plane)
        return plane

    def _touch(self, plane: DataplaneStatus) -> None:
        plane._seen_mono = self.clock()
        plane.last_seen = self.wall_clock()

    def _record(self, plane: DataplaneStatus, version: str, ok: bool, error: str | None) -> None:
        published = self._published_at.get(version)
        elapsed = self.clock() - published if published is not None else None
        if ok:
            plane.acked_version = version
            plane.acked_at = self.wall_clock()
            log.info("dataplane %s applied %s", plane.id, version)
        else:
            plane.nack = (version, error or "")
            plane.nacked_at = self.wall_clock()
            log.warning("dataplane %s refused %s: %s", plane.id, version, error)
        for listener in list(self.on_ack):
            try:
                listener(plane.id, version, ok, error, elapsed)
            except Exception:
                log.exception("an on_ack listener failed")

    def _sweep(self) -> None:
        limit = self.clock() - self.forget_after
        gone = [key for key, plane in self._dataplanes.items()
                if plane.polling == 0 and plane._seen_mono < limit]
        for key in gone:
            del self._dataplanes[key]
            log.info("dataplane %s forgotten: not seen for %.0f s", key, self.forget_after)
            for listener in list(self.on_forget):
                try:
                    listener(key)
                except Exception:
                    log.exception("an on_forget listener failed")

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None


async def serve_publisher(publisher: Publisher, host: str, port: int) -> web.AppRunner:
    """Serve `publisher.app()` on host:port; stop with `await runner.cleanup()`."""
    runner = web.AppRunner(publisher.app(), access_log=None, handle_signals=False,
                           shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


__all__ = [
    "ACK_PATH",
    "SNAPSHOT_PATH",
    "VERSION_HEADER",
    "AckListener",
    "Authenticator",
    "DataplaneStatus",
    "Publisher",
    "serve_publisher",
    "shared_token_authenticator",
    "snapshot_body",
]

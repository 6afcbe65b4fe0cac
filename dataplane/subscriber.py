"""The dataplane's side of the configuration protocol: subscribe, validate, apply, ACK.

A `Subscriber` is a feed for `kanal.dataplane.process.run_dataplane`. It long-polls
the control plane (`GET /v1/snapshot?known=V`: answered at once when the control plane
has another version, else held until it has one), and for each Snapshot it gets:

1. parses the JSON into a Snapshot and checks that its version is the hash of its
   content (a truncated or tampered body is refused);
2. applies it (`apply_snapshot`: the route table and pools are built first, then
   swapped in atomically; a Snapshot that cannot run leaves the previous one serving);
3. answers `POST /v1/ack` with the version and ok (ACK) or the error (NACK);
4. keeps the last good Snapshot in `--state-dir` (written to a temporary file,
   fsynced, renamed), so a dataplane restarted while the control plane is away serves
   what it served before (and `/ready` says so).

Connection failures are retried with capped exponential backoff with jitter, reset by
any answer. The bearer token is read from `--token-file` (or the pod's service-account
token) before every request, so a rotated token is picked up without a restart.

This module imports nothing of the control plane: no kopf, no pydantic models, no
`kanal.operator`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from kanal.contract.codec import SnapshotDecoder, SnapshotRejected
from kanal.contract.protocol import ACK_PATH, SNAPSHOT_PATH, STATE_FILE, VERSION_HEADER
from kanal.contract.snapshot import Snapshot
from kanal.dataplane.process import apply_snapshot, apply_snapshot_off_loop
from kanal.dataplane.runtime import Runtime
from kanal.dataplane.server import configuration_objects

log = logging.getLogger("kanal.subscriber")

SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class Backoff:
    """Capped exponential backoff with jitter: the n-th delay is in [c/2, c], c = min(cap, initial * 2**n).

    With the defaults the first retry waits 0.2 to 0.4 s, later ones at most 10 s; the
    jitter keeps many dataplanes from reconnecting in step after the control plane
    comes back.
    """

    def __init__(self, initial: float = 0.2, cap: float = 10.0, rng: random.Random | None = None) -> None:
        if not 0 < initial <= cap:
            raise ValueError("backoff needs 0 < initial <= cap")
        self.initial = initial
        self.cap = cap
        self.rng = rng or random.Random()
        self.failures = 0

    def next(self) -> float:
        ceiling = min(self.cap, self.initial * 2 ** (self.failures + 1))
        self.failures += 1
        return max(self.initial, self.rng.uniform(ceiling / 2, ceiling))

    def reset(self) -> None:
        self.failures = 0


@dataclass
class SubscriberOptions:
    control_plane: str
    """Base URL of the control plane, e.g. http://kanal-operator.kanal:9000."""
    mode: str = "ingress"
    dataplane_id: str | None = None
    """Default: $POD_NAME, else host name and process id."""
    namespace: str | None = None
    """Default: $POD_NAMESPACE, else the service account's namespace file."""
    pod: str | None = None
    """Default: $POD_NAME."""
    token_file: Path | None = None
    """Default: the pod's service-account token, when present."""
    state_dir: Path | None = None
    poll_timeout: float = 40.0
    """Client-side limit of one long poll (the control plane answers 304 after ~25 s)."""
    ack_timeout: float = 5.0
    backoff_initial: float = 0.2
    backoff_cap: float = 10.0


def default_dataplane_id() -> str:
    pod = os.environ.get("POD_NAME")
    if pod:
        return pod
    return f"{socket.gethostname()}-{os.getpid()}"


class Subscriber:
    """Feeds a Runtime from a control plane; `run` is a feed for `run_dataplane`."""

    def __init__(self, options: SubscriberOptions, *, rng: random.Random | None = None) -> None:
        self.options = options
        self.base = options.control_plane.rstrip("/")
        self.dataplane_id = options.dataplane_id or default_dataplane_id()
        self.pod = options.pod or os.environ.get("POD_NAME")
        self.namespace = options.namespace or os.environ.get("POD_NAMESPACE") or _read(
            SERVICE_ACCOUNT_NAMESPACE)
        self.backoff = Backoff(options.backoff_initial, options.backoff_cap, rng)
        self.known: str | None = None
        """The last version received, applied or refused: a refused one is not fetched again."""
        self.applied: str | None = None
        self.connected = False
        self.last_error: str | None = None
        self.attempts: collections.deque[tuple[float, str]] = collections.deque(maxlen=64)
        """Recent polls: (loop time when it started, outcome)."""
        self.decoder = SnapshotDecoder()

    # ------------------------------------------------------------------ state on disk

    @property
    def state_path(self) -> Path | None:
        return self.options.state_dir / STATE_FILE if self.options.state_dir else None

    def load_state(self, runtime: Runtime) -> Snapshot | None:
        """Apply the Snapshot kept in the state directory, if there is a good one."""
        path = self.state_path
        if path is None or not path.exists():
            return None
        try:
            snapshot = self.decoder.parse(path.read_bytes())
        except (OSError, SnapshotRejected) as exc:
            log.warning("ignoring the kept configuration %s: %s", path, exc)
            return None
        error = apply_snapshot(runtime, snapshot)
        if error is not None:
            log.warning("the kept configuration %s does not run here: %s", path, error)
            return None
        self.known = self.applied = snapshot.version
        log.info("serving the kept configuration %s from %s until the control plane answers",
                 snapshot.version, path)
        return snapshot

    def save_state(self, body: bytes) -> None:
        """Keep `body` as the last good Snapshot: temporary file, fsync, rename, fsync folder."""
        path = self.state_path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

    # ------------------------------------------------------------------ the loop

    def token(self) -> str | None:
        """The bearer token, read afresh (it may have been rotated)."""
        path = self.options.token_file
        if path is None and SERVICE_ACCOUNT_TOKEN.exists():
            path = SERVICE_ACCOUNT_TOKEN
        if path is None:
            return None
        return _read(path)

    def _headers(self) -> dict[str, str]:
        token = self.token()
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _params(self) -> dict[str, str]:
        params = {"dataplane": self.dataplane_id, "mode": self.options.mode}
        for name, value in (("known", self.known), ("applied", self.applied),
                            ("namespace", self.namespace), ("pod", self.pod)):
            if value:
                params[name] = value
        return params

    async def run(self, runtime: Runtime, stop: asyncio.Event) -> None:
        """Subscribe until `stop` is set (or the task is cancelled)."""
        loop = asyncio.get_running_loop()
        timeout = aiohttp.ClientTimeout(total=self.options.poll_timeout, connect=5.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not stop.is_set():
                started = loop.time()
                try:
                    outcome = await self.poll_once(session, runtime)
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    outcome = f"unreachable: {type(exc).__name__}: {exc}".rstrip(": ")
                self.attempts.append((started, outcome))
                if outcome in ("updated", "unchanged"):
                    self.backoff.reset()
                    continue
                if self.connected or self.last_error != outcome:
                    log.warning("control plane %s: %s; serving %s meanwhile", self.base, outcome,
                                self.applied or "nothing yet")
                self.connected = False
                self.last_error = outcome
                delay = self.backoff.next()
                log.debug("retrying in %.2f s", delay)
                try:
                    async with asyncio.timeout(delay):
                        await stop.wait()
                except TimeoutError:
                    pass

    async def poll_once(self, session: aiohttp.ClientSession, runtime: Runtime) -> str:
        """One long poll; returns "updated", "unchanged" or why it failed."""
        url = self.base + SNAPSHOT_PATH
        async with session.get(url, params=self._params(), headers=self._headers()) as answer:
            if answer.status == 304:
                self._connected()
                return "unchanged"
            if answer.status == 401:
                return "401: the control plane refused the token" + (
                    "" if self.token() else " (no token: pass --token-file)")
            if answer.status != 200:
                text = (await answer.text()).strip()[:200]
                return text if text.startswith(str(answer.status)) else f"{answer.status}: {text}"
            body = await answer.read()
            header_version = answer.headers.get(VERSION_HEADER)
        self._connected()
        await self.take(session, runtime, body, header_version)
        return "updated"

    def _connected(self) -> None:
        if not self.connected:
            log.info("subscribed to %s as %s (%s)", self.base, self.dataplane_id, self.options.mode)
        self.connected = True
        self.last_error = None

    async def take(self, session: aiohttp.ClientSession, runtime: Runtime, body: bytes,
                   header_version: str | None) -> str | None:
        """Validate and apply one Snapshot body, keep it if good, ACK or NACK it."""
        try:
            # Decoded and built off the loop: requests keep flowing during a big change.
            snapshot = await asyncio.to_thread(self._decode, body)
        except SnapshotRejected as exc:
            version = header_version or "unknown"
            error: str | None = f"invalid snapshot: {exc}"
        else:
            version = snapshot.version
            error = await apply_snapshot_off_loop(runtime, snapshot)
        self.known = version
        if error is None:
            self.applied = version
        else:
            log.error("refusing configuration %s: %s; still serving %s", version, error,
                      self.applied or "nothing")
        ack = asyncio.get_running_loop().create_task(self.ack(session, version, error))
        try:
            if error is None:
                await asyncio.to_thread(self.save_state, body)
        except OSError as exc:
            log.error("could not keep configuration %s in %s: %s", version,
                      self.options.state_dir, exc)
        finally:
            await ack
        return error

    def _decode(self, body: bytes) -> Snapshot:
        with configuration_objects():
            return self.decoder.parse(body)

    async def ack(self, session: aiohttp.ClientSession, version: str, error: str | None) -> bool:
        """ACK (error None) or NACK a version; a lost ACK is made good by the next poll."""
        payload: dict[str, Any] = {"dataplane": self.dataplane_id, "version": version,
                                   "ok": error is None, "error": error}
        try:
            async with session.post(self.base + ACK_PATH, json=payload, headers=self._headers(),
                                    timeout=aiohttp.ClientTimeout(total=self.options.ack_timeout),
                                    ) as answer:
                if answer.status >= 300:
                    log.warning("control plane answered %d to the %s of %s", answer.status,
                                "ACK" if error is None else "NACK", version)
                    return False
                return True
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning("could not report %s of %s: %s", "ACK" if error is None else "NACK",
                        version, exc)
            return False


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None

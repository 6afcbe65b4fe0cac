"""One operator replica: store, debounced builder, Publisher, status writer, servers, metrics.

`ControlPlane.start()` lists every watched kind once (so the first Snapshot is built
from complete inputs: a restarted operator never serves a partial configuration), then
compiles, publishes, opens the configuration server (`--config-listen`) and the admin
server (`--admin`: /live, /ready, /metrics). kopf's watch handlers then call `event()`;
changes that matter poke the builder, which compiles once per burst, publishes a new
version if the Snapshot changed, and writes statuses. ACKs from dataplanes refresh the
Routes' `Programmed` condition (debounced too).

With leader election on (`OperatorOptions.leader_election`, see
`kanal.operator.kube.election`), every replica still compiles, publishes and serves its
dataplanes, but only the Lease holder writes statuses and Events, and `Programmed`
counts the dataplanes of every replica from the records they share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from kanal.contract.splits import route_conditions
from kanal.operator.compiler import CompileResult
from kanal.operator.kube.auth import TokenReviewAuthenticator
from kanal.operator.kube.builder import DEFAULT_CAP, DEFAULT_HOLDOFF, Debouncer
from kanal.operator.kube.client import KubeClient, KubeError, login
from kanal.operator.kube.election import (
    ERROR_CHARS,
    DataplaneRecord,
    DataplaneRecords,
    ElectionSettings,
    LeaderElector,
    count,
)
from kanal.operator.kube.status import Programmed, StatusWriter
from kanal.operator.kube.store import EndpointPolicy, Store
from kanal.operator.models import GROUP, RESOURCES, VERSION
from kanal.operator.publisher import DataplaneStatus, Publisher, shared_token_authenticator

# Keys of kopf's memo shared by the handlers and the webhooks.
MEMO_OPTIONS = "kanal_options"
MEMO_CONNECTION = "kanal_connection"
MEMO_CONTROL_PLANE = "kanal_control_plane"

log = logging.getLogger("kanal.operator")

Address = tuple[str, int]

WATCHED: tuple[tuple[str, str, str], ...] = (
    # (kind, API prefix, plural), in the order the initial listing applies them:
    # referrers first, so the Secrets and ConfigMaps they name are kept when their turn
    # comes.
    *((kind, f"/apis/{GROUP}/{VERSION}", model.plural) for kind, model in RESOURCES.items()),
    ("Service", "/api/v1", "services"),
    ("EndpointSlice", "/apis/discovery.k8s.io/v1", "endpointslices"),
    ("Secret", "/api/v1", "secrets"),
    ("ConfigMap", "/api/v1", "configmaps"),
)
API_VERSIONS = {"Service": "v1", "Secret": "v1", "ConfigMap": "v1",
                "EndpointSlice": "discovery.k8s.io/v1",
                **{kind: f"{GROUP}/{VERSION}" for kind in RESOURCES}}

PROPAGATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _env_address(name: str, default: Address) -> Address:
    text = os.environ.get(name)
    if not text:
        return default
    host, _, port = text.rpartition(":")
    return (host.strip("[]") or "0.0.0.0", int(port))


def _env_path(name: str) -> Path | None:
    text = os.environ.get(name)
    return Path(text) if text else None


@dataclass
class OperatorOptions:
    """`kanal operator`'s flags (or, under `kopf run -m`, the KANAL_* environment)."""

    config_listen: Address | None = ("0.0.0.0", 9000)
    admin: Address | None = ("0.0.0.0", 9901)
    namespaces: Sequence[str] = ()
    """Empty: every namespace."""
    token_file: Path | None = None
    allow_loopback_endpoints: bool = False
    node_addresses: Sequence[str] = ()
    """Addresses of this node (default $NODE_IP): refused as static endpoints."""
    holdoff: float = DEFAULT_HOLDOFF
    cap: float = DEFAULT_CAP
    poll_timeout: float = 25.0
    webhook_listen: Address | None = None
    """Where kopf's admission webhook server listens (HTTPS); None: no server."""
    webhook_cert_dir: Path | None = None
    """tls.crt and tls.key of the webhook server (ca.crt is the chart's business)."""
    sidecar_template: Path | None = None
    """What the injection webhook adds to pods (the chart's sidecar.yaml)."""
    leader_election: ElectionSettings | None = None
    """None: this replica writes statuses from its own dataplanes (one replica, or kmock)."""

    @classmethod
    def from_env(cls) -> OperatorOptions:
        namespaces = [n for n in os.environ.get("KANAL_NAMESPACES", "").split(",") if n]
        token_file = os.environ.get("KANAL_TOKEN_FILE")
        return cls(
            config_listen=_env_address("KANAL_CONFIG_LISTEN", ("0.0.0.0", 9000)),
            admin=_env_address("KANAL_ADMIN", ("0.0.0.0", 9901)),
            namespaces=namespaces,
            token_file=Path(token_file) if token_file else None,
            allow_loopback_endpoints=os.environ.get("KANAL_ALLOW_LOOPBACK_ENDPOINTS", "")
            .lower() in ("1", "true", "yes"),
            webhook_listen=(_env_address("KANAL_WEBHOOK_LISTEN", ("0.0.0.0", 9443))
                            if os.environ.get("KANAL_WEBHOOK_LISTEN") else None),
            webhook_cert_dir=_env_path("KANAL_WEBHOOK_CERT_DIR"),
            sidecar_template=_env_path("KANAL_SIDECAR_TEMPLATE"),
            leader_election=ElectionSettings.from_env(),
        )

    def node_ips(self) -> frozenset[str]:
        found = set(self.node_addresses)
        if os.environ.get("NODE_IP"):
            found.add(os.environ["NODE_IP"])
        return frozenset(found)


class Metrics:
    """The operator's Prometheus metrics, in a registry of its own."""

    def __init__(self, publisher: Publisher) -> None:
        self.registry = CollectorRegistry()
        self.propagation = Histogram(
            "kanal_operator_propagation_seconds",
            "From the first watch event a configuration includes to the last dataplane's ACK",
            buckets=PROPAGATION_BUCKETS, registry=self.registry)
        self.compiles = Counter("kanal_operator_compiles", "Snapshots compiled",
                                registry=self.registry)
        self.publishes = Counter("kanal_operator_publishes",
                                 "New configuration versions published", registry=self.registry)
        self.nacks = Counter("kanal_operator_nacks", "Configurations dataplanes refused",
                             registry=self.registry)
        self.events = Counter("kanal_operator_watch_events",
                              "Watch events, by kind and whether they changed the inputs",
                              ["kind", "effect"], registry=self.registry)
        self.status_patches = Counter("kanal_operator_status_patches",
                                      "Status patches written", registry=self.registry)
        self.connected = Gauge("kanal_operator_connected_dataplanes",
                               "Dataplanes subscribed to this replica", registry=self.registry)
        self.connected.set_function(lambda: len(publisher.dataplanes()))
        self.leader = Gauge("kanal_operator_leader",
                            "1 while this replica writes statuses (holds the Lease)",
                            registry=self.registry)

    def text(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class ControlPlane:
    options: OperatorOptions = field(default_factory=OperatorOptions)
    connection: kopf.ConnectionInfo | None = None
    """How to reach the API server; default: kanal.operator.kube.client.login()."""

    def __post_init__(self) -> None:
        self.store = Store(policy=EndpointPolicy(
            allow_loopback=self.options.allow_loopback_endpoints,
            node_addresses=self.options.node_ips()))
        self.client: KubeClient | None = None
        self.publisher: Publisher | None = None
        self.metrics: Metrics | None = None
        self.status: StatusWriter | None = None
        self.result: CompileResult | None = None
        self.ready = False
        self.config_address: Address | None = None
        self.admin_address: Address | None = None
        self.builder = Debouncer(self.rebuild, holdoff=self.options.holdoff,
                                 cap=self.options.cap, name="rebuild")
        self.status_refresher = Debouncer(self.refresh_status, holdoff=self.options.holdoff,
                                          cap=self.options.cap, name="status refresh")
        self._tasks: list[asyncio.Task[None]] = []
        self._runners: list[web.AppRunner] = []
        self._changed_since: float | None = None
        self._propagating: dict[str, float] = {}
        self._refused: dict[str, dict[str, str]] = {}
        self.election: LeaderElector | None = None
        self.records: DataplaneRecords | None = None

    @property
    def leading(self) -> bool:
        """Whether this replica writes statuses: always, without leader election."""
        return self.election is None or self.election.is_leader

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        info = self.connection or login()
        self.client = KubeClient(info)
        if self.options.token_file is not None:
            token = self.options.token_file.read_text(encoding="utf-8").strip()
            authenticate = shared_token_authenticator(token)
        else:
            authenticate = TokenReviewAuthenticator(self.client)
        self.publisher = Publisher(authenticate, poll_timeout=self.options.poll_timeout)
        self.publisher.on_ack.append(self._on_ack)
        self.publisher.on_forget.append(lambda _: self.status_refresher.poke())
        self.publisher.on_report.append(lambda _: self.status_refresher.poke())
        self.metrics = Metrics(self.publisher)
        self.status = StatusWriter(self.client, self.store)
        election = self.options.leader_election
        if election is not None:
            self.election = LeaderElector(self.client, election,
                                          on_change=self._on_leadership)
            self.records = DataplaneRecords(
                self.client, election, self._local_records,
                should_prune=lambda: self.leading, on_change=self.status_refresher.poke)
            self.publisher.on_forget.append(lambda _: self._records_changed())
            await self.election.try_once()  # one replica alone leads from its first build
            await self.records.read()
        else:
            self.metrics.leader.set(1)
        if self.options.admin is not None:
            self.admin_address = await self._serve(self._admin_app(), self.options.admin)
        await self.initial_sync()
        await self.rebuild()
        if self.options.config_listen is not None:
            self.config_address = await self._serve(self.publisher.app(),
                                                    self.options.config_listen)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self.builder.run(), name="kanal rebuild"),
                       loop.create_task(self.status_refresher.run(), name="kanal status")]
        if self.election is not None and self.records is not None:
            self._tasks += [
                loop.create_task(self.election.run(), name="kanal leader election"),
                loop.create_task(self.records.run(), name="kanal dataplane records")]
        self.ready = True
        log.info("control plane ready: configuration on %s, admin on %s",
                 self.config_address, self.admin_address)

    async def stop(self) -> None:
        self.ready = False
        if self.publisher is not None:
            self.publisher.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.election is not None:
            await self.election.release()
        if self.records is not None:
            await self.records.withdraw()
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        if self.client is not None:
            await self.client.close()

    async def _serve(self, app: web.Application, address: Address) -> Address:
        runner = web.AppRunner(app, access_log=None, handle_signals=False,
                               shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, address[0], address[1])
        await site.start()
        self._runners.append(runner)
        server = site._server
        sockets = getattr(server, "sockets", None) or ()
        for sock in sockets:
            host, port = sock.getsockname()[:2]
            return (str(host), int(port))
        return address

    # ------------------------------------------------------------------ inputs

    def _paths(self, prefix: str, plural: str) -> list[str]:
        if not self.options.namespaces:
            return [f"{prefix}/{plural}"]
        return [f"{prefix}/namespaces/{ns}/{plural}" for ns in self.options.namespaces]

    async def initial_sync(self) -> None:
        """List every watched kind once, referrers first, before the first Snapshot."""
        assert self.client is not None
        for kind, prefix, plural in WATCHED:
            for path in self._paths(prefix, plural):
                for item in await self.client.list(path):
                    self.store.apply(self._typed(kind, item))
        log.info("initial listing: %d Kanal objects, %d Services, %d EndpointSlices, "
                 "%d Secrets referenced", len(self.store.kanal), len(self.store.services),
                 len(self.store.slices), len(self.store.secrets))

    @staticmethod
    def _typed(kind: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """List items and some bodies come without kind/apiVersion: name them."""
        typed = dict(body)
        typed["kind"] = kind
        typed.setdefault("apiVersion", API_VERSIONS[kind])
        return typed

    def event(self, kind: str, body: Mapping[str, Any], type_: str | None) -> bool:
        """A watch event from kopf. True when it changed the inputs (a rebuild follows)."""
        typed = self._typed(kind, body)
        changed = bool(self.store.delete(typed) if type_ == "DELETED"
                       else self.store.apply(typed))
        if self.metrics is not None:
            self.metrics.events.labels(kind, "changed" if changed else "ignored").inc()
        if changed:
            if self._changed_since is None:
                self._changed_since = asyncio.get_running_loop().time()
            self.builder.poke()
        return changed

    async def _fetch_referenced(self) -> None:
        """Secrets and ConfigMaps named since their watch events were ignored."""
        assert self.client is not None
        store = self.store
        for kind, plural, wanted, dormant in (
                ("Secret", "secrets", store.secrets_to_fetch(), store.dormant_secrets),
                ("ConfigMap", "configmaps", store.config_maps_to_fetch(),
                 store.dormant_config_maps)):
            for namespace, name in sorted(wanted):
                try:
                    body = await self.client.get(
                        f"/api/v1/namespaces/{namespace}/{plural}/{name}")
                except KubeError as exc:
                    if exc.status != 404:
                        raise
                    dormant.discard((namespace, name))
                    continue
                store.apply(self._typed(kind, body))

    # ------------------------------------------------------------------ building

    async def rebuild(self) -> None:
        assert self.publisher is not None and self.metrics is not None
        loop = asyncio.get_running_loop()
        since, self._changed_since = self._changed_since, None
        await self._fetch_referenced()
        self.store.forget_unreferenced_secrets()
        self.store.forget_unreferenced_config_maps()
        result = self.store.compile()
        self.metrics.compiles.inc()
        self.result = result
        version = result.snapshot.version
        current = self.publisher.current
        if current is None or current.version != version:
            self.publisher.publish(result.snapshot)
            self.metrics.publishes.inc()
            self._propagating = {version: since if since is not None else loop.time()}
            self._refused = {}
            log.info("compiled configuration %s: %d routes, %d upstreams",
                     version, len(result.snapshot.routes), len(result.snapshot.upstreams))
        await self._write_status()

    async def refresh_status(self) -> None:
        if self.result is not None:
            await self._write_status()

    async def _write_status(self) -> None:
        assert self.status is not None and self.metrics is not None
        assert self.result is not None
        if not self.leading:
            return
        patched = await self.status.write(self.result, self.programmed(),
                                          self.split_conditions())
        self.metrics.status_patches.inc(patched)

    def split_conditions(self) -> dict[str, dict[str, Any]]:
        """Each weighted Route's SplitObserved condition, from the last split report of
        every dataplane: this replica's, and with leader election every replica's (from
        the shared records, each dataplane once), their windows summed."""
        if self.publisher is None or self.publisher.current is None:
            return {}
        if self.records is not None:
            reports = [(plane, record.splits)
                       for plane, record in self.records.merged().items()]
        else:
            reports = [(plane.id, plane.splits) for plane in self.publisher.dataplanes()]
        return route_conditions(self.publisher.current, reports)

    def programmed(self) -> Programmed | None:
        if self.publisher is None or self.publisher.current is None:
            return None
        version = self.publisher.current.version
        if self.records is not None:
            return Programmed(version, *count(self.records.merged(), version))
        acked, total = self.publisher.programmed(version)
        refused = tuple(sorted(self._refused.get(version, {}).items()))
        return Programmed(version, acked, total, refused)

    # ------------------------------------------------------------------ replicas

    def _local_records(self) -> dict[str, DataplaneRecord]:
        assert self.publisher is not None
        return {plane.id: _record(plane) for plane in self.publisher.dataplanes()}

    def _records_changed(self) -> None:
        if self.records is not None:
            self.records.poke()

    def _on_leadership(self, leading: bool) -> None:
        if self.metrics is not None:
            self.metrics.leader.set(1 if leading else 0)
        if leading and self.status is not None:
            # What this replica wrote in an earlier term may have been overwritten since:
            # compare with what the watch shows instead.
            self.status.forget_written()
            self.status_refresher.poke()

    def _on_ack(self, dataplane: str, version: str, ok: bool, error: str | None,
                seconds: float | None) -> None:
        assert self.publisher is not None and self.metrics is not None
        if ok:
            self._refused.get(version, {}).pop(dataplane, None)
        else:
            self.metrics.nacks.inc()
            self._refused.setdefault(version, {})[dataplane] = error or "refused"
        started = self._propagating.get(version)
        if ok and started is not None:
            acked, total = self.publisher.programmed(version)
            if acked >= total:
                self.metrics.propagation.observe(asyncio.get_running_loop().time() - started)
                del self._propagating[version]
        self._records_changed()
        self.status_refresher.poke()

    # ------------------------------------------------------------------ admin

    def _admin_app(self) -> web.Application:
        async def live(_: web.Request) -> web.Response:
            return web.Response(text="ok\n")

        async def ready(_: web.Request) -> web.Response:
            if self.ready and self.publisher is not None and self.publisher.current is not None:
                return web.Response(text=f"ready {self.publisher.current.version}\n")
            return web.Response(status=503, text="not ready\n")

        async def metrics(_: web.Request) -> web.Response:
            assert self.metrics is not None
            return web.Response(body=self.metrics.text(),
                                headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/live", live)
        app.router.add_get("/ready", ready)
        app.router.add_get("/metrics", metrics)
        return app


def _record(plane: DataplaneStatus) -> DataplaneRecord:
    refused = None
    if plane.nack is not None:
        refused = (plane.nack[0], plane.nack[1][:ERROR_CHARS])
    return DataplaneRecord(acked=plane.acked_version, refused=refused, seen=plane.last_seen,
                           splits=plane.splits)

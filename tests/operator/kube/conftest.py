"""Fixtures for the operator's tests: kopf running for real against kmock's KubernetesEmulator.

`FilledEmulator` is kmock 0.8's `KubernetesEmulator` plus a thin layer that does what a
real API server does and the emulator does not, so that real kopf (and our own client)
can run against it. What it emulates, and only that:

- POST: `metadata.namespace` from the URL when the body has none; `metadata.name` from
  `generateName` plus a random suffix (kopf posts every Event with generateName: without
  this, its second Event gets 409); `uid`, `creationTimestamp`, `generation: 1` and a
  `resourceVersion` from a counter.
- GET /api/v1/namespaces: kmock 0.8 cannot parse that path (500); kopf lists and
  watches namespaces when given `--namespaces`. Answered with the namespaces that hold
  objects; a watch of it stays open and silent.
- PUT (kmock 0.8 has none): replaces a named object, 409 on a stale `resourceVersion`.
- PATCH: a new `resourceVersion` every time; `generation` + 1 when `spec` changes. For
  resources declared with the `status` subresource (our CRDs), a PATCH of `.../status`
  changes only `status`, and a PATCH of the object itself leaves `status` alone.

Known gaps left as they are (the operator copes with them): lists carry no `kind`
(the operator names list items itself), `labelSelector` is ignored (nothing here uses
one), every new watch replays every object as ADDED (the store ignores repeats). The
operator uses no finalizers, so the emulator's finalizer handling is never exercised.

Objects are created, changed and deleted over HTTP (`Cluster.create/patch/delete`),
as kubectl would: writing `emulator.objects` directly would emit no watch events.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import secrets
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
import kmock
import kopf
import pytest
from kmock._internal import enums

from kanal.operator.kube.controlplane import ControlPlane, OperatorOptions
from kanal.operator.kube.handlers import MEMO_CONTROL_PLANE
from kanal.operator.kube.main import run_operator
from tests.conftest import DataplaneProcess, async_wait_until, free_port

TOKEN = "kube-test-token"

PLURALS = {
    "Route": ("kanal.dev/v1alpha1", "routes"),
    "Upstream": ("kanal.dev/v1alpha1", "upstreams"),
    "EgressPolicy": ("kanal.dev/v1alpha1", "egresspolicies"),
    "Service": ("v1", "services"),
    "EndpointSlice": ("discovery.k8s.io/v1", "endpointslices"),
    "Secret": ("v1", "secrets"),
    "ConfigMap": ("v1", "configmaps"),
    "Event": ("v1", "events"),
    "TokenReview": ("authentication.k8s.io/v1", "tokenreviews"),
}
WITH_STATUS = {"routes", "upstreams", "egresspolicies"}


def _path(api_version: str, plural: str, namespace: str | None = None,
          name: str | None = None, subresource: str | None = None) -> str:
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = base + (f"/namespaces/{namespace}" if namespace else "") + f"/{plural}"
    path += f"/{name}" if name else ""
    return path + (f"/{subresource}" if subresource else "")


def _merge(base: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (what the emulator applies, to predict `spec` changes)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge(result.get(key), value)
    return result


class FilledEmulator(kmock.KubernetesEmulator):
    """KubernetesEmulator with the API server's bookkeeping (see the module's docstring)."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._versions = itertools.count(1000)

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if raw_request.path == "/api/v1/namespaces" and raw_request.method == "GET":
            return await self._serve_namespaces(raw_request)
        if raw_request.method == "PUT":
            return await self._serve_replace(raw_request)
        return await super().__call__(raw_request)

    async def _serve_replace(self, raw_request: aiohttp.web.BaseRequest
                             ) -> aiohttp.web.StreamResponse:
        """PUT of a named object (kmock 0.8 has none; leader election renews its Lease
        so): 409 when the body's resourceVersion is not the stored one, as an API server
        answers; the object is then the body, with a new resourceVersion."""
        parts = raw_request.path.strip("/").split("/")
        if len(parts) < 4 or parts[-4] != "namespaces":
            return aiohttp.web.json_response({"code": 404}, status=404)
        namespace, plural, name = parts[-3], parts[-2], parts[-1]
        body = await raw_request.json()
        async with self._lock:
            found = [(key, stored) for key, stored in self._objects.items()
                     if key[0].plural == plural and key[1] == namespace and key[2] == name
                     and not stored.deleted]
            if not found:
                return aiohttp.web.json_response({"code": 404, "reason": "NotFound"}, status=404)
            (resource, _, _), stored = found[0]
            meta = body.setdefault("metadata", {})
            current = stored.raw.get("metadata", {}).get("resourceVersion")
            if meta.get("resourceVersion") not in (None, current):
                return aiohttp.web.json_response({"code": 409, "reason": "Conflict"}, status=409)
            meta["resourceVersion"] = str(next(self._versions))
            stored.patch(body)
            raw = stored.raw
            await self._buses[resource].put({"type": "MODIFIED", "object": raw})
        return aiohttp.web.json_response(raw)

    async def _serve_namespaces(self, raw_request: aiohttp.web.BaseRequest
                                ) -> aiohttp.web.StreamResponse:
        """kmock 0.8 cannot parse this path (500): list the namespaces objects are in;
        a watch stays open and silent (no namespace comes or goes in these tests)."""
        names = sorted({ns for (_, ns, _), obj in self._objects.items()
                        if ns and not obj.deleted} | {"default"})
        if raw_request.query.get("watch") in ("true", "1"):
            response = aiohttp.web.StreamResponse()
            await response.prepare(raw_request)
            await asyncio.Event().wait()  # until the client goes away
            return response
        return aiohttp.web.json_response({
            "apiVersion": "v1", "kind": "NamespaceList", "metadata": {"resourceVersion": "1"},
            "items": [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
                      for name in names]})

    async def _handle(self, request: Any) -> Any:
        if request.resource is not None and isinstance(request.data, dict):
            if request.action == enums.action.CREATE:
                self._fill_create(request)
            elif request.action == enums.action.UPDATE and request.name is not None:
                self._fill_patch(request)
        return await super()._handle(request)

    def _fill_create(self, request: Any) -> None:
        meta = request.data.setdefault("metadata", {})
        if request.namespace and not meta.get("namespace"):
            meta["namespace"] = request.namespace
        if not meta.get("name"):
            meta["name"] = (meta.get("generateName") or "object-") + secrets.token_hex(4)
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp",
                        datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        meta["generation"] = 1
        meta["resourceVersion"] = str(next(self._versions))

    def _fill_patch(self, request: Any) -> None:
        data = request.data
        plural = request.resource.plural
        if plural in WITH_STATUS:
            if request.subresource == "status":
                for key in [key for key in data if key not in ("status", "metadata")]:
                    del data[key]
            else:
                data.pop("status", None)
        meta = data.setdefault("metadata", {})
        meta["resourceVersion"] = str(next(self._versions))
        key = (request.resource, request.namespace, request.name)
        current = None
        for stored_key, stored in self._objects.items():
            if stored_key == key and not stored.deleted:
                current = stored.raw
        if current is not None and "spec" in data \
                and _merge(current.get("spec"), data["spec"]) != current.get("spec"):
            meta["generation"] = int(current.get("metadata", {}).get("generation") or 1) + 1


@dataclass
class Cluster:
    """The emulator, and kubectl-like calls to it over HTTP."""

    emulator: FilledEmulator
    url: str
    session: aiohttp.ClientSession

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
        async with self.session.request(method, self.url + path, json=body,
                                        headers=headers) as answer:
            data = await answer.json(content_type=None)
            if answer.status >= 400:
                raise AssertionError(f"{method} {path}: {answer.status} {data}")
            return data

    async def create(self, body: dict[str, Any]) -> Any:
        api_version, plural = PLURALS[body["kind"]]
        body = {"apiVersion": api_version, **body}
        namespace = body["metadata"].setdefault("namespace", "default")
        return await self._call("POST", _path(api_version, plural, namespace), body)

    async def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> Any:
        api_version, plural = PLURALS[kind]
        return await self._call("PATCH", _path(api_version, plural, namespace, name), patch)

    async def delete(self, kind: str, namespace: str, name: str) -> Any:
        api_version, plural = PLURALS[kind]
        return await self._call("DELETE", _path(api_version, plural, namespace, name))

    def stored(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object as the emulator holds it now (None when absent or deleted)."""
        api_version, plural = PLURALS[kind]
        wanted = f"{plural}.{api_version.replace('/', '.')}" if "/" in api_version else None
        for (resource, ns, stored_name), obj in self.emulator.objects.items():
            if resource.plural != plural or ns != namespace or stored_name != name:
                continue
            if wanted is not None and resource.group != api_version.split("/")[0]:
                continue
            if not obj.deleted:
                return dict(obj.raw)
        return None

    def condition(self, kind: str, namespace: str, name: str, type_: str) -> dict[str, Any] | None:
        body = self.stored(kind, namespace, name) or {}
        for condition in (body.get("status") or {}).get("conditions") or ():
            if condition.get("type") == type_:
                return dict(condition)
        return None

    def events(self) -> list[dict[str, Any]]:
        return [dict(obj.raw) for (resource, _, _), obj in self.emulator.objects.items()
                if resource.plural == "events" and not obj.deleted]

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: kmock\n"
            f"clusters: [{{name: kmock, cluster: {{server: '{self.url}'}}}}]\n"
            "users: [{name: kmock, user: {token: kmock-token}}]\n"
            "contexts: [{name: kmock, context: {cluster: kmock, user: kmock}}]\n",
            encoding="utf-8")
        return path


def declare_resources(emulator: FilledEmulator) -> None:
    kanal = {"routes": "Route", "upstreams": "Upstream", "egresspolicies": "EgressPolicy"}
    for plural, kind in kanal.items():
        emulator.resources[f"kanal.dev/v1alpha1/{plural}"] = kmock.ResourceInfo(
            kind=kind, singular=kind.lower(), namespaced=True, subresources={"status"},
            verbs={"list", "watch", "get", "patch", "create", "delete", "update"})
    core = {"services": "Service", "secrets": "Secret", "configmaps": "ConfigMap",
            "events": "Event", "namespaces": "Namespace"}
    for plural, kind in core.items():
        emulator.resources[f"v1/{plural}"] = kmock.ResourceInfo(
            kind=kind, singular=kind.lower(), namespaced=plural != "namespaces",
            verbs={"list", "watch", "get", "patch", "create", "delete"})
    emulator.resources["discovery.k8s.io/v1/endpointslices"] = kmock.ResourceInfo(
        kind="EndpointSlice", singular="endpointslice", namespaced=True,
        verbs={"list", "watch", "get", "patch", "create", "delete"})
    emulator.resources["authentication.k8s.io/v1/tokenreviews"] = kmock.ResourceInfo(
        kind="TokenReview", singular="tokenreview", namespaced=False, verbs={"create"})
    # Leader election and the replicas' shared dataplane records.
    emulator.resources["coordination.k8s.io/v1/leases"] = kmock.ResourceInfo(
        kind="Lease", singular="lease", namespaced=True,
        verbs={"get", "create", "patch", "update", "list", "watch"})


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with FilledEmulator() as emulator, kmock.Server(emulator) as server:
        declare_resources(emulator)
        async with aiohttp.ClientSession() as session:
            yield Cluster(emulator, str(server.url).rstrip("/"), session)


# --------------------------------------------------------------------------- the operator


@dataclass
class RunningOperator:
    """kopf running Kanal's handlers in a thread of this process, on its own event loop.

    Its own loop, because kopf, when it stops, cancels every task created on its loop
    after it started (the emulator's and the test's included). Tests look inside through
    `call` (a coroutine run on the operator's loop) and plain attribute reads.
    """

    options: OperatorOptions
    memo: kopf.Memo = field(default_factory=kopf.Memo)
    stop_flag: threading.Event = field(default_factory=threading.Event)
    loop: asyncio.AbstractEventLoop | None = None
    thread: threading.Thread | None = None
    error: BaseException | None = None

    def start(self, connection: kopf.ConnectionInfo) -> None:
        def main() -> None:
            loop = asyncio.new_event_loop()
            self.loop = loop
            try:
                loop.run_until_complete(run_operator(
                    self.options, connection=connection, stop_flag=self.stop_flag,
                    memo=self.memo))
            except asyncio.CancelledError:
                pass  # kopf ends as cancelled when stopped by its flag
            except BaseException as exc:
                self.error = exc
            finally:
                loop.close()

        self.thread = threading.Thread(target=main, name="kopf", daemon=True)
        self.thread.start()

    @property
    def control_plane(self) -> ControlPlane:
        control_plane = self.memo.get(MEMO_CONTROL_PLANE)
        assert control_plane is not None, "the control plane has not started"
        return control_plane

    @property
    def config_url(self) -> str:
        address = self.control_plane.config_address
        assert address is not None
        return f"http://127.0.0.1:{address[1]}"

    @property
    def admin_url(self) -> str:
        address = self.control_plane.admin_address
        assert address is not None
        return f"http://127.0.0.1:{address[1]}"

    async def call(self, coro: Any) -> Any:
        assert self.loop is not None
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def settled(self) -> None:
        """Wait until no rebuild or status refresh is pending."""
        control_plane = self.control_plane

        async def idle() -> None:
            await control_plane.builder.idle()
            await control_plane.status_refresher.idle()

        await self.call(idle())

    async def stop(self) -> None:
        self.stop_flag.set()
        if self.thread is not None:
            await asyncio.to_thread(self.thread.join, 20)
            assert not self.thread.is_alive(), "kopf did not stop"


@pytest.fixture
async def operator(cluster: Cluster, tmp_path: Path
                   ) -> AsyncIterator[Callable[..., Awaitable[RunningOperator]]]:
    """Start kopf with Kanal's handlers: `op = await operator(allow_loopback_endpoints=True)`."""
    started: list[RunningOperator] = []
    token_file = tmp_path / "operator-token"
    token_file.write_text(TOKEN + "\n")

    async def start(**overrides: Any) -> RunningOperator:
        values: dict[str, Any] = {"config_listen": ("127.0.0.1", free_port()),
                                  "admin": ("127.0.0.1", 0), "token_file": token_file}
        values.update(overrides)
        running = RunningOperator(OperatorOptions(**values))
        running.start(kopf.ConnectionInfo(server=cluster.url, token="kmock-token"))
        started.append(running)

        async def up() -> bool:
            if running.error is not None:
                raise AssertionError(f"the operator failed: {running.error!r}")
            control_plane = running.memo.get(MEMO_CONTROL_PLANE)
            return control_plane is not None and control_plane.ready

        await async_wait_until(up, timeout=20)
        return running

    yield start
    for running in started:
        await running.stop()


# --------------------------------------------------------------------------- a dataplane


class Dataplane(DataplaneProcess):
    """`kanal dataplane` as a subprocess, reached with the Host of the tests' Routes."""

    async def get(self, path: str = "/", host: str = "shop.example.com"
                  ) -> tuple[int, str | None]:
        async with aiohttp.ClientSession() as session, session.get(
            self.url + path, headers={"Host": host}, timeout=aiohttp.ClientTimeout(total=5)
        ) as answer:
            await answer.read()
            return answer.status, answer.headers.get("X-Backend")

    async def wait_for(self, expected: set[str | None], path: str = "/", tries: int = 6,
                       timeout: float = 15.0) -> None:
        """Until `tries` requests in a row reach exactly the backends `expected` (None:
        no backend answered)."""
        seen: set[str | None] = set()

        async def serving() -> bool:
            seen.clear()
            for _ in range(tries):
                try:
                    _, backend = await self.get(path)
                except (aiohttp.ClientError, OSError, TimeoutError):
                    return False
                seen.add(backend)
            return seen == expected

        try:
            await async_wait_until(serving, timeout=timeout, interval=0.05)
        except AssertionError:
            raise AssertionError(
                f"dataplane serves {seen}, not {expected}:\n{self.log()[-3000:]}") from None


@pytest.fixture
async def dataplane(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Dataplane]]]:
    """`dp = await dataplane(op.config_url)`: a real `kanal dataplane` subscribed to it."""
    started: list[Dataplane] = []
    token_file = tmp_path / "dataplane-token"
    token_file.write_text(TOKEN + "\n")

    async def start(url: str, *flags: str, wait_ready: bool = True) -> Dataplane:
        index = len(started)
        port, admin_port = free_port(), free_port()
        argv = [
            sys.executable, "-m", "kanal", "dataplane", "--control-plane", url,
            "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin_port}",
            "--state-dir", str(tmp_path / f"state-{index}"),
            "--dataplane-id", f"dp-{index}", "--token-file", str(token_file), *flags,
        ]
        instance = Dataplane(port, admin_port, argv, tmp_path / f"dataplane-{index}.log")
        instance.start()
        started.append(instance)
        if wait_ready:
            await async_wait_until(instance.ready, timeout=20)
        return instance

    yield start
    for instance in started:
        await instance.stop()


# --------------------------------------------------------------------------- manifests


def route(name: str, *upstreams: str, namespace: str = "default",
          hostnames: tuple[str, ...] = ("shop.example.com",), weights: tuple[int, ...] = (),
          **spec: Any) -> dict[str, Any]:
    backends = [{"upstream": u, "weight": weights[i] if weights else 1}
                for i, u in enumerate(upstreams)]
    return {"kind": "Route", "metadata": {"name": name, "namespace": namespace},
            "spec": {"hostnames": list(hostnames), "rules": [{"backends": backends}], **spec}}


def upstream(name: str, *, namespace: str = "default", service: tuple[str, int] | None = None,
             endpoints: list[tuple[str, int]] | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = dict(spec)
    if service is not None:
        body["service"] = {"name": service[0], "port": service[1]}
    else:
        body["endpoints"] = [{"address": a, "port": p} for a, p in endpoints or []]
    return {"kind": "Upstream", "metadata": {"name": name, "namespace": namespace},
            "spec": body}


def service(name: str, port: int = 80, *, namespace: str = "default",
            port_name: str = "http") -> dict[str, Any]:
    return {"kind": "Service", "metadata": {"name": name, "namespace": namespace},
            "spec": {"ports": [{"name": port_name, "port": port, "protocol": "TCP"}]}}


def endpoint_slice(name: str, service_name: str, target_port: int,
                   addresses: list[str | tuple[str, dict[str, bool]]], *,
                   namespace: str = "default", port_name: str = "http") -> dict[str, Any]:
    endpoints = []
    for item in addresses:
        address, conditions = (item, {"ready": True}) if isinstance(item, str) else item
        endpoints.append({"addresses": [address], "conditions": conditions})
    return {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4",
            "ports": [{"name": port_name, "port": target_port, "protocol": "TCP"}],
            "endpoints": endpoints}


def config_map(name: str, *, namespace: str = "default", **binary: bytes) -> dict[str, Any]:
    import base64

    return {"kind": "ConfigMap", "metadata": {"name": name, "namespace": namespace},
            "binaryData": {k.replace("_", "."): base64.b64encode(v).decode()
                           for k, v in binary.items()}}


def secret(name: str, *, namespace: str = "default", type_: str = "Opaque",
           **string_data: str) -> dict[str, Any]:
    import base64

    return {"kind": "Secret", "metadata": {"name": name, "namespace": namespace},
            "type": type_,
            "data": {k.replace("_", "."): base64.b64encode(v.encode()).decode()
                     for k, v in string_data.items()}}

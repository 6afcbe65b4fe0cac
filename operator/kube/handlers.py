"""kopf handlers: watch events into the control plane. No finalizers, no object patches.

Every handler is `@kopf.on.event` (fire-and-forget: kopf adds no finalizer and writes no
progress annotations), async (they run on the event loop, next to the store), and only
hands the event to `ControlPlane.event`, which decides whether it matters. Secrets come
through here too: the store keeps the data of the ones a Route, Upstream or
EgressPolicy names and drops the rest; nothing here logs an object's content.

Start with `kanal operator` (flags) or `kopf run -m kanal.operator.kube.handlers -A`
(options from KANAL_CONFIG_LISTEN, KANAL_ADMIN, KANAL_NAMESPACES, KANAL_TOKEN_FILE,
KANAL_ALLOW_LOOPBACK_ENDPOINTS; give kopf the same namespaces with `-n`).
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import kopf

# The admission webhooks (sidecar injection, validation) register with kopf here too.
from kanal.operator.kube import webhooks
from kanal.operator.kube.client import KubeError, login
from kanal.operator.kube.controlplane import (
    MEMO_CONNECTION,
    MEMO_CONTROL_PLANE,
    MEMO_OPTIONS,
    ControlPlane,
    OperatorOptions,
)
from kanal.operator.models import GROUP, VERSION

log = logging.getLogger("kanal.operator")


@kopf.on.login()
def _login(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    connection: kopf.ConnectionInfo | None = memo.get(MEMO_CONNECTION)
    return connection if connection is not None else login(settings)


@kopf.on.startup()
async def _startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Replicas serve side by side (the compiler is deterministic): no peering needed.
    settings.peering.standalone = True
    # The namespaces and resources are known (flags, our CRDs): no scanning of namespaces
    # or CRDs, which the chart's RBAC does not grant (kopf would retry 403s for a minute
    # before watching anything under a namespaced Role).
    settings.scanning.disabled = True
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    options = memo.get(MEMO_OPTIONS) or OperatorOptions.from_env()
    memo[MEMO_OPTIONS] = options
    # kopf's webhook server on --webhook-listen; the chart registers the webhooks.
    webhooks.configure(settings, options.webhook_listen, options.webhook_cert_dir)
    control_plane = ControlPlane(options, connection=memo.get(MEMO_CONNECTION))
    try:
        await control_plane.start()
    except (KubeError, aiohttp.ClientError, OSError) as exc:
        await control_plane.stop()
        raise kopf.TemporaryError(f"cannot start the control plane: {exc}", delay=2) from exc
    memo[MEMO_CONTROL_PLANE] = control_plane


@kopf.on.cleanup()
async def _cleanup(memo: kopf.Memo, **_: Any) -> None:
    control_plane = memo.pop(MEMO_CONTROL_PLANE, None)
    if control_plane is not None:
        await control_plane.stop()


def _feed(kind: str, memo: kopf.Memo, body: Any, type_: str | None) -> None:
    control_plane: ControlPlane | None = memo.get(MEMO_CONTROL_PLANE)
    if control_plane is not None:
        control_plane.event(kind, body, type_)


@kopf.on.event(GROUP, VERSION, "routes")
async def route_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _feed("Route", memo, body, type)


@kopf.on.event(GROUP, VERSION, "upstreams")
async def upstream_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _feed("Upstream", memo, body, type)


@kopf.on.event(GROUP, VERSION, "egresspolicies")
async def egress_policy_event(type: str | None, body: kopf.Body, memo: kopf.Memo,
                              **_: Any) -> None:
    _feed("EgressPolicy", memo, body, type)


@kopf.on.event("v1", "services")
async def service_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _feed("Service", memo, body, type)


@kopf.on.event("discovery.k8s.io", "v1", "endpointslices")
async def endpoint_slice_event(type: str | None, body: kopf.Body, memo: kopf.Memo,
                               **_: Any) -> None:
    _feed("EndpointSlice", memo, body, type)


@kopf.on.event("v1", "secrets")
async def secret_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    # The store keeps a Secret's data only if something names it.
    _feed("Secret", memo, body, type)


@kopf.on.event("v1", "configmaps")
async def config_map_event(type: str | None, body: kopf.Body, memo: kopf.Memo,
                           **_: Any) -> None:
    # The store keeps a ConfigMap's data only if a Route names it (descriptor sets).
    _feed("ConfigMap", memo, body, type)

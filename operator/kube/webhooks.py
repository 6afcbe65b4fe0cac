"""Admission webhooks, served by kopf's own webhook server in the operator.

- `/inject` (mutating, pods CREATE): adds the sidecar of `--sidecar-template` to a pod
  labelled `kanal.dev/inject: "true"`. `/inject-namespace` is the same for the pods of
  a namespace labelled so, which the chart's second webhook sends (its
  namespaceSelector says the namespace opted in: the operator needs no right to read
  namespaces); a pod labelled `"false"` opts out there. Any other pod is left alone.
  Injecting means: the template's `initContainers` (a native sidecar,
  `restartPolicy: Always`: started before the app, stopped after it) go first in the
  pod's init containers, its `containers` after the pod's, its `volumes` after the
  pod's; every app container (`spec.containers`) gets the template's `appEnv`
  (`HTTP_PROXY`, `HTTPS_PROXY` to the sidecar's forward listener, `NO_PROXY`), and the
  lower-case twins curl and others read. A variable the container sets itself is kept,
  except `NO_PROXY`, to which the container's own hosts are appended. With the
  annotation `kanal.dev/app-port: "8080"`, the sidecar also gets
  `--inbound-listen=0.0.0.0:<template inbound.port>` and `--app-port=8080`. A pod that
  already has the sidecar is left as it is, so injecting twice changes nothing.
- `/validate` (validating, Routes, Upstreams, EgressPolicies CREATE and UPDATE):
  refuses what the operator would mark `Accepted=False`, with the same message
  (`kanal.operator.kube.store.validate_kanal`: the models' validation, the endpoint
  address policy).

Failures: a mutating handler that fails would refuse the pod, so injection problems
(no template, a bad annotation) are logged and the pod is admitted unchanged. What
the API server does while the operator is unreachable is the webhook configurations'
`failurePolicy` (the chart: Ignore for injection, Fail for validation).

`kanal operator --webhook-listen HOST:PORT --webhook-cert-dir DIR --sidecar-template PATH`
turns the server on (`tls.crt`, `tls.key` in DIR); without `--webhook-listen` the
handlers stay registered but no server listens. The operator never registers webhook
configurations itself (`settings.admission.managed` is None): the chart renders them.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import kopf

from kanal.operator.kube.controlplane import MEMO_CONTROL_PLANE, MEMO_OPTIONS
from kanal.operator.kube.store import EndpointPolicy, validate_kanal
from kanal.operator.models import GROUP, RESOURCES, VERSION

log = logging.getLogger("kanal.operator.webhooks")

INJECT_LABEL = "kanal.dev/inject"
APP_PORT_ANNOTATION = "kanal.dev/app-port"
SIDECAR_NAME = "kanal-sidecar"
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


# --------------------------------------------------------------------------- the server


class KanalWebhookServer(kopf.WebhookServer):
    """kopf's server; the object of a review gets the request's namespace when it has
    none (a pod made by a ReplicaSet arrives without one)."""

    async def __call__(self, fn: Any) -> AsyncIterator[Any]:
        async def with_namespace(request: Any, **kwargs: Any) -> Any:
            payload = request.get("request") if isinstance(request, dict) else None
            if isinstance(payload, dict) and payload.get("namespace"):
                for key in ("object", "oldObject"):
                    obj = payload.get(key)
                    if isinstance(obj, dict):
                        meta = obj.setdefault("metadata", {})
                        if isinstance(meta, dict) and not meta.get("namespace"):
                            meta["namespace"] = payload["namespace"]
            return await fn(request, **kwargs)

        async for config in super().__call__(with_namespace):
            yield config


async def no_webhook_server(fn: Any) -> AsyncIterator[Any]:
    """Without --webhook-listen: the handlers exist, nothing listens."""
    import asyncio

    await asyncio.Event().wait()
    yield  # pragma: no cover - never reached


def configure(settings: kopf.OperatorSettings, listen: tuple[str, int] | None,
              cert_dir: Path | None) -> None:
    """kopf's admission settings from the operator's flags; never self-registered."""
    settings.admission.managed = None
    if listen is None:
        settings.admission.server = no_webhook_server
        return
    host, port = listen
    certfile = pkeyfile = None
    if cert_dir is not None:
        certfile, pkeyfile = str(cert_dir / "tls.crt"), str(cert_dir / "tls.key")
    settings.admission.server = KanalWebhookServer(
        addr=host, port=port, certfile=certfile, pkeyfile=pkeyfile)


# --------------------------------------------------------------------------- injection


def load_template(path: Path) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a mapping")
    if not data.get("initContainers") and not data.get("containers"):
        raise ValueError(f"{path}: no initContainers nor containers")
    return data


def _sidecar_names(template: Mapping[str, Any]) -> set[str]:
    return {str(c.get("name")) for key in ("initContainers", "containers")
            for c in template.get(key) or () if isinstance(c, dict)}


def opted_in(pod: Mapping[str, Any], by_namespace: bool) -> bool:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    label = labels.get(INJECT_LABEL)
    if label == "true":
        return True
    return by_namespace and label is None


def inject(pod: Mapping[str, Any], template: Mapping[str, Any]) -> dict[str, Any] | None:
    """The pod with the sidecar, or None when it already has one. Pure."""
    spec = pod.get("spec") or {}
    names = _sidecar_names(template)
    present = {str(c.get("name")) for key in ("initContainers", "containers")
               for c in spec.get(key) or ()}
    if names & present:
        return None
    new = copy.deepcopy(dict(pod))
    spec = new.setdefault("spec", {})
    sidecars_init = copy.deepcopy(list(template.get("initContainers") or ()))
    sidecars = copy.deepcopy(list(template.get("containers") or ()))
    annotations = (new.get("metadata") or {}).get("annotations") or {}
    app_port = annotations.get(APP_PORT_ANNOTATION)
    inbound = template.get("inbound") or {}
    if app_port is not None and inbound.get("port"):
        text = str(app_port).strip()
        if not text.isdigit() or not 1 <= int(text) <= 65535:
            raise ValueError(f"annotation {APP_PORT_ANNOTATION}: expected a port number, "
                             f"got {app_port!r}")
        for container in [*sidecars_init, *sidecars]:
            if container.get("name") == SIDECAR_NAME:
                container["args"] = [*container.get("args", []),
                                     f"--inbound-listen=0.0.0.0:{int(inbound['port'])}",
                                     f"--app-port={int(text)}"]
                container["ports"] = [*container.get("ports", []),
                                      {"name": "kanal-inbound", "containerPort":
                                       int(inbound["port"]), "protocol": "TCP"}]
    if sidecars_init:
        spec["initContainers"] = [*sidecars_init, *(spec.get("initContainers") or [])]
    app_env = list(template.get("appEnv") or ())
    for container in spec.get("containers") or []:
        container["env"] = _with_proxy_env(container.get("env") or [], app_env)
    if sidecars:
        spec["containers"] = [*(spec.get("containers") or []), *sidecars]
    if template.get("volumes"):
        have = {v.get("name") for v in spec.get("volumes") or ()}
        spec["volumes"] = [*(spec.get("volumes") or []),
                           *(copy.deepcopy(v) for v in template["volumes"]
                             if v.get("name") not in have)]
    return new


def _with_proxy_env(env: list[dict[str, Any]], app_env: list[dict[str, Any]]
                    ) -> list[dict[str, Any]]:
    """The container's env plus the proxy variables (upper and lower case): its own
    values are kept, but NO_PROXY is ours followed by its own."""
    result = [dict(item) for item in env]
    by_name = {item.get("name"): item for item in result}
    for wanted in app_env:
        name, value = wanted["name"], str(wanted.get("value", ""))
        for variant in (name, name.lower()) if name in PROXY_VARIABLES else (name,):
            mine = by_name.get(variant)
            if mine is None:
                item = {"name": variant, "value": value}
                result.append(item)
                by_name[variant] = item
            elif name == "NO_PROXY" and "value" in mine:
                hosts = [h for h in value.split(",") if h]
                hosts += [h.strip() for h in str(mine["value"]).split(",")
                          if h.strip() and h.strip() not in hosts]
                mine["value"] = ",".join(hosts)
    return result


MEMO_TEMPLATE = "kanal_sidecar_template"


def _template(memo: kopf.Memo) -> dict[str, Any] | None:

    if MEMO_TEMPLATE not in memo:
        options = memo.get(MEMO_OPTIONS)
        path = getattr(options, "sidecar_template", None)
        template = None
        if path is not None:
            try:
                template = load_template(Path(path))
            except (OSError, ValueError) as exc:
                log.error("sidecar template %s unusable: %s", path, exc)
        memo[MEMO_TEMPLATE] = template
    template = memo[MEMO_TEMPLATE]
    return template if isinstance(template, dict) else None


def _mutate(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, by_namespace: bool) -> None:
    pod = dict(body)
    if not opted_in(pod, by_namespace):
        return
    where = f"pod {body.metadata.namespace}/{body.metadata.name or body.metadata.get('generateName', '')}"
    template = _template(memo)
    if template is None:
        log.warning("%s not injected: no sidecar template (--sidecar-template)", where)
        return
    try:
        injected = inject(pod, template)
    except ValueError as exc:
        log.warning("%s not injected: %s", where, exc)
        return
    if injected is None:
        return  # already injected
    spec = injected["spec"]
    # The JSON patch kopf sends is the difference between the pod and this.
    patch.fns.append(lambda raw: raw.__setitem__("spec", spec))
    log.info("%s: sidecar injected", where)


@kopf.on.mutate("pods", id="inject", operations=["CREATE"])
async def inject_labelled(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo,
                          **_: Any) -> None:
    _mutate(body, patch, memo, by_namespace=False)


@kopf.on.mutate("pods", id="inject-namespace", operations=["CREATE"])
async def inject_namespace(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo,
                           **_: Any) -> None:
    _mutate(body, patch, memo, by_namespace=True)


# --------------------------------------------------------------------------- validation


def _validator(kind: str) -> Any:
    async def validate(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        control_plane = memo.get(MEMO_CONTROL_PLANE)
        if control_plane is not None:
            policy = control_plane.store.policy
        else:
            options = memo.get(MEMO_OPTIONS)
            policy = EndpointPolicy(
                allow_loopback=bool(getattr(options, "allow_loopback_endpoints", False)),
                node_addresses=options.node_ips() if options is not None else frozenset())
        _resource, error = validate_kanal(kind, dict(body), policy)
        if error is not None:
            raise kopf.AdmissionError(error, code=422)
    validate.__name__ = f"validate_{kind.lower()}"
    return validate


for _kind, _model in RESOURCES.items():
    kopf.on.validate(GROUP, VERSION, _model.plural, id="validate",
                     operations=["CREATE", "UPDATE"])(_validator(_kind))

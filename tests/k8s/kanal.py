"""Kanal against the real API server: the chart rendered by helm, the operator as a process.

`render_chart` is `helm template` of charts/kanal. `install_operator_identity` applies
what the chart gives the operator to act as (its ServiceAccounts, ClusterRoles, Roles
and bindings) and returns a kubeconfig holding a TokenRequest token of the operator's
ServiceAccount: the operator then has exactly the chart's rights, no more.

`OperatorProcess` runs `kanal operator` with the arguments of the chart's Deployment,
listen addresses moved to free loopback ports and mounted files (the dataplane token,
the webhook certificate, the sidecar template) written to a folder from the rendered
chart. `webhook_configurations` turns the chart's webhook configurations into ones
that call that process: `clientConfig.service` becomes `url: https://127.0.0.1:PORT/PATH`
(as controller-runtime's envtest does) and `caBundle` the test CA's.
"""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.k8s.cluster import Cluster, free_port, stop_process, wait_for

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kanal"
IDENTITY_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")


@dataclass
class Rendered:
    release: str
    namespace: str
    docs: list[dict[str, Any]]

    def of_kind(self, *kinds: str) -> list[dict[str, Any]]:
        return [doc for doc in self.docs if doc.get("kind") in kinds]

    def one(self, kind: str, name_suffix: str = "") -> dict[str, Any]:
        found = [doc for doc in self.of_kind(kind)
                 if doc["metadata"]["name"].endswith(name_suffix)]
        assert len(found) == 1, f"{len(found)} {kind} named *{name_suffix}"
        return found[0]

    @property
    def operator_deployment(self) -> dict[str, Any]:
        return self.one("Deployment", "-operator")

    @property
    def operator_service_account(self) -> str:
        spec = self.operator_deployment["spec"]["template"]["spec"]
        return str(spec.get("serviceAccountName") or "default")


def render_chart(cluster: Cluster, release: str, namespace: str,
                 *args: str) -> Rendered:
    done = cluster.helm("template", release, str(CHART), "--namespace", namespace, *args)
    docs = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    return Rendered(release, namespace, docs)


def apply_docs(cluster: Cluster, docs: Iterable[Mapping[str, Any]], *args: str) -> str:
    stream = yaml.safe_dump_all([dict(doc) for doc in docs])
    return cluster.kubectl("apply", "--server-side", "-f", "-", *args, input=stream).stdout


def install_operator_identity(cluster: Cluster, rendered: Rendered, folder: Path) -> Path:
    """The chart's ServiceAccounts and RBAC applied; a kubeconfig acting as the operator."""
    if not cluster.exists(f"/api/v1/namespaces/{rendered.namespace}"):
        cluster.create_namespace(rendered.namespace)
    apply_docs(cluster, rendered.of_kind(*IDENTITY_KINDS))
    account = rendered.operator_service_account
    token = cluster.service_account_token(rendered.namespace, account)
    folder.mkdir(parents=True, exist_ok=True)
    return cluster.write_kubeconfig(folder / "operator.kubeconfig", token,
                                    f"system:serviceaccount:{rendered.namespace}:{account}")


def _mounted_files(rendered: Rendered) -> dict[str, bytes]:
    """Mount path of every file the operator's pod would see from its Secrets/ConfigMaps."""
    pod = rendered.operator_deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    volumes = {volume["name"]: volume for volume in pod.get("volumes") or []}
    files: dict[str, bytes] = {}
    for mount in container.get("volumeMounts") or []:
        volume = volumes[mount["name"]]
        if "secret" in volume:
            source = next(
                doc for doc in rendered.of_kind("Secret")
                if doc["metadata"]["name"] == volume["secret"]["secretName"])
            data = {key: base64.b64decode(value)
                    for key, value in (source.get("data") or {}).items()}
        elif "configMap" in volume:
            source = next(doc for doc in rendered.of_kind("ConfigMap")
                          if doc["metadata"]["name"] == volume["configMap"]["name"])
            data = {key: str(value).encode() for key, value in (source.get("data") or {}).items()}
        else:
            continue
        for key, value in data.items():
            files[f"{mount['mountPath'].rstrip('/')}/{key}"] = value
    return files


@dataclass
class OperatorProcess:
    """`kanal operator` with the chart Deployment's arguments, on loopback ports."""

    cluster: Cluster
    rendered: Rendered
    kubeconfig: Path
    folder: Path
    extra_args: Sequence[str] = ()
    extra_env: Mapping[str, str] = field(default_factory=dict)
    pod_name: str = field(default_factory=lambda: f"kanal-operator-{secrets.token_hex(4)}")
    """What `metadata.name` would be: the replica's identity in leader election."""
    config_port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    webhook_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    files: dict[str, Path] = field(default_factory=dict)
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    """Run by stop(), first: what was started against this operator (dataplanes)."""

    def argv(self) -> list[str]:
        self.folder.mkdir(parents=True, exist_ok=True)
        mounted = _mounted_files(self.rendered)
        mounts: dict[str, Path] = {}
        for path, content in mounted.items():
            local = self.folder / "mounts" / path.lstrip("/")
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(content)
            mounts[path] = local
            self.files[path] = local
        webhook_dir = self.folder / "mounts" / "webhook"
        cert = self.cluster.ca.issue_cert("127.0.0.1", "localhost")
        webhook_dir.mkdir(parents=True, exist_ok=True)
        cert.cert_chain_pems[0].write_to_path(str(webhook_dir / "tls.crt"))
        cert.private_key_pem.write_to_path(str(webhook_dir / "tls.key"))
        ports = {"--config-listen": self.config_port, "--admin": self.admin_port,
                 "--webhook-listen": self.webhook_port}
        args: list[str] = []
        container = self.rendered.operator_deployment["spec"]["template"]["spec"]["containers"][0]
        for arg in container["args"]:
            name, _, value = arg.partition("=")
            if name in ports:
                args.append(f"{name}=127.0.0.1:{ports[name]}")
            elif name == "--webhook-cert-dir":
                args.append(f"{name}={webhook_dir}")
            elif value.startswith("/"):
                args.append(f"{name}={mounts[value]}")
            else:
                args.append(arg)
        return [sys.executable, "-m", "kanal", *args, *self.extra_args]

    def container_env(self) -> dict[str, str]:
        """The chart container's env, with the Downward API fields a pod would get."""
        fields = {"metadata.name": self.pod_name, "metadata.namespace": self.rendered.namespace}
        container = self.rendered.operator_deployment["spec"]["template"]["spec"]["containers"][0]
        env: dict[str, str] = {}
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = str(item["value"])
            else:
                env[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
        return {**env, **self.extra_env}

    @property
    def log_path(self) -> Path:
        return self.folder / "operator.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 30.0) -> OperatorProcess:
        argv = self.argv()
        env = {**os.environ, **self.container_env(), "KUBECONFIG": str(self.kubeconfig),
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env, cwd=self.folder)
        wait_for("kanal operator /ready", self.ready, timeout, interval=0.1)
        return self

    def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"kanal operator exited {self.process.returncode}:\n"
                                 f"{self.log()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready",
                                        timeout=2) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        while self.cleanups:
            self.cleanups.pop()()
        if self.process is not None:
            stop_process(self.process)

    @property
    def config_url(self) -> str:
        return f"http://127.0.0.1:{self.config_port}"

    @property
    def dataplane_token(self) -> Path:
        return self.files["/etc/kanal/token/token"]


def webhook_configurations(rendered: Rendered, port: int, ca_pem: bytes
                           ) -> list[dict[str, Any]]:
    """The chart's webhook configurations, calling https://127.0.0.1:PORT instead."""
    out: list[dict[str, Any]] = []
    for doc in rendered.of_kind("MutatingWebhookConfiguration",
                                "ValidatingWebhookConfiguration"):
        doc = yaml.safe_load(yaml.safe_dump(doc))
        for webhook in doc["webhooks"]:
            service = webhook["clientConfig"].pop("service")
            webhook["clientConfig"] = {
                "url": f"https://127.0.0.1:{port}{service.get('path') or '/'}",
                "caBundle": base64.b64encode(ca_pem).decode(),
            }
        out.append(doc)
    return out


def wait_for_status(cluster: Cluster, path: str, predicate: Any, timeout: float = 20.0
                    ) -> dict[str, Any]:
    """Poll an object until `predicate(object)` holds; return the object."""
    last: dict[str, Any] = {}

    def check() -> bool:
        nonlocal last
        last = cluster.get(path)
        return bool(predicate(last))
    try:
        wait_for(path, check, timeout, interval=0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nlast seen: {yaml.safe_dump(last.get('status'))}") from None
    return last


def condition(obj: Mapping[str, Any], kind: str) -> dict[str, Any]:
    for item in (obj.get("status") or {}).get("conditions") or []:
        if item.get("type") == kind:
            return dict(item)
    return {}

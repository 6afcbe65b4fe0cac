"""A real control plane for tests: etcd and kube-apiserver on free loopback ports.

What controller-runtime's envtest does, in Python: the API server is real (validation,
defaulting, CEL, RBAC, admission webhooks over TLS, watches, server-side apply), and
nothing else runs. There is no controller-manager and no kubelet: namespaces are never
finalized, no `default` ServiceAccount appears by itself, no Pod runs, no
EndpointSlice is written.

- etcd stores in a temporary folder (`--unsafe-no-fsync`: tests need no durability).
- kube-apiserver serves TLS with a certificate of a `trustme` CA, authenticates an
  admin through a static token (group `system:masters`) and service accounts through
  the signing keys made here (TokenRequest works), authorizes with RBAC, and routes to
  webhook and aggregated services by endpoint (`--enable-aggregator-routing`), never
  to a ClusterIP nobody here can reach.
- Readiness is `/readyz` answering 200, polled with a deadline; processes are ended
  by the PIDs started here.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.k8s.build import Binaries

ADMIN_USER = "kanal-test-admin"
SERVICE_CIDR = "10.96.0.0/16"
START_DEADLINE = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 15.0,
             interval: float = 0.1) -> Any:
    """Poll until `predicate()` returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")
        time.sleep(interval)


class ApiError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        message = body.get("message") if isinstance(body, dict) else body
        super().__init__(f"{status}: {message}")
        self.status = status
        self.body = body
        self.message = str(message)


@dataclass
class Cluster:
    """A running API server and how to talk to it (as the admin unless told otherwise)."""

    url: str
    ca_pem: bytes
    ca: trustme.CA
    admin_token: str
    kubeconfig: Path
    binaries: Binaries
    folder: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    """etcd, then kube-apiserver."""
    apiserver_argv: list[str] = field(default_factory=list)
    etcd_url: str = ""

    # ----------------------------------------------------------------- HTTP

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=self.ca_pem.decode())

    def request(self, method: str, path: str, body: Any = None, *, token: str | None = None,
                content_type: str = "application/json", timeout: float = 30.0) -> Any:
        data = None
        headers = {"Accept": "application/json",
                   "Authorization": f"Bearer {token or self.admin_token}"}
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = content_type
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, context=self.ssl_context(),
                                        timeout=timeout) as answer:
                raw = answer.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = raw.decode(errors="replace")
            raise ApiError(exc.code, parsed) from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def create(self, path: str, body: Mapping[str, Any], **kwargs: Any) -> Any:
        return self.request("POST", path, dict(body), **kwargs)

    def merge_patch(self, path: str, patch: Mapping[str, Any], **kwargs: Any) -> Any:
        return self.request("PATCH", path, dict(patch),
                            content_type="application/merge-patch+json", **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self.request("DELETE", path, **kwargs)

    def exists(self, path: str) -> bool:
        try:
            self.get(path)
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    # ----------------------------------------------------------------- tools

    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig),
                "HELM_CACHE_HOME": str(self.folder / "helm-cache"),
                "HELM_CONFIG_HOME": str(self.folder / "helm-config"),
                "HELM_DATA_HOME": str(self.folder / "helm-data")}

    def run(self, program: Path, *args: str, input: str | None = None,
            check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(program), *args], input=input, capture_output=True,
                              text=True, env=self.env(), timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"{program.name} {' '.join(args)} exited "
                                 f"{done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def kubectl(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.run(self.binaries.kubectl, *args, **kwargs)

    def helm(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.run(self.binaries.helm, *args, **kwargs)

    # ----------------------------------------------------------------- helpers

    def create_namespace(self, name: str, labels: Mapping[str, str] | None = None) -> None:
        self.create("/api/v1/namespaces", {
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": dict(labels or {})}})

    def service_account_token(self, namespace: str, name: str, *, seconds: int = 3600,
                              audiences: Sequence[str] = ()) -> str:
        """A TokenRequest for an existing ServiceAccount: what a pod would be given."""
        spec: dict[str, Any] = {"expirationSeconds": seconds}
        if audiences:
            spec["audiences"] = list(audiences)
        answer = self.create(
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
        return str(answer["status"]["token"])

    def write_kubeconfig(self, path: Path, token: str, user: str) -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "test", "cluster": {
                "server": self.url,
                "certificate-authority-data": base64.b64encode(self.ca_pem).decode()}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": user}}],
            "current-context": "test",
        }), encoding="utf-8")
        path.chmod(0o600)
        return path

    def wait_established(self, crd_names: Sequence[str], timeout: float = 30.0) -> None:
        """Objects of a new CRD are refused (429/404) until it is Established."""
        def established() -> bool:
            for name in crd_names:
                crd = self.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
                conditions = (crd.get("status") or {}).get("conditions") or []
                if not any(c.get("type") == "Established" and c.get("status") == "True"
                           for c in conditions):
                    return False
            return True
        wait_for(f"CRDs {', '.join(crd_names)} Established", established, timeout)

    def compact_etcd(self) -> int:
        """Compact etcd's history up to now (what the API server does every 5 minutes):
        a watch from an older resourceVersion can then only be answered 410 Gone."""
        def call(path: str, body: Mapping[str, Any]) -> Any:
            request = urllib.request.Request(self.etcd_url + path, method="POST",
                                             data=json.dumps(body).encode())
            with urllib.request.urlopen(request, timeout=10) as answer:
                return json.load(answer)
        key = base64.b64encode(b"/").decode()
        revision = int(call("/v3/kv/range", {"key": key, "limit": 1})["header"]["revision"])
        call("/v3/kv/compaction", {"revision": revision, "physical": True})
        return revision

    def restart_apiserver(self, timeout: float = START_DEADLINE) -> None:
        """Stop kube-apiserver (by its PID) and start it again on the same port.

        Its watch cache starts afresh: a watch resumed from a resourceVersion of before
        the restart is answered `410 Gone`, as one that expired would be.
        """
        stop_process(self.processes[1])
        log = self.folder / "kube-apiserver.log"
        with open(log, "ab") as out:
            self.processes[1] = subprocess.Popen(self.apiserver_argv, stdout=out,
                                                 stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL)

        def ready() -> bool:
            if self.processes[1].poll() is not None:
                raise RuntimeError(f"kube-apiserver exited:\n{_log_tail(log)}")
            try:
                return bool(self.request("GET", "/readyz", timeout=2) == "ok")
            except (ApiError, OSError):
                return False
        wait_for("kube-apiserver /readyz after a restart", ready, timeout, interval=0.2)

    def stop(self) -> None:
        for process in reversed(self.processes):
            stop_process(process)
        self.processes.clear()


def stop_process(process: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM the process we started (by its PID), then SIGKILL after `grace` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(grace)


def _service_account_keys(folder: Path) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = folder / "sa.key"
    public = folder / "sa.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _log_tail(path: Path, size: int = 4000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-size:]
    except OSError:
        return ""


@contextmanager
def control_plane(binaries: Binaries, folder: Path) -> Iterator[Cluster]:
    """Start etcd and kube-apiserver in `folder`; stop both when the block ends."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(folder / "ca.crt"))
    server_cert.private_key_pem.write_to_path(str(folder / "apiserver.key"))
    server_cert.cert_chain_pems[0].write_to_path(str(folder / "apiserver.crt"))
    sa_key, sa_pub = _service_account_keys(folder)
    admin_token = secrets.token_urlsafe(32)
    (folder / "tokens.csv").write_text(
        f'{admin_token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n', encoding="utf-8")

    processes: list[subprocess.Popen[bytes]] = []
    try:
        etcd_client, etcd_peer = free_port(), free_port()
        etcd_log = folder / "etcd.log"
        with open(etcd_log, "wb") as log:
            processes.append(subprocess.Popen([
                str(binaries.etcd), "--name", "test", "--data-dir", str(folder / "etcd"),
                "--listen-client-urls", f"http://127.0.0.1:{etcd_client}",
                "--advertise-client-urls", f"http://127.0.0.1:{etcd_client}",
                "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
                "--initial-cluster", f"test=http://127.0.0.1:{etcd_peer}",
                "--unsafe-no-fsync", "--log-level", "warn",
            ], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        port = free_port()
        apiserver_log = folder / "kube-apiserver.log"
        apiserver_argv = [
            str(binaries.kube_apiserver),
            f"--etcd-servers=http://127.0.0.1:{etcd_client}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={folder / 'certs'}",
            f"--tls-cert-file={folder / 'apiserver.crt'}",
            f"--tls-private-key-file={folder / 'apiserver.key'}",
            f"--client-ca-file={folder / 'ca.crt'}",
            f"--token-auth-file={folder / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={sa_pub}",
            f"--service-account-signing-key-file={sa_key}",
            "--api-audiences=https://kubernetes.default.svc.cluster.local",
            "--endpoint-reconciler-type=none",
            "--enable-aggregator-routing=true",
            "--allow-privileged=true",
            "--v=1",
        ]
        with open(apiserver_log, "wb") as log:
            processes.append(subprocess.Popen(apiserver_argv, stdout=log,
                                              stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL))
        cluster = Cluster(url=f"https://127.0.0.1:{port}", ca_pem=ca.cert_pem.bytes(), ca=ca,
                          admin_token=admin_token, kubeconfig=folder / "kubeconfig",
                          binaries=binaries, folder=folder, processes=processes,
                          apiserver_argv=apiserver_argv,
                          etcd_url=f"http://127.0.0.1:{etcd_client}")
        cluster.write_kubeconfig(cluster.kubeconfig, admin_token, ADMIN_USER)

        def ready() -> bool:
            for program, process, log_path in zip(("etcd", "kube-apiserver"), processes,
                                                  (etcd_log, apiserver_log), strict=True):
                if process.poll() is not None:
                    raise RuntimeError(f"{program} exited {process.returncode}:\n"
                                       f"{_log_tail(log_path)}")
            try:
                return bool(cluster.request("GET", "/readyz", timeout=2) == "ok")
            except (ApiError, OSError):
                return False
        try:
            wait_for("kube-apiserver /readyz", ready, START_DEADLINE, interval=0.2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{_log_tail(apiserver_log)}") from None
        yield cluster
    finally:
        for process in reversed(processes):
            stop_process(process)

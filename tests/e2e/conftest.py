"""A kind cluster with Kanal installed, for the tests marked `e2e`.

The cluster comes from scripts/e2e-kind.sh (the script people run too): `up` builds
the image, loads it into kind, installs the CRDs, the chart and the demo. With
KANAL_E2E_READY=1 the tests use a cluster already up (`scripts/e2e-kind.sh up`);
otherwise they bring one up and delete it afterwards (KANAL_E2E_KEEP=1 keeps it).

Without a Docker engine (`docker info` fails) or without kind, every test here is
skipped with the reason; nothing else is tried.
"""

from __future__ import annotations

import http.client
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "e2e-kind.sh"
MANIFESTS = Path(__file__).resolve().parent / "manifests"
DEMO_NAMESPACE = "demo"


def docker_problem() -> str | None:
    """Why no Docker engine can be used here, or None when `docker info` works."""
    if shutil.which("docker") is None:
        return "no Docker engine: `docker` is not on PATH"
    try:
        result = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30,
                                check=False)
    except subprocess.TimeoutExpired:
        return "no Docker engine: `docker info` did not answer within 30s"
    if result.returncode != 0:
        lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        detail = lines[-1].strip() if lines else f"exit status {result.returncode}"
        return f"no Docker engine: `docker info` failed: {detail}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    ours = [item for item in items if here in Path(str(item.fspath)).resolve().parents]
    if not ours:
        return
    problem = docker_problem()
    if problem is None and shutil.which("kind") is None:
        problem = "kind is not on PATH (https://kind.sigs.k8s.io/docs/user/quick-start/)"
    for item in ours:
        item.add_marker(pytest.mark.e2e)
        # The cluster fixture builds an image and starts kind (`up` may take up to 30
        # minutes); the suite's 120 s timeout is for the test bodies only.
        item.add_marker(pytest.mark.timeout(300, func_only=True))
        if problem:
            item.add_marker(pytest.mark.skip(reason=problem))


@dataclass
class Cluster:
    name: str
    namespace: str
    http_port: int

    @property
    def context(self) -> str:
        return f"kind-{self.name}"

    def get(self, host: str, path: str = "/", timeout: float = 5.0) -> tuple[int, str]:
        """One request through the ingress (a new connection: spread over replicas)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
        try:
            connection.request("GET", path, headers={"Host": host})
            answer = connection.getresponse()
            return answer.status, answer.read().decode(errors="replace").strip()
        finally:
            connection.close()


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    env = {**os.environ}
    cluster = Cluster(
        name=env.setdefault("KANAL_E2E_CLUSTER", "kanal-e2e"),
        namespace=env.setdefault("KANAL_E2E_NAMESPACE", "kanal-system"),
        http_port=int(env.setdefault("KANAL_E2E_HTTP_PORT", "30080")),
    )
    created = os.environ.get("KANAL_E2E_READY") != "1"
    if created:
        subprocess.run(["bash", str(SCRIPT), "up"], check=True, env=env, timeout=1800)
    try:
        yield cluster
    finally:
        if created and os.environ.get("KANAL_E2E_KEEP") != "1":
            subprocess.run(["bash", str(SCRIPT), "down"], check=False, env=env, timeout=300)


@pytest.fixture(scope="session")
def api(cluster: Cluster) -> object:
    """A `kubernetes` ApiClient for the kind cluster's context."""
    from kubernetes import config

    return config.new_client_from_config(context=cluster.context)


def eventually(check: Callable[[], object], timeout: float = 120.0, interval: float = 1.0,
               what: str = "") -> object:
    """Call `check` until it returns a true value or raises nothing falsy, within `timeout`."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            result = check()
        except Exception as exc:
            last = exc
        else:
            if result:
                return result
            last = result
        time.sleep(interval)
    raise AssertionError(f"{what or check} not true within {timeout}s; last: {last!r}")

"""The real-API-server tier: one etcd + kube-apiserver per session, a namespace per test.

The first session on a machine builds etcd, kube-apiserver, kubectl and helm from
their Go modules (see `tests.k8s.build`; minutes, once); later sessions start the
control plane in a few seconds. Without Go the tests skip and say why. The build runs
inside a session fixture, so `python -m pytest` does all the set-up; the tests' own
timeout covers the test body only (`func_only`), never the one-time build.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.k8s.build import Binaries, BuildUnavailable, ensure_binaries
from tests.k8s.cluster import ApiError, Cluster, control_plane, wait_for
from tests.k8s.kanal import OperatorProcess, Rendered, install_operator_identity, render_chart

REPO = Path(__file__).resolve().parents[2]
CRD_NAMES = ("routes.kanal.dev", "upstreams.kanal.dev", "egresspolicies.kanal.dev")
KANAL = "/apis/kanal.dev/v1alpha1/namespaces"
RELEASE = "kanal"
RELEASE_NAMESPACE = "kanal-system"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.k8s)
            item.add_marker(pytest.mark.timeout(180, func_only=True))


@pytest.fixture(scope="session")
def k8s_binaries() -> Binaries:
    try:
        return ensure_binaries()
    except BuildUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def cluster(k8s_binaries: Binaries, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Cluster]:
    with control_plane(k8s_binaries, tmp_path_factory.mktemp("k8s")) as running:
        yield running


@pytest.fixture(scope="session")
def crds(cluster: Cluster) -> Cluster:
    """The CRDs of crds/, applied as the README says, and Established."""
    cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    cluster.wait_established(CRD_NAMES)

    def served() -> bool:  # Established, yet 429 "storage is (re)initializing" a moment more
        try:
            for name in CRD_NAMES:
                cluster.get(f"/apis/kanal.dev/v1alpha1/{name.split('.')[0]}?limit=1")
        except ApiError:
            return False
        return True
    wait_for("the kanal.dev resources served", served)
    return cluster


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> str:
    """A fresh namespace for the test (nothing here finalizes namespaces: they stay)."""
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = base
    counter = 1
    while cluster.exists(f"/api/v1/namespaces/{name}"):
        counter += 1
        name = f"{base[:36]}-{counter}"
    cluster.create_namespace(name)
    return name


@pytest.fixture(scope="session")
def chart(crds: Cluster) -> Rendered:
    """charts/kanal rendered by helm with its default values."""
    return render_chart(crds, RELEASE, RELEASE_NAMESPACE)


@pytest.fixture(scope="session")
def operator_kubeconfig(crds: Cluster, chart: Rendered,
                        tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chart's ServiceAccount and RBAC applied; a kubeconfig with its token."""
    return install_operator_identity(crds, chart, tmp_path_factory.mktemp("operator-identity"))


@pytest.fixture
def operator(crds: Cluster, chart: Rendered, operator_kubeconfig: Path,
             tmp_path: Path) -> Iterator[OperatorProcess]:
    """`kanal operator` with the chart's arguments, as the chart's ServiceAccount."""
    process = OperatorProcess(crds, chart, operator_kubeconfig, tmp_path / "operator")
    try:
        yield process.start()
    finally:
        process.stop()

"""Find a real `helm` for the chart tests and scripts/e2e-kind.sh.

The one tests/k8s builds from its Go module (helm v4, pinned in tests/k8s/go/helm) wins
once it is built; else `helm` on PATH; else it is built now, with etcd, kube-apiserver
and kubectl for the real-API-server tier (see tests/k8s/build.py: minutes, once per
machine). Without Go and without helm on PATH, HelmNotFound says so and the chart tests
skip. `python -m tests.chart.helm` prints the path.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tests.k8s.build import (
    Binaries,
    BuildFailed,
    BuildUnavailable,
    binaries_folder,
    ensure_binaries,
    kubernetes_version,
)


class HelmNotFound(RuntimeError):
    pass


def find_helm() -> Path:
    """The built helm, else `helm` on PATH, else the built helm after building it."""
    built = Binaries(binaries_folder(), kubernetes_version())
    if built.complete():
        return built.helm
    on_path = shutil.which("helm")
    if on_path:
        return Path(on_path)
    try:
        return ensure_binaries().helm
    except (BuildUnavailable, BuildFailed) as exc:
        raise HelmNotFound(f"no `helm` on PATH, and it cannot be built: {exc}") from None


if __name__ == "__main__":
    try:
        print(find_helm())
    except HelmNotFound as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)

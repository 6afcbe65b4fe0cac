"""Build etcd, kube-apiserver, kubectl and helm from their Go modules, once per version.

The real-API-server tier (`tests/k8s`) runs the control plane the way
controller-runtime's envtest does: etcd and kube-apiserver as local processes, no
kubelet. Nothing is downloaded as a binary: the three small Go modules under
`tests/k8s/go/` pin the versions (`go.mod`, `go.sum`), and `go build` compiles them
with the Go module proxy.

- `go/kubernetes`: `k8s.io/kubernetes` (kube-apiserver and kubectl). It cannot be
  `go install`ed, because its go.mod points the `k8s.io/*` staging modules at
  `./staging`; the module here replaces each of them with the released copy of the
  same version. The version is stamped with `-ldflags -X` (unstamped, the server says
  `v0.0.0-master` and helm checks a chart's `kubeVersion` against that).
- `go/etcd`: `go.etcd.io/etcd/server/v3`, whose module root is etcd's `main`.
- `go/helm`: `helm.sh/helm/v4/cmd/helm`.

The binaries land in `$XDG_CACHE_HOME/kanal-tests/k8s-<versions>-<hash>/` (default
`~/.cache/...`), keyed by the versions and a hash of the module files, and are reused
by every later run. A cold build takes about 10 minutes on two cores and fills about
2.5 GB of Go module and build caches (the binaries themselves are about 440 MB); with
Go's build cache warm, a rebuild takes seconds. A lock file keeps two sessions from
building at once.

`python -m tests.k8s.build` builds (if needed) and prints the folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODULES = HERE / "go"

PROGRAMS = ("etcd", "kube-apiserver", "kubectl", "helm")


class BuildUnavailable(RuntimeError):
    """The binaries are not built and cannot be (no Go toolchain): tests skip with this."""


class BuildFailed(RuntimeError):
    """`go build` failed; the message carries the end of its output."""


@dataclass(frozen=True)
class Binaries:
    folder: Path
    kubernetes_version: str

    @property
    def etcd(self) -> Path:
        return self.folder / "etcd"

    @property
    def kube_apiserver(self) -> Path:
        return self.folder / "kube-apiserver"

    @property
    def kubectl(self) -> Path:
        return self.folder / "kubectl"

    @property
    def helm(self) -> Path:
        return self.folder / "helm"

    def complete(self) -> bool:
        return all(os.access(self.folder / name, os.X_OK) for name in PROGRAMS)


def _required_version(module: str, dependency: str) -> str:
    text = (MODULES / module / "go.mod").read_text(encoding="utf-8")
    found = re.search(rf"^\s*(?:require\s+)?{re.escape(dependency)}\s+(v\S+)", text, re.MULTILINE)
    if found is None:
        raise BuildFailed(f"tests/k8s/go/{module}/go.mod does not require {dependency}")
    return found.group(1)


def kubernetes_version() -> str:
    return _required_version("kubernetes", "k8s.io/kubernetes")


def etcd_version() -> str:
    return _required_version("etcd", "go.etcd.io/etcd/server/v3")


def helm_version() -> str:
    return _required_version("helm", "helm.sh/helm/v4")


def cache_root() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "kanal-tests"


def _modules_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(MODULES.glob("*/go.*")):
        digest.update(path.relative_to(MODULES).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def binaries_folder() -> Path:
    name = (f"k8s-{kubernetes_version()}-etcd-{etcd_version()}-helm-{helm_version()}"
            f"-{_modules_hash()}")
    return cache_root() / name


def _version_ldflags() -> str:
    version = kubernetes_version()
    major, minor = version.lstrip("v").split(".")[:2]
    flags = ["-s", "-w"]
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X {package}.gitVersion={version}", f"-X {package}.gitMajor={major}",
                  f"-X {package}.gitMinor={minor}", f"-X {package}.gitTreeState=clean"]
    return " ".join(flags)


def _recipes() -> dict[str, tuple[str, str, str]]:
    """Program: (module folder, package, ldflags)."""
    kube = _version_ldflags()
    helm = f"-s -w -X helm.sh/helm/v4/internal/version.version={helm_version()}"
    return {
        "etcd": ("etcd", "go.etcd.io/etcd/server/v3", "-s -w"),
        "kube-apiserver": ("kubernetes", "k8s.io/kubernetes/cmd/kube-apiserver", kube),
        "kubectl": ("kubernetes", "k8s.io/kubernetes/cmd/kubectl", kube),
        "helm": ("helm", "helm.sh/helm/v4/cmd/helm", helm),
    }


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w", encoding="ascii") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_binaries(log: bool = True) -> Binaries:
    """The built binaries, building what is missing. Raises BuildUnavailable without Go."""
    binaries = Binaries(binaries_folder(), kubernetes_version())
    if binaries.complete():
        return binaries
    go = shutil.which("go")
    if go is None:
        raise BuildUnavailable(
            "the real-API-server tests need Go (https://go.dev/dl/) to build etcd, "
            f"kube-apiserver {binaries.kubernetes_version}, kubectl and helm once into "
            f"{binaries.folder}")
    with _locked(binaries.folder):
        binaries.folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ,
               "GOFLAGS": (os.environ.get("GOFLAGS", "") + " -buildvcs=false").strip()}
        for program, (module, package, ldflags) in _recipes().items():
            target = binaries.folder / program
            if os.access(target, os.X_OK):
                continue
            started = time.monotonic()
            if log:
                sys.stderr.write(f"tests/k8s: building {program} ({package}); the first "
                                 "build takes minutes, later runs reuse it\n")
            partial = target.with_name(f".{program}.partial")
            done = subprocess.run(
                [go, "build", "-ldflags", ldflags, "-o", str(partial), package],
                cwd=MODULES / module, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                partial.unlink(missing_ok=True)
                output = (done.stdout + done.stderr).strip()[-3000:]
                raise BuildFailed(f"go build {package} failed:\n{output}")
            partial.replace(target)
            if log:
                sys.stderr.write(f"tests/k8s: built {program} in "
                                 f"{time.monotonic() - started:.0f}s\n")
    return binaries


def main() -> int:
    try:
        print(ensure_binaries().folder)
    except (BuildUnavailable, BuildFailed) as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

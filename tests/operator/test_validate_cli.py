"""`kanal validate` as users run it: a real process, its exit code and what it prints."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

UPSTREAM = """\
apiVersion: kanal.dev/v1alpha1
kind: Upstream
metadata: {name: orders, namespace: shop}
spec:
  endpoints: [{address: 127.0.0.1, port: 9001}]
"""

ROUTE = """\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: shop, namespace: shop}
spec:
  hostnames: [shop.example.com]
  tls: {secretName: shop-tls}
  rules:
    - backends: [{upstream: orders}]
"""

SECRET = """\
apiVersion: v1
kind: Secret
metadata: {name: shop-tls, namespace: shop}
type: kubernetes.io/tls
stringData:
  tls.crt: "-----BEGIN CERTIFICATE-----\\nX\\n-----END CERTIFICATE-----\\n"
  tls.key: "-----BEGIN PRIVATE KEY-----\\nY\\n-----END PRIVATE KEY-----\\n"
"""


def validate(*paths: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kanal", "validate", *paths],
        cwd=cwd, capture_output=True, text=True, timeout=60, check=False,
    )


def write(root: Path, name: str, text: str) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


@pytest.fixture
def good(tmp_path: Path) -> Path:
    write(tmp_path, "good/upstream.yaml", UPSTREAM)
    write(tmp_path, "good/routes/shop.yaml", ROUTE + "---\n" + SECRET)
    write(tmp_path, "good/deployment.yaml", "apiVersion: apps/v1\nkind: Deployment\n"
                                            "metadata: {name: app}\n")
    return tmp_path


def test_a_good_folder_exits_0_and_says_how_many_objects(good: Path) -> None:
    done = validate("good", cwd=good)

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.splitlines() == [
        "note: good/deployment.yaml: document 1: skipped apps/v1 Deployment (not a Kanal object)",
        "3 objects valid",
    ]


def test_every_error_is_printed_with_file_document_and_field(tmp_path: Path) -> None:
    write(tmp_path, "bad/a.yaml", UPSTREAM.replace("port: 9001", "port: 0") + "---\n"
          + ROUTE.replace("{upstream: orders}", "{upstream: orders, weight: -1}"))
    write(tmp_path, "bad/b.yaml", "kind: Route\nspec: [\n")
    write(tmp_path, "bad/c.yaml", UPSTREAM.replace("orders", "payments")
          .replace("endpoints:", "endpionts:"))

    done = validate("bad", cwd=tmp_path)

    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "bad/a.yaml: document 1 (Upstream shop/orders): spec.endpoints[0].port: must be >= 1",
        ("bad/a.yaml: document 2 (Route shop/shop): spec.rules[0].backends[0].weight: "
        "must be >= 0"),
        ("bad/b.yaml: line 3, column 1: invalid YAML: "
        "expected the node content, but found '<stream end>'"),
        "bad/c.yaml: document 1 (Upstream shop/payments): spec.endpionts: unknown field",
        "4 errors",
    ]


def test_references_that_do_not_resolve_are_errors(tmp_path: Path) -> None:
    write(tmp_path, "refs.yaml", ROUTE.replace("{upstream: orders}", "{upstream: orders-v3}"))

    done = validate("refs.yaml", cwd=tmp_path)

    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        ("refs.yaml: document 1 (Route shop/shop): ResolvedRefs BackendNotFound: "
        "Upstream shop/orders-v3 not found; TLS Secret shop/shop-tls not found"),
        "1 error",
    ]


def test_duplicates_across_files_are_errors(good: Path) -> None:
    write(good, "again.yaml", UPSTREAM)

    done = validate("good", "again.yaml", cwd=good)

    assert done.returncode == 1
    assert ("again.yaml: document 1 (Upstream shop/orders): duplicate of "
            "good/upstream.yaml: document 1: the same kind, namespace and name"
            in done.stderr.splitlines())


def test_an_upstream_naming_a_service_is_fine_offline(tmp_path: Path) -> None:
    write(tmp_path, "svc.yaml", UPSTREAM.replace(
        "endpoints: [{address: 127.0.0.1, port: 9001}]", "service: {name: orders, port: 80}"))

    done = validate("svc.yaml", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert "service discovery needs the operator" in done.stdout
    assert done.stdout.splitlines()[-1] == "1 object valid"


def test_a_missing_path_is_an_error(tmp_path: Path) -> None:
    done = validate("nowhere", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.splitlines() == ["nowhere: no such file or directory", "1 error"]

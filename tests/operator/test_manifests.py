"""Reading manifests from files: what is read, what is skipped, and how errors are named."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from kanal.operator.manifests import (
    Document,
    Source,
    load_documents,
    load_manifests,
    parse_document,
)
from kanal.operator.models import Route, Secret, Upstream

UPSTREAM = """\
apiVersion: kanal.dev/v1alpha1
kind: Upstream
metadata: {name: orders}
spec:
  endpoints: [{address: 10.0.0.1, port: 8080}]
"""

ROUTE = """\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: shop}
spec:
  rules:
    - backends: [{upstream: orders}]
"""

BAD_WEIGHT_ROUTE = """\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: shop}
spec:
  rules:
    - backends: [{upstream: orders}]
    - backends: [{upstream: orders, weight: -1}]
"""


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Work in a scratch folder, so paths in messages are the short relative ones."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: str, text: str) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(textwrap.dedent(text))
    return path


def test_error_names_file_document_object_and_field() -> None:
    write("examples/shop.yaml", UPSTREAM + "---\n" + BAD_WEIGHT_ROUTE)

    manifests, errors = load_manifests(["examples/shop.yaml"])

    assert [str(e) for e in errors] == [
        ("examples/shop.yaml: document 2 (Route default/shop): "
        "spec.rules[1].backends[0].weight: must be >= 0")
    ]
    assert [m.subject for m in manifests] == ["Upstream default/orders"]


def test_every_error_of_a_document_is_reported() -> None:
    write("a.yaml", """\
        apiVersion: kanal.dev/v1alpha1
        kind: Upstream
        metadata: {name: orders, namespace: shop}
        spec:
          endpoints: [{address: 10.0.0.1, port: 0}]
          loadBalancer: {policy: Fastest}
          protocl: HTTPS
        """)

    _, errors = load_manifests(["a.yaml"])

    assert [str(e) for e in errors] == [
        "a.yaml: document 1 (Upstream shop/orders): spec.endpoints[0].port: must be >= 1",
        ("a.yaml: document 1 (Upstream shop/orders): spec.loadBalancer.policy: "
        "must be one of RoundRobin, LeastRequest, Random, RingHash"),
        "a.yaml: document 1 (Upstream shop/orders): spec.protocl: unknown field",
    ]


def test_folders_are_read_recursively_in_sorted_order_yaml_and_yml_only() -> None:
    write("conf/b/route.yml", ROUTE)
    write("conf/a.yaml", UPSTREAM)
    write("conf/README.md", "not yaml: [")
    write("conf/.hidden/copy.yaml", UPSTREAM)  # ConfigMap mounts keep copies under ..data
    write("conf/..data/copy.yaml", UPSTREAM)

    documents, errors = load_documents(["conf"])

    assert errors == []
    assert [str(d.source) for d in documents] == ["conf/a.yaml: document 1",
                                                  "conf/b/route.yml: document 1"]


def test_a_file_named_explicitly_is_read_whatever_its_extension() -> None:
    write("route.txt", ROUTE)
    documents, errors = load_documents(["route.txt"])
    assert errors == [] and len(documents) == 1


def test_empty_documents_are_skipped_but_counted() -> None:
    write("a.yaml", "---\n# nothing here\n---\n" + UPSTREAM + "---\n---\n" + BAD_WEIGHT_ROUTE)

    documents, _ = load_documents(["a.yaml"])

    assert [d.source.document for d in documents] == [2, 4]
    assert [d.source.line for d in documents] == [4, 11]


def test_other_kinds_are_skipped_with_a_note_not_an_error() -> None:
    write("app.yaml", textwrap.dedent("""\
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: shop}
        spec: {replicas: 2}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: settings}
        """) + "---\n" + UPSTREAM)
    notes: list[str] = []

    manifests, errors = load_manifests(["app.yaml"], notes=notes)

    assert errors == []
    assert [m.subject for m in manifests] == ["Upstream default/orders"]
    assert notes == [
        "app.yaml: document 1: skipped apps/v1 Deployment (not a Kanal object)",
        "app.yaml: document 2: skipped v1 Service (not a Kanal object)",
    ]


def test_config_maps_are_read_and_binary_data_must_be_base64() -> None:
    write("cm.yaml", textwrap.dedent("""\
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: protos}
        binaryData: {descriptors.pb: CgVib29rcw==}
        ---
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: broken}
        binaryData: {descriptors.pb: "not base64!"}
        """))

    manifests, errors = load_manifests(["cm.yaml"])

    assert [m.subject for m in manifests] == ["ConfigMap default/protos"]
    assert [str(e) for e in errors] == [
        "cm.yaml: document 2 (ConfigMap default/broken): binaryData: descriptors.pb: not "
        "valid base64 (use data for plain text)"]


def test_secrets_are_read() -> None:
    write("secret.yaml", """\
        apiVersion: v1
        kind: Secret
        metadata: {name: shop-tls, namespace: shop}
        type: kubernetes.io/tls
        stringData: {tls.crt: CERT, tls.key: KEY}
        """)
    [manifest], errors = load_manifests(["secret.yaml"])
    assert errors == []
    assert isinstance(manifest.resource, Secret)
    assert manifest.resource.values() == {"tls.crt": "CERT", "tls.key": "KEY"}


def test_a_yaml_syntax_error_names_file_and_line_and_drops_the_file() -> None:
    write("broken.yaml", UPSTREAM + "---\nkind: Route\nspec:\n  rules: [\n    - a: b\n")

    documents, errors = load_documents(["broken.yaml"])

    assert documents == []
    [error] = errors
    assert str(error).startswith("broken.yaml: line 10, column 5: invalid YAML: ")


def test_a_key_written_twice_is_an_error() -> None:
    write("twice.yaml", UPSTREAM.replace("port: 8080}]", "port: 8080}]\n  protocol: HTTP\n"
                                         "  protocol: HTTPS"))
    _, errors = load_documents(["twice.yaml"])
    assert [str(e) for e in errors] == [
        "twice.yaml: line 7, column 3: invalid YAML: duplicate key 'protocol'"]


def test_a_path_that_does_not_exist_is_an_error() -> None:
    _, errors = load_documents(["nowhere.yaml"])
    assert [str(e) for e in errors] == ["nowhere.yaml: no such file or directory"]


@pytest.mark.parametrize(("head", "message"), [
    ("apiVersion: kanal.dev/v1\nkind: Route\n",
     ("a.yaml: document 1 (Route default/x): apiVersion: "
     "unknown version kanal.dev/v1; expected kanal.dev/v1alpha1")),
    ("apiVersion: kanal.dev/v1alpha1\nkind: Gateway\n",
     ("a.yaml: document 1 (Gateway default/x): kind: "
     "unknown kind Gateway; expected one of Route, Upstream, EgressPolicy")),
    ("kind: Route\n", "a.yaml: document 1 (Route default/x): apiVersion: field required"),
    ("apiVersion: kanal.dev/v1alpha1\n",
     "a.yaml: document 1 (object default/x): kind: field required"),
])
def test_unknown_kanal_kinds_and_versions_are_errors(head: str, message: str) -> None:
    write("a.yaml", head + "metadata: {name: x}\nspec: {}\n")
    _, errors = load_manifests(["a.yaml"])
    assert [str(e) for e in errors] == [message]


def test_a_document_that_is_not_a_mapping_is_an_error() -> None:
    write("a.yaml", "- just\n- a list\n")
    _, errors = load_manifests(["a.yaml"])
    assert [str(e) for e in errors] == [
        "a.yaml: document 1: expected a mapping with apiVersion and kind, got a list"]


def test_the_same_object_in_two_places_is_an_error_naming_both() -> None:
    write("a.yaml", UPSTREAM)
    write("b.yaml", ROUTE + "---\n" + UPSTREAM.replace("10.0.0.1", "10.0.0.2"))

    manifests, errors = load_manifests(["a.yaml", "b.yaml"])

    assert [str(e) for e in errors] == [
        ("b.yaml: document 2 (Upstream default/orders): duplicate of a.yaml: document 1: "
        "the same kind, namespace and name")
    ]
    kept = [m.resource for m in manifests if isinstance(m.resource, Upstream)]
    assert [u.spec.endpoints[0].address for u in kept if u.spec.endpoints] == ["10.0.0.1"]


def test_same_name_in_other_namespace_or_kind_is_not_a_duplicate() -> None:
    write("a.yaml", UPSTREAM + "---\n" + UPSTREAM.replace("{name: orders}",
                                                         "{name: orders, namespace: b}")
          + "---\n" + ROUTE.replace("{name: shop}", "{name: orders}"))
    manifests, errors = load_manifests(["a.yaml"])
    assert errors == [] and len(manifests) == 3


def test_parse_document_returns_the_model() -> None:
    import yaml

    parsed = parse_document(Document(Source("x.yaml", 1), yaml.safe_load(ROUTE)))
    assert isinstance(parsed, Route)
    assert parsed.key == "default/shop"

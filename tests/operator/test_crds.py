"""The CRDs: generated from the models, checked in under crds/, structural, and right.

What is checked here, and why:

- crds/ is exactly what the generator writes, and `kanal crds` prints the same
  documents: nobody applies a stale CRD;
- the schema is structural by Kubernetes' rules (every node typed, no `$ref`, no
  `additionalProperties: false`, nothing but `{type: object}` for metadata...), so the
  API server accepts the CRD and prunes and defaults as documented;
- every property has a description, so `kubectl explain` teaches the whole API, and a
  model field without one fails generation with its path;
- api.md's example manifests validate against the schema *and* the models, and carry
  no field the API server would silently prune; values the models reject for reasons
  a schema can state are rejected by the schema too.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pydantic
import pytest
import yaml
from pydantic import Field, ValidationError

from kanal.operator import crdgen, models
from kanal.operator.crdgen import CRDGenerationError, crd_files, crd_for, crds, crds_yaml
from kanal.operator.durations import DURATION_PATTERN
from kanal.operator.models import RESOURCES, KanalModel, KanalResource

REPO = Path(__file__).resolve().parents[2]
CRDS_DIR = REPO / "crds"
REGENERATE = "python -m kanal.operator.crdgen crds"

KINDS = list(RESOURCES)


def schema_of(kind: str) -> dict[str, Any]:
    schema: dict[str, Any] = crd_for(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


# --------------------------------------------------------------------------- checked in, CLI


def test_checked_in_crds_are_what_the_generator_writes() -> None:
    expected = crd_files()
    present = {path.name: path.read_text(encoding="utf-8")
               for path in sorted(CRDS_DIR.glob("kanal.dev_*.yaml"))}
    assert sorted(present) == sorted(expected), (
        f"crds/ holds {sorted(present)}, the generator writes {sorted(expected)}; "
        f"regenerate with `{REGENERATE}`"
    )
    stale = [name for name in expected if present[name] != expected[name]]
    assert not stale, f"stale CRDs {stale}: regenerate with `{REGENERATE}`"


def test_one_file_per_kind_with_the_conventional_names() -> None:
    assert list(crd_files()) == [
        "kanal.dev_routes.yaml", "kanal.dev_upstreams.yaml", "kanal.dev_egresspolicies.yaml",
    ]


def test_kanal_crds_prints_the_same_documents() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kanal", "crds"],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == crds_yaml()
    documents = list(yaml.safe_load_all(result.stdout))
    assert documents == crds()
    on_disk = [yaml.safe_load(text) for text in crd_files().values()]
    assert documents == on_disk


def test_generator_module_writes_a_folder_and_removes_stale_files(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "kanal.dev_gone.yaml").write_text("stale", encoding="utf-8")
    (folder / "README.md").write_text("kept", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "kanal.operator.crdgen", str(folder)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    names = sorted(path.name for path in folder.iterdir())
    assert names == sorted([*crd_files(), "README.md"])
    for name, text in crd_files().items():
        assert (folder / name).read_text(encoding="utf-8") == text


def test_output_is_deterministic_across_interpreters() -> None:
    """No set order or hash seed leaks into the output."""
    outputs = set()
    for seed in ("0", "1", "12345"):
        result = subprocess.run(
            [sys.executable, "-c",
             "import sys; from kanal.operator.crdgen import crds_yaml; sys.stdout.write(crds_yaml())"],
            capture_output=True, text=True, timeout=60, check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        outputs.add(result.stdout)
    assert outputs == {crds_yaml()}


def test_yaml_is_multi_document_and_round_trips() -> None:
    text = crds_yaml()
    assert text.startswith("---\n")
    assert text.count("\n---\n") == len(KINDS) - 1
    assert list(yaml.safe_load_all(text)) == crds()


# --------------------------------------------------------------------------- the CRD envelope


@pytest.mark.parametrize("kind", KINDS)
def test_crd_envelope(kind: str) -> None:
    model = RESOURCES[kind]
    crd = crd_for(kind)
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"] == {"name": f"{model.plural}.kanal.dev"}
    spec = crd["spec"]
    assert spec["group"] == "kanal.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": kind,
        "listKind": f"{kind}List",
        "plural": model.plural,
        "singular": kind.lower(),
        "shortNames": list(model.short_names),
        "categories": ["kanal"],
    }
    [version] = spec["versions"]
    assert version["name"] == "v1alpha1"
    assert version["served"] is True and version["storage"] is True
    assert version["subresources"] == {"status": {}}


@pytest.mark.parametrize("kind", KINDS)
def test_printer_columns_come_from_the_model(kind: str) -> None:
    columns = crd_for(kind)["spec"]["versions"][0]["additionalPrinterColumns"]
    assert columns == [dict(column) for column in RESOURCES[kind].printer_columns]
    assert columns, "kubectl get should show more than the name"
    assert columns[-1] == {"name": "Age", "type": "date",
                           "jsonPath": ".metadata.creationTimestamp"}
    for column in columns:
        assert column["type"] in {"integer", "number", "string", "boolean", "date"}


def test_printer_columns_show_what_api_md_promises() -> None:
    def names(kind: str) -> list[str]:
        return [c["name"] for c in crd_for(kind)["spec"]["versions"][0]["additionalPrinterColumns"]]

    assert {"Hosts", "Backends", "Age"} <= set(names("Route"))
    assert {"Healthy", "Total", "Age"} <= set(names("Upstream"))


def test_a_printer_column_on_a_missing_field_fails_generation(
        monkeypatch: pytest.MonkeyPatch) -> None:
    columns = (*models.Route.printer_columns,
               {"name": "Oops", "type": "string", "jsonPath": ".spec.hostname"})
    monkeypatch.setattr(models.Route, "printer_columns", columns)
    with pytest.raises(CRDGenerationError, match=r"Oops.*no field 'hostname'"):
        crd_for("Route")


@pytest.mark.parametrize("kind", KINDS)
def test_top_level_schema(kind: str) -> None:
    schema = schema_of(kind)
    assert schema["type"] == "object"
    assert schema["required"] == ["spec"]
    assert list(schema["properties"]) == ["apiVersion", "kind", "metadata", "spec", "status"]
    assert schema["properties"]["apiVersion"]["type"] == "string"
    assert schema["properties"]["kind"]["type"] == "string"
    # Kubernetes forbids anything here but restrictions on name and generateName,
    # and a description counts as something.
    assert schema["properties"]["metadata"] == {"type": "object"}
    spec_model = models.SPECS[kind]
    spec = schema["properties"]["spec"]
    assert list(spec["properties"]) == [
        field.alias or name for name, field in spec_model.model_fields.items()
    ]
    assert spec.get("required", []) == [
        field.alias or name for name, field in spec_model.model_fields.items()
        if field.is_required()
    ]
    assert schema["description"] == RESOURCES[kind].__doc__


@pytest.mark.parametrize("kind", KINDS)
def test_status_keeps_what_kopf_and_the_status_writer_put_there(kind: str) -> None:
    status = schema_of(kind)["properties"]["status"]
    assert status["type"] == "object"
    assert status["x-kubernetes-preserve-unknown-fields"] is True
    conditions = status["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert set(conditions["items"]["properties"]) == {
        "type", "status", "reason", "message", "observedGeneration", "lastTransitionTime",
    }
    assert ("endpoints" in status["properties"]) == (kind == "Upstream")


# --------------------------------------------------------------------------- structural rules

_VALUE_KEYS = {
    "description", "type", "format", "enum", "pattern", "minLength", "maxLength", "minimum",
    "exclusiveMinimum", "maximum", "exclusiveMaximum", "multipleOf", "minItems", "maxItems",
    "minProperties", "maxProperties", "nullable", "default", "required", "properties",
    "additionalProperties", "items", "anyOf", "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys", "x-kubernetes-map-type", "x-kubernetes-validations",
    "x-kubernetes-embedded-resource",
}
_FORMATS = {
    "bsonobjectid", "uri", "email", "hostname", "ipv4", "ipv6", "cidr", "mac", "uuid", "uuid3",
    "uuid4", "uuid5", "isbn", "isbn10", "isbn13", "creditcard", "ssn", "hexcolor", "rgbcolor",
    "byte", "password", "date", "duration", "datetime", "date-time", "int32", "int64", "float",
    "double",
}


def walk(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        yield from walk(node["items"], f"{path}[*]")


def structural_problems(schema: dict[str, Any]) -> list[str]:
    """Kubernetes' structural-schema rules, as far as this generator can break them."""
    problems: list[str] = []
    for path, node in walk(schema, ""):
        where = path or "<root>"
        unknown = set(node) - _VALUE_KEYS
        if unknown:
            problems.append(f"{where}: unknown keys {sorted(unknown)} (a $ref, title, "
                            f"oneOf, allOf... left in?)")
        int_or_string = node.get("x-kubernetes-int-or-string") is True
        free = node.get("x-kubernetes-preserve-unknown-fields") is True
        if "type" not in node and not (int_or_string or free):
            problems.append(f"{where}: no type")
        if "anyOf" in node and not (
                int_or_string and node["anyOf"] == [{"type": "integer"}, {"type": "string"}]):
            problems.append(f"{where}: anyOf other than the int-or-string pattern")
        if node.get("additionalProperties") is False:
            problems.append(f"{where}: additionalProperties: false")
        if "additionalProperties" in node and "properties" in node:
            problems.append(f"{where}: both properties and additionalProperties")
        if node.get("type") == "array" and "items" not in node:
            problems.append(f"{where}: array without items")
        if node.get("type") == "object" and not (
                "properties" in node or "additionalProperties" in node or free
                or path == ".metadata"):
            problems.append(f"{where}: object without properties prunes everything")
        if "format" in node and node["format"] not in _FORMATS:
            problems.append(f"{where}: format {node['format']!r} unknown to Kubernetes")
        if node.get("uniqueItems"):
            problems.append(f"{where}: uniqueItems")
        for name in node.get("required", []):
            if name not in node.get("properties", {}):
                problems.append(f"{where}: requires {name!r}, which it does not describe")
        if node.get("x-kubernetes-list-type") == "map":
            item = node["items"]
            for key in node["x-kubernetes-list-map-keys"]:
                if key not in item.get("required", []) and "default" not in \
                        item["properties"][key]:
                    problems.append(f"{where}: list-map key {key!r} neither required nor "
                                    f"defaulted")
        if "pattern" in node and re.search(r"\(\?<?[=!]|\\[1-9]", node["pattern"]):
            problems.append(f"{where}: pattern needs lookaround/backreferences (not RE2)")
        if "default" in node:
            problems.extend(f"{where}: default {node['default']!r}: {message}"
                            for message in default_problems(node))
        if path.startswith(".metadata") and path != ".metadata":
            problems.append(f"{where}: metadata may only restrict name and generateName")
    return problems


def default_problems(node: dict[str, Any]) -> list[str]:
    value = node["default"]
    kinds = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if type(value) not in kinds:
        return ["not a plain scalar"]
    if kinds[type(value)] != node.get("type") and not (
            type(value) is int and node.get("type") == "number"):
        return [f"not of type {node.get('type')}"]
    validator = jsonschema_validator({k: v for k, v in node.items() if k != "default"})
    return [error.message for error in validator.iter_errors(value)]


def jsonschema_validator(schema: dict[str, Any]) -> Any:
    jsonschema = pytest.importorskip(
        "jsonschema", reason="jsonschema is not installed (add it to the test extra)")
    # OpenAPI v3.0 schemas are closest to draft 4 (boolean exclusiveMinimum, no const).
    return jsonschema.Draft4Validator(schema)


@pytest.mark.parametrize("kind", KINDS)
def test_schema_is_structural(kind: str) -> None:
    problems = structural_problems(schema_of(kind))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("kind", KINDS)
def test_every_property_has_a_description(kind: str) -> None:
    missing = [path for path, node in walk(schema_of(kind), "")
               if path and not path.endswith(("[*]", ".*")) and path != ".metadata"
               and not node.get("description", "").strip()]
    assert not missing, f"no description (kubectl explain shows nothing): {missing}"


def test_kubectl_explain_teaches_the_model_descriptions() -> None:
    """`kubectl explain route.spec.rules.backends` shows the field's description."""
    spec = schema_of("Route")["properties"]["spec"]
    backends = spec["properties"]["rules"]["items"]["properties"]["backends"]
    assert backends["description"] == models.RuleSpec.model_fields["backends"].description
    weight = backends["items"]["properties"]["weight"]
    assert weight["description"] == models.BackendSpec.model_fields["weight"].description
    hash_on = schema_of("Upstream")["properties"]["spec"]["properties"]["loadBalancer"][
        "properties"]["hashOn"]
    assert hash_on["description"] == models.LoadBalancerSpec.model_fields["hash_on"].description


def test_schema_keeps_the_models_constraints() -> None:
    upstream = schema_of("Upstream")["properties"]["spec"]["properties"]
    port = upstream["endpoints"]["items"]["properties"]["port"]
    assert (port["type"], port["minimum"], port["maximum"]) == ("integer", 1, 65535)
    assert upstream["protocol"]["enum"] == ["HTTP", "HTTPS", "H2C", "H2"]
    assert upstream["protocol"]["default"] == "HTTP"
    breaker = upstream["circuitBreaker"]["properties"]
    assert breaker["failureRatePercent"]["maximum"] == 100
    assert breaker["openDuration"]["pattern"] == DURATION_PATTERN
    route = schema_of("Route")["properties"]["spec"]["properties"]
    assert route["rules"]["minItems"] == 1
    # Backends may be left out only by a rule whose filters answer (redirect, direct
    # response) or that aggregates, and never beside an aggregate: CEL rules say so.
    assert "required" not in route["rules"]["items"]
    checks = route["rules"]["items"]["x-kubernetes-validations"]
    assert any("RequestRedirect" in rule["rule"] and "aggregate" in rule["rule"]
               for rule in checks)
    assert any(rule["message"] == "a rule has backends or aggregate, not both"
               for rule in checks)
    # Optional fields are plain, not nullable, and null defaults are gone.
    assert "nullable" not in route["tls"] and "default" not in route["tls"]
    # A list default is not a plain scalar: the model supplies it.
    assert "default" not in route["gateways"]


@pytest.mark.parametrize("kind", KINDS)
def test_scalar_defaults_are_the_models_defaults(kind: str) -> None:
    """Where the API server fills in a default, it fills in the models' value."""
    def defaults(model: type[KanalModel], node: dict[str, Any], path: str) -> Iterator[str]:
        for name, field in model.model_fields.items():
            child = node["properties"][field.alias or name]
            if "default" in child:
                assert child["default"] == field.default, f"{path}.{field.alias}"
                yield f"{path}.{field.alias or name}"
            target = child.get("items", child)
            annotation = field.annotation
            for candidate in _models_in(annotation):
                if "properties" in target:
                    yield from defaults(candidate, target, f"{path}.{field.alias or name}")

    found = list(defaults(models.SPECS[kind], schema_of(kind)["properties"]["spec"], "spec"))
    if kind != "EgressPolicy":
        assert found, "expected some scalar defaults"


def _models_in(annotation: Any) -> list[type[KanalModel]]:
    if isinstance(annotation, type) and issubclass(annotation, KanalModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _models_in(arg)]


# --------------------------------------------------------------------------- loud failures


class _Undocumented(KanalModel):
    """A spec with a field nobody explained."""

    things: list[str] = Field(default_factory=list)


class _Fake(KanalResource):
    """Fake."""

    kind_name = "Fake"
    plural = "fakes"
    kind: Literal["Fake"] = Field(description="Fake")
    spec: _Undocumented = Field(description="The desired state.")


class _Choice(KanalModel):
    """A union of objects: structural schemas cannot say it."""

    one: models.ServiceRef | models.StaticEndpoint = Field(description="Either.")


class _FakeUnion(KanalResource):
    """Fake."""

    kind_name = "FakeUnion"
    plural = "fakeunions"
    kind: Literal["FakeUnion"] = Field(description="FakeUnion")
    spec: _Choice = Field(description="The desired state.")


def test_a_field_without_description_fails_generation_naming_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(RESOURCES, "Fake", _Fake)
    with pytest.raises(CRDGenerationError, match=r"^Fake\.spec\.things: no description"):
        crd_for("Fake")
    with pytest.raises(CRDGenerationError):
        crds()


def test_a_union_of_objects_fails_generation_naming_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(RESOURCES, "FakeUnion", _FakeUnion)
    with pytest.raises(CRDGenerationError, match=r"^FakeUnion\.spec\.one: a union"):
        crd_for("FakeUnion")


def test_conversion_rules_on_single_nodes() -> None:
    convert = crdgen._convert
    assert convert({"const": "x", "type": "string", "title": "X", "description": "d"}, {},
                   "p") == {"description": "d", "type": "string", "enum": ["x"]}
    assert convert({"type": "integer", "exclusiveMinimum": 0, "default": 0}, {}, "p") == {
        "type": "integer", "minimum": 0, "exclusiveMinimum": True}  # invalid default dropped
    assert convert({"type": "string", "pattern": "^a", "default": "b"}, {}, "p") == {
        "type": "string", "pattern": "^a"}
    assert convert({"type": "object", "additionalProperties": True}, {}, "p") == {
        "type": "object", "x-kubernetes-preserve-unknown-fields": True}
    assert convert({"type": "string", "format": "duration"}, {}, "p") == {"type": "string"}
    assert convert({"type": "string", "format": "date-time"}, {}, "p") == {
        "type": "string", "format": "date-time"}
    int_or_string = {"x-kubernetes-int-or-string": True,
                     "anyOf": [{"type": "integer"}, {"type": "string"}]}
    assert convert(int_or_string, {}, "p") == int_or_string
    with pytest.raises(CRDGenerationError, match="p: pattern"):
        convert({"type": "string", "pattern": "^(?!x)"}, {}, "p")
    with pytest.raises(CRDGenerationError, match="p: an array without"):
        convert({"type": "array"}, {}, "p")
    with pytest.raises(CRDGenerationError, match="p: unsupported JSON schema keyword 'oneOf'"):
        convert({"oneOf": [{"type": "string"}], "description": "d"}, {}, "p")
    with pytest.raises(CRDGenerationError, match="p: tuple items"):
        convert({"type": "array", "items": [{"type": "string"}]}, {}, "p")


# --------------------------------------------------------------------------- api.md examples

UPSTREAM_SERVICE = """
apiVersion: kanal.dev/v1alpha1
kind: Upstream
metadata: {name: orders-v1, namespace: shop}
spec:
  service: {name: orders-v1, port: 8080}
  protocol: HTTPS
  tls:
    sni: orders.internal
    caSecretName: orders-ca
    clientCertSecretName: orders-client
    insecureSkipVerify: false
  loadBalancer:
    policy: RingHash
    hashOn: {header: x-user}
  healthCheck:
    path: /healthz
    interval: 5s
    timeout: 1s
    healthyThreshold: 2
    unhealthyThreshold: 3
  circuitBreaker:
    maxConnections: 1024
    maxPendingRequests: 1024
    consecutiveFailures: 5
    failureRatePercent: 50
    minimumRequests: 20
    slowCallDuration: 2s
    openDuration: 30s
    halfOpenRequests: 1
  timeouts: {connect: 2s, idle: 60s}
status:
  conditions:
    - {type: Accepted, status: "True", reason: Accepted, message: "",
       observedGeneration: 3, lastTransitionTime: "2024-05-01T10:00:00Z"}
    - {type: ResolvedRefs, status: "False", reason: SecretNotFound,
       message: "Secret shop/orders-ca not found", observedGeneration: 3,
       lastTransitionTime: "2024-05-01T10:00:00Z"}
  endpoints: {total: 3, healthy: 2}
"""

UPSTREAM_STATIC = """
apiVersion: kanal.dev/v1alpha1
kind: Upstream
metadata: {name: orders-v2, namespace: shop}
spec:
  endpoints:
    - {address: 127.0.0.1, port: 9001, weight: 1}
    - {address: orders.example.net, port: 9002}
  protocol: HTTP
  loadBalancer: {policy: RoundRobin}
"""

ROUTE = """
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: shop, namespace: shop}
spec:
  hostnames: [shop.example.com, "*.example.com"]
  gateways: [ingress]
  tls:
    secretName: shop-tls
    redirectHTTP: true
    hsts: {maxAge: 31536000, includeSubDomains: false}
  rules:
    - name: canary-by-header
      matches:
        - path: {type: PathPrefix, value: /api}
          method: GET
          headers: [{name: x-canary, value: "true"}]
          queryParams: [{name: beta, value: "1"}]
      backends:
        - {upstream: orders-v2, weight: 1}
    - matches: [{path: {type: PathPrefix, value: /api}}]
      backends:
        - {upstream: orders-v1, weight: 95}
        - {upstream: orders-v2, weight: 5}
      sessionAffinity: {cookie: {name: kanal-affinity, ttl: 1h}}
      timeout: 15s
      retries: {attempts: 2, perTryTimeout: 400ms,
                retryOn: [connect-failure, reset, "502", "503", "504"]}
status:
  conditions:
    - {type: Accepted, status: "True", reason: Accepted}
    - {type: Programmed, status: "Unknown", reason: Pending, message: "0 of 2 dataplanes"}
  kopf: {progress: {}}
"""

EGRESS_POLICY = """
apiVersion: kanal.dev/v1alpha1
kind: EgressPolicy
metadata: {name: default, namespace: shop}
spec:
  allow:
    - {host: "*.example.com", ports: [443]}
    - {host: api.partner.net}
  deny:
    - {host: "ads.example.com"}
  allowPrivateNetworks: false
  auth: {basicSecretName: egress-users}
  anonymize: true
"""

EXAMPLES = {
    "upstream-service": UPSTREAM_SERVICE,
    "upstream-static": UPSTREAM_STATIC,
    "route": ROUTE,
    "egress-policy": EGRESS_POLICY,
}


def pruned_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the API server would drop silently: not in a schema that prunes."""
    if schema.get("x-kubernetes-preserve-unknown-fields") is True and \
            "properties" not in schema:
        return []
    if path == ".metadata":
        return []
    found: list[str] = []
    if isinstance(value, dict):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if properties is not None and key in properties:
                found += pruned_fields(item, properties[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += pruned_fields(item, extra, f"{path}.{key}")
            elif schema.get("x-kubernetes-preserve-unknown-fields") is not True:
                found.append(f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            found += pruned_fields(item, schema["items"], f"{path}[{index}]")
    return found


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_api_md_examples_validate_against_schema_and_model(name: str) -> None:
    document = yaml.safe_load(EXAMPLES[name])
    schema = schema_of(document["kind"])
    errors = [f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
              for error in jsonschema_validator(schema).iter_errors(document)]
    assert not errors, "\n".join(errors)
    assert pruned_fields(document, schema) == []
    RESOURCES[document["kind"]].model_validate(document)


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_what_the_models_write_back_validates(name: str) -> None:
    """A parsed object dumped with every default is still a valid object."""
    document = yaml.safe_load(EXAMPLES[name])
    model = RESOURCES[document["kind"]].model_validate(document)
    dumped = model.model_dump(mode="json", by_alias=True, exclude_none=True)
    dumped["metadata"] = document["metadata"]
    schema = schema_of(document["kind"])
    errors = [error.message for error in jsonschema_validator(schema).iter_errors(dumped)]
    assert not errors, errors
    assert pruned_fields(dumped, schema) == []


def test_a_spec_is_required() -> None:
    document = {"apiVersion": "kanal.dev/v1alpha1", "kind": "Route",
                "metadata": {"name": "x"}}
    errors = list(jsonschema_validator(schema_of("Route")).iter_errors(document))
    assert [error.message for error in errors] == ["'spec' is a required property"]


# (example, dotted path to change, bad value): rejected by the models and the schema.
BAD_VALUES = [
    ("route", "spec.rules.0.backends.0.weight", -1),
    ("route", "spec.rules.0.backends.0.weight", 1_000_001),
    ("route", "spec.rules", []),
    ("route", "spec.rules.1.timeout", "1.5s"),
    ("route", "spec.rules.1.retries.attempts", 11),
    ("route", "spec.rules.1.retries.retryOn.0", "404"),
    ("route", "spec.rules.0.matches.0.path.type", "Prefix"),
    ("route", "spec.rules.0.matches.0.method", "get"),
    ("route", "spec.rules.0.matches.0.headers.0.name", "bad header"),
    ("route", "spec.hostnames.0", "shop_example.com"),
    ("route", "spec.gateways", []),
    ("route", "spec.gateways.0", "edge"),
    ("route", "spec.tls.secretName", "Shop-TLS"),
    ("upstream-service", "spec.service.port", 0),
    ("upstream-service", "spec.service.name", "1orders"),
    ("upstream-service", "spec.protocol", "GRPC"),
    ("upstream-service", "spec.loadBalancer.policy", "LeastConn"),
    ("upstream-service", "spec.circuitBreaker.failureRatePercent", 101),
    ("upstream-service", "spec.circuitBreaker.openDuration", "30"),
    ("upstream-service", "spec.healthCheck.path", "healthz"),
    ("upstream-service", "spec.timeouts.idle", "1d"),
    ("upstream-static", "spec.endpoints.0.port", 65536),
    ("upstream-static", "spec.endpoints.0.address", ""),
    ("egress-policy", "spec.allow.0.ports.0", 0),
    ("egress-policy", "spec.auth", {}),
]


def _set(document: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node: Any = document
    for step in parents:
        node = node[int(step)] if isinstance(node, list) else node[step]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


@pytest.mark.parametrize(("name", "where", "value"), BAD_VALUES,
                         ids=[f"{name}:{where}={value!r}" for name, where, value in BAD_VALUES])
def test_values_the_models_reject_the_schema_rejects(name: str, where: str, value: Any) -> None:
    document = copy.deepcopy(yaml.safe_load(EXAMPLES[name]))
    _set(document, where, value)
    with pytest.raises(ValidationError):
        RESOURCES[document["kind"]].model_validate(document)
    errors = list(jsonschema_validator(schema_of(document["kind"])).iter_errors(document))
    assert errors, f"the API server would accept {where}={value!r}, kanal validate does not"


# Values pydantic's lax mode coerces (so `kanal validate` and `kanal run` accept them)
# while the API server rejects them: a manifest that works standalone fails on
# `kubectl apply`. The fix belongs in the models (strict types, keeping the deliberate
# YAML int -> str of retryOn by making that item int-or-string in the schema, or
# strict); when it lands these pass and, being strict xfails, fail until removed here.
LAX_VALUES = [
    ("route", "spec.tls.redirectHTTP", "yes"),
    ("route", "spec.tls.hsts.includeSubDomains", 1),
    ("upstream-service", "spec.service.port", "8080"),
    ("route", "spec.rules.0.backends.0.weight", "5"),
    ("route", "spec.rules.1.retries.retryOn.2", 502),
    ("egress-policy", "spec.anonymize", "no"),
]


@pytest.mark.parametrize(("name", "where", "value"), LAX_VALUES,
                         ids=[f"{name}:{where}={value!r}" for name, where, value in LAX_VALUES])
def test_values_the_api_server_rejects_kanal_validate_rejects(
    name: str, where: str, value: Any
) -> None:
    """Strings for numbers or booleans (and unquoted status codes) fail in both places."""
    document = copy.deepcopy(yaml.safe_load(EXAMPLES[name]))
    _set(document, where, value)
    with pytest.raises(pydantic.ValidationError):
        RESOURCES[document["kind"]].model_validate(document)
    errors = [error.message
              for error in jsonschema_validator(schema_of(document["kind"])).iter_errors(document)]
    assert errors, f"the schema accepts {where}={value!r}, which kanal validate rejects"

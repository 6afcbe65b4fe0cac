"""The CustomResourceDefinitions of Route, Upstream and EgressPolicy, generated from the models.

The pydantic models in `kanal.operator.models` are the one definition of the API; this
module turns their JSON schema into the structural OpenAPI v3 schema Kubernetes wants
(https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#specifying-a-structural-schema),
so that `kubectl apply` checks what `kanal validate` checks and `kubectl explain`
teaches what the field descriptions say.

The conversion, node by node:

- `$ref`/`$defs` are inlined; `anyOf: [X, {type: null}]` (an Optional field) becomes X.
  No `nullable`: Kubernetes prunes a null value of a non-nullable field, which is what
  the models do with an absent optional field.
- `title` goes, `const` becomes a one-value `enum`, `additionalProperties: false`
  (pydantic's `extra="forbid"`) goes: structural schemas forbid it and the API server
  prunes unknown fields instead. `additionalProperties: true` becomes
  `x-kubernetes-preserve-unknown-fields: true`.
- A `default` stays only when it is a plain scalar that the node's own schema accepts;
  the API server then fills it in, as the models do.
- `format` stays only when Kubernetes knows it with the same meaning.
- Every property needs a description, and anything the conversion does not understand
  (a union of objects, a tuple, a lookahead in a pattern...) is an error naming the
  path: generation fails loudly rather than emit a schema that says something else.

`metadata` is `{type: object}` (Kubernetes forbids describing it further) and `status`
documents the conditions and endpoint counts the operator writes while preserving
unknown fields (kopf keeps its own bookkeeping there).

Regenerate the checked-in files with `python -m kanal.operator.crdgen crds`; a test
fails when they are stale. `kanal crds` prints the same documents.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from kanal.operator.models import GROUP, RESOURCES, VERSION, KanalResource

__all__ = [
    "CRDGenerationError",
    "crd_file_name",
    "crd_files",
    "crd_for",
    "crds",
    "crds_yaml",
    "write_crds",
]

CRD_API_VERSION = "apiextensions.k8s.io/v1"
CATEGORIES = ("kanal",)

HEADER = (
    "# Generated from the models in operator/models.py by `python -m kanal.operator.crdgen crds`.\n"
    "# Do not edit by hand: change the models and regenerate.\n"
)

# The order keys are written in: what a node is first, then its constraints, then its
# children. Keys not listed here never reach the output (the converter rejects them).
_KEY_ORDER = (
    "description",
    "type",
    "format",
    "enum",
    "pattern",
    "minLength",
    "maxLength",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "multipleOf",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "nullable",
    "default",
    "x-kubernetes-int-or-string",
    "anyOf",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-embedded-resource",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    "x-kubernetes-validations",
    "required",
    "properties",
    "additionalProperties",
    "items",
)

# Value constraints copied as they are.
_PLAIN_KEYS = frozenset({
    "pattern", "minLength", "maxLength", "minimum", "maximum", "multipleOf",
    "minItems", "maxItems", "minProperties", "maxProperties", "enum", "nullable",
})

# Formats Kubernetes validates with the meaning JSON schema gives them. Others are
# dropped: pydantic's `duration` is ISO 8601 where Kubernetes' is Go's, for instance.
_KUBERNETES_FORMATS = frozenset({
    "date-time", "date", "email", "uri", "uuid", "ipv4", "ipv6", "hostname", "cidr",
    "mac", "byte", "password", "int32", "int64", "float", "double",
})

_TYPES = frozenset({"object", "array", "string", "integer", "number", "boolean"})

# The one `anyOf` a structural schema allows (with `x-kubernetes-int-or-string: true`).
_INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]

# Go's RE2 (what the API server runs `pattern` with) has no lookaround or backreference.
_NOT_RE2 = re.compile(r"\(\?<?[=!]|\\[1-9]")

_TOP_LEVEL = ("apiVersion", "kind", "metadata", "spec", "status")

_API_VERSION_DESCRIPTION = (
    "APIVersion defines the versioned schema of this representation of an object. "
    "Servers should convert recognized schemas to the latest internal value, and may "
    "reject unrecognized values. More info: "
    "https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#resources"
)
_KIND_DESCRIPTION = (
    "Kind is a string value representing the REST resource this object represents. "
    "Servers may infer this from the endpoint the client submits requests to. Cannot be "
    "updated. In CamelCase. More info: "
    "https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#types-kinds"
)


# Cross-field rules of the models that the API server can check by itself, so that
# `kubectl apply` refuses them with no operator running. Keyed by model (its `$defs`
# name): `x-kubernetes-*` keys go on the model's node, others name one of its properties
# and go on that property's node. The models' validators stay the reference (`kanal
# validate`, the operator, the webhook); these say the same in CEL
# (https://kubernetes.io/docs/reference/using-api/cel/) or in the list's own semantics.
# Rules a schema cannot say (regular expressions in RE2 syntax, public suffixes,
# endpoint address policy) stay with the models. Generation fails if a key here no
# longer names a model or a property.
_SERVER_RULES: dict[str, dict[str, Any]] = {
    "RouteSpec": {
        "x-kubernetes-validations": [{
            "rule": "self.rules.all(r, !has(r.name) || "
                    "self.rules.exists_one(s, has(s.name) && s.name == r.name))",
            "message": "rule names must be unique within the Route",
            "fieldPath": ".rules",
        }],
    },
    # A header or query parameter named twice: the server says Duplicate (exact names;
    # header names differing only in case are left to the models).
    "MatchSpec": {
        "headers": {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
        "queryParams": {"x-kubernetes-list-type": "map",
                        "x-kubernetes-list-map-keys": ["name"]},
    },
    "PathMatchSpec": {
        "x-kubernetes-validations": [{
            "rule": "(has(self.type) && self.type == 'RegularExpression') || "
                    "!has(self.value) || self.value.startsWith('/')",
            "message": "Exact and PathPrefix paths must start with '/'",
            "fieldPath": ".value",
        }],
    },
    "UpstreamSpec": {
        "x-kubernetes-validations": [{
            "rule": "has(self.service) != has(self.endpoints)",
            "message": "set exactly one of service or endpoints",
        }, {
            "rule": "!has(self.tls) || (has(self.protocol) && self.protocol in ['HTTPS', 'H2'])",
            "message": "tls is only valid with protocol: HTTPS or H2",
            "fieldPath": ".tls",
            "reason": "FieldValueForbidden",
        }],
        # An endpoint is its address and port: listed twice, the server says Duplicate.
        "endpoints": {
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["address", "port"],
        },
    },
    "LoadBalancerSpec": {
        "x-kubernetes-validations": [{
            "rule": "!has(self.hashOn) || (has(self.policy) && self.policy == 'RingHash')",
            "message": "hashOn is only valid with policy RingHash",
            "fieldPath": ".hashOn",
            "reason": "FieldValueForbidden",
        }],
    },
    "HashOnSpec": {
        "x-kubernetes-validations": [{
            "rule": "(has(self.header) ? 1 : 0) + (has(self.cookie) ? 1 : 0) + "
                    "(has(self.sourceIP) && self.sourceIP ? 1 : 0) == 1",
            "message": "set exactly one of header, cookie or sourceIP: true",
        }],
    },
    # A rule has backends (at least one), unless it aggregates or a filter answers; an
    # aggregate rule has no backends.
    "RuleSpec": {
        "x-kubernetes-validations": [{
            "rule": "(has(self.backends) && size(self.backends) > 0) || has(self.aggregate) || "
                    "(has(self.filters) && self.filters.exists(f, f.type == 'RequestRedirect' "
                    "|| f.type == 'DirectResponse'))",
            "message": "at least one backend, unless the rule aggregates or a RequestRedirect "
                       "or DirectResponse filter answers",
            "fieldPath": ".backends",
        }, {
            "rule": "!has(self.aggregate) || !has(self.backends) || size(self.backends) == 0",
            "message": "a rule has backends or aggregate, not both",
        }, {
            "rule": "!has(self.aggregate) || !has(self.filters) || !self.filters.exists(f, "
                    "f.type == 'URLRewrite' || f.type == 'RequestMirror')",
            "message": "an aggregate rule takes no URLRewrite or RequestMirror filter",
            "fieldPath": ".filters",
        }],
    },
    "FilterSpec": {
        "x-kubernetes-validations": [{
            "rule": f"(self.type == '{kind}') == has(self.{field})",
            "message": f"{field} is set exactly when type is {kind}",
        } for kind, field in (
            ("RequestHeaderModifier", "requestHeaderModifier"),
            ("ResponseHeaderModifier", "responseHeaderModifier"),
            ("URLRewrite", "urlRewrite"), ("RequestRedirect", "requestRedirect"),
            ("RequestMirror", "requestMirror"), ("CORS", "cors"),
            ("DirectResponse", "directResponse"))] + [{
            "rule": "self.type == 'Compression' || !has(self.compression)",
            "message": "compression is only for type Compression",
        }],
    },
    "GrpcTranscoderSpec": {
        "x-kubernetes-validations": [{
            "rule": "(has(self.descriptorSecretName) ? 1 : 0) + "
                    "(has(self.descriptorConfigMapName) ? 1 : 0) + "
                    "(has(self.descriptorFile) ? 1 : 0) == 1",
            "message": "set exactly one of descriptorSecretName, descriptorConfigMapName or "
                       "descriptorFile",
        }],
    },
    "HealthCheckSpec": {
        "x-kubernetes-validations": [{
            "rule": "duration(has(self.timeout) ? self.timeout : '1s') <= "
                    "duration(has(self.interval) ? self.interval : '5s')",
            "message": "timeout must not be longer than interval",
            "fieldPath": ".timeout",
        }],
    },
}


class CRDGenerationError(ValueError):
    """A model cannot be turned into a structural schema; the message names the field."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


# --------------------------------------------------------------------------- schemas


def _ordered(node: Mapping[str, Any]) -> dict[str, Any]:
    return {key: node[key] for key in _KEY_ORDER if key in node}


def _resolve(node: Mapping[str, Any], defs: Mapping[str, Any], path: str,
             seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Inline `$ref` (also in a one-element `allOf`) and unwrap Optional's `anyOf`.

    Keys next to a `$ref` or an `anyOf` (the field's description and default) win
    over the referenced model's (its docstring).
    """
    node = dict(node)
    if "allOf" in node and len(node["allOf"]) == 1 and set(node["allOf"][0]) == {"$ref"}:
        node.update(node.pop("allOf")[0])
    if "$ref" in node:
        ref = node.pop("$ref")
        name = ref.removeprefix("#/$defs/")
        if name == ref or name not in defs:
            raise CRDGenerationError(path, f"cannot resolve $ref {ref!r}")
        if name in seen:
            raise CRDGenerationError(path, f"recursive model {name} (structural schemas "
                                           "cannot describe recursion)")
        target = _with_server_rules(name, _resolve(defs[name], defs, path, seen + (name,)),
                                    path)
        return {**target, **node}
    if "anyOf" in node:
        choices = [choice for choice in node["anyOf"] if choice != {"type": "null"}]
        if node.get("x-kubernetes-int-or-string") is True and choices == _INT_OR_STRING:
            return node
        if len(choices) != 1:
            raise CRDGenerationError(path, "a union of several types; structural schemas "
                                           "allow only Optional[X] and int-or-string")
        del node["anyOf"]
        inner = _resolve(choices[0], defs, path, seen)
        return {**inner, **node}
    if isinstance(node.get("type"), list):
        types = [kind for kind in node["type"] if kind != "null"]
        if len(types) != 1:
            raise CRDGenerationError(path, f"several types {node['type']}")
        node["type"] = types[0]
    return node


def _with_server_rules(model: str, node: dict[str, Any], path: str) -> dict[str, Any]:
    """The model's node with its `_SERVER_RULES` added (see there)."""
    extra = _SERVER_RULES.get(model)
    if not extra:
        return node
    node = dict(node)
    for key, value in extra.items():
        if key.startswith("x-kubernetes-"):
            node[key] = value
            continue
        properties = dict(node.get("properties") or {})
        if key not in properties:
            raise CRDGenerationError(f"{path}.{key}", f"a server rule for {model}.{key}, "
                                                      "which has no such field")
        properties[key] = {**properties[key], **value}
        node["properties"] = properties
    return node


def _check_server_rules_name_models() -> None:
    names: set[str] = set()
    for model in RESOURCES.values():
        names.update(model.model_json_schema(by_alias=True, mode="validation")
                     .get("$defs", {}))
    for model_name in _SERVER_RULES:
        if model_name not in names:
            raise CRDGenerationError(model_name, "_SERVER_RULES names a model no CRD uses")


def _convert(raw: Mapping[str, Any], defs: Mapping[str, Any], path: str) -> dict[str, Any]:
    """One node of the pydantic JSON schema as a structural OpenAPI v3 node."""
    node = _resolve(raw, defs, path)
    out: dict[str, Any] = {}
    default: Any = None
    has_default = False
    for key, value in node.items():
        if key in ("title", "$defs", "examples", "readOnly", "writeOnly", "deprecated"):
            continue
        if key == "description":
            if not isinstance(value, str) or not value.strip():
                raise CRDGenerationError(path, "empty description")
            out["description"] = value.strip()
        elif key == "type":
            if value not in _TYPES:
                raise CRDGenerationError(path, f"unsupported type {value!r}")
            out["type"] = value
        elif key == "const":
            out.setdefault("enum", [value])
        elif key == "format":
            if value in _KUBERNETES_FORMATS:
                out["format"] = value
        elif key == "pattern":
            _check_pattern(value, path)
            out["pattern"] = value
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            if isinstance(value, bool):  # already OpenAPI 3.0's form
                out[key] = value
            else:  # JSON schema 2020-12's number: OpenAPI 3.0 says bound + flag
                out[bound] = value
                out[key] = True
        elif key in _PLAIN_KEYS or key.startswith("x-kubernetes-"):
            out[key] = value
        elif key == "default":
            default, has_default = value, True
        elif key == "required":
            out["required"] = list(value)
        elif key == "properties":
            out["properties"] = _properties(value, defs, path)
        elif key == "additionalProperties":
            if value is True:
                out["x-kubernetes-preserve-unknown-fields"] = True
            elif value is not False:  # false (extra="forbid"): the API server prunes
                out["additionalProperties"] = _convert(value, defs, f"{path}.*")
        elif key == "items":
            if not isinstance(value, Mapping):
                raise CRDGenerationError(path, "tuple items (structural schemas need one "
                                               "schema for every item)")
            out["items"] = _convert(value, defs, f"{path}[*]")
        elif key == "anyOf":  # int-or-string, the only anyOf _resolve lets through
            out["anyOf"] = [dict(choice) for choice in value]
        elif key == "uniqueItems":
            if value:
                raise CRDGenerationError(path, "uniqueItems (a set) is not allowed in CRDs; "
                                               "use a list")
        else:
            raise CRDGenerationError(path, f"unsupported JSON schema keyword {key!r}")

    kind = out.get("type")
    free = out.get("x-kubernetes-preserve-unknown-fields") is True
    if kind is None and not free and out.get("x-kubernetes-int-or-string") is not True:
        # `Any`: keep whatever is sent rather than prune it.
        out["x-kubernetes-preserve-unknown-fields"] = True
    if kind == "array" and "items" not in out:
        raise CRDGenerationError(path, "an array without an item schema")
    if kind == "object" and "properties" in out and "additionalProperties" in out:
        raise CRDGenerationError(path, "both properties and additionalProperties")
    if has_default and _is_valid_default(default, out):
        out["default"] = default
    return _ordered(out)


def _properties(properties: Mapping[str, Any], defs: Mapping[str, Any],
                path: str) -> dict[str, Any]:
    converted: dict[str, Any] = {}
    for name, raw in properties.items():
        where = f"{path}.{name}"
        node = _convert(raw, defs, where)
        if "description" not in node:
            raise CRDGenerationError(where, "no description; give the model field "
                                            "Field(description=...) so `kubectl explain` "
                                            "can teach it")
        converted[name] = node
    return converted


def _check_pattern(pattern: Any, path: str) -> None:
    if not isinstance(pattern, str):
        raise CRDGenerationError(path, f"pattern {pattern!r} is not a string")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise CRDGenerationError(path, f"invalid pattern {pattern!r}: {exc}") from None
    if _NOT_RE2.search(pattern):
        raise CRDGenerationError(path, f"pattern {pattern!r} uses lookaround or a "
                                       "backreference, which Kubernetes (RE2) rejects")


def _is_valid_default(value: Any, node: Mapping[str, Any]) -> bool:
    """True for a plain scalar the node accepts: a default the API server may apply."""
    kind = node.get("type")
    if isinstance(value, bool):
        ok = kind == "boolean"
    elif isinstance(value, int):
        ok = kind in ("integer", "number")
    elif isinstance(value, float):
        ok = kind == "number"
    elif isinstance(value, str):
        ok = kind == "string"
    else:  # None, lists, objects: not plain scalars
        return False
    if not ok:
        return False
    if "enum" in node and value not in node["enum"]:
        return False
    if isinstance(value, str):
        if "pattern" in node and not re.search(node["pattern"], value):
            return False
        if len(value) < node.get("minLength", 0):
            return False
        if "maxLength" in node and len(value) > node["maxLength"]:
            return False
    elif not isinstance(value, bool):
        if "minimum" in node and (value < node["minimum"] or (
                node.get("exclusiveMinimum") is True and value == node["minimum"])):
            return False
        if "maximum" in node and (value > node["maximum"] or (
                node.get("exclusiveMaximum") is True and value == node["maximum"])):
            return False
    return True


def _status_schema(kind: str, description: str) -> dict[str, Any]:
    """What the operator writes in `status` (see kanal.operator.conditions).

    Unknown fields are preserved: kopf keeps its own bookkeeping in `status`, and a
    field the status writer adds must not be pruned before this schema learns it.
    """
    condition_types = "Accepted (the spec is valid), ResolvedRefs (every referenced " \
        "Upstream, Service and Secret exists)"
    if kind == "Route":
        condition_types += ", Programmed (the dataplanes applied the configuration " \
            "that holds the Route; the message says how many of how many)"
    properties: dict[str, Any] = {
        "conditions": {
            "description": "The operator's latest observations, in the Kubernetes "
            f"convention, one per type: {condition_types}.",
            "type": "array",
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
            "items": {
                "type": "object",
                "required": ["type", "status"],
                "properties": {
                    "type": {"description": "Condition type: Accepted, ResolvedRefs"
                             + (" or Programmed." if kind == "Route" else "."),
                             "type": "string"},
                    "status": {"description": "True, False or Unknown.", "type": "string",
                               "enum": ["True", "False", "Unknown"]},
                    "reason": {"description": "Why, in one CamelCase word (for example "
                               "Invalid, BackendNotFound, SecretNotFound).",
                               "type": "string"},
                    "message": {"description": "Details for people: which field or object "
                                "is wrong and how.", "type": "string"},
                    "observedGeneration": {"description": "The metadata.generation the "
                                           "condition was decided for.",
                                           "type": "integer", "format": "int64",
                                           "minimum": 0},
                    "lastTransitionTime": {"description": "When the status last changed.",
                                           "type": "string", "format": "date-time"},
                },
            },
        },
    }
    if kind == "Upstream":
        properties["endpoints"] = {
            "description": "How many endpoints the Upstream has and how many take traffic.",
            "type": "object",
            "properties": {
                "total": {"description": "Endpoints configured: the static list, or the "
                          "ready addresses of the Service's EndpointSlices.",
                          "type": "integer", "minimum": 0},
                "healthy": {"description": "Endpoints that can take traffic (none while a "
                            "Secret the TLS settings name is missing).",
                            "type": "integer", "minimum": 0},
            },
        }
    return _ordered({
        "description": description,
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {name: _ordered(prop) for name, prop in properties.items()},
    })


def _reorder_tree(node: Any) -> Any:
    """Key order for hand-written parts, recursively (properties keep their order)."""
    if not isinstance(node, dict):
        return node
    out = _ordered(node) if "type" in node or "description" in node else dict(node)
    if "properties" in out:
        out["properties"] = {name: _reorder_tree(child) for name, child in out["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = _reorder_tree(out[key])
    return out


def _open_api_schema(model: type[KanalResource]) -> dict[str, Any]:
    kind = model.kind_name
    schema = model.model_json_schema(by_alias=True, mode="validation")
    defs: Mapping[str, Any] = schema.get("$defs", {})
    properties: Mapping[str, Any] = schema.get("properties", {})
    if set(properties) != set(_TOP_LEVEL):
        raise CRDGenerationError(kind, f"top-level fields {sorted(properties)}; the generator "
                                       f"knows {list(_TOP_LEVEL)}")
    description = schema.get("description")
    if not isinstance(description, str) or not description.strip():
        raise CRDGenerationError(kind, "the model has no docstring")
    status_description = properties["status"].get("description")
    if not isinstance(status_description, str) or not status_description.strip():
        raise CRDGenerationError(f"{kind}.status", "no description")
    spec = _convert(properties["spec"], defs, f"{kind}.spec")
    if "description" not in spec:
        raise CRDGenerationError(f"{kind}.spec", "no description")
    return _ordered({
        "description": description.strip(),
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"description": _API_VERSION_DESCRIPTION, "type": "string"},
            "kind": {"description": _KIND_DESCRIPTION, "type": "string"},
            # Kubernetes allows nothing here but restrictions on name and generateName.
            "metadata": {"type": "object"},
            "spec": spec,
            "status": _reorder_tree(_status_schema(kind, status_description)),
        },
    })


# --------------------------------------------------------------------------- printer columns

_COLUMN_TYPES = frozenset({"integer", "number", "string", "boolean", "date"})
_COLUMN_KEYS = ("name", "type", "format", "description", "priority", "jsonPath")
_JSON_PATH_STEP = re.compile(r"\.([A-Za-z0-9_-]+)|\[[^\]]*\]")


def _printer_columns(model: type[KanalResource], schema: Mapping[str, Any]) -> list[dict[str, Any]]:
    columns: list[dict[str, Any]] = []
    for column in model.printer_columns:
        where = f"{model.kind_name} printer column {column.get('name')!r}"
        unknown = set(column) - set(_COLUMN_KEYS)
        if unknown or not {"name", "type", "jsonPath"} <= set(column):
            raise CRDGenerationError(where, "needs name, type and jsonPath, and only "
                                            f"{', '.join(_COLUMN_KEYS)}")
        if column["type"] not in _COLUMN_TYPES:
            raise CRDGenerationError(where, f"type {column['type']!r} is not one of "
                                            f"{sorted(_COLUMN_TYPES)}")
        _check_json_path(schema, column["jsonPath"], where)
        columns.append({key: column[key] for key in _COLUMN_KEYS if key in column})
    return columns


def _check_json_path(schema: Mapping[str, Any], json_path: str, where: str) -> None:
    """The column's path must lead through the schema (a renamed field breaks it)."""
    matches = list(_JSON_PATH_STEP.finditer(json_path))
    if not matches or "".join(match.group(0) for match in matches) != json_path:
        raise CRDGenerationError(where, f"jsonPath {json_path!r} is not a simple path like "
                                        ".spec.field[*].name")
    node: Mapping[str, Any] = schema
    for match in matches:
        name = match.group(1)
        if node.get("x-kubernetes-preserve-unknown-fields") is True and name and \
                name not in node.get("properties", {}):
            return
        if node.get("type") == "object" and "properties" not in node:
            return  # metadata: Kubernetes' own fields
        if name:
            if name not in node.get("properties", {}):
                raise CRDGenerationError(where, f"jsonPath {json_path!r}: no field {name!r}")
            node = node["properties"][name]
        else:
            if node.get("type") != "array":
                raise CRDGenerationError(where, f"jsonPath {json_path!r}: "
                                                f"{match.group(0)} on a non-array")
            node = node["items"]


# --------------------------------------------------------------------------- CRDs


def crd_for(kind: str) -> dict[str, Any]:
    """The CustomResourceDefinition of one kind (`Route`, `Upstream` or `EgressPolicy`)."""
    try:
        model = RESOURCES[kind]
    except KeyError:
        raise KeyError(f"unknown kind {kind!r}; expected one of {', '.join(RESOURCES)}") \
            from None
    schema = _open_api_schema(model)
    return {
        "apiVersion": CRD_API_VERSION,
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{model.plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": model.kind_name,
                "listKind": f"{model.kind_name}List",
                "plural": model.plural,
                "singular": model.kind_name.lower(),
                "shortNames": list(model.short_names),
                "categories": list(CATEGORIES),
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": _printer_columns(model, schema),
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def crds() -> list[dict[str, Any]]:
    """Every Kanal CRD, in the order of `RESOURCES` (Route, Upstream, EgressPolicy)."""
    _check_server_rules_name_models()
    return [crd_for(kind) for kind in RESOURCES]


def crd_file_name(crd: Mapping[str, Any]) -> str:
    """`kanal.dev_routes.yaml`: the file of one CRD (controller-gen's naming)."""
    return f"{crd['spec']['group']}_{crd['spec']['names']['plural']}.yaml"


def _dump(crd: Mapping[str, Any]) -> str:
    body = yaml.safe_dump(dict(crd), sort_keys=False, default_flow_style=False,
                          allow_unicode=True, width=100)
    return f"---\n{HEADER}{body}"


def crd_files() -> dict[str, str]:
    """File name to content, for every CRD: what `write_crds` writes."""
    return {crd_file_name(crd): _dump(crd) for crd in crds()}


def crds_yaml() -> str:
    """Every CRD as one multi-document YAML stream (`---` separated): `kanal crds`."""
    return "".join(crd_files().values())


def write_crds(folder: str | Path) -> list[Path]:
    """Write one file per CRD into `folder`; remove stale `kanal.dev_*.yaml` files there.

    Returns the paths written, in the order of `crds()`.
    """
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    files = crd_files()
    for stale in sorted(target.glob(f"{GROUP}_*.yaml")):
        if stale.name not in files:
            stale.unlink()
    written: list[Path] = []
    for name, text in files.items():
        path = target / name
        path.write_text(text, encoding="utf-8", newline="\n")
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m kanal.operator.crdgen [FOLDER]`: write the CRDs (default folder `crds`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 1 or (args and args[0] in ("-h", "--help")):
        sys.stderr.write("usage: python -m kanal.operator.crdgen [FOLDER]  (default: crds)\n")
        return 0 if args and args[0] in ("-h", "--help") else 2
    for path in write_crds(args[0] if args else "crds"):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

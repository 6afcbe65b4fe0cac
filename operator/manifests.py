"""Manifests on disk: reading YAML files into Kanal objects, and `kanal validate`.

This is the file-side I/O edge of the control plane. It turns files (or folders of
them, the same documents one would `kubectl apply`) into validated model objects, and
every problem into a `ManifestError` that names the file, the document and the field
in one line, e.g.::

    examples/shop.yaml: document 2 (Route default/shop): spec.rules[1].backends[0].weight: must be >= 0

Rules (written down because `kanal run` relies on them too):

- Folders are read recursively, `.yaml` and `.yml` files only, in sorted order;
  names starting with a dot are skipped (Kubernetes' ConfigMap mounts keep a second
  copy of every file under `..data`). A file named explicitly is read whatever its
  extension.
- Documents are counted from 1 in each file, empty ones included (so the count
  matches the `---` separators) but empty ones are otherwise skipped.
- Kanal objects (`kanal.dev/v1alpha1`) and core `v1` Secrets and ConfigMaps are read; any other kind
  (a Deployment next to the Routes, say) is skipped with a note, not an error. An
  unknown kind or version in the `kanal.dev` group is an error.
- A YAML syntax error makes the whole file unreadable: it contributes no documents
  and one error with the line. A key written twice in one mapping is an error.
- The same kind, namespace and name in two places is an error naming both; the first
  one (in reading order) is kept.
"""

from __future__ import annotations

import os
import re
import ssl
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError

from kanal.contract.pem import load_pem_pair
from kanal.operator import descriptorfiles
from kanal.operator.models import API_VERSION, GROUP, RESOURCES, ConfigMap, Resource, Secret

YAML_SUFFIXES = (".yaml", ".yml")

_CORE_KINDS: dict[str, type[Secret | ConfigMap]] = {"Secret": Secret, "ConfigMap": ConfigMap}
"""Core v1 kinds Kanal objects name: Secrets (TLS, CA, basic auth, descriptor sets) and
ConfigMaps (descriptor sets)."""


@dataclass(frozen=True, slots=True)
class Source:
    """Where a document comes from: the file path as given, and its 1-based index."""

    path: str
    document: int | None = None
    line: int | None = None

    def __str__(self) -> str:
        if self.document is not None:
            return f"{self.path}: document {self.document}"
        if self.line is not None:
            return f"{self.path}: line {self.line}"
        return self.path


@dataclass(frozen=True, slots=True)
class Document:
    """One YAML document that looks like something Kanal reads, not yet validated."""

    source: Source
    body: Any

    @property
    def subject(self) -> str | None:
        """`Kind namespace/name` as far as the document says, for error messages."""
        return _subject(self.body)


@dataclass(frozen=True, slots=True)
class ManifestError:
    """A problem with a manifest, printable as one self-contained line."""

    source: Source | None
    message: str
    subject: str | None = None
    field: str | None = None

    def __str__(self) -> str:
        parts = []
        head = str(self.source) if self.source is not None else ""
        if self.subject:
            head = f"{head} ({self.subject})" if head else self.subject
        if head:
            parts.append(head)
        if self.field:
            parts.append(self.field)
        parts.append(self.message)
        return ": ".join(parts)


@dataclass(frozen=True, slots=True)
class Manifest:
    """A validated object and where it was read from."""

    source: Source
    resource: Resource

    @property
    def subject(self) -> str:
        return f"{self.resource.kind} {self.resource.key}"


# --------------------------------------------------------------------------- reading


def load_documents(
    paths: Iterable[str], *, notes: list[str] | None = None
) -> tuple[list[Document], list[ManifestError]]:
    """Read every document Kanal cares about from files and folders.

    Returns the documents in reading order and the errors (missing paths, unreadable
    files, YAML syntax errors). Documents of other kinds are left out; a line saying
    so is appended to `notes` when given.
    """
    documents: list[Document] = []
    errors: list[ManifestError] = []
    for file_documents, file_errors in _load_files(paths, notes):
        documents.extend(file_documents)
        errors.extend(file_errors)
    return documents, errors


def _load_files(
    paths: Iterable[str], notes: list[str] | None
) -> Iterator[tuple[list[Document], list[ManifestError]]]:
    """Per file (or missing path), in reading order: its documents and its errors."""
    for path in paths:
        if os.path.isdir(path):
            files = _walk(path)
        elif os.path.exists(path):
            files = [path]
        else:
            yield [], [ManifestError(Source(path), "no such file or directory")]
            continue
        for name in files:
            errors: list[ManifestError] = []
            documents = [item for item in _read_file(name, errors) if _is_ours(item, notes)]
            yield documents, errors


def _walk(folder: str) -> list[str]:
    found: list[str] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        found.extend(
            os.path.join(root, name)
            for name in files
            if name.endswith(YAML_SUFFIXES) and not name.startswith(".")
        )
    return sorted(found)


def _read_file(path: str, errors: list[ManifestError]) -> list[Document]:
    try:
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
    except UnicodeDecodeError:
        errors.append(ManifestError(Source(path), "not UTF-8 text"))
        return []
    except OSError as exc:
        errors.append(ManifestError(Source(path), f"cannot read: {exc.strerror or exc}"))
        return []
    try:
        return list(_parse_yaml(path, text))
    except yaml.MarkedYAMLError as exc:
        errors.append(_yaml_error(path, exc))
    except yaml.YAMLError as exc:
        errors.append(ManifestError(Source(path), f"invalid YAML: {exc}"))
    return []


def _parse_yaml(path: str, text: str) -> Iterator[Document]:
    loader = _StrictLoader(text)
    try:
        index = 0
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                break
            index += 1
            body = loader.construct_document(node)
            if body is not None:
                yield Document(Source(path, index, node.start_mark.line + 1), body)
    finally:
        loader.dispose()


def _yaml_error(path: str, exc: yaml.MarkedYAMLError) -> ManifestError:
    mark = exc.problem_mark or exc.context_mark
    problem = exc.problem or exc.context or "invalid YAML"
    if mark is None:
        return ManifestError(Source(path), f"invalid YAML: {problem}")
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    return ManifestError(Source(path), f"{where}: invalid YAML: {problem}")


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key written twice in one mapping.

    PyYAML keeps the last value silently; for a proxy's configuration that turns a
    copy-paste slip into a wrong route.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"duplicate key {key!r}", key_node.start_mark,
                )
            seen.add(key)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


def _is_ours(document: Document, notes: list[str] | None) -> bool:
    """Kanal objects, Secrets, and anything too broken to tell (so it gets reported)."""
    body = document.body
    if not isinstance(body, Mapping):
        return True
    api_version, kind = body.get("apiVersion"), body.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        return True
    if api_version.split("/")[0] == GROUP or (api_version == "v1" and kind in _CORE_KINDS):
        return True
    if notes is not None:
        notes.append(f"{document.source}: skipped {api_version} {kind} (not a Kanal object)")
    return False


# --------------------------------------------------------------------------- validating


def parse_document(document: Document) -> Resource | list[ManifestError]:
    """Validate one document into its model, or say everything that is wrong with it."""
    body = document.body
    if not isinstance(body, Mapping):
        return [ManifestError(
            document.source,
            f"expected a mapping with apiVersion and kind, got {_type_name(body)}",
        )]
    model, problem = _model_for(body)
    if model is None:
        field, message = problem
        return [ManifestError(document.source, message, document.subject, field)]
    try:
        return model.model_validate(dict(body))  # type: ignore[no-any-return]
    except ValidationError as exc:
        return [
            ManifestError(document.source, message, document.subject, field or None)
            for field, message in describe_validation_error(exc)
        ]


def secret_problems(document: Document, secret: Secret) -> list[ManifestError]:
    """What makes a Secret's certificates unusable, checked as the dataplane loads them.

    `tls.crt` and `tls.key` must both be there and load as one certificate chain and
    its key; `ca.crt` must load as certificates. `kanal run` refuses a Secret with a
    problem like any invalid object (its last good version keeps serving), rather
    than handing the dataplane a certificate it would drop.
    """
    values = secret.values()
    found: list[ManifestError] = []

    def problem(field: str, message: str) -> None:
        found.append(ManifestError(document.source, message, document.subject, field))

    cert, key = values.get("tls.crt"), values.get("tls.key")
    if cert and not key:
        problem("data.tls.key", "missing: tls.crt needs its tls.key")
    elif key and not cert:
        problem("data.tls.crt", "missing: tls.key needs its tls.crt")
    elif cert and key:
        reason = _pem_pair_problem(cert, key)
        if reason is not None:
            problem("data", f"tls.crt and tls.key are not usable as a certificate and its "
                            f"key: {reason}")
    ca = values.get("ca.crt")
    if ca:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=ca)
        except (ssl.SSLError, ValueError) as exc:
            problem("data.ca.crt", f"not usable as CA certificates: {_ssl_reason(exc)}")
    return found


def _pem_pair_problem(cert_pem: str, key_pem: str) -> str | None:
    """Why OpenSSL does not load this chain and key, or None when it does."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        load_pem_pair(context, cert_pem, key_pem)
    except (ssl.SSLError, ValueError) as exc:
        return _ssl_reason(exc)
    return None


def _ssl_reason(exc: Exception) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason).replace("_", " ").lower() if reason else str(exc)


def _model_for(body: Mapping[str, Any]) -> tuple[Any, tuple[str, str]]:
    api_version, kind = body.get("apiVersion"), body.get("kind")
    if api_version is None:
        return None, ("apiVersion", "field required")
    if kind is None:
        return None, ("kind", "field required")
    if not isinstance(api_version, str):
        return None, ("apiVersion", "must be a string")
    if not isinstance(kind, str):
        return None, ("kind", "must be a string")
    if api_version == "v1" and kind in _CORE_KINDS:
        return _CORE_KINDS[kind], ("", "")
    if api_version.split("/")[0] != GROUP:
        return None, ("apiVersion", f"{api_version} {kind} is not a Kanal object")
    if api_version != API_VERSION:
        return None, ("apiVersion", f"unknown version {api_version}; expected {API_VERSION}")
    if kind not in RESOURCES:
        return None, ("kind", f"unknown kind {kind}; expected one of {', '.join(RESOURCES)}")
    return RESOURCES[kind], ("", "")


def load_manifests(
    paths: Iterable[str], *, notes: list[str] | None = None
) -> tuple[list[Manifest], list[ManifestError]]:
    """Read and validate: every valid object once, and every error.

    Objects that appear twice (same kind, namespace and name) are reported; the first
    in reading order is kept so that callers that go on (like `kanal run`) stay
    predictable.
    """
    manifests: list[Manifest] = []
    errors: list[ManifestError] = []
    first_seen: dict[tuple[str, str], Source] = {}
    for documents, file_errors in _load_files(paths, notes):
        errors.extend(file_errors)
        for document in documents:
            parsed = parse_document(document)
            if isinstance(parsed, list):
                errors.extend(parsed)
                continue
            identity = (parsed.kind, parsed.key)
            if identity in first_seen:
                errors.append(ManifestError(
                    document.source,
                    f"duplicate of {first_seen[identity]}: the same kind, namespace and name",
                    f"{parsed.kind} {parsed.key}",
                ))
                continue
            first_seen[identity] = document.source
            manifests.append(Manifest(document.source, parsed))
    return manifests, errors


# --------------------------------------------------------------------------- messages


def describe_validation_error(exc: ValidationError) -> list[tuple[str, str]]:
    """Pydantic's errors as (field path, short message) pairs.

    The path is written as users think of the YAML: `spec.rules[1].backends[0].weight`.
    """
    return [(field_path(error["loc"]), _message(error)) for error in exc.errors()]


def field_path(loc: Sequence[int | str]) -> str:
    """`("spec", "rules", 1, "name")` -> `spec.rules[1].name`."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _message(error: Mapping[str, Any]) -> str:
    kind: str = error["type"]
    ctx: Mapping[str, Any] = error.get("ctx") or {}
    simple = _SIMPLE_MESSAGES.get(kind)
    if simple is not None:
        return simple
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        operator, bound = _BOUNDS[kind]
        return f"must be {operator} {ctx[bound]}"
    if kind in ("literal_error", "enum"):
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return f"must be one of {', '.join(choices)}"
    if kind in ("too_short", "string_too_short"):
        return _length_message(kind, "at least", ctx.get("min_length", 0))
    if kind in ("too_long", "string_too_long"):
        return _length_message(kind, "at most", ctx.get("max_length", 0))
    if kind == "string_pattern_mismatch":
        return f"must match the pattern {ctx.get('pattern')}"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", error.get("msg", "invalid value")))
    return str(error.get("msg", "invalid value"))


def _length_message(kind: str, bound: str, count: int) -> str:
    if kind.startswith("string"):
        if bound == "at least" and count == 1:
            return "must not be empty"
        return f"must be {bound} {count} characters long"
    return f"must have {bound} {count} item{'s' if count != 1 else ''}"


_BOUNDS = {
    "greater_than_equal": (">=", "ge"),
    "greater_than": (">", "gt"),
    "less_than_equal": ("<=", "le"),
    "less_than": ("<", "lt"),
}

_SIMPLE_MESSAGES = {
    "missing": "field required",
    "extra_forbidden": "unknown field",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "datetime_type": "must be a timestamp like 2024-01-01T00:00:00Z",
    "datetime_parsing": "must be a timestamp like 2024-01-01T00:00:00Z",
    "datetime_from_date_parsing": "must be a timestamp like 2024-01-01T00:00:00Z",
    "frozen_instance": "cannot be changed",
}


def _type_name(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    return type(value).__name__


def _subject(body: Any) -> str | None:
    if not isinstance(body, Mapping):
        return None
    kind = body.get("kind")
    metadata = body.get("metadata")
    name = namespace = None
    if isinstance(metadata, Mapping):
        name = metadata.get("name")
        namespace = metadata.get("namespace", "default")
    if not isinstance(kind, str):
        kind = "object"
    if not isinstance(name, str):
        return kind
    return f"{kind} {namespace if isinstance(namespace, str) else 'default'}/{name}"


# --------------------------------------------------------------------------- kanal validate


def validate_command(paths: list[str]) -> int:
    """`kanal validate PATH...`: every error on stderr, one a line; exit 1 if any.

    Checks what `kanal run` would check: each document on its own, duplicates, and
    the references between objects (a Route's Upstreams and Secrets, an Upstream's
    Secrets). An Upstream with `service` is fine here: its endpoints come from the
    cluster, so that is a note, not an error.
    """
    notes: list[str] = []
    manifests, errors = load_manifests(paths, notes=notes)
    problems = [str(error) for error in errors]
    problems.extend(compile_problems(manifests, notes))
    for note in notes:
        print(f"note: {note}", file=sys.stdout)
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"{len(problems)} error{'s' if len(problems) != 1 else ''}", file=sys.stderr)
        return 1
    count = len(manifests)
    print(f"{count} object{'s' if count != 1 else ''} valid")
    return 0


def compile_problems(manifests: Sequence[Manifest], notes: list[str] | None = None) -> list[str]:
    """What the compiler has to say about valid objects, as error lines naming the file."""
    from kanal.operator.compiler import SERVICE_DISCOVERY_UNAVAILABLE, compile_snapshot

    resources: list[Resource] = []
    files: dict[str, bytes | str] = {}
    for each in manifests:
        resource, read = descriptorfiles.resolve(each.resource, each.source.path)
        resources.append(resource)
        files.update(read)
    result = compile_snapshot(resources, descriptor_files=files)
    sources: dict[tuple[str, str], Manifest] = {
        (m.resource.kind, m.resource.key): m for m in manifests
    }
    problems: list[str] = []
    for status in result.statuses:
        manifest = sources.get((status.kind, status.key))
        source = manifest.source if manifest is not None else None
        for condition in status.conditions:
            if condition.status == "True":
                continue
            line = str(ManifestError(
                source, f"{condition.type} {condition.reason}: {condition.message}",
                f"{status.kind} {status.key}",
            ))
            if condition.reason == SERVICE_DISCOVERY_UNAVAILABLE:
                if notes is not None:
                    notes.append(line)
            else:
                problems.append(line)
    return problems

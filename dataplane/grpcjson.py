"""REST/JSON to gRPC transcoding, the pure part (no I/O): which gRPC method a JSON
request calls, the request message it makes, and the JSON of the answer.

The methods exposed are those of a protobuf descriptor set (`protoc --include_imports
--descriptor_set_out`) that carry a `google.api.http` annotation; a method without one
is not reachable. Templates follow google/api/http.proto: `{field}` and
`{field=pattern}` bind path segments (`*` one segment, `**` the rest) to fields of the
request message, `body: "*"` takes the JSON body as the message, `body: "field"` as
that field, and query parameters fill the other fields. Messages go to and from JSON
with protobuf's proto3 JSON mapping. gRPC statuses become HTTP statuses as Google's API
design guide maps them.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import DecodeError, Message

from kanal.dataplane.grpcerrors import HTTP_FOR_GRPC, TranscodeError, error_json

__all__ = ["HTTP_FOR_GRPC", "Binding", "TranscodeError", "Transcoder", "error_json",
           "request_message", "response_json"]

HTTP_RULE_FIELD = 72295728
"""The field number of `google.api.http` in MethodOptions."""

_VERBS = {2: "GET", 3: "PUT", 4: "POST", 5: "DELETE", 6: "PATCH"}


@dataclass(frozen=True)
class Binding:
    """One HTTP rule of one method."""

    path: str                      # the gRPC path, `/package.Service/Method`
    verb: str
    pattern: re.Pattern[str]
    fields: tuple[str, ...]        # field path of each group, in order
    body: str                      # "", "*" or a field name
    response_body: str
    input: type[Message]
    output: type[Message]


def _varint(data: bytes, index: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if index >= len(data):
            raise DecodeError("truncated varint")
        byte = data[index]
        index += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, index


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """The (number, value) pairs of a serialized message: varints and length-delimited
    values (the only wire types an HttpRule and its option use)."""
    out: list[tuple[int, int | bytes]] = []
    index = 0
    while index < len(data):
        key, index = _varint(data, index)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, index = _varint(data, index)
            out.append((number, value))
        elif wire == 2:
            length, index = _varint(data, index)
            out.append((number, data[index:index + length]))
            index += length
        elif wire == 1:
            index += 8
        elif wire == 5:
            index += 4
        else:
            raise DecodeError(f"unsupported wire type {wire}")
    return out


def _http_rules(options: bytes) -> list[tuple[str, str, str, str]]:
    """(verb, template, body, response_body) of a method's google.api.http rules."""
    rules: list[tuple[str, str, str, str]] = []

    def read(rule: bytes) -> None:
        verb = template = body = response_body = ""
        nested: list[bytes] = []
        for number, value in _fields(rule):
            if not isinstance(value, bytes):
                continue
            if number in _VERBS:
                verb, template = _VERBS[number], value.decode()
            elif number == 8:  # custom: {kind, path}
                parts = dict(_fields(value))
                kind, path = parts.get(1, b""), parts.get(2, b"")
                if isinstance(kind, bytes) and isinstance(path, bytes):
                    verb, template = kind.decode().upper(), path.decode()
            elif number == 7:
                body = value.decode()
            elif number == 12:
                response_body = value.decode()
            elif number == 11:
                nested.append(value)
        if verb and template:
            rules.append((verb, template, body, response_body))
        for binding in nested:
            read(binding)

    for number, value in _fields(options):
        if number == HTTP_RULE_FIELD and isinstance(value, bytes):
            read(value)
    return rules


def _compile(template: str) -> tuple[re.Pattern[str], tuple[str, ...]]:
    """A path template as a regular expression, and the field of each group."""
    verb = ""
    colon = template.rfind(":")
    if colon > template.rfind("}") and colon > template.rfind("/"):
        template, verb = template[:colon], template[colon + 1:]
    pattern = ""
    fields: list[str] = []
    index = 0
    for found in re.finditer(r"\{([A-Za-z0-9_.]+)(?:=([^}]*))?\}", template):
        pattern += re.escape(template[index:found.start()])
        sub = found.group(2) or "*"
        piece = "/".join("[^/]+" if s == "*" else ".+" if s == "**" else re.escape(s)
                         for s in sub.split("/"))
        pattern += f"({piece})"
        fields.append(found.group(1))
        index = found.end()
    pattern += re.escape(template[index:])
    if verb:
        pattern += re.escape(":" + verb)
    return re.compile(pattern), tuple(fields)


class Transcoder:
    """The bindings of one descriptor set."""

    def __init__(self, bindings: list[Binding]) -> None:
        self.bindings = bindings

    @classmethod
    def from_base64(cls, text: str) -> Transcoder:
        """Raises ValueError when the bytes are not a descriptor set."""
        files = descriptor_pb2.FileDescriptorSet()
        try:
            files.ParseFromString(base64.b64decode(text))
        except (DecodeError, ValueError) as exc:
            raise ValueError(f"not a protobuf descriptor set: {exc}") from None
        pool = descriptor_pool.DescriptorPool()
        for file in files.file:
            pool.Add(file)
        bindings: list[Binding] = []
        for file in files.file:
            for service in file.service:
                full = f"{file.package}.{service.name}" if file.package else service.name
                described = pool.FindServiceByName(full)
                for method in service.method:
                    rules = _http_rules(method.options.SerializeToString())
                    if not rules:
                        continue  # no annotation: not exposed
                    found = described.methods_by_name[method.name]
                    request = message_factory.GetMessageClass(found.input_type)
                    answer = message_factory.GetMessageClass(found.output_type)
                    for verb, template, body, response_body in rules:
                        pattern, fields = _compile(template)
                        bindings.append(Binding(f"/{full}/{method.name}", verb, pattern,
                                                fields, body, response_body, request, answer))
        return cls(bindings)

    def match(self, verb: str, path: str) -> tuple[Binding, dict[str, str]] | None:
        for binding in self.bindings:
            if binding.verb != verb:
                continue
            found = binding.pattern.fullmatch(path)
            if found is not None:
                return binding, {field: unquote(value)
                                 for field, value in zip(binding.fields, found.groups(),
                                                         strict=True)}
        return None

    # The message functions below, for callers that hold a Transcoder: they need not
    # import this module (and protobuf) before a configuration transcodes.

    def request_message(self, binding: Binding, variables: dict[str, str], query: str,
                        body: bytes) -> bytes:
        return request_message(binding, variables, query, body)

    def response_json(self, binding: Binding, data: bytes) -> bytes:
        return response_json(binding, data)


def _put(target: dict[str, Any], field: str, value: Any) -> None:
    *parents, last = field.split(".")
    for name in parents:
        target = target.setdefault(name, {})
    target.setdefault(last, value)


def request_message(binding: Binding, variables: dict[str, str], query: str,
                    body: bytes) -> bytes:
    """The serialized request message; raises TranscodeError."""
    try:
        data: Any = json.loads(body) if body.strip() else {}
    except ValueError as exc:
        raise TranscodeError(f"the body is not JSON: {exc}") from None
    if binding.body == "*":
        if not isinstance(data, dict):
            raise TranscodeError("the body must be a JSON object")
        fields: dict[str, Any] = data
    elif binding.body:
        fields = {binding.body: data} if body.strip() else {}
    else:
        fields = {}
    for field, value in variables.items():
        _put(fields, field, value)
    if binding.body != "*":
        for name, values in parse_qs(query, keep_blank_values=True).items():
            _put(fields, name, values if len(values) > 1 else values[0])
    message = binding.input()
    try:
        json_format.ParseDict(fields, message)
    except json_format.ParseError as exc:
        raise TranscodeError(str(exc)) from None
    return bytes(message.SerializeToString())


def response_json(binding: Binding, data: bytes) -> bytes:
    """The JSON of an answer message (or of its `response_body` field)."""
    message = binding.output.FromString(data)
    plain: Any = json_format.MessageToDict(message)
    if binding.response_body:
        plain = plain.get(_json_name(binding, binding.response_body))
    return json.dumps(plain).encode()


def _json_name(binding: Binding, field: str) -> str:
    described = binding.output.DESCRIPTOR.fields_by_name.get(field)
    return described.json_name if described is not None else field

"""Request aggregation, the pure part: filling a part's path template, and merging the
parts' answers into one JSON object (the Backend-for-Frontend pattern).

A template's placeholders are `{path.NAME}` (a named group of the rule's
RegularExpression path match), `{query.NAME}` and `{header.NAME}`; values are
percent-encoded, so whatever the client sent cannot add a path segment, a query
parameter or a line to the sub-request. A placeholder with no value fails the request
(400): the sub-request it would make is not the one the rule describes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote

from kanal.contract.patterns import compile_pattern
from kanal.contract.snapshot import Rule

_PLACEHOLDER = re.compile(r"\{(path|query|header)\.([A-Za-z0-9_.-]+)\}")

MAX_PART_BODY = 4 * 1024 * 1024
"""Bytes of one part's answer kept for the merge; a larger answer fails the part."""


class MissingValue(ValueError):
    """A placeholder of a template has no value in the request."""


def path_parameters(rule: Rule, path: str) -> dict[str, str]:
    """The named groups of the rule's RegularExpression path matches that match `path`."""
    found: dict[str, str] = {}
    for match in rule.matches:
        if match.path.type != "RegularExpression":
            continue
        hit = compile_pattern(match.path.value).fullmatch(path)
        groupdict = getattr(hit, "groupdict", None)
        if groupdict is not None:
            for name, value in groupdict().items():
                if value is not None:
                    found.setdefault(name, value)
    return found


def fill(template: str, path: Mapping[str, str], query: str,
         header: Callable[[str], str | None]) -> str:
    """The sub-request target for `template`; raises MissingValue."""
    parsed = parse_qs(query, keep_blank_values=True) if "{query." in template else {}

    def value(found: re.Match[str]) -> str:
        source, name = found.group(1), found.group(2)
        if source == "path":
            text = path.get(name)
        elif source == "query":
            values = parsed.get(name)
            text = values[0] if values else None
        else:
            text = header(name.lower())
        if text is None:
            raise MissingValue(f"{{{source}.{name}}} has no value in the request")
        return quote(text, safe="")

    return _PLACEHOLDER.sub(value, template)


@dataclass(frozen=True, slots=True)
class PartResult:
    """What one part came to: its answer (status and body), or why it has none
    (`overdue`: the rule's timeout ran out before it answered)."""

    name: str
    status: int = 0
    body: bytes = b""
    error: str | None = None
    overdue: bool = False


def _decoded(body: bytes) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")


def merge(results: Sequence[PartResult], on_error: str) -> tuple[int, bytes]:
    """The aggregate answer: (status, JSON body).

    A part failed when it has an error (unreachable, late, too large) or its answer is
    not 2xx. `Fail`: 502 naming the first failed part, or 504 when the rule's timeout
    ran out before some part answered (the whole request was late, as a proxied one
    is). `Partial`: 200, null for each failed part and its reason under `errors`.
    """
    merged: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for result in results:
        reason = result.error
        if reason is None and not 200 <= result.status < 300:
            reason = f"answered {result.status}"
        if reason is not None:
            errors[result.name] = reason
            merged[result.name] = None
        else:
            merged[result.name] = _decoded(result.body)
    if errors and on_error != "Partial":
        overdue = [result.name for result in results if result.overdue]
        if overdue:
            body = {"error": f"the rule's timeout ran out before part {overdue[0]} answered",
                    "errors": errors}
            return 504, json.dumps(body).encode()
        name = next(iter(errors))
        body = {"error": f"part {name} failed: {errors[name]}", "errors": errors}
        return 502, json.dumps(body).encode()
    if errors:
        merged["errors"] = errors
    return 200, json.dumps(merged).encode()

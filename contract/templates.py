"""Header values with variables: `X-Client: ${client_address}`.

Both planes read them the same way: the operator refuses an unknown variable when a
manifest is loaded (naming the field), the dataplane splits each value once per
Snapshot into literal parts and variables, so a request only joins strings.

Syntax: `${name}` is a variable, `$$` is one `$`, and a `$` followed by anything else
is itself (`$1` stays `$1`). The variables:

- `client_address`: the address of the client connection (the peer's IP);
- `request_id`: the request's `X-Request-Id`, or a fresh random id when it has none;
- `route_name`: the Route that took the request, as `namespace/name`;
- `host`: the request's host, lower case, without its port.
"""

from __future__ import annotations

VARIABLES = ("client_address", "request_id", "route_name", "host")

Part = tuple[str, bool]
"""A literal text (False) or the name of a variable (True)."""


class TemplateError(ValueError):
    """A value whose variables cannot be read; the message says which and why."""


def parse_template(text: str) -> tuple[Part, ...]:
    """The parts of a value, or TemplateError for an unknown or unterminated variable."""
    parts: list[Part] = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "$" and text.startswith("$$", i):
            literal.append("$")
            i += 2
            continue
        if char == "$" and text.startswith("${", i):
            end = text.find("}", i + 2)
            if end == -1:
                raise TemplateError(f"unterminated variable at {text[i:]!r} (write $$ for a $)")
            name = text[i + 2 : end]
            if name not in VARIABLES:
                raise TemplateError(
                    f"unknown variable ${{{name}}}; known: "
                    + ", ".join(f"${{{v}}}" for v in VARIABLES))
            if literal:
                parts.append(("".join(literal), False))
                literal = []
            parts.append((name, True))
            i = end + 1
            continue
        literal.append(char)
        i += 1
    if literal:
        parts.append(("".join(literal), False))
    return tuple(parts)


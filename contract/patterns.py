"""Regular expressions users write (RegularExpression path, header and query matches).

They run on every request, so they run on RE2 (google-re2), a linear-time engine, as
Envoy does: a pattern such as `/r/(a+)+$` cannot stall the event loop however the path
is crafted. RE2's syntax is Python's without backreferences and lookaround; a pattern
that needs them is refused when the configuration is loaded.

A pattern that is plain text, optionally followed by `.*` (`application/grpc.*`, as a
sidecar's inbound listener uses), cannot backtrack in any engine: Python's `re` runs
it, with the same meaning. RE2 (a C++ library, about 2.5 MiB resident with its
runtime) is loaded by the first pattern that needs it, so a configuration without one
does not pay for it.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

_re2: Any = None
_OPTIONS: Any = None

_LITERAL_PREFIX = re.compile(r"[A-Za-z0-9/_\-:=@,;%~ ]*(?:\.\*)?")
"""Patterns that are text (no metacharacter) and may end in `.*`: linear in any engine."""


def _engine() -> Any:
    global _re2, _OPTIONS
    if _re2 is None:
        import re2  # type: ignore[import-untyped]

        options = re2.Options()
        options.log_errors = False  # the error goes to the user, not to stderr
        _re2, _OPTIONS = re2, options
    return _re2


class UserPattern(Protocol):
    """What the router uses of a compiled pattern."""

    @property
    def pattern(self) -> str: ...

    def fullmatch(self, text: str) -> object | None: ...


class PatternError(ValueError):
    """A pattern RE2 cannot compile; the message says why."""


def compile_pattern(pattern: str) -> UserPattern:
    """Compile a user's pattern with RE2, or raise PatternError saying why not."""
    if _LITERAL_PREFIX.fullmatch(pattern):
        return re.compile(pattern)
    re2 = _engine()
    try:
        compiled: UserPattern = re2.compile(pattern, options=_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise PatternError(f"{reason} (RE2 syntax: no backreferences or lookaround)") from None
    return compiled


_GROUP_REFERENCE = re.compile(r"\\(?:(\d+)|g<([^>]*)>)")


def substitution_problem(substitution: str, pattern: str) -> str | None:
    """Why `substitution` (`\\1`, `\\g<name>`) cannot use `pattern`'s groups, or None.

    For a URL rewrite's ReplaceRegexMatch: a reference to a group the pattern lacks is
    refused when the configuration is loaded, not met by a request.
    """
    try:
        compiled = compile_pattern(pattern)
    except PatternError as exc:
        return str(exc)
    groups: int = getattr(compiled, "groups", 0)
    names: dict[str, int] = getattr(compiled, "groupindex", {})
    for number, name in _GROUP_REFERENCE.findall(substitution):
        if number:
            if int(number) > groups:
                return (f"\\{number} names a group the pattern {pattern!r} does not have "
                        f"(it has {groups})")
        elif name not in names:
            return f"\\g<{name}> names no group of the pattern {pattern!r}"
    return None

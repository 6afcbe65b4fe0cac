"""Path rewrites and redirect targets (URLRewrite, RequestRedirect), as Gateway API defines them.

Pure: strings in, strings out. A rule's path modifier is compiled once per Snapshot
(`PathRewriter`) with the rule's own matches, because two of its modes depend on what
matched:

- `ReplaceFullPath`: the whole path becomes the value;
- `ReplacePrefixMatch`: the matched `PathPrefix` is replaced, on whole segments
  (Gateway API's table: prefix `/foo` with `/xyz` makes `/foo/bar` `/xyz/bar` and
  `/foo` `/xyz`; with an empty or `/` replacement `/foo/bar` becomes `/bar` and `/foo`
  becomes `/`). A rule with several prefixes replaces the longest one the path, as
  sent, is under (a path the router only matched once decoded is left as it is);
- `ReplaceRegexMatch`: the matched `RegularExpression` path is replaced by the
  substitution, where `\\1` or `\\g<name>` stand for the pattern's groups (RE2).

The query string is never part of the path: it is kept as sent.
"""

from __future__ import annotations

from kanal.contract.patterns import UserPattern, compile_pattern
from kanal.contract.snapshot import PathModifier, Rule


def replace_prefix(path: str, prefix: str, replacement: str) -> str | None:
    """`path` with `prefix` (whole segments) replaced, or None when it is not under it."""
    base = prefix.rstrip("/")
    if path != base and not path.startswith(base + "/") and not (base == "" and path.startswith("/")):
        return None
    rest = path[len(base):]
    result = replacement.rstrip("/") + rest
    return result or "/"


class PathRewriter:
    """A rule's path modifier, ready to apply to request paths."""

    __slots__ = ("_prefixes", "_regexes", "modifier")

    def __init__(self, modifier: PathModifier, rule: Rule) -> None:
        self.modifier = modifier
        prefixes = {m.path.value for m in rule.matches if m.path.type == "PathPrefix"}
        self._prefixes = tuple(sorted(prefixes, key=lambda p: -len(p.rstrip("/"))))
        self._regexes: tuple[UserPattern, ...] = tuple(
            compile_pattern(m.path.value) for m in rule.matches
            if m.path.type == "RegularExpression")

    def rewrite(self, path: str) -> str:
        """The new path for `path` (unchanged when its mode finds nothing to replace)."""
        modifier = self.modifier
        if modifier.type == "ReplaceFullPath":
            return modifier.value
        if modifier.type == "ReplacePrefixMatch":
            for prefix in self._prefixes:
                replaced = replace_prefix(path, prefix, modifier.value)
                if replaced is not None:
                    return replaced
            return path
        for regex in self._regexes:
            match = regex.fullmatch(path)
            if match is not None:
                expanded: str = match.expand(modifier.value)  # type: ignore[attr-defined]
                return expanded
        return path


def default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def redirect_location(
    *,
    request_scheme: str,
    request_host: str,
    path: str,
    query: str,
    scheme: str | None,
    hostname: str | None,
    port: int | None,
) -> str:
    """The `Location` of a RequestRedirect, by Gateway API's port rules.

    With no `port`: the scheme's well-known port when `scheme` is set, else the port
    the client used (from its Host). A port that is the scheme's well-known one is left
    out of the Location.
    """
    new_scheme = scheme or request_scheme
    host, sent_port = split_host_port(request_host)
    if port is None:
        port = default_port(new_scheme) if scheme else (sent_port or default_port(new_scheme))
    new_host = hostname or host
    if ":" in new_host and not new_host.startswith("["):
        new_host = f"[{new_host}]"
    authority = new_host if port == default_port(new_scheme) else f"{new_host}:{port}"
    return f"{new_scheme}://{authority}{path}" + (f"?{query}" if query else "")


def split_host_port(host: str) -> tuple[str, int | None]:
    """A Host value's name (lower case) and port, if it has one."""
    if host.startswith("["):
        end = host.find("]")
        name, rest = host[: end + 1], host[end + 1 :]
    else:
        name, _, port_text = host.partition(":")
        rest = ":" + port_text if port_text else ""
    port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    return name.lower().removesuffix("."), port

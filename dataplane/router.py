"""The route table: which route and rule take a request (Gateway API HTTPRoute rules).

Built once per Snapshot and immutable afterwards (the Splits it holds advance their
cursor, nothing else changes), so a reload swaps one reference and no request ever
sees a mixture of two configurations.

Precedence, highest first (api.md, Gateway API):
1. hostname: routes listing the request's host exactly, then routes whose wildcard
   matches it, the longest wildcard first, then routes with no hostnames;
2. within one hostname level, per match: an Exact path (longer first), then PathPrefix
   by the length of its value, then RegularExpression; then a match with a method; then
   more header matches; then more query matches; then the route listed earlier in the
   Snapshot (the compiler lists them oldest first, then by key); then the earlier rule;
   then the earlier match.
A request falls through to lower-precedence rules while the higher ones do not match;
nothing matching gives None (the caller answers 404).

The index: one ordered candidate tuple per hostname group (exact host, wildcard suffix,
any host), and per exact host / wildcard suffix a tuple of references to the groups that
apply, in order. A lookup is one dict probe (raw Host values are cached, bounded), or a
probe per dot of the host for wildcards; the candidates then run from the best down.
The lone `PathPrefix /` with no other condition costs one attribute test.

Paths. The path is matched as sent (no decoding) whenever it is unambiguous: no `%`,
no backslash, no `//` and no `/.`. Otherwise a rule's path condition must hold on BOTH
readings a backend might make of it:
- as sent, with literal `.` and `..` segments resolved (RFC 3986 5.2.4);
- decoded: `%2F` and `%5C` (and `\\`) read as `/`, `%2E` and escaped unreserved
  characters decoded (RFC 3986 6.2.2.2), runs of `/` merged, dot segments resolved.
So `/public/..%2Fadmin` is not under `PathPrefix /public` (decoded it is `/admin`), and
`/admin/..%2Fpublic` is not under it either (as sent it is under `/admin`): an encoded
slash or dot can never carry a request out of the prefix that admitted it, whichever
way the backend reads it. Such a request still reaches a rule both readings agree on
(typically a catch-all), and a legitimate `%2F` inside a segment (`/api/v4/projects/
group%2Fproject`) still matches `/api`. Configured path values are read the same two
ways. Other alternate spellings (`/%61dmin`, `//admin`, case) never *escape* a prefix;
they can only miss a more specific rule and land on a broader one, whose backend then
sees them: forwarding the decoded path (see `normalize_path`) closes that too.

Hosts: the port is ignored, case is folded, one trailing dot is dropped, `[v6]`
literals keep their brackets. Headers: a mapping from lower-case name to the first
value; if it also has `getall` (aiohttp's multidict), other values are tried when the
first one does not match. Query strings are parsed only when a candidate needs them.

Invalid regular expressions make `RouteTable.build` raise ValueError naming the route
and rule, so the dataplane NACKs the Snapshot and keeps the last good one.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final
from urllib.parse import parse_qsl

from kanal.contract.patterns import PatternError, UserPattern, compile_pattern
from kanal.contract.snapshot import (
    Aggregate,
    Gateway,
    GrpcTranscoder,
    Match,
    Retries,
    Route,
    RouteTLS,
    Rule,
    SessionAffinity,
    Snapshot,
    ValueMatch,
)
from kanal.dataplane.access.policy import Access, compile_access
from kanal.dataplane.cache.rule import RuleCache, rule_cache
from kanal.dataplane.filters import RuleFilters
from kanal.dataplane.split import Split

__all__ = ["RouteTable", "Selection", "normalize_host", "normalize_path", "path_views"]

_ANY_PATH = 0
_PREFIX: Final = 1
_EXACT: Final = 2
_REGEX: Final = 3

_PATH_RANK = {"Exact": 0, "PathPrefix": 1, "RegularExpression": 2}

_HOST_CACHE_SIZE = 4096
"""Distinct raw Host values remembered; the cache is dropped whole when it fills up."""

_NEVER = re.compile(r"(?!)")
_NO_HEADERS: Mapping[str, str] = {}

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_PARAMETERS = re.compile(r";[^/]*")
_SLASHES = re.compile(r"/{2,}")


class Selection:
    """What the router chose: the route, its rule, and the rule's backend Split.

    One instance per rule, built with the table and returned by every match: no
    allocation per request. The rule's settings the request path reads on every
    request are copied here from the (interpreted) Route and Rule, where reading them
    costs a dictionary lookup each.
    """

    def __init__(self, route_key: str, rule: Rule, split: Split, route: Route,
                 access: Access | None = None, filters: RuleFilters | None = None,
                 cache: RuleCache | None = None) -> None:
        self.route_key = route_key
        self.rule = rule
        self.split = split
        self.route = route
        self.access = access
        self.filters = filters
        """The rule's compiled `filters` (and its backends'); None when it has none."""
        self.cache = cache
        self.tls: RouteTLS | None = route.tls
        self.allow_websocket: bool = rule.allow_websocket
        self.aggregate: Aggregate | None = rule.aggregate
        self.max_request_body_size: int | None = rule.max_request_body_size
        self.session_affinity: SessionAffinity | None = rule.session_affinity
        self.grpc_transcoder: GrpcTranscoder | None = rule.grpc_transcoder
        self.retries: Retries | None = rule.retries
        self.timeout: float | None = rule.timeout

    def __repr__(self) -> str:
        return f"Selection({self.route_key} rule {self.rule.index})"


class _ValuePredicate:
    """A header or query condition, its regex compiled once."""

    __slots__ = ("name", "regex", "spec", "value")

    def __init__(self, spec: ValueMatch, regex: UserPattern | None) -> None:
        self.spec = spec
        self.name = spec.name
        self.value = spec.value
        self.regex = regex

    def accepts(self, value: str) -> bool:
        regex = self.regex
        if regex is None:
            return value == self.value
        return regex.fullmatch(value) is not None

    def describe(self) -> str:
        if self.regex is None:
            return f"== {self.value!r}"
        return f"~ /{self.value}/"


class _Candidate:
    """One match of one rule, with everything precomputed for the hot loop."""

    __slots__ = (
        "headers",
        "kind",
        "match_index",
        "method",
        "plain",
        "query",
        "regex",
        "route",
        "route_pos",
        "rule",
        "selection",
        "sort_key",
        "value",
        "value_d",
        "value_d_slash",
        "value_slash",
    )

    def __init__(
        self,
        route_pos: int,
        route: Route,
        rule: Rule,
        rule_pos: int,
        match_index: int,
        match: Match,
        selection: Selection,
        regexes: dict[str, UserPattern],
    ) -> None:
        self.route_pos = route_pos
        self.route = route
        self.rule = rule
        self.match_index = match_index
        self.selection = selection
        path = match.path
        self.regex: UserPattern = _NEVER
        if path.type == "PathPrefix":
            value = path.value.rstrip("/")
            self.kind = _PREFIX if value else _ANY_PATH
            self.value = value
            self.value_d = path_views(path.value or "/")[1].rstrip("/")
            length = len(value)
        elif path.type == "Exact":
            self.kind = _EXACT
            self.value = path.value
            self.value_d = path_views(path.value)[1]
            length = len(path.value)
        elif path.type == "RegularExpression":
            self.kind = _REGEX
            self.value = self.value_d = path.value
            self.regex = _compile(path.value, regexes, route, rule, "path")
            length = 0
        else:
            raise ValueError(f"{route.key} rule {rule.index}: unknown path type {path.type!r}")
        self.value_slash = self.value + "/"
        self.value_d_slash = self.value_d + "/"
        self.method = match.method.upper() if match.method else None
        self.headers = tuple(_predicate(h, regexes, route, rule, "header") for h in match.headers)
        self.query = tuple(_predicate(q, regexes, route, rule, "query") for q in match.query_params)
        self.plain = self.method is None and not self.headers and not self.query
        self.sort_key = (
            _PATH_RANK[path.type],
            -length,
            0 if self.method else 1,
            -len(self.headers),
            -len(self.query),
            route_pos,
            rule_pos,
            match_index,
        )

    def path_ok(self, as_sent: str, decoded: str) -> bool:
        """The path condition on both readings of a path (see the module docstring)."""
        kind = self.kind
        if kind == _ANY_PATH:
            return True
        if kind == _PREFIX:
            return (as_sent == self.value or as_sent.startswith(self.value_slash)) and (
                decoded == self.value_d or decoded.startswith(self.value_d_slash)
            )
        if kind == _EXACT:
            return as_sent == self.value and decoded == self.value_d
        regex = self.regex
        return regex.fullmatch(as_sent) is not None and regex.fullmatch(decoded) is not None

    def describe_path(self) -> str:
        kind = {_ANY_PATH: "PathPrefix", _PREFIX: "PathPrefix", _EXACT: "Exact"}.get(
            self.kind, "RegularExpression"
        )
        value = self.value if self.kind in (_EXACT, _REGEX) else (self.value or "/")
        return f"{kind} {value}"


def _compile(
    pattern: str, cache: dict[str, UserPattern], route: Route, rule: Rule, what: str
) -> UserPattern:
    """Compile a regex (RE2) once per build; a bad one names its route and rule."""
    compiled = cache.get(pattern)
    if compiled is None:
        try:
            compiled = compile_pattern(pattern)
        except PatternError as error:
            raise ValueError(
                f"{route.key} rule {rule.index}: invalid {what} regular expression "
                f"{pattern!r}: {error}"
            ) from None
        cache[pattern] = compiled
    return compiled


def _predicate(
    spec: ValueMatch, cache: dict[str, UserPattern], route: Route, rule: Rule, what: str
) -> _ValuePredicate:
    regex = (
        _compile(spec.value, cache, route, rule, what) if spec.type == "RegularExpression" else None
    )
    name = spec.name.lower() if what == "header" else spec.name
    return _ValuePredicate(ValueMatch(name, spec.value, spec.type), regex)


def normalize_host(host: str) -> str:
    """The host part of a Host header / authority, lower case, without port or final dot."""
    if host.startswith("["):
        end = host.find("]")
        if end != -1:
            host = host[: end + 1]
    else:
        colon = host.rfind(":")
        if colon != -1:
            host = host[:colon]
    host = host.lower()
    host = host.removesuffix(".")
    return host


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 for an absolute path: `/a/./b/../c` -> `/a/c`, never above `/`."""
    if not path.startswith("/"):
        return path
    segments = path.split("/")
    out: list[str] = []
    for segment in segments[1:]:
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    result = "/" + "/".join(out)
    if segments[-1] in (".", "..") and not result.endswith("/"):
        result += "/"
    return result


def _decode_safe(escape: re.Match[str]) -> str:
    """Decode an escape that cannot change meaning (unreserved) or that moves segments."""
    char = chr(int(escape.group(1), 16))
    if char in _UNRESERVED or char == "/":
        return char
    if char == "\\":
        return "/"
    return "%" + escape.group(1).upper()


def normalize_path(path: str) -> str:
    """The decoded reading of a path: what a lenient backend would resolve it to.

    `%2F`, `%5C` and `\\` become `/`, `%2E` and other escaped unreserved characters are
    decoded (once: `%252F` stays `%252F`), runs of `/` merge and dot segments resolve.
    Other escapes keep their bytes (hex in upper case). Path parameters (`;jsessionid=1`
    at the end of a segment, which servlet containers strip) are dropped.
    """
    if "%" in path:
        path = _ESCAPE.sub(_decode_safe, path)
    if ";" in path:
        path = _PARAMETERS.sub("", path)
    path = path.replace("\\", "/")
    if "//" in path:
        path = _SLASHES.sub("/", path)
    return _remove_dot_segments(path)


def _is_plain_path(path: str) -> bool:
    """True when both readings of the path are the path itself (the common case)."""
    return not ("%" in path or "\\" in path or "/." in path or "//" in path or ";" in path)


def path_views(path: str) -> tuple[str, str]:
    """(as sent with dot segments resolved, decoded): the two readings rules must match."""
    if _is_plain_path(path):
        return path, path
    as_sent = path
    if ";" in as_sent:
        # Path parameters are no part of the hierarchy in either reading: servlet
        # containers drop them, so /admin;x=1/a is under /admin for every backend.
        as_sent = _PARAMETERS.sub("", as_sent)
    if "/." in as_sent:
        as_sent = _remove_dot_segments(as_sent)
    return as_sent, normalize_path(path)


def _parse_query(query: str) -> dict[str, str]:
    """First value of each query parameter, names case-sensitive, values decoded."""
    result: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        result.setdefault(name, value)
    return result


def _headers_ok(predicates: tuple[_ValuePredicate, ...], headers: Mapping[str, str]) -> bool:
    for predicate in predicates:
        value = headers.get(predicate.name)
        if value is None:
            return False
        if not predicate.accepts(value) and not _other_values_ok(predicate, headers):
            return False
    return True


def _other_values_ok(predicate: _ValuePredicate, headers: Mapping[str, str]) -> bool:
    """Repeated headers: accept if any value matches, when the mapping can list them."""
    getall: Any = getattr(headers, "getall", None)
    if getall is None:
        return False
    return any(predicate.accepts(value) for value in getall(predicate.name, ()))


def _query_ok(predicates: tuple[_ValuePredicate, ...], params: dict[str, str]) -> bool:
    for predicate in predicates:
        value = params.get(predicate.name)
        if value is None or not predicate.accepts(value):
            return False
    return True


_Level = tuple[_Candidate, ...]
_Levels = tuple[_Level, ...]


class RouteTable:
    """The compiled routes of one gateway (`ingress` or `mesh`) of one Snapshot."""

    __slots__ = ("_any", "_cache", "_compiled", "_exact", "_wild", "gateway", "routes", "version")

    def __init__(
        self,
        gateway: str,
        version: str,
        compiled: list[tuple[Route, tuple[_Candidate, ...]]],
        exact: dict[str, _Levels],
        wild: dict[str, _Levels],
        any_host: _Levels,
    ) -> None:
        self.gateway = gateway
        self.version = version
        self.routes: tuple[Route, ...] = tuple(route for route, _ in compiled)
        self._compiled = compiled
        self._exact = exact
        self._wild = wild
        self._any = any_host
        self._cache: dict[str, _Levels] = {}

    # -- building -----------------------------------------------------------------

    @classmethod
    def build(
        cls,
        snapshot: Snapshot,
        gateway: Gateway | str = "ingress",
        rng: random.Random | None = None,
        compress_all: bool = False,
    ) -> RouteTable:
        """Compile the routes of `snapshot` that serve `gateway`.

        `rng`, if given, starts each Split at a random point of its cycle so frequent
        reloads do not keep restarting every split on its first backend.
        `compress_all` gives every rule without a Compression filter one (--compression).
        """
        regexes: dict[str, UserPattern] = {}
        compiled: list[tuple[Route, tuple[_Candidate, ...]]] = []
        exact_groups: dict[str, list[_Candidate]] = {}
        wild_groups: dict[str, list[_Candidate]] = {}
        any_group: list[_Candidate] = []
        routes = [route for route in snapshot.routes if gateway in route.gateways]
        for route_pos, route in enumerate(routes):
            candidates = tuple(_compile_route(route_pos, route, regexes, rng, compress_all))
            compiled.append((route, candidates))
            for hostname in _hostnames(route):
                if hostname == "*":
                    any_group.extend(candidates)
                elif hostname.startswith("*."):
                    wild_groups.setdefault(hostname[2:], []).extend(candidates)
                else:
                    exact_groups.setdefault(hostname, []).extend(candidates)
            if not route.hostnames:
                any_group.extend(candidates)
        exact, wild, any_host = _index(exact_groups, wild_groups, any_group)
        return cls(str(gateway), snapshot.version, compiled, exact, wild, any_host)

    # -- matching -----------------------------------------------------------------

    def _levels(self, host: str) -> _Levels:
        """The candidate groups for a raw Host value, best first (cached, bounded)."""
        levels = self._cache.get(host)
        if levels is not None:
            return levels
        levels = self._lookup(normalize_host(host))
        cache = self._cache
        if len(cache) >= _HOST_CACHE_SIZE:
            cache.clear()
        cache[host] = levels
        return levels

    def _lookup(self, host: str) -> _Levels:
        levels = self._exact.get(host)
        if levels is not None:
            return levels
        wild = self._wild
        if wild:
            dot = host.find(".")
            while dot != -1:
                levels = wild.get(host[dot + 1 :])
                if levels is not None:
                    return levels
                dot = host.find(".", dot + 1)
        return self._any

    def match(
        self,
        host: str,
        method: str,
        path: str,
        query: str = "",
        headers: Mapping[str, str] = _NO_HEADERS,
    ) -> Selection | None:
        """The Selection for a request, or None when no rule takes it (404)."""
        levels = self._cache.get(host)
        if levels is None:
            levels = self._levels(host)
        if "%" in path or "/." in path or "//" in path or "\\" in path or ";" in path:
            # not _is_plain_path
            return self._match_views(levels, method, path, query, headers)
        params: dict[str, str] | None = None
        for level in levels:
            for c in level:
                kind = c.kind
                if kind == _PREFIX:
                    if not path.startswith(c.value_slash) and path != c.value:
                        continue
                elif kind == _EXACT:
                    if path != c.value:
                        continue
                elif kind == _REGEX and c.regex.fullmatch(path) is None:
                    continue
                if c.plain:
                    return c.selection
                if c.method is not None and c.method != method:
                    continue
                if c.headers and not _headers_ok(c.headers, headers):
                    continue
                if c.query:
                    if params is None:
                        params = _parse_query(query)
                    if not _query_ok(c.query, params):
                        continue
                return c.selection
        return None

    def _match_views(
        self,
        levels: _Levels,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
    ) -> Selection | None:
        """The slow path for paths with escapes, backslashes, `//` or dot segments."""
        as_sent, decoded = path_views(path)
        params: dict[str, str] | None = None
        for level in levels:
            for c in level:
                if not c.path_ok(as_sent, decoded):
                    continue
                if c.method is not None and c.method != method:
                    continue
                if c.headers and not _headers_ok(c.headers, headers):
                    continue
                if c.query:
                    if params is None:
                        params = _parse_query(query)
                    if not _query_ok(c.query, params):
                        continue
                return c.selection
        return None

    def selections(self) -> list[Selection]:
        """Every rule's Selection once, in Snapshot order (for split verification)."""
        found: dict[int, Selection] = {}
        for _route, candidates in self._compiled:
            for c in candidates:
                found.setdefault(id(c.selection), c.selection)
        return list(found.values())

    # -- explaining ---------------------------------------------------------------

    def explain(
        self,
        host: str,
        method: str,
        path: str,
        query: str = "",
        headers: Mapping[str, str] = _NO_HEADERS,
    ) -> dict[str, Any]:
        """Why a request goes where it goes, as JSON-able data (for `GET /explain`).

        Lists every candidate match in precedence order with its verdict: `chosen`,
        `lost on precedence` (it matches, but a better one came first) or `no match`
        with the reasons; then the rules of routes whose hostnames do not apply.
        """
        name = normalize_host(host)
        as_sent, decoded = path_views(path)
        params = _parse_query(query)
        chosen: _Candidate | None = None
        entries: list[dict[str, Any]] = []
        seen: set[int] = set()
        considered_routes: set[int] = set()
        for label, level in self._labelled_levels(name):
            for c in level:
                if id(c) in seen:
                    continue
                seen.add(id(c))
                considered_routes.add(c.route_pos)
                reasons = _reasons(c, as_sent, decoded, method, headers, params)
                entry = _describe_candidate(c, label)
                if reasons:
                    entry.update(result="no match", reasons=reasons)
                elif chosen is None:
                    chosen = c
                    entry.update(result="chosen", reasons=[])
                else:
                    entry.update(
                        result="lost on precedence",
                        reasons=[f"lost on precedence to {_candidate_name(chosen)}"],
                    )
                entries.append(entry)
        for route_pos, (route, candidates) in enumerate(self._compiled):
            if route_pos in considered_routes:
                continue
            reason = f"hostname {name} not in [{', '.join(route.hostnames)}]"
            for c in candidates:
                entry = _describe_candidate(c, None)
                entry.update(result="no match", reasons=[reason])
                entries.append(entry)
        result = _explanation(self, host, method, path, query, as_sent, decoded, chosen, entries)
        filters = chosen.selection.filters if chosen is not None else None
        if filters is not None:
            # What the rule's filters would do: in order, and the rewritten request.
            result["filters"] = filters.explain(
                method=method, host=host, target=path + (f"?{query}" if query else ""),
                headers=headers, scheme="http")
        return result

    def _labelled_levels(self, host: str) -> Iterable[tuple[str, _Level]]:
        """The candidate groups for a normalized host with the hostname each matched by."""
        labels: list[str] = []
        if host in self._exact:
            labels.append(host)
        dot = host.find(".")
        while dot != -1:
            if host[dot + 1 :] in self._wild:
                labels.append("*." + host[dot + 1 :])
            dot = host.find(".", dot + 1)
        levels = self._lookup(host)
        # Each level is one group: exact, then wildcards longest first, then any host.
        for index, level in enumerate(levels):
            yield (labels[index] if index < len(labels) else "(any host)"), level


def _hostnames(route: Route) -> list[str]:
    """A route's hostnames, lower case, without duplicates, in order."""
    seen: dict[str, None] = {}
    for hostname in route.hostnames:
        name = hostname.lower().rstrip(".")
        # The route's own string when it was written so (the usual case): the table's
        # keys then share it instead of holding a copy each.
        seen.setdefault(hostname if name == hostname else name, None)
    return list(seen)


def _compile_route(
    route_pos: int, route: Route, regexes: dict[str, UserPattern], rng: random.Random | None,
    compress_all: bool = False,
) -> Iterable[_Candidate]:
    for rule_pos, rule in enumerate(route.rules):
        selection = Selection(route.key, rule, Split.from_rule(rule, rng), route,
                              compile_access(route.key, rule),
                              RuleFilters.build(route, rule, rng=rng, compress_all=compress_all),
                              rule_cache(rule.cache))
        matches = rule.matches or (Match(),)  # no matches: the rule takes every request
        for match_index, match in enumerate(matches):
            yield _Candidate(
                route_pos, route, rule, rule_pos, match_index, match, selection, regexes
            )


def _index(
    exact_groups: dict[str, list[_Candidate]],
    wild_groups: dict[str, list[_Candidate]],
    any_group: list[_Candidate],
) -> tuple[dict[str, _Levels], dict[str, _Levels], _Levels]:
    """Sort each group by precedence and chain the groups that apply to each key."""

    def ordered(group: list[_Candidate]) -> _Level:
        return tuple(sorted(group, key=lambda c: c.sort_key))

    any_levels: _Levels = (ordered(any_group),) if any_group else ()
    wild_sorted = {suffix: ordered(group) for suffix, group in wild_groups.items()}

    def chain(host: str) -> _Levels:
        """The wildcard groups matching `host` (proper suffixes, longest first), any host."""
        levels: list[_Level] = []
        dot = host.find(".")
        while dot != -1:
            group = wild_sorted.get(host[dot + 1 :])
            if group is not None:
                levels.append(group)
            dot = host.find(".", dot + 1)
        return tuple(levels) + any_levels

    exact = {host: (ordered(group),) + chain(host) for host, group in exact_groups.items()}
    wild = {suffix: (group,) + chain(suffix) for suffix, group in wild_sorted.items()}
    return exact, wild, any_levels


def _candidate_name(c: _Candidate) -> str:
    name = f" ({c.rule.name})" if c.rule.name else ""
    return f"{c.route.key} rule {c.rule.index}{name} match {c.match_index}"


def _describe_candidate(c: _Candidate, hostname: str | None) -> dict[str, Any]:
    return {
        "route": c.route.key,
        "rule": c.rule.index,
        "name": c.rule.name,
        "match": c.match_index,
        "hostname": hostname,
    }


def _reasons(
    c: _Candidate,
    as_sent: str,
    decoded: str,
    method: str,
    headers: Mapping[str, str],
    params: dict[str, str],
) -> list[str]:
    """Every condition of a candidate the request fails, in words (empty: it matches)."""
    reasons: list[str] = []
    if not c.path_ok(as_sent, decoded):
        shown = as_sent if as_sent == decoded else f"{as_sent} (decoded {decoded})"
        reasons.append(f"path {shown} does not match {c.describe_path()}")
    if c.method is not None and c.method != method:
        reasons.append(f"method {method} != {c.method}")
    for predicate in c.headers:
        value = headers.get(predicate.name)
        if value is None:
            reasons.append(f"header {predicate.name}: missing")
        elif not predicate.accepts(value) and not _other_values_ok(predicate, headers):
            reasons.append(f"header {predicate.name}: {value!r} not {predicate.describe()}")
    for predicate in c.query:
        value = params.get(predicate.name)
        if value is None:
            reasons.append(f"query {predicate.name}: missing")
        elif not predicate.accepts(value):
            reasons.append(f"query {predicate.name}: {value!r} not {predicate.describe()}")
    return reasons


def _explanation(
    table: RouteTable,
    host: str,
    method: str,
    path: str,
    query: str,
    as_sent: str,
    decoded: str,
    chosen: _Candidate | None,
    entries: list[dict[str, Any]],
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "gateway": table.gateway,
        "version": table.version,
        "request": {
            "host": host,
            "method": method,
            "path": path,
            "query": query,
            "path_as_sent": as_sent,
            "path_decoded": decoded,
        },
        "matched": chosen is not None,
        "route": None,
        "rule": None,
        "backends": [],
        "session_affinity": None,
        "candidates": entries,
    }
    if chosen is not None:
        rule = chosen.rule
        result["route"] = chosen.route.key
        result["rule"] = {"index": rule.index, "name": rule.name, "match": chosen.match_index}
        result["backends"] = chosen.selection.split.describe()
        if rule.session_affinity is not None:
            result["session_affinity"] = {
                "cookie": rule.session_affinity.cookie_name,
                "ttl": rule.session_affinity.ttl,
            }
    return result

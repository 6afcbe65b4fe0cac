"""What every Snapshot must satisfy before a dataplane runs it, whoever made it.

The compiler makes Snapshots that satisfy these by construction; a dataplane still
checks each one it is given (from the control plane, the state file, or a file written
by hand), so a bug or a forged body is refused with a reason instead of half-applied.
Values that reach the wire are checked here too: nothing configured may carry CR, LF
or NUL into a request line or a header.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from kanal.contract.access import policy_problems
from kanal.contract.snapshot import Cache, Filter, HeaderValue, Rule, Snapshot, content_version
from kanal.contract.templates import TemplateError, parse_template

_WIRE_UNSAFE = frozenset("\r\n\x00")


def wire_safe(value: str) -> bool:
    """Whether `value` can be written into a request line or header without injection."""
    return _WIRE_UNSAFE.isdisjoint(value)


def validate(snapshot: Snapshot, *, check_version: bool = False) -> list[str]:
    """The problems that make `snapshot` unfit to run; empty when it is fit.

    `check_version` also requires a non-empty version equal to the content's hash.
    """
    problems = list(_problems(snapshot))
    if check_version and snapshot.version != content_version(snapshot):
        problems.append(f"version {snapshot.version!r} is not the content's hash")
    return problems


def _duplicates(keys: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    twice: set[str] = set()
    for key in keys:
        (twice if key in seen else seen).add(key)
    return sorted(twice)


def _problems(snapshot: Snapshot) -> Iterator[str]:
    for part, items in (("route", snapshot.routes), ("upstream", snapshot.upstreams),
                        ("egress policy", snapshot.egress_policies)):
        for key in _duplicates(item.key for item in items):
            yield f"{part} {key} appears twice"
    for route in snapshot.routes:
        for hostname in route.hostnames:
            if not hostname or not wire_safe(hostname) or " " in hostname:
                yield f"route {route.key}: hostname {hostname!r} is not a host name"
        for rule in route.rules:
            where = f"route {route.key} rule {rule.name or rule.index}"
            # A backend naming no upstream is allowed: it is answered 500 naming the
            # missing upstream, as Gateway API asks of an unresolved backendRef.
            for backend in rule.backends:
                if backend.weight < 0:
                    yield f"{where}: backend {backend.upstream} has a negative weight"
            for match in rule.matches:
                for header in match.headers:
                    if not header.name or not wire_safe(header.name):
                        yield f"{where}: header name {header.name!r} cannot be matched"
            if rule.access is not None:
                yield from (f"{where}: {problem}" for problem in
                            policy_problems(rule.access, wire_safe))
            if rule.session_affinity is not None and not _token(
                    rule.session_affinity.cookie_name):
                yield f"{where}: cookie name {rule.session_affinity.cookie_name!r} is not a token"
            yield from filter_problems(where, rule)
            if rule.cache is not None:
                yield from _cache_problems(where, rule.cache)
            pieces = rule.aggregate.parts if rule.aggregate is not None else ()
            for piece in pieces:
                # The template is filled with percent-encoded values, so what it holds
                # reaches the wire as written: it must be a request target.
                if not piece.path.startswith("/") or not _visible(piece.path):
                    yield f"{where}: aggregate part {piece.name} path {piece.path!r} is not a target"
                if not _token(piece.method) or piece.timeout <= 0:
                    yield f"{where}: aggregate part {piece.name} has a bad method or timeout"
    for policy in snapshot.egress_policies:
        if policy.cache is not None:
            yield from _cache_problems(f"egress policy {policy.key}", policy.cache)
    for upstream in snapshot.upstreams:
        for endpoint in upstream.endpoints:
            if not 0 < endpoint.port < 65536:
                yield f"upstream {upstream.key}: port {endpoint.port} is out of range"
            if endpoint.weight < 0:
                yield f"upstream {upstream.key}: endpoint {endpoint.address} has a negative weight"
            if not endpoint.address or not wire_safe(endpoint.address):
                yield f"upstream {upstream.key}: endpoint address {endpoint.address!r} is invalid"
        check = upstream.health_check
        if check is not None and (not check.path.startswith("/") or not _visible(check.path)):
            yield (f"upstream {upstream.key}: health check path {check.path!r} must start "
                   "with / and hold only visible characters")
        if check is not None and check.grpc_service and not _visible(check.grpc_service):
            yield (f"upstream {upstream.key}: gRPC health check service "
                   f"{check.grpc_service!r} must hold only visible characters")
        if upstream.tls is not None and upstream.tls.sni is not None and not _visible(
                upstream.tls.sni):
            yield f"upstream {upstream.key}: SNI {upstream.tls.sni!r} is not a host name"


def _cache_problems(where: str, cache: Cache) -> Iterator[str]:
    """A cache section's values: names that reach the key, sizes and times."""
    for name in cache.key_headers:
        if not _token(name) or name != name.lower():
            yield f"{where}: cache key header {name!r} is not a lower-case header name"
    for name in cache.key_cookies:
        if not _token(name):
            yield f"{where}: cache key cookie {name!r} is not a token"
    for status in cache.statuses:
        if not 200 <= status <= 599:
            yield f"{where}: cacheable status {status} is not a final status code"
    if cache.max_object_size < 0:
        yield f"{where}: cache maxObjectSize is negative"
    if cache.default_ttl is not None and not cache.default_ttl >= 0:
        yield f"{where}: cache defaultTTL is negative"


def _visible(value: str) -> bool:
    """Visible ASCII only (RFC 9110 VCHAR): what a request-target or a name may hold."""
    return bool(value) and all("!" <= ch <= "~" for ch in value)


_TOKEN_EXTRA = frozenset("!#$%&'*+-.^_`|~")


def _token(value: str) -> bool:
    """An RFC 9110 token: what a header or cookie name may be."""
    return bool(value) and all(ch.isascii() and (ch.isalnum() or ch in _TOKEN_EXTRA)
                               for ch in value)


def filter_problems(where: str, rule: Rule) -> Iterator[str]:
    """What a rule's filters (and its backends') would write that cannot go on the wire."""
    lists = [("filters", rule.filters)] + [
        (f"backend {backend.upstream} filters", backend.filters) for backend in rule.backends]
    for label, filters in lists:
        for item in filters:
            for problem in _one_filter(item):
                yield f"{where}: {label}: {item.type}: {problem}"


_FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive",
                      "upgrade", "te", "trailer", "proxy-connection", "host"})
"""Headers a filter may never write: the proxy frames each message (and sets Host
through URLRewrite); a second Content-Length or Transfer-Encoding would let a request
be read two ways."""


def _one_filter(item: Filter) -> Iterator[str]:
    headers: list[HeaderValue] = []
    names: list[str] = []
    for modifier in (item.request_header_modifier, item.response_header_modifier):
        if modifier is not None:
            headers += [*modifier.set, *modifier.add]
            names += modifier.remove
    if item.direct_response is not None:
        headers += item.direct_response.headers
    for header in headers:
        if not _token(header.name):
            yield f"header name {header.name!r} is not a token"
        if not wire_safe(header.value):
            yield f"header {header.name} value holds CR, LF or NUL"
        elif not header.value.isascii():
            yield f"header {header.name} value is not ASCII"
        try:
            parse_template(header.value)
        except TemplateError as exc:
            yield f"header {header.name}: {exc}"
    for name in names:
        if not _token(name):
            yield f"header name {name!r} is not a token"
    for name in sorted({h.name.lower() for h in headers} & _FRAMING):
        yield f"header {name} is the proxy's to write"
    rewrite, redirect = item.url_rewrite, item.request_redirect
    for hostname in (rewrite.hostname if rewrite else None,
                     redirect.hostname if redirect else None):
        if hostname is not None and not _visible(hostname):
            yield f"hostname {hostname!r} is not a host name"
    for path in (rewrite.path if rewrite else None, redirect.path if redirect else None):
        if path is not None and path.value and not _visible(path.value):
            yield f"path {path.value!r} must hold only visible characters"
    if redirect is not None and redirect.status_code not in (301, 302, 303, 307, 308):
        yield f"status code {redirect.status_code} is not a redirect"
    if item.cors is not None:
        cors = item.cors
        for value in (*cors.allow_origins, *cors.allow_methods, *cors.allow_headers,
                      *cors.expose_headers):
            if not _visible(value):
                yield f"value {value!r} must hold only visible characters"
    if item.direct_response is not None and not 200 <= item.direct_response.status_code <= 599:
        yield f"status code {item.direct_response.status_code} is out of range"

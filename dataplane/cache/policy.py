"""RFC 9111 decisions of a shared cache, pure: bytes and numbers in, decisions out.

Nothing here reads a clock or a socket: times are passed in (seconds since the epoch
for HTTP dates and ages), so every rule is tested without sockets. The engine that
uses these (`exchange`, `store`) does the I/O.

Choices where RFC 9111 leaves room, each on the safe side:
- a qualified `private="field"` or `no-cache="field"` counts as the unqualified
  directive (never store / always revalidate), rather than storing minus fields;
- only GET answers are stored; a HEAD is answered from a stored GET answer;
- an invalid `Expires`, or a malformed `max-age`, means already stale;
- heuristic freshness (10% of the time since `Last-Modified`, at most a day) applies
  only to heuristically cacheable statuses or `public` answers, and only when the
  rule sets no `defaultTTL`; `defaultTTL` replaces the heuristic when set;
- `s-maxage`, `must-revalidate` and `proxy-revalidate` forbid serving stale answers,
  even with `stale-if-error` or `stale-while-revalidate`.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

HEURISTIC_STATUSES = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
HEURISTIC_FRACTION = 0.1
HEURISTIC_CAP = 86400.0
MAX_VARY_FIELDS = 16
"""An answer that varies on more request fields than this is not stored (huge Vary)."""
MAX_VARY_BYTES = 1024
UNLIMITED = float("inf")

HeaderList = Sequence[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class CacheControl:
    """The Cache-Control directives a shared cache acts on (RFC 9111 5.2)."""

    no_store: bool = False
    no_cache: bool = False
    private: bool = False
    public: bool = False
    max_age: float | None = None
    s_maxage: float | None = None
    must_revalidate: bool = False
    proxy_revalidate: bool = False
    stale_while_revalidate: float | None = None
    stale_if_error: float | None = None
    max_stale: float | None = None
    min_fresh: float | None = None
    only_if_cached: bool = False


NO_DIRECTIVES = CacheControl()
_SECONDS_DIRECTIVES = {
    "max-age": "max_age", "s-maxage": "s_maxage", "stale-while-revalidate":
    "stale_while_revalidate", "stale-if-error": "stale_if_error", "max-stale": "max_stale",
    "min-fresh": "min_fresh",
}
_FLAG_DIRECTIVES = {
    "no-store": "no_store", "no-cache": "no_cache", "private": "private", "public": "public",
    "must-revalidate": "must_revalidate", "proxy-revalidate": "proxy_revalidate",
    "only-if-cached": "only_if_cached",
}
_DIRECTIVE = re.compile(r'\s*([^=,\s]+)\s*(?:=\s*("(?:[^"\\]|\\.)*"|[^,]*))?\s*(?:,|$)')


def parse_cache_control(values: Iterable[bytes]) -> CacheControl:
    """The directives of every Cache-Control field value (repeated fields concatenate).

    A seconds directive that does not parse is 0 (stale), a repeated one keeps the
    smaller value; unknown directives are ignored, as RFC 9111 requires.
    """
    fields: dict[str, object] = {}
    for value in values:
        text = value.decode("latin-1")
        for match in _DIRECTIVE.finditer(text):
            name = match.group(1).lower()
            argument = match.group(2)
            if name in _FLAG_DIRECTIVES:
                fields[_FLAG_DIRECTIVES[name]] = True
            elif name in _SECONDS_DIRECTIVES:
                attribute = _SECONDS_DIRECTIVES[name]
                if argument is None:
                    # max-stale without a value: any staleness is acceptable.
                    seconds = UNLIMITED if name == "max-stale" else 0.0
                else:
                    digits = argument.strip().strip('"')
                    seconds = float(int(digits)) if digits.isdigit() else 0.0
                previous = fields.get(attribute)
                if isinstance(previous, float):
                    seconds = min(previous, seconds)
                fields[attribute] = seconds
    if not fields:
        return NO_DIRECTIVES
    return CacheControl(**fields)  # type: ignore[arg-type]


def parse_http_date(value: bytes | None) -> float | None:
    """An HTTP-date as seconds since the epoch; None when absent or invalid."""
    if value is None:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value.decode("latin-1").strip())
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.timestamp()


def parse_age(value: bytes | None) -> float:
    """The Age field in seconds; 0 when absent or invalid."""
    if value is None:
        return 0.0
    text = value.strip()
    return float(int(text)) if text.isdigit() else 0.0


class RequestFields:
    """The request fields a cache reads, found in one pass over the request's fields."""

    __slots__ = ("cache_control", "if_modified_since", "if_none_match", "if_range",
                 "pragma", "range")

    def __init__(self, headers: HeaderList) -> None:
        self.cache_control: list[bytes] = []
        self.pragma: bytes | None = None
        self.if_none_match: bytes | None = None
        self.if_modified_since: bytes | None = None
        self.range: bytes | None = None
        self.if_range: bytes | None = None
        for name, value in headers:
            if len(name) < 5 or name[0] not in b"cCpPiIrR":
                continue  # cheap test first: most fields are none of these
            lower = name.lower()
            if lower == b"cache-control":
                self.cache_control.append(value)
            elif lower == b"pragma":
                self.pragma = value
            elif lower == b"if-none-match":
                self.if_none_match = value
            elif lower == b"if-modified-since":
                self.if_modified_since = value
            elif lower == b"range":
                self.range = value
            elif lower == b"if-range":
                self.if_range = value

    @property
    def conditional(self) -> bool:
        return (self.if_none_match is not None or self.if_modified_since is not None
                or self.range is not None)

    @property
    def pragma_no_cache(self) -> bool:
        return (not self.cache_control and self.pragma is not None
                and b"no-cache" in self.pragma.lower())


def header(headers: HeaderList, name: bytes) -> bytes | None:
    """The first value of `name` (lower case), or None."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def header_values(headers: HeaderList, name: bytes) -> list[bytes]:
    """Every value of `name` (lower case), in order."""
    return [value for key, value in headers if key.lower() == name]


# --------------------------------------------------------------------------- storing


def vary_fields(values: Sequence[bytes]) -> tuple[str, ...] | None:
    """The request fields an answer varies on, lower case and sorted; None for `Vary: *`
    and for a Vary larger than the cache keeps (the answer is then not stored)."""
    names: set[str] = set()
    total = 0
    for value in values:
        total += len(value)
        for part in value.decode("latin-1").split(","):
            name = part.strip().lower()
            if name == "*":
                return None
            if name:
                names.add(name)
    if total > MAX_VARY_BYTES or len(names) > MAX_VARY_FIELDS:
        return None
    return tuple(sorted(names))


def not_storable(
    *,
    method: bytes,
    status: int,
    statuses: frozenset[int],
    request_cc: CacheControl,
    response_cc: CacheControl,
    authorization: bool,
    set_cookie: bool,
    allow_set_cookie: bool,
    vary: Sequence[bytes],
) -> str | None:
    """Why a shared cache must not store this answer (RFC 9111 3), or None when it may."""
    if method != b"GET":
        return "method"
    if status not in statuses:
        return "status"
    if request_cc.no_store or response_cc.no_store:
        return "no-store"
    if response_cc.private:
        return "private"
    if authorization and not (response_cc.public or response_cc.must_revalidate
                              or response_cc.s_maxage is not None):
        return "authorization"
    if set_cookie and not allow_set_cookie:
        return "set-cookie"
    if vary and vary_fields(vary) is None:
        return "vary"
    return None


def freshness_lifetime(
    response_cc: CacheControl,
    *,
    status: int,
    date: float | None,
    expires: bytes | None,
    last_modified: float | None,
    response_time: float,
    default_ttl: float | None,
) -> float:
    """How long an answer is fresh, in seconds (RFC 9111 4.2.1, shared cache)."""
    if response_cc.s_maxage is not None:
        return response_cc.s_maxage
    if response_cc.max_age is not None:
        return response_cc.max_age
    if expires is not None:
        expiry = parse_http_date(expires)
        if expiry is None:
            return 0.0  # an invalid Expires is a time in the past
        return max(0.0, expiry - (date if date is not None else response_time))
    if default_ttl is not None:
        return default_ttl
    if last_modified is not None and (status in HEURISTIC_STATUSES or response_cc.public):
        since = (date if date is not None else response_time) - last_modified
        return min(HEURISTIC_CAP, max(0.0, since * HEURISTIC_FRACTION))
    return 0.0


def initial_age(
    *, age: float, date: float | None, request_time: float, response_time: float
) -> float:
    """corrected_initial_age of RFC 9111 4.2.3: what the answer's age was on arrival."""
    apparent = max(0.0, response_time - date) if date is not None else 0.0
    corrected = age + max(0.0, response_time - request_time)
    return max(apparent, corrected)


def may_serve_stale(response_cc: CacheControl) -> bool:
    """Whether a stale copy of this answer may ever be served (RFC 9111 4.2.4)."""
    return not (response_cc.must_revalidate or response_cc.proxy_revalidate
                or response_cc.s_maxage is not None or response_cc.no_cache)


Verdict = Literal["fresh", "stale-while-revalidate", "revalidate"]


def lookup_verdict(
    response_cc: CacheControl, request_cc: CacheControl, *, age: float, lifetime: float,
    pragma_no_cache: bool = False,
) -> Verdict:
    """What to do with a stored answer for this request: serve it, serve it while a
    background request revalidates it, or revalidate it first."""
    if response_cc.no_cache or request_cc.no_cache or pragma_no_cache:
        return "revalidate"
    if request_cc.max_age is not None and age > request_cc.max_age:
        return "revalidate"
    fresh_for = lifetime - age
    if request_cc.min_fresh is not None and fresh_for < request_cc.min_fresh:
        return "revalidate"
    if fresh_for > 0:
        return "fresh"
    if not may_serve_stale(response_cc):
        return "revalidate"
    staleness = -fresh_for
    if request_cc.max_stale is not None and staleness <= request_cc.max_stale:
        return "fresh"  # the client accepts this much staleness
    window = response_cc.stale_while_revalidate
    if window is not None and staleness <= window:
        return "stale-while-revalidate"
    return "revalidate"


def may_serve_on_error(
    response_cc: CacheControl, request_cc: CacheControl, *, age: float, lifetime: float
) -> bool:
    """Whether a stale answer may stand in for an upstream that failed (RFC 5861)."""
    if not may_serve_stale(response_cc):
        return False
    staleness = age - lifetime
    if staleness <= 0:
        return True
    for window in (request_cc.stale_if_error, response_cc.stale_if_error):
        if window is not None and staleness <= window:
            return True
    return False


# --------------------------------------------------------------------------- keys

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")


def _normal_escape(match: re.Match[bytes]) -> bytes:
    byte = int(match.group(1), 16)
    return bytes((byte,)) if byte in _UNRESERVED else b"%" + match.group(1).upper()


def normalize_path(path: bytes) -> str:
    """The path as RFC 3986 6.2.2 reads it: escapes of unreserved characters decoded,
    other escapes in upper case, dot segments resolved. `%2F` stays `%2F`: it names
    another resource than `/` to most backends."""
    if path.find(b"%") >= 0:  # (find: `b"%" in path` raises a TypeError inside)
        path = _ESCAPE.sub(_normal_escape, path)
    text = path.decode("latin-1")
    if "/." not in text:
        return text or "/"
    out: list[str] = []
    for segment in text.split("/")[1:]:
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    if text.endswith(("/.", "/..")):
        out.append("")
    return "/" + "/".join(out)


def normalize_authority(scheme: str, host: str) -> str:
    """The host as the key reads it: lower case, no final dot, no default port."""
    host = host.lower()
    if host.startswith("["):
        end = host.find("]") + 1
        name, port = host[:end], host[end + 1:] if host[end:end + 1] == ":" else ""
    else:
        name, _, port = host.partition(":")
    name = name.removesuffix(".")
    if port and port != ("443" if scheme == "https" else "80"):
        return name + ":" + port
    return name


_AUTHORITIES: dict[tuple[str, str], str] = {}


def url_key(scheme: str, host: str, target: bytes) -> str:
    """The URL part of a cache key, and what purges match: `scheme://host/path?query`."""
    authority = _AUTHORITIES.get((scheme, host))
    if authority is None:
        if len(_AUTHORITIES) > 4096:
            _AUTHORITIES.clear()  # bounded: distinct Host values are few in practice
        authority = _AUTHORITIES[(scheme, host)] = normalize_authority(scheme, host)
    if target.find(b"%") < 0 and target.find(b"/.") < 0:  # (see normalize_path)
        return f"{scheme}://{authority}{target.decode('latin-1')}"
    path, mark, query = target.partition(b"?")
    url = f"{scheme}://{authority}{normalize_path(path)}"
    return url + "?" + query.decode("latin-1") if mark else url


def url_of(text: str) -> str | None:
    """A URL as a purge or an invalidation names it, in the form of `url_key`."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    return url_key(parts.scheme, parts.netloc.rpartition("@")[2], target.encode("latin-1"))


def cookie_values(cookie: bytes | None, names: Sequence[str]) -> list[str]:
    """The values of the named cookies ("" for a missing one), in the order named."""
    found: dict[str, str] = {}
    if cookie is not None:
        for pair in cookie.decode("latin-1").split(";"):
            name, _, value = pair.strip().partition("=")
            found.setdefault(name, value)
    return [found.get(name, "") for name in names]


def field_value(headers: HeaderList, name: str) -> str:
    """A request field as a key part: every value joined, whitespace normalised."""
    wanted = name.encode("latin-1")
    parts = [" ".join(part.split()) for key, value in headers if key.lower() == wanted
             for part in value.decode("latin-1").split(",")]
    return ", ".join(part for part in parts if part)


def variant_of(fields: Sequence[str], headers: HeaderList) -> tuple[str, ...]:
    """The request's values of the fields an answer varies on: one stored variant."""
    return tuple(field_value(headers, name) for name in fields)


# --------------------------------------------------------------------------- validation


def _etags(value: bytes) -> list[bytes]:
    return [tag.strip().removeprefix(b"W/") for tag in value.split(b",") if tag.strip()]


def not_modified(
    *, if_none_match: bytes | None, if_modified_since: bytes | None, etag: bytes | None,
    last_modified: bytes | None,
) -> bool:
    """Whether a client's conditional GET is answered 304 by a stored answer (RFC 9110
    13.2.2: If-None-Match, weak comparison, takes precedence over If-Modified-Since)."""
    if if_none_match is not None:
        if if_none_match.strip() == b"*":
            return True
        if etag is None:
            return False
        return etag.strip().removeprefix(b"W/") in _etags(if_none_match)
    if if_modified_since is not None and last_modified is not None:
        since = parse_http_date(if_modified_since)
        modified = parse_http_date(last_modified)
        return since is not None and modified is not None and modified <= since
    return False


CONDITIONAL_FIELDS = frozenset({b"if-none-match", b"if-modified-since", b"if-match",
                                b"if-unmodified-since", b"if-range", b"range"})
"""Request fields a cache replaces with its own when it fetches or revalidates."""


def revalidation_fields(etag: bytes | None, last_modified: bytes | None) -> list[tuple[bytes, bytes]]:
    """The conditional fields that ask the origin whether a stored answer still holds."""
    fields = []
    if etag is not None:
        fields.append((b"If-None-Match", etag))
    if last_modified is not None:
        fields.append((b"If-Modified-Since", last_modified))
    return fields


_NOT_UPDATED = frozenset({b"content-length", b"content-encoding", b"content-range",
                          b"transfer-encoding", b"age"})


def merge_not_modified(stored: HeaderList, fresh: HeaderList) -> list[tuple[bytes, bytes]]:
    """A stored answer's fields updated by a 304's (RFC 9111 3.2): the 304's fields
    replace those of the same name, framing fields excepted."""
    replaced = {name.lower() for name, _ in fresh if name.lower() not in _NOT_UPDATED}
    merged = [(name, value) for name, value in stored if name.lower() not in replaced]
    merged += [(name, value) for name, value in fresh if name.lower() in replaced]
    return merged


# --------------------------------------------------------------------------- invalidation

UNSAFE_METHODS = frozenset({b"POST", b"PUT", b"DELETE", b"PATCH"})


def invalidated_urls(
    *, method: bytes, status: int, request_url: str, location: bytes | None,
    content_location: bytes | None,
) -> list[str]:
    """The URLs whose stored answers an unsafe request's answer invalidates (RFC 9111
    4.4): its own, and Location / Content-Location on the same origin."""
    if method not in UNSAFE_METHODS or not 200 <= status < 400:
        return []
    urls = [request_url]
    origin = request_url.split("/", 3)
    base = "/".join(origin[:3])
    for value in (location, content_location):
        if value is None:
            continue
        text = value.decode("latin-1").strip()
        if text.startswith("/") and not text.startswith("//"):
            text = base + text
        url = url_of(text)
        if url is not None and url.split("/", 3)[:3] == origin[:3] and url not in urls:
            urls.append(url)
    return urls


# --------------------------------------------------------------------------- ranges

ByteRange = tuple[int, int]
"""First and last byte positions, inclusive."""


def byte_range(value: bytes, length: int) -> ByteRange | Literal["unsatisfiable"] | None:
    """One `bytes=` range of a body of `length` bytes; None to ignore the field (not one
    valid range: the full answer is sent), "unsatisfiable" for a 416."""
    text = value.decode("latin-1").strip()
    unit, eq, spec = text.partition("=")
    if not eq or unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    if not first:
        if not last.isdigit():
            return None
        suffix = int(last)
        if suffix == 0 or length == 0:
            return "unsatisfiable"
        return (max(0, length - suffix), length - 1)
    if not first.isdigit() or (last and not last.isdigit()):
        return None
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= length:
        return "unsatisfiable"
    end = int(last) if last else length - 1
    return (start, min(end, length - 1))


def if_range_holds(if_range: bytes | None, etag: bytes | None, last_modified: bytes | None) -> bool:
    """Whether a Range applies under its If-Range (RFC 9110 13.1.5: strong comparison)."""
    if if_range is None:
        return True
    value = if_range.strip()
    if value.startswith((b'"', b"W/")):
        return etag is not None and not value.startswith(b"W/") and value == etag.strip()
    return last_modified is not None and value == last_modified.strip()

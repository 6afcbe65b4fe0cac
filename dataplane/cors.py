"""CORS (the Fetch standard's CORS protocol), as Gateway API's HTTPCORSFilter describes it.

Pure: a compiled policy answers two questions. Is this a preflight (`OPTIONS` with
`Origin` and `Access-Control-Request-Method`)? Then the proxy answers it itself, 204,
and the backend never sees it. Otherwise, which headers go on the answer? A request
from an origin the policy does not allow gets no CORS header at all (the browser then
refuses the answer to the page); `*` is never sent when credentials are allowed: the
origin is echoed instead, with `Vary: Origin` so caches keep the answers apart.

Origins are compared as the browser sends them (`scheme://host[:port]`, case-folded);
an allowed `https://*.example.com` admits any subdomain of example.com over https,
not example.com itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from kanal.contract.snapshot import CORS

Headers = list[tuple[bytes, bytes]]

ANSWER_HEADERS = frozenset({
    b"access-control-allow-origin", b"access-control-allow-credentials",
    b"access-control-expose-headers", b"access-control-allow-methods",
    b"access-control-allow-headers", b"access-control-max-age",
})
"""CORS headers a backend may send; the policy's decision replaces them."""


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    """A CORS filter compiled once per Snapshot."""

    any_origin: bool
    exact: frozenset[str]
    suffixes: tuple[tuple[str, str], ...]  # (scheme "://", ".example.com")
    methods: bytes
    any_method: bool
    method_set: frozenset[str]
    headers: bytes
    expose: bytes
    credentials: bool
    max_age: bytes

    @classmethod
    def compile(cls, spec: CORS) -> CorsPolicy:
        exact: set[str] = set()
        suffixes: list[tuple[str, str]] = []
        for origin in spec.allow_origins:
            origin = origin.lower().rstrip("/")
            if origin == "*":
                continue
            scheme, sep, host = origin.partition("://")
            if sep and host.startswith("*."):
                suffixes.append((scheme + "://", host[1:]))
            else:
                exact.add(origin)
        methods = tuple(m.upper() for m in spec.allow_methods)
        return cls(
            any_origin="*" in spec.allow_origins,
            exact=frozenset(exact),
            suffixes=tuple(suffixes),
            methods=", ".join(methods).encode("latin-1"),
            any_method="*" in methods,
            method_set=frozenset(methods),
            headers=", ".join(spec.allow_headers).encode("latin-1"),
            expose=", ".join(spec.expose_headers).encode("latin-1"),
            credentials=spec.allow_credentials,
            max_age=str(spec.max_age).encode(),
        )

    def allows(self, origin: str) -> bool:
        """Whether a request from `origin` may read the answer."""
        if self.any_origin:
            return True
        origin = origin.lower()
        if origin in self.exact:
            return True
        for scheme, suffix in self.suffixes:
            if origin.startswith(scheme):
                host = origin[len(scheme):]
                name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
                if name.endswith(suffix) and len(name) > len(suffix):
                    return True
        return False

    def _origin_headers(self, origin: bytes) -> Headers:
        if self.any_origin and not self.credentials:
            return [(b"Access-Control-Allow-Origin", b"*")]
        headers = [(b"Access-Control-Allow-Origin", origin), (b"Vary", b"Origin")]
        if self.credentials:
            headers.append((b"Access-Control-Allow-Credentials", b"true"))
        return headers

    def preflight(self, origin: bytes, method: bytes, request_headers: bytes | None) -> Headers:
        """The headers of the proxy's 204 answer to a preflight (empty: not allowed)."""
        text = origin.decode("latin-1")
        if not self.allows(text):
            return []
        wanted = method.decode("latin-1").strip()
        if not (self.any_method or wanted in self.method_set):
            return []
        headers = self._origin_headers(origin)
        if self.any_method and self.credentials:
            allowed = method  # `*` is not a wildcard for requests with credentials
        else:
            allowed = self.methods
        if allowed:
            headers.append((b"Access-Control-Allow-Methods", allowed))
        allow_headers = self.headers
        if allow_headers == b"*" and (self.credentials or request_headers is None):
            allow_headers = request_headers or b""
        if allow_headers:
            headers.append((b"Access-Control-Allow-Headers", allow_headers))
        headers.append((b"Access-Control-Max-Age", self.max_age))
        return headers

    def answer_headers(self, origin: bytes) -> Headers:
        """The CORS headers of an actual answer to `origin` (empty: not allowed)."""
        if not self.allows(origin.decode("latin-1")):
            return []
        headers = self._origin_headers(origin)
        if self.expose:
            headers.append((b"Access-Control-Expose-Headers", self.expose))
        return headers


def without_cors(headers: Headers) -> Headers:
    """A backend's headers without its own CORS answer headers."""
    return [(name, value) for name, value in headers if name.lower() not in ANSWER_HEADERS]

"""A rule's `filters`, compiled once per Snapshot into a request stage and a response stage.

Pure: no sockets, no clock. `RuleFilters.build` turns a rule's filter list (and its
backends' lists) into precompiled steps, hung on the rule's `Selection`; a rule with no
filters gets None, and the proxy pays one attribute test for it.

At request time the proxy calls `begin` after route selection. The request steps run
in the order written, on the parsed request itself: header changes, URL rewrites, and
the filters that answer in the proxy's name (RequestRedirect, DirectResponse, a CORS
preflight), which end the chain with an `OwnAnswer`. What concerns the answer (the
ResponseHeaderModifiers, CORS headers, compression) is kept in the `Exchange` and
applied when the backend's head arrives (`Exchange.response_head`), and to the proxy's
own answers too.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from kanal.contract.snapshot import (
    Compression,
    DirectResponse,
    Filter,
    HeaderModifier,
    HeaderValue,
    RequestMirror,
    RequestRedirect,
    Route,
    Rule,
    URLRewrite,
)
from kanal.contract.templates import Part, parse_template
from kanal.dataplane import compress
from kanal.dataplane.cors import CorsPolicy, without_cors
from kanal.dataplane.http1 import status_line
from kanal.dataplane.rewrite import PathRewriter, redirect_location, split_host_port

Headers = list[tuple[bytes, bytes]]


class RequestView(Protocol):
    """What the filters read and change of a parsed request (the proxy's `Request`)."""

    method: bytes
    target: bytes
    host: bytes | None
    headers: list[tuple[bytes, bytes]]


@dataclass(slots=True)
class OwnAnswer:
    """An answer the proxy gives itself: a redirect, a direct response, a preflight."""

    status: int
    reason: str
    headers: Headers
    body: bytes = b""
    preflight: bool = False
    """A CORS preflight answer: its CORS headers are final."""

    def encode(self, *, keep_alive: bool, head_only: bool) -> bytes:
        """The whole answer on the wire (HEAD: the head alone)."""
        lines = [status_line(self.status)]
        lines += [name + b": " + value for name, value in self.headers]
        if self.status not in (204, 304) and not 100 <= self.status < 200:
            lines.append(b"Content-Length: %d" % len(self.body))
        lines.append(b"Connection: keep-alive" if keep_alive else b"Connection: close")
        head = b"\r\n".join(lines) + b"\r\n\r\n"
        return head if head_only or self.status in (204, 304) else head + self.body


class BodyCopy(Protocol):
    """A request's copy for RequestMirror, fed the body as it arrives (dataplane/mirror.py)."""

    def feed(self, chunk: bytes) -> None: ...

    def complete(self) -> None: ...


class _Values:
    """The variables' values for one request, each computed when first used (a fresh
    request id costs a random draw: only a request whose filters use it pays it)."""

    __slots__ = ("_new_id", "_peer", "_request", "_request_id", "_route")

    def __init__(self, request: RequestView, route: str, peer: str,
                 new_id: Callable[[], str]) -> None:
        self._request = request
        self._route = route
        self._peer = peer
        self._new_id = new_id
        self._request_id: str | None = None

    def value(self, name: str) -> str:
        if name == "client_address":
            return self._peer
        if name == "route_name":
            return self._route
        if name == "host":
            host = self._request.host
            return split_host_port(host.decode("latin-1"))[0] if host is not None else ""
        request_id = self._request_id
        if request_id is None:
            for header, text in self._request.headers:
                if header.lower() == b"x-request-id":
                    request_id = text.decode("latin-1")
                    break
            else:
                request_id = self._new_id()
            self._request_id = request_id
        return request_id


def _template(value: str) -> tuple[Part, ...] | bytes:
    """A value's parts, or its bytes when it has no variable (the common case)."""
    parts = parse_template(value)
    if all(not variable for _, variable in parts):
        return "".join(text for text, _ in parts).encode("latin-1")
    return parts


def _render(value: tuple[Part, ...] | bytes, values: _Values) -> bytes:
    if isinstance(value, bytes):
        return value
    return "".join(values.value(text) if variable else text
                   for text, variable in value).encode("latin-1")


class HeaderOps:
    """A HeaderModifier: remove, then set (replacing every copy), then add.

    `add` appends its value to the header's list as Gateway API's example writes it
    (`my-header: foo` plus `bar` is `my-header: foo,bar`), or adds the header when the
    message has none. `Set-Cookie`, which cannot be joined (RFC 9110 5.3), gets a line
    of its own.
    """

    __slots__ = ("add", "drop", "set")

    def __init__(self, spec: HeaderModifier) -> None:
        self.drop = frozenset(
            [name.lower().encode("latin-1") for name in spec.remove]
            + [h.name.lower().encode("latin-1") for h in spec.set])
        self.set = tuple((h.name.encode("latin-1"), _template(h.value)) for h in spec.set)
        self.add = tuple((h.name.encode("latin-1"), h.name.lower().encode("latin-1"),
                          _template(h.value)) for h in spec.add)

    def apply(self, headers: Headers, values: _Values) -> Headers:
        drop = self.drop
        out = [pair for pair in headers if pair[0].lower() not in drop] if drop else headers
        for name, value in self.set:
            out.append((name, _render(value, values)))
        for name, lower, value in self.add:
            rendered = _render(value, values)
            if lower != b"set-cookie":
                for index in range(len(out) - 1, -1, -1):
                    if out[index][0].lower() == lower:
                        out[index] = (out[index][0], out[index][1] + b"," + rendered)
                        break
                else:
                    out.append((name, rendered))
            else:
                out.append((name, rendered))
        return out


class _Step(Protocol):
    def run(self, request: RequestView, exchange: Exchange) -> OwnAnswer | None: ...


class _RequestHeaders:
    __slots__ = ("ops",)

    def __init__(self, spec: HeaderModifier) -> None:
        self.ops = HeaderOps(spec)

    def run(self, request: RequestView, exchange: Exchange) -> OwnAnswer | None:
        request.headers = self.ops.apply(list(request.headers), exchange.values)
        return None


class _Rewrite:
    __slots__ = ("hostname", "path")

    def __init__(self, spec: URLRewrite, rule: Rule) -> None:
        self.hostname = spec.hostname.encode("latin-1") if spec.hostname else None
        self.path = PathRewriter(spec.path, rule) if spec.path is not None else None

    def run(self, request: RequestView, exchange: Exchange) -> OwnAnswer | None:
        hostname = self.hostname
        if hostname is not None:
            # The Host the backend reads changes; request.host stays the client's,
            # so X-Forwarded-Host still says what the client asked for.
            request.headers = [pair for pair in request.headers if pair[0].lower() != b"host"]
            request.headers.append((b"Host", hostname))
            if request.host is None:  # an HTTP/1.0 request without Host: this is its Host
                request.host = hostname
        if self.path is not None:
            path, sep, query = request.target.partition(b"?")
            new_path = self.path.rewrite(path.decode("latin-1")).encode("latin-1")
            request.target = new_path + sep + query
        return None


class _Redirect:
    __slots__ = ("path", "spec")

    def __init__(self, spec: RequestRedirect, rule: Rule) -> None:
        self.spec = spec
        self.path = PathRewriter(spec.path, rule) if spec.path is not None else None

    def run(self, request: RequestView, exchange: Exchange) -> OwnAnswer | None:
        spec = self.spec
        path, _, query = request.target.decode("latin-1").partition("?")
        if self.path is not None:
            path = self.path.rewrite(path)
        host = request.host.decode("latin-1") if request.host is not None else ""
        location = redirect_location(
            request_scheme=exchange.scheme, request_host=host, path=path,
            query=query if spec.keep_query else "", scheme=spec.scheme,
            hostname=spec.hostname, port=spec.port)
        return OwnAnswer(spec.status_code, f"redirect to {location}",
                         [(b"Location", location.encode("latin-1"))])


class _Direct:
    __slots__ = ("body", "headers", "status", "typed")

    def __init__(self, spec: DirectResponse) -> None:
        self.status = spec.status_code
        self.headers = tuple((h.name.encode("latin-1"), _template(h.value))
                             for h in spec.headers)
        self.typed = any(h.name.lower() == "content-type" for h in spec.headers)
        self.body = spec.body.encode("utf-8")

    def run(self, request: RequestView, exchange: Exchange) -> OwnAnswer | None:
        headers = [(name, _render(value, exchange.values)) for name, value in self.headers]
        if not self.typed and self.body:
            headers.insert(0, (b"Content-Type", b"text/plain; charset=utf-8"))
        return OwnAnswer(self.status, "direct response", headers, self.body)


class _Preflight:
    __slots__ = ("policy",)

    def __init__(self, policy: CorsPolicy) -> None:
        self.policy = policy

    def run(self, request: RequestView, exchange: Exchange) -> OwnAnswer | None:
        if request.method != b"OPTIONS" or exchange.origin is None:
            return None
        wanted = requested_headers = None
        for name, value in request.headers:
            lower = name.lower()
            if lower == b"access-control-request-method":
                wanted = value
            elif lower == b"access-control-request-headers":
                requested_headers = value
        if wanted is None:
            return None  # an OPTIONS request of the application's own
        headers = self.policy.preflight(exchange.origin, wanted, requested_headers)
        return OwnAnswer(204, "CORS preflight", headers, preflight=True)


class _Mirror:
    __slots__ = ("spec",)

    def __init__(self, spec: RequestMirror) -> None:
        self.spec = spec

    def run(self, request: RequestView, exchange: Exchange) -> OwnAnswer | None:
        spec = self.spec
        if spec.percent >= 100 or exchange.rng.random() * 100 < spec.percent:
            exchange.mirrors.append(spec)
        return None


@dataclass(frozen=True, slots=True)
class CompressionPolicy:
    algorithms: tuple[str, ...]
    content_types: frozenset[str]
    min_size: int

    @classmethod
    def compile(cls, spec: Compression) -> CompressionPolicy:
        return cls(tuple(spec.algorithms), frozenset(t.lower() for t in spec.content_types),
                   spec.min_size)


@dataclass(slots=True)
class _Stage:
    """The steps of one filter list (a rule's, or a backend's)."""

    steps: list[_Step] = field(default_factory=list)
    response: list[HeaderOps] = field(default_factory=list)
    cors: CorsPolicy | None = None
    compression: CompressionPolicy | None = None
    order: list[tuple[str, _Step | None]] = field(default_factory=list)
    """Every filter in the order written, with its request step if it has one."""


def _stage(filters: tuple[Filter, ...], rule: Rule) -> _Stage:
    stage = _Stage()
    for item in filters:
        count = len(stage.steps)
        if item.request_header_modifier is not None:
            stage.steps.append(_RequestHeaders(item.request_header_modifier))
        elif item.response_header_modifier is not None:
            stage.response.append(HeaderOps(item.response_header_modifier))
        elif item.url_rewrite is not None:
            stage.steps.append(_Rewrite(item.url_rewrite, rule))
        elif item.request_redirect is not None:
            stage.steps.append(_Redirect(item.request_redirect, rule))
        elif item.direct_response is not None:
            stage.steps.append(_Direct(item.direct_response))
        elif item.cors is not None:
            stage.cors = CorsPolicy.compile(item.cors)
            stage.steps.append(_Preflight(stage.cors))
        elif item.request_mirror is not None:
            stage.steps.append(_Mirror(item.request_mirror))
        elif item.compression is not None:
            stage.compression = CompressionPolicy.compile(item.compression)
        else:
            raise ValueError(f"filter {item.type} carries no settings")
        stage.order.append((item.type, stage.steps[-1] if len(stage.steps) > count else None))
    return stage


class RuleFilters:
    """The filters of one rule and of its backends, compiled."""

    __slots__ = ("backends", "new_id", "reads_answer_headers", "rng", "route_key", "rule_stage")

    def __init__(self, route_key: str, rule_stage: _Stage, backends: dict[str, _Stage],
                 rng: random.Random, new_id: Callable[[], str]) -> None:
        self.route_key = route_key
        self.rule_stage = rule_stage
        # CORS and compression read Origin, Accept-Encoding and Range: only then are
        # the request's headers scanned for them.
        self.reads_answer_headers = (rule_stage.cors is not None
                                     or rule_stage.compression is not None)
        self.backends = backends
        self.rng = rng
        self.new_id = new_id

    @classmethod
    def build(cls, route: Route, rule: Rule, *, rng: random.Random | None = None,
              new_id: Callable[[], str] | None = None,
              compress_all: bool = False) -> RuleFilters | None:
        """The compiled filters of `rule`, or None when neither it nor a backend has any.

        `compress_all` (the listener's --compression) gives a rule without a Compression
        filter one with the defaults.
        """
        if (not rule.filters and not compress_all
                and not any(backend.filters for backend in rule.backends)):
            return None
        backends = {backend.upstream: _stage(backend.filters, rule)
                    for backend in rule.backends if backend.filters}
        stage = _stage(rule.filters, rule)
        if compress_all and stage.compression is None:
            stage.compression = CompressionPolicy.compile(Compression())
        return cls(route.key, stage, backends,
                   rng or random.Random(), new_id or (lambda: uuid.uuid4().hex))

    def explain(self, *, method: str, host: str, target: str, headers: Mapping[str, str],
                scheme: str) -> dict[str, Any]:
        """What the filters would do to a request, as /explain shows it.

        The filters that would run, in order (an answer ends them), the answer if one
        is given, else the request as the backend would get it: method, Host, path and
        the headers that change (per backend where backends have filters of their own).
        """
        request = _ExplainedRequest(method.encode("latin-1"), target.encode("latin-1"),
                                    host.encode("latin-1") if host else None,
                                    [(name.encode("latin-1"), value.encode("latin-1"))
                                     for name, value in headers.items() if name != "host"])
        before = list(request.headers)
        exchange = Exchange(self, request, scheme, "(client address)")
        exchange.values = _Values(request, self.route_key, "(client address)",
                                  lambda: "(a fresh id)")
        ran: list[str] = []
        for name, step in self.rule_stage.order:
            ran.append(name)
            answer = step.run(request, exchange) if step is not None else None
            if answer is not None:
                answer = exchange.own_answer(answer)
                return {"filters": ran, "answer": {
                    "status": answer.status, "reason": answer.reason,
                    "headers": _texts(answer.headers)}, "request": None}
        if self.rule_stage.compression is not None and "Compression" not in ran:
            ran.append("Compression (--compression)")
        result: dict[str, Any] = {"filters": ran, "answer": None,
                                  "request": _rewritten(request, before, host)}
        backends: dict[str, Any] = {}
        for upstream, stage in self.backends.items():
            copy = _ExplainedRequest(request.method, request.target, request.host,
                                     list(request.headers))
            for _, step in stage.order:
                if step is not None:
                    step.run(copy, exchange)
            backends[upstream] = {"filters": [name for name, _ in stage.order],
                                  "request": _rewritten(copy, before, host)}
        if backends:
            result["backends"] = backends
        return result

    def begin(self, request: RequestView, *, scheme: str, peer: str) -> Exchange:
        """Run the rule's request steps; the exchange's `answer` is set if one answered."""
        exchange = Exchange(self, request, scheme, peer)
        for step in self.rule_stage.steps:
            answer = step.run(request, exchange)
            if answer is not None:
                exchange.answer = exchange.own_answer(answer)
                break
        return exchange

    def backend_chosen(self, exchange: Exchange, request: RequestView, upstream: str) -> None:
        """Run the chosen backend's own filters (HTTPRoute's backendRef filters)."""
        stage = self.backends.get(upstream)
        if stage is None:
            return
        exchange.backend_stage = stage
        for step in stage.steps:
            step.run(request, exchange)


@dataclass(slots=True)
class _ExplainedRequest:
    method: bytes
    target: bytes
    host: bytes | None
    headers: list[tuple[bytes, bytes]]


def _texts(headers: Headers) -> list[list[str]]:
    return [[name.decode("latin-1"), value.decode("latin-1")] for name, value in headers]


def _rewritten(request: _ExplainedRequest, before: Headers, host: str) -> dict[str, Any]:
    """The request as the backend would get it, and the headers that changed."""
    after = request.headers
    new_host = next((value.decode("latin-1") for name, value in after
                     if name.lower() == b"host"), host)
    old = {name.lower() for name, _ in before}
    now = {name.lower() for name, _ in after}
    path, _, query = request.target.decode("latin-1").partition("?")
    return {
        "method": request.method.decode("latin-1"),
        "host": new_host,
        "path": path,
        "query": query,
        "headers_added": _texts([pair for pair in after
                                 if pair not in before and pair[0].lower() != b"host"]),
        "headers_removed": sorted(name.decode("latin-1") for name in old - now),
    }


class Exchange:
    """What the filters keep of one request until its answer."""

    __slots__ = ("accept_encoding", "answer", "backend_stage", "copy", "filters", "mirrors",
                 "origin", "ranged", "rng", "scheme", "values")

    def __init__(self, filters: RuleFilters, request: RequestView, scheme: str,
                 peer: str) -> None:
        self.filters = filters
        self.scheme = scheme
        self.rng = filters.rng
        self.values = _Values(request, filters.route_key, peer, filters.new_id)
        self.answer: OwnAnswer | None = None
        self.backend_stage: _Stage | None = None
        self.mirrors: list[RequestMirror] = []
        self.copy: BodyCopy | None = None
        self.origin: bytes | None = None
        self.accept_encoding: bytes | None = None
        self.ranged = False
        if not filters.reads_answer_headers:
            return
        for name, value in request.headers:
            lower = name.lower()
            if lower == b"origin":
                self.origin = value
            elif lower == b"accept-encoding":
                self.accept_encoding = (value if self.accept_encoding is None
                                        else self.accept_encoding + b", " + value)
            elif lower == b"range":
                self.ranged = True

    def part_headers(self, headers: Headers) -> Headers:
        """An aggregate part's own request headers with the rule's RequestHeaderModifiers
        applied (in order), as they apply to a backend's request."""
        for step in self.filters.rule_stage.steps:
            if isinstance(step, _RequestHeaders):
                headers = step.ops.apply(list(headers), self.values)
        return headers

    def _response_ops(self) -> list[HeaderOps]:
        ops = self.filters.rule_stage.response
        if self.backend_stage is not None and self.backend_stage.response:
            ops = ops + self.backend_stage.response
        return ops

    def own_answer(self, answer: OwnAnswer) -> OwnAnswer:
        """The proxy's own answer with the response header changes and CORS applied."""
        answer.headers = self._finish(answer.headers, cors=not answer.preflight)
        return answer

    def _finish(self, headers: Headers, *, cors: bool = True) -> Headers:
        policy = self.filters.rule_stage.cors
        if policy is not None and cors:
            headers = without_cors(headers)
            if self.origin is not None:
                headers = headers + policy.answer_headers(self.origin)
        for ops in self._response_ops():
            headers = ops.apply(list(headers), self.values)
        return headers

    def response_head(self, status: int, headers: Headers, content_length: bytes | None,
                      *, no_body: bool, chunked_ok: bool
                      ) -> tuple[Headers, bytes | None, compress.Encoder | None]:
        """The backend's head as the client gets it: (headers, Content-Length, encoder).

        With an encoder, the answer's length is unknown: the caller frames it chunked.
        """
        headers = self._finish(headers)
        policy = self.filters.rule_stage.compression
        if policy is None or not chunked_ok:
            return headers, content_length, None
        found: dict[bytes, bytes] = {}
        for name, value in headers:
            lower = name.lower()
            if lower in _COMPRESSION_FIELDS:
                found[lower] = value if lower not in found else found[lower] + b", " + value
        coding = compress.choose_coding(
            None if self.accept_encoding is None else self.accept_encoding.decode("latin-1"),
            policy.algorithms)
        varied = _with_vary(headers) if _varies(status, no_body) else headers
        if coding is None or not compress.should_compress(
                status=status, no_body=no_body, ranged=self.ranged,
                content_type=found.get(b"content-type"),
                content_encoding=found.get(b"content-encoding"),
                cache_control=found.get(b"cache-control"), content_length=content_length,
                content_types=policy.content_types, min_size=policy.min_size):
            return varied, content_length, None
        out = [(name, _weak_etag(value) if name.lower() == b"etag" else value)
               for name, value in varied]
        out.append((b"Content-Encoding", coding.encode()))
        return out, None, compress.make_encoder(coding)


_COMPRESSION_FIELDS = frozenset({b"content-type", b"content-encoding", b"cache-control"})


def _varies(status: int, no_body: bool) -> bool:
    return not no_body and status not in (204, 304, 206)


def _with_vary(headers: Headers) -> Headers:
    """`Vary: Accept-Encoding` added (once) to an answer whose coding depends on it."""
    for name, value in headers:
        if name.lower() == b"vary" and (b"accept-encoding" in value.lower() or value.strip() == b"*"):
            return headers
    return [*headers, (b"Vary", b"Accept-Encoding")]


def _weak_etag(value: bytes) -> bytes:
    """A compressed answer's bytes differ from the original's: a strong ETag becomes weak."""
    return value if value.startswith(b"W/") else b"W/" + value


def header_value(spec: HeaderValue) -> tuple[bytes, tuple[Part, ...] | bytes]:
    """A configured header as the filters keep it (for tests and /explain)."""
    return spec.name.encode("latin-1"), _template(spec.value)

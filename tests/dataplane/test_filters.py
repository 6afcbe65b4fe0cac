"""Route filters without sockets: header changes, rewrites, redirects, direct answers.

The compiled filters (dataplane/filters.py) work on the parsed request the proxy hands
them; here that is a plain object, so each rule of Gateway API's HTTPRoute filters is
checked on its own, exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from kanal.contract.snapshot import (
    CORS,
    Backend,
    DirectResponse,
    Filter,
    HeaderModifier,
    HeaderValue,
    Match,
    PathMatch,
    PathModifier,
    RequestRedirect,
    Route,
    Rule,
    URLRewrite,
)
from kanal.contract.templates import TemplateError, parse_template
from kanal.dataplane.filters import RuleFilters
from kanal.dataplane.rewrite import redirect_location, replace_prefix


@dataclass
class Req:
    method: bytes = b"GET"
    target: bytes = b"/"
    host: bytes | None = b"shop.example.com:8080"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


def compiled(*filters: Filter, matches: tuple[Match, ...] = (Match(),),
             backends: tuple[Backend, ...] = (Backend("shop/app"),)) -> RuleFilters:
    rule = Rule(index=0, matches=matches, backends=backends, filters=filters)
    built = RuleFilters.build(Route("shop/web", rules=(rule,)), rule, rng=random.Random(1),
                              new_id=lambda: "fresh-id")
    assert built is not None
    return built


def names(headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(n.decode(), v.decode()) for n, v in headers]


def test_a_rule_without_filters_compiles_to_nothing() -> None:
    rule = Rule(index=0, backends=(Backend("shop/app"),))
    assert RuleFilters.build(Route("shop/web", rules=(rule,)), rule) is None


def test_request_headers_remove_then_set_then_add_with_variables() -> None:
    modifier = HeaderModifier(
        set=(HeaderValue("X-Env", "prod"), HeaderValue("X-Client", "${client_address}")),
        add=(HeaderValue("X-Trace", "${request_id}/${route_name}/${host}/$$1"),),
        remove=("X-Secret",))
    filters = compiled(Filter("RequestHeaderModifier", request_header_modifier=modifier))
    request = Req(headers=[(b"X-Env", b"dev"), (b"x-env", b"qa"), (b"X-Secret", b"s"),
                           (b"X-Request-Id", b"abc"), (b"X-Trace", b"first")])
    exchange = filters.begin(request, scheme="http", peer="10.0.0.7")
    assert exchange.answer is None
    # `add` joins the existing list as Gateway API's example writes it: `foo,bar`.
    assert names(request.headers) == [
        ("X-Request-Id", "abc"), ("X-Trace", "first,abc/shop/web/shop.example.com/$1"),
        ("X-Env", "prod"), ("X-Client", "10.0.0.7")]


def test_request_id_is_made_up_when_the_request_has_none() -> None:
    modifier = HeaderModifier(set=(HeaderValue("X-Id", "${request_id}"),))
    filters = compiled(Filter("RequestHeaderModifier", request_header_modifier=modifier))
    request = Req()
    filters.begin(request, scheme="http", peer="1.2.3.4")
    assert names(request.headers) == [("X-Id", "fresh-id")]


def test_unknown_and_unterminated_variables_are_refused() -> None:
    with pytest.raises(TemplateError, match=r"unknown variable \$\{client_ip\}"):
        parse_template("${client_ip}")
    with pytest.raises(TemplateError, match="unterminated"):
        parse_template("a${host")
    assert parse_template("$1 $$ ${host}") == (("$1 $ ", False), ("host", True))


def test_response_headers_are_changed_on_the_backends_answer() -> None:
    modifier = HeaderModifier(set=(HeaderValue("Server", "kanal"),), remove=("X-Powered-By",),
                              add=(HeaderValue("Set-Cookie", "b=2"),))
    filters = compiled(Filter("ResponseHeaderModifier", response_header_modifier=modifier))
    exchange = filters.begin(Req(), scheme="http", peer="1.2.3.4")
    headers, length, encoder = exchange.response_head(
        200, [(b"Server", b"gunicorn"), (b"X-Powered-By", b"php"), (b"Set-Cookie", b"a=1")],
        b"10", no_body=False, chunked_ok=True)
    assert names(headers) == [("Set-Cookie", "a=1"), ("Server", "kanal"), ("Set-Cookie", "b=2")]
    assert (length, encoder) == (b"10", None)


@pytest.mark.parametrize(("path", "prefix", "replacement", "expected"), [
    # Gateway API's table for ReplacePrefixMatch
    ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
    ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
    ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
    ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
    ("/foo", "/foo", "/xyz", "/xyz"),
    ("/foo/", "/foo", "/xyz", "/xyz/"),
    ("/foo/bar", "/foo", "", "/bar"),
    ("/foo/", "/foo", "", "/"),
    ("/foo", "/foo", "", "/"),
    ("/foo/", "/foo", "/", "/"),
    ("/foo", "/foo", "/", "/"),
    ("/foobar", "/foo", "/xyz", None),  # not under the prefix: whole segments only
])
def test_replace_prefix_match_is_segment_safe(path: str, prefix: str, replacement: str,
                                              expected: str | None) -> None:
    assert replace_prefix(path, prefix, replacement) == expected


def test_url_rewrite_changes_host_header_and_path_and_keeps_the_query() -> None:
    rewrite = URLRewrite(hostname="internal.svc",
                         path=PathModifier("ReplacePrefixMatch", "/v2"))
    filters = compiled(Filter("URLRewrite", url_rewrite=rewrite),
                       matches=(Match(PathMatch("PathPrefix", "/api")),
                                Match(PathMatch("PathPrefix", "/api/v1"))))
    request = Req(target=b"/api/v1/users?x=1", headers=[(b"Host", b"shop.example.com:8080")])
    filters.begin(request, scheme="http", peer="1.2.3.4")
    assert request.target == b"/v2/users?x=1"  # the longest prefix that matched
    assert names(request.headers) == [("Host", "internal.svc")]
    assert request.host == b"shop.example.com:8080"  # X-Forwarded-Host stays the client's


def test_replace_full_path_and_regex_with_groups() -> None:
    full = compiled(Filter("URLRewrite", url_rewrite=URLRewrite(
        path=PathModifier("ReplaceFullPath", "/index.html"))))
    request = Req(target=b"/anything/at/all?q")
    full.begin(request, scheme="http", peer="")
    assert request.target == b"/index.html?q"
    regex = compiled(
        Filter("URLRewrite", url_rewrite=URLRewrite(
            path=PathModifier("ReplaceRegexMatch", r"/u/\g<id>/\1"))),
        matches=(Match(PathMatch("RegularExpression", r"/users/(?P<id>\d+)/profile")),))
    request = Req(target=b"/users/42/profile")
    regex.begin(request, scheme="http", peer="")
    assert request.target == b"/u/42/42"


@pytest.mark.parametrize(("redirect", "host", "target", "location"), [
    (RequestRedirect(scheme="https", status_code=301), "shop.example.com:8080", "/a?b=1",
     "https://shop.example.com/a?b=1"),  # a scheme brings its well-known port
    (RequestRedirect(hostname="new.example.com"), "shop.example.com:8080", "/a",
     "http://new.example.com:8080/a"),  # no scheme: the port the client used
    (RequestRedirect(port=443, scheme="https"), "shop.example.com", "/", "https://shop.example.com/"),
    (RequestRedirect(port=8443, scheme="https"), "shop.example.com", "/", "https://shop.example.com:8443/"),
    (RequestRedirect(path=PathModifier("ReplaceFullPath", "/new"), keep_query=False),
     "shop.example.com", "/old?x=1", "http://shop.example.com/new"),
    (RequestRedirect(path=PathModifier("ReplacePrefixMatch", "/docs")), "shop.example.com",
     "/help/faq?x=1", "http://shop.example.com/docs/faq?x=1"),
])
def test_redirect_location(redirect: RequestRedirect, host: str, target: str, location: str) -> None:
    filters = compiled(Filter("RequestRedirect", request_redirect=redirect),
                       matches=(Match(PathMatch("PathPrefix", "/help")),))
    exchange = filters.begin(Req(target=target.encode(), host=host.encode()), scheme="http",
                             peer="")
    assert exchange.answer is not None
    assert exchange.answer.status == redirect.status_code
    assert names(exchange.answer.headers) == [("Location", location)]


def test_redirect_of_an_ipv6_host() -> None:
    assert redirect_location(request_scheme="http", request_host="[::1]:8080", path="/",
                             query="", scheme="https", hostname=None, port=None) == "https://[::1]/"


def test_direct_response_answers_with_its_headers_and_body_and_response_changes() -> None:
    filters = compiled(
        Filter("ResponseHeaderModifier", response_header_modifier=HeaderModifier(
            set=(HeaderValue("X-Served-By", "${route_name}"),))),
        Filter("DirectResponse", direct_response=DirectResponse(
            503, (HeaderValue("Retry-After", "120"),), "down for maintenance\n")))
    exchange = filters.begin(Req(), scheme="http", peer="")
    answer = exchange.answer
    assert answer is not None
    wire = answer.encode(keep_alive=True, head_only=False)
    assert wire == (b"HTTP/1.1 503 Service Unavailable\r\n"
                    b"Content-Type: text/plain; charset=utf-8\r\nRetry-After: 120\r\n"
                    b"X-Served-By: shop/web\r\nContent-Length: 21\r\n"
                    b"Connection: keep-alive\r\n\r\ndown for maintenance\n")
    assert answer.encode(keep_alive=False, head_only=True).endswith(b"Connection: close\r\n\r\n")


def test_steps_run_in_order_and_an_answer_ends_the_chain() -> None:
    filters = compiled(
        Filter("RequestHeaderModifier", request_header_modifier=HeaderModifier(
            add=(HeaderValue("X-A", "1"),))),
        Filter("DirectResponse", direct_response=DirectResponse(200, (), "ok")),
        Filter("RequestHeaderModifier", request_header_modifier=HeaderModifier(
            add=(HeaderValue("X-B", "2"),))))
    request = Req()
    exchange = filters.begin(request, scheme="http", peer="")
    assert exchange.answer is not None and names(request.headers) == [("X-A", "1")]


def test_backend_filters_run_only_for_their_backend() -> None:
    backend = Backend("shop/v2", filters=(Filter("RequestHeaderModifier",
                                                 request_header_modifier=HeaderModifier(
                                                     set=(HeaderValue("X-Version", "2"),))),))
    filters = compiled(backends=(Backend("shop/v1"), backend))
    request = Req()
    exchange = filters.begin(request, scheme="http", peer="")
    filters.backend_chosen(exchange, request, "shop/v1")
    assert request.headers == []
    filters.backend_chosen(exchange, request, "shop/v2")
    assert names(request.headers) == [("X-Version", "2")]


def cors_filters(**settings: object) -> RuleFilters:
    spec = CORS(**{"allow_origins": ("https://app.example.com", "https://*.shop.test"),
                   "allow_methods": ("GET", "PUT"), "allow_headers": ("X-Token",),
                   "expose_headers": ("X-Total",), "max_age": 600, **settings})  # type: ignore[arg-type]
    return compiled(Filter("CORS", cors=spec))


def preflight(filters: RuleFilters, origin: bytes, method: bytes = b"PUT"):  # type: ignore[no-untyped-def]
    request = Req(method=b"OPTIONS", headers=[
        (b"Origin", origin), (b"Access-Control-Request-Method", method),
        (b"Access-Control-Request-Headers", b"x-token")])
    return filters.begin(request, scheme="http", peer="").answer


def test_cors_preflight_from_an_allowed_origin_is_answered_by_the_proxy() -> None:
    answer = preflight(cors_filters(), b"https://app.example.com")
    assert answer is not None and answer.status == 204
    assert names(answer.headers) == [
        ("Access-Control-Allow-Origin", "https://app.example.com"), ("Vary", "Origin"),
        ("Access-Control-Allow-Methods", "GET, PUT"), ("Access-Control-Allow-Headers", "X-Token"),
        ("Access-Control-Max-Age", "600")]


@pytest.mark.parametrize("origin", [b"https://evil.example", b"http://app.example.com",
                                    b"https://shop.test", b"https://a.shop.test.evil"])
def test_cors_preflight_from_another_origin_gets_no_cors_headers(origin: bytes) -> None:
    answer = preflight(cors_filters(), origin)
    assert answer is not None and answer.status == 204 and answer.headers == []


def test_cors_wildcard_subdomain_and_disallowed_method() -> None:
    answer = preflight(cors_filters(), b"https://a.b.shop.test")
    assert answer is not None and answer.headers[0] == (b"Access-Control-Allow-Origin",
                                                       b"https://a.b.shop.test")
    answer = preflight(cors_filters(), b"https://app.example.com", b"DELETE")
    assert answer is not None and answer.headers == []


def test_cors_never_sends_a_star_with_credentials() -> None:
    filters = cors_filters(allow_origins=("*",), allow_credentials=True)
    exchange = filters.begin(Req(headers=[(b"Origin", b"https://x.test")]), scheme="http",
                             peer="")
    headers, _, _ = exchange.response_head(200, [(b"Access-Control-Allow-Origin", b"*")],
                                           None, no_body=False, chunked_ok=True)
    assert names(headers) == [
        ("Access-Control-Allow-Origin", "https://x.test"), ("Vary", "Origin"),
        ("Access-Control-Allow-Credentials", "true"), ("Access-Control-Expose-Headers", "X-Total")]
    without = cors_filters(allow_origins=("*",))
    exchange = without.begin(Req(headers=[(b"Origin", b"https://x.test")]), scheme="http",
                             peer="")
    headers, _, _ = exchange.response_head(200, [], None, no_body=False, chunked_ok=True)
    assert names(headers)[0] == ("Access-Control-Allow-Origin", "*")


def test_cors_answer_to_a_disallowed_origin_drops_the_backends_cors_headers() -> None:
    exchange = cors_filters().begin(Req(headers=[(b"Origin", b"https://evil.example")]),
                                    scheme="http", peer="")
    headers, _, _ = exchange.response_head(
        200, [(b"Access-Control-Allow-Origin", b"*"), (b"X-Total", b"3")], None,
        no_body=False, chunked_ok=True)
    assert names(headers) == [("X-Total", "3")]


def test_an_applications_own_options_request_is_not_a_preflight() -> None:
    request = Req(method=b"OPTIONS", headers=[(b"Origin", b"https://app.example.com")])
    assert cors_filters().begin(request, scheme="http", peer="").answer is None


def test_mirror_percent_samples_requests() -> None:
    from kanal.contract.snapshot import RequestMirror

    filters = compiled(Filter("RequestMirror", request_mirror=RequestMirror("shop/shadow", 25)),
                       Filter("RequestMirror", request_mirror=RequestMirror("shop/all")))
    picked = [[m.upstream for m in filters.begin(Req(), scheme="http", peer="").mirrors]
              for _ in range(400)]
    assert all("shop/all" in p for p in picked)
    shadowed = sum("shop/shadow" in p for p in picked)
    assert 60 < shadowed < 140  # 25% of 400, seeded

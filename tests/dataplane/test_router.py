"""The route table: Gateway API matching and precedence, explain, and robustness."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kanal.dataplane
from kanal.contract.snapshot import (
    Backend,
    Match,
    PathMatch,
    Route,
    Rule,
    SessionAffinity,
    Snapshot,
    ValueMatch,
)
from kanal.dataplane import router as router_module
from kanal.dataplane.router import RouteTable, normalize_host, normalize_path, path_views


def prefix(value: str, **kwargs: object) -> Match:
    return Match(PathMatch("PathPrefix", value), **kwargs)  # type: ignore[arg-type]


def exact(value: str, **kwargs: object) -> Match:
    return Match(PathMatch("Exact", value), **kwargs)  # type: ignore[arg-type]


def regex(value: str, **kwargs: object) -> Match:
    return Match(PathMatch("RegularExpression", value), **kwargs)  # type: ignore[arg-type]


def route(key: str, *rules: tuple[Match, ...], hostnames: tuple[str, ...] = ()) -> Route:
    """A route whose rule i has the given matches and one backend named `key#i`."""
    return Route(
        key,
        hostnames=hostnames,
        rules=tuple(
            Rule(i, matches=matches, backends=(Backend(f"{key}#{i}"),))
            for i, matches in enumerate(rules)
        ),
    )


def table(*routes: Route) -> RouteTable:
    return RouteTable.build(Snapshot(routes=routes))


def hit(
    t: RouteTable,
    path: str = "/",
    host: str = "shop.example.com",
    method: str = "GET",
    query: str = "",
    headers: Mapping[str, str] | None = None,
) -> str | None:
    """`route#rule` of the match, or None."""
    selection = t.match(host, method, path, query, headers or {})
    return None if selection is None else f"{selection.route_key}#{selection.rule.index}"


# -- build ----------------------------------------------------------------------------


def test_only_routes_of_the_gateway() -> None:
    snapshot = Snapshot(
        routes=(
            Route("a/ingress", rules=(Rule(0),)),
            Route("a/mesh", gateways=("mesh",), rules=(Rule(0),)),
            Route("a/both", gateways=("ingress", "mesh"), rules=(Rule(0),)),
        ),
        version="v1",
    )
    ingress = RouteTable.build(snapshot)
    mesh = RouteTable.build(snapshot, gateway="mesh")
    assert [r.key for r in ingress.routes] == ["a/ingress", "a/both"]
    assert [r.key for r in mesh.routes] == ["a/mesh", "a/both"]
    assert ingress.version == "v1"


def test_selection_holds_route_rule_and_a_shared_split() -> None:
    rule = Rule(0, backends=(Backend("u/a", 95), Backend("u/b", 5)))
    t = RouteTable.build(Snapshot(routes=(Route("ns/r", rules=(rule,)),)))
    first = t.match("x", "GET", "/", "", {})
    second = t.match("y", "GET", "/z", "", {})
    assert first is not None and first is second  # no allocation per request
    assert (first.route_key, first.rule, first.route.key) == ("ns/r", rule, "ns/r")
    assert first.split.backends == rule.backends


def test_rule_without_matches_takes_everything() -> None:
    t = RouteTable.build(Snapshot(routes=(Route("ns/r", rules=(Rule(0, matches=()),)),)))
    assert hit(t, "/anything") == "ns/r#0"


def test_invalid_regex_names_route_and_rule() -> None:
    with pytest.raises(ValueError, match=r"ns/bad rule 0: invalid path regular expression"):
        table(route("ns/bad", (regex("/(unclosed"),)))
    with pytest.raises(ValueError, match=r"invalid header regular expression"):
        table(route("ns/bad", (prefix("/", headers=(ValueMatch("x", "[", "RegularExpression"),)),)))


# -- hostnames ------------------------------------------------------------------------


def test_exact_hostname() -> None:
    t = table(route("ns/shop", (prefix("/"),), hostnames=("shop.example.com",)))
    assert hit(t, host="shop.example.com") == "ns/shop#0"
    assert hit(t, host="other.example.com") is None


def test_host_with_port_and_upper_case() -> None:
    t = table(route("ns/shop", (prefix("/"),), hostnames=("shop.example.com",)))
    assert hit(t, host="SHOP.Example.COM:8443") == "ns/shop#0"
    assert hit(t, host="shop.example.com.") == "ns/shop#0"  # fully qualified
    assert normalize_host("[::1]:8080") == "[::1]"
    assert normalize_host("") == ""


def test_wildcard_matches_subdomains_at_any_depth_but_not_the_apex() -> None:
    t = table(route("ns/wild", (prefix("/"),), hostnames=("*.example.com",)))
    assert hit(t, host="a.example.com") == "ns/wild#0"
    assert hit(t, host="a.b.c.example.com:80") == "ns/wild#0"
    assert hit(t, host="A.EXAMPLE.COM") == "ns/wild#0"
    assert hit(t, host="example.com") is None
    assert hit(t, host="badexample.com") is None


def test_empty_hostnames_match_any_host() -> None:
    t = table(route("ns/any", (prefix("/"),)))
    assert hit(t, host="whatever") == "ns/any#0"
    assert hit(t, host="") == "ns/any#0"


def test_exact_hostname_beats_wildcard_beats_any_host() -> None:
    t = table(
        route("ns/any", (prefix("/"),)),
        route("ns/wild", (prefix("/"),), hostnames=("*.example.com",)),
        route("ns/exact", (prefix("/"),), hostnames=("shop.example.com",)),
    )
    assert hit(t, host="shop.example.com") == "ns/exact#0"
    assert hit(t, host="blog.example.com") == "ns/wild#0"
    assert hit(t, host="example.org") == "ns/any#0"


def test_longer_wildcard_beats_shorter() -> None:
    t = table(
        route("ns/short", (prefix("/"),), hostnames=("*.example.com",)),
        route("ns/long", (prefix("/"),), hostnames=("*.eu.example.com",)),
    )
    assert hit(t, host="shop.eu.example.com") == "ns/long#0"
    assert hit(t, host="x.shop.eu.example.com") == "ns/long#0"
    assert hit(t, host="eu.example.com") == "ns/short#0"


def test_hostname_specificity_comes_before_path_precedence() -> None:
    t = table(
        route("ns/any", (exact("/api/orders"),)),
        route("ns/exact", (prefix("/"),), hostnames=("shop.example.com",)),
    )
    assert hit(t, "/api/orders") == "ns/exact#0"
    assert hit(t, "/api/orders", host="other") == "ns/any#0"


def test_falls_through_hostname_levels() -> None:
    t = table(
        route("ns/any", (prefix("/"),)),
        route("ns/wild", (prefix("/blog"),), hostnames=("*.example.com",)),
        route("ns/exact", (prefix("/api"),), hostnames=("shop.example.com",)),
    )
    assert hit(t, "/api/x") == "ns/exact#0"
    assert hit(t, "/blog/1") == "ns/wild#0"
    assert hit(t, "/other") == "ns/any#0"


def test_route_listing_both_exact_and_wildcard() -> None:
    t = table(
        route("ns/both", (prefix("/"),), hostnames=("shop.example.com", "*.example.com")),
        route("ns/other", (prefix("/"),), hostnames=("*.example.com",)),
    )
    assert hit(t, host="shop.example.com") == "ns/both#0"
    assert hit(t, host="blog.example.com") == "ns/both#0"  # listed earlier
    candidates = t.explain("shop.example.com", "GET", "/", "", {})["candidates"]
    assert [(c["route"], c["hostname"]) for c in candidates] == [
        ("ns/both", "shop.example.com"),
        ("ns/other", "*.example.com"),
    ]  # listed once, at its best level


# -- paths ----------------------------------------------------------------------------


def test_path_prefix_matches_on_segment_boundaries() -> None:
    t = table(route("ns/api", (prefix("/api"),)))
    assert hit(t, "/api") == "ns/api#0"
    assert hit(t, "/api/") == "ns/api#0"
    assert hit(t, "/api/x/y") == "ns/api#0"
    assert hit(t, "/apix") is None
    assert hit(t, "/") is None


def test_trailing_slash_in_prefix_is_ignored() -> None:
    t = table(route("ns/api", (prefix("/api/"),)))
    assert hit(t, "/api") == "ns/api#0"
    assert hit(t, "/api/x") == "ns/api#0"
    assert hit(t, "/apix") is None


def test_slash_prefix_matches_everything() -> None:
    t = table(route("ns/all", (prefix("/"),)))
    for path in ("/", "/x", "/x/y?", "*", "", "/%2F", "/../.."):
        assert hit(t, path) == "ns/all#0", path


def test_exact_is_exact() -> None:
    t = table(route("ns/e", (exact("/healthz"),)))
    assert hit(t, "/healthz") == "ns/e#0"
    assert hit(t, "/healthz/") is None
    assert hit(t, "/healthz/x") is None
    assert hit(t, "/Healthz") is None


def test_regular_expression_is_a_full_match() -> None:
    t = table(route("ns/re", (regex(r"/users/\d+"),)))
    assert hit(t, "/users/42") == "ns/re#0"
    assert hit(t, "/users/42/orders") is None
    assert hit(t, "/x/users/42") is None


def test_encoded_slash_cannot_escape_a_prefix() -> None:
    t = table(
        route("ns/public", (prefix("/public"),)),
        route("ns/admin", (prefix("/admin", headers=(ValueMatch("x-admin", "yes"),)),)),
        route("ns/catchall", (prefix("/"),)),
    )
    # decoded, these leave /public: never taken by the /public rule
    for path in (
        "/public/..%2Fadmin",
        "/public/..%2fadmin",
        "/public/%2e%2e/admin",
        "/public/.%2E/admin",
        "/public/..%5Cadmin",
        "/public/..\\admin",
        "/public//../admin",
    ):
        assert hit(t, path) == "ns/catchall#0", path
    # as sent, this one is under /admin: not taken by /public either
    assert hit(t, "/admin/..%2Fpublic/x") == "ns/catchall#0"
    # a literal dot segment is resolved before matching
    assert hit(t, "/admin/../public/x") == "ns/public#0"
    assert hit(t, "/public/../admin", headers={"x-admin": "yes"}) == "ns/admin#0"
    # escapes that stay inside the prefix keep matching
    assert hit(t, "/public/a%2Fb") == "ns/public#0"
    assert hit(t, "/public/%7Euser/caf%C3%A9") == "ns/public#0"
    assert hit(t, "/public/.well-known/x") == "ns/public#0"
    # no double decoding
    assert hit(t, "/public/..%252Fadmin") == "ns/public#0"


def test_path_views() -> None:
    assert path_views("/a/b") == ("/a/b", "/a/b")
    assert path_views("/a/../b/./c/..") == ("/b/", "/b/")
    assert path_views("/a/..%2Fb") == ("/a/..%2Fb", "/b")
    assert normalize_path("/%61%62%2Fc%20d") == "/ab/c%20d"
    assert normalize_path("/../../x") == "/x"
    assert normalize_path("//a///b") == "/a/b"


def test_encoded_prefix_value_matches_its_encoding() -> None:
    t = table(route("ns/enc", (prefix("/caf%C3%A9"),)))
    assert hit(t, "/caf%C3%A9/menu") == "ns/enc#0"
    assert hit(t, "/caf%c3%a9/menu") is None  # as sent, escapes differ in case


# -- conditions -----------------------------------------------------------------------


def test_method_is_exact() -> None:
    t = table(route("ns/m", (prefix("/", method="POST"),)))
    assert hit(t, method="POST") == "ns/m#0"
    assert hit(t, method="GET") is None


def test_header_exact_is_case_sensitive_in_value() -> None:
    t = table(route("ns/h", (prefix("/", headers=(ValueMatch("x-canary", "true"),)),)))
    assert hit(t, headers={"x-canary": "true"}) == "ns/h#0"
    assert hit(t, headers={"x-canary": "True"}) is None
    assert hit(t, headers={}) is None


def test_header_names_in_matches_are_lower_cased() -> None:
    t = table(route("ns/h", (prefix("/", headers=(ValueMatch("X-Canary", "1"),)),)))
    assert hit(t, headers={"x-canary": "1"}) == "ns/h#0"


def test_header_regular_expression() -> None:
    m = prefix("/", headers=(ValueMatch("user-agent", r".*Mobile.*", "RegularExpression"),))
    t = table(route("ns/h", (m,)))
    assert hit(t, headers={"user-agent": "Foo Mobile Bar"}) == "ns/h#0"
    assert hit(t, headers={"user-agent": "Desktop"}) is None


class MultiHeaders(Mapping[str, str]):
    """A stand-in for aiohttp's multidict: `get` gives the first value, `getall` all."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self.items_ = items

    def __getitem__(self, name: str) -> str:
        for key, value in self.items_:
            if key == name:
                return value
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(dict(self.items_))

    def __len__(self) -> int:
        return len(dict(self.items_))

    def getall(self, name: str, default: object = ()) -> list[str]:
        return [value for key, value in self.items_ if key == name] or default  # type: ignore[return-value]


def test_repeated_headers_are_checked_when_the_mapping_can_list_them() -> None:
    t = table(route("ns/h", (prefix("/", headers=(ValueMatch("x-tag", "b"),)),)))
    assert hit(t, headers=MultiHeaders([("x-tag", "a"), ("x-tag", "b")])) == "ns/h#0"
    assert hit(t, headers={"x-tag": "a"}) is None


def test_query_params_exact_and_regex_on_first_value() -> None:
    m = prefix(
        "/",
        query_params=(
            ValueMatch("beta", "1"),
            ValueMatch("v", r"[0-9]+", "RegularExpression"),
        ),
    )
    t = table(route("ns/q", (m,)))
    assert hit(t, query="beta=1&v=42") == "ns/q#0"
    assert hit(t, query="v=42&beta=1&beta=2") == "ns/q#0"
    assert hit(t, query="beta=2&beta=1&v=42") is None  # first value only
    assert hit(t, query="Beta=1&v=42") is None  # names are case-sensitive
    assert hit(t, query="beta=1&v=4x") is None
    assert hit(t, query="beta=%31&v=42") == "ns/q#0"  # values are decoded


def router_source() -> ModuleType:
    """The router run from its source, whatever the build: compiled, `match` calls
    `_parse_query` directly, and a patched module attribute would go unseen."""
    path = Path(str(kanal.dataplane.__file__)).with_name("router.py")  # (the package's own
    # __init__.py is never compiled; a compiled module's __file__ may name the shared library)
    spec = importlib.util.spec_from_file_location("kanal_router_from_source", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def test_query_is_parsed_only_when_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    source = router_source()
    real = source._parse_query

    def counting(query: str) -> dict[str, str]:
        calls.append(query)
        return real(query)  # type: ignore[no-any-return]

    monkeypatch.setattr(source, "_parse_query", counting)
    t = source.RouteTable.build(Snapshot(routes=(
        route("ns/q", (prefix("/q", query_params=(ValueMatch("a", "1"),)),)),
        route("ns/all", (prefix("/"),)),
    )))
    assert hit(t, "/x", query="a=1") == "ns/all#0"
    assert calls == []
    assert hit(t, "/q", query="a=1") == "ns/q#0"
    assert calls == ["a=1"]


# -- precedence within a hostname level (one test per rule of api.md) ------------------


def test_exact_path_beats_prefix() -> None:
    t = table(route("ns/p", (prefix("/api"),)), route("ns/e", (exact("/api"),)))
    assert hit(t, "/api") == "ns/e#0"
    assert hit(t, "/api/x") == "ns/p#0"


def test_longer_prefix_beats_shorter() -> None:
    t = table(route("ns/short", (prefix("/api"),)), route("ns/long", (prefix("/api/v2"),)))
    assert hit(t, "/api/v2/x") == "ns/long#0"
    assert hit(t, "/api/v1/x") == "ns/short#0"


def test_prefix_beats_regular_expression() -> None:
    t = table(route("ns/re", (regex("/api/.*"),)), route("ns/p", (prefix("/"),)))
    assert hit(t, "/api/x") == "ns/p#0"  # even the shortest prefix


def test_regular_expressions_keep_route_order() -> None:
    t = table(route("ns/first", (regex("/a.*"),)), route("ns/second", (regex("/ab.*"),)))
    assert hit(t, "/abc") == "ns/first#0"


def test_match_with_method_beats_one_without() -> None:
    t = table(route("ns/any", (prefix("/api"),)), route("ns/get", (prefix("/api", method="GET"),)))
    assert hit(t, "/api", method="GET") == "ns/get#0"
    assert hit(t, "/api", method="POST") == "ns/any#0"


def test_more_header_matches_win() -> None:
    one = prefix("/", headers=(ValueMatch("a", "1"),))
    two = prefix("/", headers=(ValueMatch("a", "1"), ValueMatch("b", "2")))
    t = table(route("ns/one", (one,)), route("ns/two", (two,)))
    assert hit(t, headers={"a": "1", "b": "2"}) == "ns/two#0"
    assert hit(t, headers={"a": "1"}) == "ns/one#0"


def test_more_query_matches_win() -> None:
    one = prefix("/", query_params=(ValueMatch("a", "1"),))
    two = prefix("/", query_params=(ValueMatch("a", "1"), ValueMatch("b", "2")))
    t = table(route("ns/one", (one,)), route("ns/two", (two,)))
    assert hit(t, query="a=1&b=2") == "ns/two#0"
    assert hit(t, query="a=1") == "ns/one#0"


def test_headers_outrank_query_params() -> None:
    by_header = prefix("/", headers=(ValueMatch("a", "1"),))
    by_query = prefix("/", query_params=(ValueMatch("a", "1"), ValueMatch("b", "1")))
    t = table(route("ns/q", (by_query,)), route("ns/h", (by_header,)))
    assert hit(t, query="a=1&b=1", headers={"a": "1"}) == "ns/h#0"


def test_path_outranks_method_and_headers() -> None:
    specific = prefix("/api", method="GET", headers=(ValueMatch("a", "1"),))
    t = table(route("ns/conds", (specific,)), route("ns/longer", (prefix("/api/v1"),)))
    assert hit(t, "/api/v1", headers={"a": "1"}) == "ns/longer#0"


def test_ties_go_to_the_route_listed_earlier() -> None:
    t = table(route("ns/older", (prefix("/api"),)), route("ns/newer", (prefix("/api"),)))
    assert hit(t, "/api") == "ns/older#0"


def test_ties_then_go_to_the_earlier_rule() -> None:
    t = table(route("ns/r", (prefix("/api"),), (prefix("/api"),)))
    assert hit(t, "/api") == "ns/r#0"


def test_ties_then_go_to_the_earlier_match() -> None:
    t = table(route("ns/r", (prefix("/api"), prefix("/api/"))))
    assert t.explain("h", "GET", "/api", "", {})["rule"] == {"index": 0, "name": None, "match": 0}


def test_precedence_is_per_match_not_per_rule() -> None:
    # rule 0 has a short prefix, rule 1 a long one: the long one wins for its paths
    t = table(route("ns/r", (prefix("/"),), (prefix("/api"),)))
    assert hit(t, "/api/x") == "ns/r#1"
    assert hit(t, "/web") == "ns/r#0"


def test_fall_through_to_lower_precedence_rules() -> None:
    canary = prefix("/api", method="GET", headers=(ValueMatch("x-canary", "true"),))
    t = table(
        route("ns/shop", (canary,), (prefix("/api"),), hostnames=("shop.example.com",)),
        route("ns/default", (prefix("/"),)),
    )
    assert hit(t, "/api/x", headers={"x-canary": "true"}) == "ns/shop#0"
    assert hit(t, "/api/x", headers={"x-canary": "false"}) == "ns/shop#1"
    assert hit(t, "/web") == "ns/default#0"
    assert hit(t, "/web", host="elsewhere") == "ns/default#0"


def test_nothing_matches_gives_none() -> None:
    t = table(route("ns/api", (prefix("/api"),), hostnames=("shop.example.com",)))
    assert hit(t, "/web") is None
    assert hit(t, "/api", host="other") is None
    assert table().match("h", "GET", "/", "", {}) is None


def test_host_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(router_module, "_HOST_CACHE_SIZE", 8)
    t = table(route("ns/all", (prefix("/"),)))
    for i in range(100):
        assert hit(t, host=f"h{i}") == "ns/all#0"
    assert len(t._cache) <= 8


# -- explain ---------------------------------------------------------------------------


def explain_table() -> RouteTable:
    canary = Rule(
        0,
        name="canary-by-header",
        matches=(prefix("/api", method="GET", headers=(ValueMatch("x-canary", "true"),)),),
        backends=(Backend("shop/orders-v2"),),
    )
    main = Rule(
        1,
        matches=(prefix("/api"),),
        backends=(Backend("shop/orders-v1", 95), Backend("shop/orders-v2", 5)),
        session_affinity=SessionAffinity("kanal-affinity", 3600.0),
    )
    return table(
        Route("shop/shop", hostnames=("shop.example.com",), rules=(canary, main)),
        route("shop/web", (prefix("/web"),)),
        route("blog/blog", (prefix("/"),), hostnames=("blog.example.com", "*.blog.example.com")),
    )


def test_explain_names_the_choice_and_its_backends() -> None:
    out = explain_table().explain("shop.example.com", "POST", "/api/orders", "", {})
    assert out["matched"] is True
    assert out["route"] == "shop/shop"
    assert out["rule"] == {"index": 1, "name": None, "match": 0}
    assert out["backends"] == [
        {"upstream": "shop/orders-v1", "weight": 95, "share": 0.95},
        {"upstream": "shop/orders-v2", "weight": 5, "share": 0.05},
    ]
    assert out["session_affinity"] == {"cookie": "kanal-affinity", "ttl": 3600.0}
    json.dumps(out)  # JSON-able


def test_explain_says_why_each_other_rule_did_not_match() -> None:
    out = explain_table().explain("shop.example.com", "POST", "/api/orders", "", {})
    by_rule = {(c["route"], c["rule"]): c for c in out["candidates"]}
    canary = by_rule[("shop/shop", 0)]
    assert canary["name"] == "canary-by-header"
    assert canary["result"] == "no match"
    assert canary["reasons"] == ["method POST != GET", "header x-canary: missing"]
    assert by_rule[("shop/shop", 1)]["result"] == "chosen"
    assert by_rule[("shop/web", 0)]["reasons"] == [
        "path /api/orders does not match PathPrefix /web"
    ]
    assert by_rule[("blog/blog", 0)]["reasons"] == [
        "hostname shop.example.com not in [blog.example.com, *.blog.example.com]"
    ]
    order = [(c["route"], c["rule"]) for c in out["candidates"]]
    assert order == [("shop/shop", 0), ("shop/shop", 1), ("shop/web", 0), ("blog/blog", 0)]


def test_explain_reports_losing_on_precedence() -> None:
    out = explain_table().explain("shop.example.com", "GET", "/api", "", {"x-canary": "true"})
    assert out["rule"]["name"] == "canary-by-header"
    lost = [c for c in out["candidates"] if c["result"] == "lost on precedence"]
    assert [(c["route"], c["rule"]) for c in lost] == [("shop/shop", 1)]
    assert lost[0]["reasons"] == [
        "lost on precedence to shop/shop rule 0 (canary-by-header) match 0"
    ]


def test_explain_wrong_header_value_and_query() -> None:
    m = prefix(
        "/", headers=(ValueMatch("x-canary", "true"),), query_params=(ValueMatch("beta", "1"),)
    )
    out = table(route("ns/r", (m,))).explain("h", "GET", "/", "beta=2", {"x-canary": "no"})
    assert out["matched"] is False and out["route"] is None and out["backends"] == []
    assert out["candidates"][0]["reasons"] == [
        "header x-canary: 'no' not == 'true'",
        "query beta: '2' not == '1'",
    ]


def test_explain_shows_both_readings_of_an_ambiguous_path() -> None:
    out = table(route("ns/p", (prefix("/public"),))).explain("h", "GET", "/public/..%2Fx", "", {})
    assert out["candidates"][0]["reasons"] == [
        "path /public/..%2Fx (decoded /x) does not match PathPrefix /public"
    ]


# -- properties -------------------------------------------------------------------------

HOSTS = st.one_of(
    st.sampled_from(["shop.example.com", "a.b.example.com", "example.com", "blog.example.com"]),
    st.text(max_size=40),
)
PATHS = st.one_of(
    st.sampled_from(["/", "/api", "/api/", "/apix", "/web/1", "/public/..%2Fapi", "/users/7"]),
    st.text(max_size=60),
    st.text(alphabet="/.%2Fe5cC\\ap", max_size=30),
)
QUERIES = st.one_of(
    st.sampled_from(["", "beta=1", "beta=2&beta=1", "a=%zz&&="]), st.text(max_size=30)
)
HEADERS = st.dictionaries(
    st.sampled_from(["x-canary", "x-user", "accept"]),
    st.one_of(st.sampled_from(["true", "1"]), st.text(max_size=10)),
    max_size=3,
)
METHODS = st.sampled_from(["GET", "POST", "get", ""])


def property_table() -> RouteTable:
    return table(
        route(
            "ns/shop",
            (prefix("/api", method="GET", headers=(ValueMatch("x-canary", "true"),)),),
            (prefix("/api", query_params=(ValueMatch("beta", "1"),)), exact("/")),
            (regex(r"/users/\d+"),),
            hostnames=("shop.example.com", "*.example.com"),
        ),
        route("ns/web", (prefix("/web"),), hostnames=("*.b.example.com",)),
        route("ns/any", (prefix("/public"), prefix("/api/", method="POST"))),
    )


PROPERTY_TABLE = property_table()


@settings(max_examples=300, deadline=None)
@given(host=HOSTS, method=METHODS, path=PATHS, query=QUERIES, headers=HEADERS)
def test_router_never_raises_and_explain_agrees_with_match(
    host: str, method: str, path: str, query: str, headers: dict[str, str]
) -> None:
    selection = PROPERTY_TABLE.match(host, method, path, query, headers)
    out = PROPERTY_TABLE.explain(host, method, path, query, headers)
    json.dumps(out)
    if selection is None:
        assert out["matched"] is False
    else:
        assert (out["route"], out["rule"]["index"]) == (selection.route_key, selection.rule.index)
    chosen = [c for c in out["candidates"] if c["result"] == "chosen"]
    assert len(chosen) == (0 if selection is None else 1)


@settings(max_examples=200, deadline=None)
@given(path=st.text(alphabet="/.%2FfeE5cC\\abp", max_size=30))
def test_a_chosen_prefix_holds_on_every_reading(path: str) -> None:
    t = table(route("ns/p", (prefix("/public"),)))
    if t.match("h", "GET", path, "", {}) is not None:
        for reading in path_views(path):
            assert reading == "/public" or reading.startswith("/public/")

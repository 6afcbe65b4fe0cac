"""Scenario: which backend a request reaches, through a real `kanal run`.

One process serves every case of this module. Each concern has a hostname of its own
(`paths.test`, `prec-method.test`, ...), so the routes of one case cannot take the
requests of another. A backend answers with its name: that name is what a user sees.
"""

from __future__ import annotations

import aiohttp
import pytest

from tests.conftest import upstream_yaml

NAMES = ["A", "B", "C", "D"]

ROUTES = """\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: host-exact}
spec:
  hostnames: [shop.example.com]
  rules: [{backends: [{upstream: up-a}]}]
---
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: host-wild}
spec:
  hostnames: ["*.example.com"]
  rules: [{backends: [{upstream: up-b}]}]
---
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: any-host}
spec:
  rules:
    - matches: [{path: {type: PathPrefix, value: /anyhost}}]
      backends: [{upstream: up-c}]
---
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: paths}
spec:
  hostnames: [paths.test]
  rules:
    - matches: [{path: {type: Exact, value: /exact}}]
      backends: [{upstream: up-a}]
    - matches: [{path: {type: PathPrefix, value: /api}}]
      backends: [{upstream: up-b}]
    - matches: [{path: {type: RegularExpression, value: "/re/[0-9]+"}}]
      backends: [{upstream: up-c}]
---
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: methods}
spec:
  hostnames: [method.test]
  rules:
    - matches: [{path: {type: PathPrefix, value: /}, method: POST}]
      backends: [{upstream: up-a}]
    - matches: [{path: {type: PathPrefix, value: /}, method: DELETE}]
      backends: [{upstream: up-c}]
    - backends: [{upstream: up-b}]
---
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: headers}
spec:
  hostnames: [headers.test]
  rules:
    - matches: [{headers: [{name: x-env, value: canary}]}]
      backends: [{upstream: up-a}]
    - matches: [{headers: [{name: x-ver, type: RegularExpression, value: "v[0-9]+"}]}]
      backends: [{upstream: up-b}]
    - backends: [{upstream: up-c}]
---
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: query}
spec:
  hostnames: [query.test]
  rules:
    - matches: [{queryParams: [{name: beta, value: "1"}]}]
      backends: [{upstream: up-a}]
    - backends: [{upstream: up-b}]
---
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: prec-path}
spec:
  hostnames: [prec-path.test]
  rules:
    # listed worst first: the order of rules must not matter
    - matches: [{path: {type: RegularExpression, value: "/p/.*"}}]
      backends: [{upstream: up-d}]
    - matches: [{path: {type: PathPrefix, value: /p}}]
      backends: [{upstream: up-b}]
    - matches: [{path: {type: PathPrefix, value: /p/a}}]
      backends: [{upstream: up-c}]
    - matches: [{path: {type: Exact, value: /p/a}}]
      backends: [{upstream: up-a}]
---
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: prec-method}
spec:
  hostnames: [prec-method.test]
  rules:
    - matches: [{path: {type: PathPrefix, value: /m}}]
      backends: [{upstream: up-a}]
    - matches: [{path: {type: PathPrefix, value: /m}, method: GET}]
      backends: [{upstream: up-b}]
    # a longer prefix outranks a method
    - matches: [{path: {type: PathPrefix, value: /m/long}}]
      backends: [{upstream: up-c}]
---
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: prec-headers}
spec:
  hostnames: [prec-headers.test]
  rules:
    - matches: [{headers: [{name: x-a, value: "1"}]}]
      backends: [{upstream: up-a}]
    - matches: [{headers: [{name: x-a, value: "1"}, {name: x-b, value: "1"}]}]
      backends: [{upstream: up-b}]
    # a method outranks header matches
    - matches: [{method: PUT, headers: []}]
      backends: [{upstream: up-c}]
---
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: prec-query}
spec:
  hostnames: [prec-query.test]
  rules:
    - matches: [{queryParams: [{name: a, value: "1"}]}]
      backends: [{upstream: up-a}]
    - matches: [{queryParams: [{name: a, value: "1"}, {name: b, value: "1"}]}]
      backends: [{upstream: up-b}]
    # a header match outranks query matches
    - matches: [{headers: [{name: x-h, value: "1"}]}]
      backends: [{upstream: up-c}]
---
# Same match on the same host: the older Route wins, whatever the names say.
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: aaa-newer, creationTimestamp: "2024-05-01T00:00:00Z"}
spec:
  hostnames: [tie-age.test]
  rules: [{backends: [{upstream: up-a}]}]
---
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: zzz-older, creationTimestamp: "2020-01-01T00:00:00Z"}
spec:
  hostnames: [tie-age.test]
  rules: [{backends: [{upstream: up-b}]}]
---
# Same match, same age: alphabetical order of the name decides.
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: bravo, creationTimestamp: "2022-01-01T00:00:00Z"}
spec:
  hostnames: [tie-name.test]
  rules: [{backends: [{upstream: up-a}]}]
---
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: alpha, creationTimestamp: "2022-01-01T00:00:00Z"}
spec:
  hostnames: [tie-name.test]
  rules: [{backends: [{upstream: up-b}]}]
"""


@pytest.fixture(scope="module")
def proxy(module_kanal, module_backends):
    files = {"routes.yaml": ROUTES}
    for name in NAMES:
        files[f"up-{name}.yaml"] = upstream_yaml(f"up-{name.lower()}", module_backends(name))
    return module_kanal(files)


async def reach(
    proxy, host: str, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> str:
    """The backend a request reaches, or `404` when the proxy finds no route."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            proxy.url + path,
            headers={"Host": host, **(headers or {})},
            allow_redirects=False,
        ) as answer,
    ):
        if answer.status == 404:
            assert "no route" in await answer.text()
            return "404"
        assert answer.status == 200, await answer.text()
        return str((await answer.json())["backend"])


@pytest.mark.parametrize(
    ("host", "path", "expected"),
    [
        ("shop.example.com", "/", "A"),
        ("SHOP.Example.COM", "/x", "A"),  # host names are case-insensitive
        ("shop.example.com:8080", "/", "A"),  # the port is not part of the name
        ("shop.example.com.", "/", "A"),  # a fully qualified name with its final dot
        ("api.example.com", "/", "B"),  # *.example.com
        ("deep.api.example.com", "/", "B"),  # a wildcard covers several labels
        ("API.EXAMPLE.COM:443", "/", "B"),
        ("example.com", "/", "404"),  # "*.example.com" is not example.com itself
        ("other.test", "/anyhost/1", "C"),  # a Route without hostnames takes any host
        ("other.test", "/", "404"),
    ],
)
async def test_routing_by_host(proxy, host, path, expected):
    assert await reach(proxy, host, path) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/exact", "A"),
        ("/exact/", "404"),  # Exact is the whole path
        ("/exact/more", "404"),
        ("/api", "B"),
        ("/api/", "B"),
        ("/api/orders/1", "B"),
        ("/apix", "404"),  # PathPrefix matches whole segments only
        ("/re/123", "C"),
        ("/re/abc", "404"),
        ("/re/123?x=1", "C"),  # the query is not part of the path
    ],
)
async def test_routing_by_path(proxy, path, expected):
    assert await reach(proxy, "paths.test", path) == expected


@pytest.mark.parametrize(
    ("method", "expected"), [("GET", "B"), ("POST", "A"), ("DELETE", "C"), ("PUT", "B")]
)
async def test_routing_by_method(proxy, method, expected):
    assert await reach(proxy, "method.test", "/any", method=method) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"x-env": "canary"}, "A"),
        ({"X-ENV": "canary"}, "A"),  # header names are case-insensitive
        ({"x-env": "stable"}, "C"),
        ({"x-ver": "v12"}, "B"),
        ({"x-ver": "version"}, "C"),
        ({}, "C"),
    ],
)
async def test_routing_by_header(proxy, headers, expected):
    assert await reach(proxy, "headers.test", "/", headers=headers) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/?beta=1", "A"), ("/?x=2&beta=1", "A"), ("/?beta=2", "B"), ("/", "B"), ("/?betax=1", "B")],
)
async def test_routing_by_query_parameter(proxy, path, expected):
    assert await reach(proxy, "query.test", path) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/p/a", "A"),  # Exact beats every PathPrefix and RegularExpression
        ("/p/a/b", "C"),  # the longest PathPrefix wins
        ("/p/z", "B"),  # PathPrefix beats RegularExpression
    ],
)
async def test_precedence_exact_then_longest_prefix_then_regex(proxy, path, expected):
    assert await reach(proxy, "prec-path.test", path) == expected


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/m", "B"),  # same path: the match with a method wins
        ("POST", "/m", "A"),
        ("GET", "/m/long", "C"),  # but a longer prefix comes before the method
    ],
)
async def test_precedence_method_after_path(proxy, method, path, expected):
    assert await reach(proxy, "prec-method.test", path, method=method) == expected


@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        ("GET", {"x-a": "1", "x-b": "1"}, "B"),  # more header matches win
        ("GET", {"x-a": "1"}, "A"),
        ("PUT", {"x-a": "1", "x-b": "1"}, "C"),  # a method comes before headers
    ],
)
async def test_precedence_more_headers_after_method(proxy, method, headers, expected):
    assert await reach(proxy, "prec-headers.test", "/", method=method, headers=headers) == expected


@pytest.mark.parametrize(
    ("path", "headers", "expected"),
    [
        ("/?a=1&b=1", {}, "B"),  # more query matches win
        ("/?a=1", {}, "A"),
        ("/?a=1&b=1", {"x-h": "1"}, "C"),  # a header match comes before query matches
    ],
)
async def test_precedence_more_query_params_after_headers(proxy, path, headers, expected):
    assert await reach(proxy, "prec-query.test", path, headers=headers) == expected


async def test_tie_goes_to_the_older_route(proxy):
    assert await reach(proxy, "tie-age.test", "/") == "B"


async def test_tie_of_same_age_goes_to_the_name_first_in_alphabetical_order(proxy):
    assert await reach(proxy, "tie-name.test", "/") == "B"

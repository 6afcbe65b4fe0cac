"""The `cache` section from manifest to Snapshot: validated with file and field named,
and a hand-written Snapshot whose cache values would reach the wire is refused."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kanal.contract import snapshot as snap
from kanal.contract.validate import validate
from kanal.operator.models import Route


def route(cache: object) -> dict[str, object]:
    return {"apiVersion": "kanal.dev/v1alpha1", "kind": "Route", "metadata": {"name": "r"},
            "spec": {"rules": [{"backends": [{"upstream": "web"}], "cache": cache}]}}


@pytest.mark.parametrize(("cache", "field"), [
    ({"maxObjectSize": "lots"}, "maxObjectSize"),
    ({"defaultTTL": "forever"}, "defaultTTL"),
    ({"statuses": [100]}, "statuses"),
    ({"key": {"headers": ["bad header"]}}, "headers"),
    ({"ttl": "1m"}, "ttl"),
])
def test_bad_cache_fields_are_named(cache: object, field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Route.model_validate(route(cache))
    assert field in str(caught.value)


def test_cache_values_that_would_reach_the_wire_are_refused() -> None:
    cache = snap.Cache(key_headers=("x-a\r\nb",), key_cookies=("a b",), statuses=(99,),
                       max_object_size=-1, default_ttl=-1.0)
    rule = snap.Rule(index=0, backends=(snap.Backend("default/web"),), cache=cache)
    problems = validate(snap.Snapshot(routes=(snap.Route(key="default/r", rules=(rule,)),)))
    assert len(problems) == 5, problems
    assert all("route default/r rule 0" in p for p in problems)

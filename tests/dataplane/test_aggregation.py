"""Request aggregation's pure part: templates and the merge."""

from __future__ import annotations

import json

import pytest

from kanal.contract.snapshot import Match, PathMatch, Rule
from kanal.dataplane.aggregation import MissingValue, PartResult, fill, merge, path_parameters


def test_path_parameters_come_from_named_groups():
    rule = Rule(index=0, matches=(
        Match(path=PathMatch("PathPrefix", "/x")),
        Match(path=PathMatch("RegularExpression", "/u/(?P<id>[0-9]+)/(?P<tab>[a-z]+)")),
    ))
    assert path_parameters(rule, "/u/42/orders") == {"id": "42", "tab": "orders"}
    assert path_parameters(rule, "/x/1") == {}


def test_fill_percent_encodes_every_value():
    headers = {"x-user": "a b/c?d#e"}
    target = fill("/h/{header.x-user}?id={path.id}&q={query.q}", {"id": "7"}, "q=x%26y&z=1",
                  headers.get)
    assert target == "/h/a%20b%2Fc%3Fd%23e?id=7&q=x%26y"


@pytest.mark.parametrize("template", ["/{path.nope}", "/{query.nope}", "/{header.nope}"])
def test_a_missing_value_is_refused(template):
    with pytest.raises(MissingValue):
        fill(template, {}, "", {}.get)


def test_merge_policies():
    results = [PartResult("a", 200, b'{"x": 1}'), PartResult("b", 200, b"plain"),
               PartResult("c", error="no answer within 1s"), PartResult("d", 404, b"")]
    status, body = merge(results, "Partial")
    assert status == 200
    assert json.loads(body) == {"a": {"x": 1}, "b": "plain", "c": None, "d": None,
                                "errors": {"c": "no answer within 1s", "d": "answered 404"}}
    status, body = merge(results, "Fail")
    assert status == 502 and json.loads(body)["error"] == "part c failed: no answer within 1s"
    assert merge(results[:2], "Fail")[0] == 200


def test_a_part_cut_by_the_rules_timeout_makes_a_failing_aggregate_504():
    results = [PartResult("a", 503, b""),
               PartResult("b", error="no answer within the rule's timeout (1s)", overdue=True)]
    status, body = merge(results, "Fail")
    assert status == 504
    assert json.loads(body)["errors"] == {"a": "answered 503",
                                          "b": "no answer within the rule's timeout (1s)"}
    status, body = merge(results, "Partial")
    assert status == 200 and json.loads(body)["b"] is None

"""The words of split verification, and how the operator sums dataplanes' reports."""

from __future__ import annotations

from kanal.contract.snapshot import Backend, Route, Rule, Snapshot
from kanal.contract.splits import (
    SplitObservation,
    SplitShare,
    merge_observations,
    route_conditions,
    split_condition,
)

SNAPSHOT = Snapshot(routes=(
    Route("shop/web", rules=(
        Rule(0, backends=(Backend("shop/v1", 90), Backend("shop/v2", 10))),
        Rule(1, name="solo", backends=(Backend("shop/v1"),)),
    )),
))


def seen(v1: int, v2: int, weights: tuple[int, int] = (90, 10)) -> SplitObservation:
    return SplitObservation("shop/web", 0, None, (
        SplitShare("shop/v1", weights[0], v1), SplitShare("shop/v2", weights[1], v2)))


def test_the_windows_of_several_dataplanes_add_up() -> None:
    [merged] = merge_observations([seen(450, 50), seen(447, 53)])
    assert [s.observed for s in merged.shares] == [897, 103]
    conditions = route_conditions(SNAPSHOT, [("dp-0", [seen(450, 50)]),
                                             ("dp-1", [seen(447, 53)])])
    assert conditions == {"shop/web": {
        "type": "SplitObserved", "status": "True", "reason": "ObservedMatchesDeclared",
        "message": "declared 90/10, observed 89.7/10.3 over the last 1000 requests "
                   "(shop/v1/shop/v2) on 2 dataplanes",
    }}


def test_reports_on_other_weights_or_unknown_rules_do_not_count() -> None:
    stale = seen(0, 70, weights=(0, 100))  # a dataplane still on the previous version
    unknown = SplitObservation("shop/gone", 0, None, (SplitShare("shop/v1", 1, 5),
                                                      SplitShare("shop/v2", 1, 5)))
    conditions = route_conditions(SNAPSHOT, [("dp-0", [seen(90, 10)]),
                                             ("dp-1", [stale, unknown])])
    assert conditions["shop/web"]["message"].endswith("over the last 100 requests "
                                                      "(shop/v1/shop/v2) on 1 dataplane")
    assert set(conditions) == {"shop/web"}
    assert route_conditions(SNAPSHOT, []) == {}


def test_several_weighted_rules_are_named_in_one_condition() -> None:
    other = SplitObservation("shop/web", 2, "canary", (SplitShare("shop/v1", 1, 1),
                                                         SplitShare("shop/v2", 1, 9)))
    condition = split_condition([other, seen(9, 1)])
    assert condition is not None
    assert condition["status"] == "False"  # 10/90 against a declared 50/50
    assert condition["message"] == (
        "rule 0: declared 90/10, observed 90.0/10.0 over the last 10 requests "
        "(shop/v1/shop/v2); rule 2 (canary): declared 50/50, observed 10.0/90.0 over the "
        "last 10 requests (shop/v1/shop/v2)")

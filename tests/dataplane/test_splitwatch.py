"""Split verification without sockets: counting in the Split, windows, reloads, words."""

from __future__ import annotations

from kanal.contract.snapshot import Backend, Route, Rule, SessionAffinity, Snapshot
from kanal.contract.splits import SplitObservation, SplitShare, split_condition
from kanal.dataplane.router import RouteTable
from kanal.dataplane.split import Split
from kanal.dataplane.splitwatch import SplitWatch, explain_with_split, routes_with_status


def table(*weights: tuple[str, int], name: str | None = None) -> RouteTable:
    rule = Rule(0, name=name, backends=tuple(Backend(up, w) for up, w in weights))
    return RouteTable.build(Snapshot(routes=(Route("shop/web", rules=(rule,)),)))


def send(t: RouteTable, count: int, cookie: str | None = None) -> None:
    selection = t.match("shop.example", "GET", "/")
    assert selection is not None
    for _ in range(count):
        selection.split.choose(cookie)


def test_a_single_backend_rule_counts_nothing() -> None:
    split = Split((Backend("shop/v1", 1),))
    assert split.chosen is None
    assert split.choose() == ("shop/v1", None)
    # The same upstream twice is still no choice to verify.
    assert Split((Backend("shop/v1", 1), Backend("shop/v1", 3))).chosen is None


def test_a_weighted_rule_counts_every_choice_even_weight_zero_backends() -> None:
    split = Split((Backend("shop/v1", 9), Backend("shop/v2", 1), Backend("shop/v3", 0)))
    for _ in range(100):
        split.choose()
    assert split.chosen == {"shop/v1": 90, "shop/v2": 10, "shop/v3": 0}


def test_a_blue_green_rule_with_one_live_backend_is_counted() -> None:
    split = Split((Backend("shop/blue", 100), Backend("shop/green", 0)))
    assert [split.choose() for _ in range(3)] == [("shop/blue", None)] * 3
    assert split.chosen == {"shop/blue": 3, "shop/green": 0}


def test_kept_affinity_cookies_are_counted_too() -> None:
    split = Split((Backend("shop/v1", 1), Backend("shop/v2", 1)),
                  SessionAffinity("kanal-affinity", None))
    key, token = split.choose()
    assert key is not None and token is not None
    for _ in range(9):
        assert split.choose(token) == (key, None)
    assert split.chosen is not None and split.chosen[key] == 10


def test_observed_share_over_the_last_requests() -> None:
    t = table(("shop/v1", 90), ("shop/v2", 10))
    watch = SplitWatch(window=1000)
    watch.follow(t)
    [empty] = watch.observations()
    assert empty.window == 0
    assert empty.message() == "declared 90/10 (shop/v1/shop/v2), no requests observed yet"
    send(t, 500)
    [half] = watch.observations()
    assert half.window == 500
    assert [s.observed for s in half.shares] == [450, 50]
    send(t, 3000)
    [full] = watch.observations()
    # A window starts at the newest checkpoint at least 1000 requests back: the read
    # after 500 requests here; reads every 50 requests then narrow it to ~1000.
    assert full.window == 3000
    for _ in range(40):
        send(t, 50)
        watch.observations()
    [last] = watch.observations()
    assert 1000 <= last.window <= 1050
    assert last.message().startswith("declared 90/10, observed 90.0/10.0 over the last ")


def test_a_reload_with_the_same_weights_keeps_the_window_and_new_weights_start_one() -> None:
    watch = SplitWatch()
    first = table(("shop/v1", 90), ("shop/v2", 10))
    watch.follow(first)
    send(first, 100)
    same = table(("shop/v1", 90), ("shop/v2", 10))
    watch.follow(same)
    send(same, 100)
    [kept] = watch.observations()
    assert (kept.window, [s.observed for s in kept.shares]) == (200, [180, 20])
    flipped = table(("shop/v1", 0), ("shop/v2", 100))
    watch.follow(flipped)
    send(flipped, 30)
    [fresh] = watch.observations()
    assert [(s.upstream, s.weight, s.observed) for s in fresh.shares] == [
        ("shop/v1", 0, 0), ("shop/v2", 100, 30)]
    assert fresh.message() == ("declared 0/100, observed 0.0/100.0 over the last 30 requests "
                               "(shop/v1/shop/v2)")


def test_condition_true_false_and_unknown() -> None:
    def obs(*observed: int) -> SplitObservation:
        return SplitObservation("shop/web", 0, None, (
            SplitShare("shop/v1", 90, observed[0]), SplitShare("shop/v2", 10, observed[1])))

    assert split_condition([]) is None
    unknown = split_condition([obs(0, 0)])
    assert unknown is not None and unknown["status"] == "Unknown"
    good = split_condition([obs(897, 103)])
    assert good == {
        "type": "SplitObserved", "status": "True", "reason": "ObservedMatchesDeclared",
        "message": "declared 90/10, observed 89.7/10.3 over the last 1000 requests "
                   "(shop/v1/shop/v2)",
    }
    bad = split_condition([obs(500, 500)])
    assert bad is not None and (bad["status"], bad["reason"]) == ("False", "ObservedDeviates")
    assert SplitObservation.from_dict(obs(897, 103).to_dict()) == obs(897, 103)


def test_explain_and_config_show_the_observation() -> None:
    t = table(("shop/v1", 3), ("shop/v2", 1), name="canary")
    watch = SplitWatch()
    watch.follow(t)
    send(t, 40)
    answer = explain_with_split(t.explain("shop.example", "GET", "/"), watch)
    assert [(b["upstream"], b["share"], b["observedShare"], b["observed"])
            for b in answer["backends"]] == [("shop/v1", 0.75, 0.75, 30),
                                             ("shop/v2", 0.25, 0.25, 10)]
    assert answer["split"]["message"] == (
        "declared 75/25, observed 75.0/25.0 over the last 40 requests (shop/v1/shop/v2)")
    routes: list[dict[str, object]] = [{"key": "shop/web"}, {"key": "other/one"}]
    routes_with_status(routes, watch)
    status = routes[0]["status"]
    assert isinstance(status, dict) and status["conditions"][0]["status"] == "True"
    assert "status" not in routes[1]

"""The group dashboard of `kanal run --workers N`: how the workers' views are made one."""

from __future__ import annotations

from typing import Any

from kanal.commands.dashmerge import merge_views
from kanal.dataplane.dashview import render_tables


def worker_view(*, requests: int, rate: float | None, v1: int, v2: int, health: str,
                circuit: str, active: int, errors: list[dict[str, Any]]) -> dict[str, Any]:
    window = v1 + v2
    split = {"route": "default/web", "rule": 0, "name": None, "window": window,
             "backends": [{"upstream": "default/v1", "weight": 90, "declaredShare": 0.9,
                           "observedShare": v1 / window, "observed": v1},
                          {"upstream": "default/v2", "weight": 10, "declaredShare": 0.1,
                           "observedShare": v2 / window, "observed": v2}],
             "message": "(this worker's)"}
    return {
        "version": "v-1", "appliedAt": "2027-01-15 08:00:00 UTC",
        "generatedAt": "2027-01-15 08:00:10 UTC",
        "routes": [{"key": "default/web", "hostnames": ["*"], "gateways": ["ingress"],
                    "rules": [{"index": 0, "name": None, "matches": ["every request"],
                               "backends": [{**b, "observedShare": b["observedShare"]}
                                            for b in split["backends"]],
                               "split": "(this worker's)"}],
                    "requests": requests, "errors": 1, "requestRate": rate, "errorRate": 0.5}],
        "upstreams": [{"key": "default/v1", "policy": "RoundRobin", "healthChecked": True,
                       "endpoints": [{"address": "10.0.0.1:80", "weight": 1, "health": health,
                                      "circuit": circuit, "activeRequests": active}]}],
        "splits": [split],
        "recentErrors": errors,
    }


def test_counts_and_rates_add_up_and_shares_are_weighted_by_windows() -> None:
    one = worker_view(requests=100, rate=10.0, v1=90, v2=10, health="healthy",
                      circuit="closed", active=2, errors=[])
    two = worker_view(requests=300, rate=30.0, v1=170, v2=30, health="healthy",
                      circuit="closed", active=3, errors=[])
    view = merge_views([one, two], workers=2)
    (route,) = view["routes"]
    assert (route["requests"], route["errors"], route["requestRate"], route["errorRate"]) == (
        400, 2, 40.0, 1.0)
    (split,) = view["splits"]
    assert split["window"] == 300
    assert [b["observed"] for b in split["backends"]] == [260, 40]
    # 40 of 300, not the mean of 10% and 15%.
    assert [b["observedShare"] for b in route["rules"][0]["backends"]] == [260 / 300, 40 / 300]
    assert route["rules"][0]["split"] == (
        "declared 90/10, observed 86.7/13.3 over the last 300 requests (default/v1/default/v2)")
    assert view["upstreams"][0]["endpoints"][0]["activeRequests"] == 5
    assert view["workers"] == {"answered": 2, "total": 2}


def test_a_rate_is_unknown_until_every_worker_has_one() -> None:
    one = worker_view(requests=1, rate=None, v1=1, v2=0, health="healthy", circuit="closed",
                      active=0, errors=[])
    two = worker_view(requests=1, rate=3.0, v1=1, v2=0, health="healthy", circuit="closed",
                      active=0, errors=[])
    assert merge_views([one, two], workers=2)["routes"][0]["requestRate"] is None


def test_an_endpoint_bad_in_one_worker_is_shown_bad_and_errors_merge_newest_first() -> None:
    early = {"at": "2027-01-15 08:00:01 UTC", "message": "1 × 502 from route default/web"}
    late = {"at": "2027-01-15 08:00:09 UTC", "message": "upstream default/v1: a circuit opened"}
    middle = {"at": "2027-01-15 08:00:05 UTC", "message": "2 × 503 from route default/web"}
    one = worker_view(requests=1, rate=1.0, v1=1, v2=0, health="healthy", circuit="open",
                      active=0, errors=[late, early])
    two = worker_view(requests=1, rate=1.0, v1=1, v2=0, health="unhealthy", circuit="closed",
                      active=0, errors=[middle])
    view = merge_views([one, two], workers=3)
    (endpoint,) = view["upstreams"][0]["endpoints"]
    assert (endpoint["health"], endpoint["circuit"]) == ("unhealthy", "open")
    assert view["recentErrors"] == [late, middle, early]
    assert view["workers"] == {"answered": 2, "total": 3}
    html = render_tables(view)
    assert "unhealthy (healthy in 1 of 2 workers)" in html
    assert "open (closed in 1 of 2 workers)" in html
    assert "sums over 2 of 3 workers" in html

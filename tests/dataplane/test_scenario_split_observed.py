"""Scenario: "is my canary really getting 10%?" answered by /metrics, /explain and status.

Requests go through a real `kanal run` to real backends; the observed split is then
read the three ways a user would read it.
"""

from __future__ import annotations

import collections

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import upstream_yaml

ROUTE = """\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: web}
spec:
  rules:
    - matches: [{path: {type: PathPrefix, value: /solo}}]
      backends: [{upstream: stable}]
    - name: canary
      backends: [{upstream: stable, weight: 90}, {upstream: canary, weight: 10}]
"""


def samples(text: str, family: str) -> dict[tuple[str, ...], float]:
    found: dict[tuple[str, ...], float] = {}
    for metric in text_string_to_metric_families(text):
        if metric.name == family:
            for sample in metric.samples:
                if sample.name in (family, family + "_total"):
                    found[tuple(sample.labels[k] for k in sorted(sample.labels))] = sample.value
    return found


async def test_observed_split_in_metrics_explain_and_status(kanal, backends):
    stable, canary = await backends("stable"), await backends("canary")
    k = kanal({
        "up.yaml": upstream_yaml("stable", stable) + "---\n" + upstream_yaml("canary", canary),
        "route.yaml": ROUTE,
    })
    seen: collections.Counter[str] = collections.Counter()
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            async with session.get(k.url + "/") as answer:
                assert answer.status == 200
                seen[(await answer.json())["backend"]] += 1
        for _ in range(20):
            async with session.get(k.url + "/solo") as answer:
                assert answer.status == 200
        async with session.get(k.admin + "/metrics") as answer:
            text = await answer.text()
        async with session.get(k.admin + "/explain", params={"url": "http://shop/"}) as answer:
            explained = await answer.json()
        async with session.get(k.admin + "/config") as answer:
            config = await answer.json()
    assert seen == {"stable": 180, "canary": 20}

    # /metrics: labels sorted by name: (route, rule, upstream).
    assert samples(text, "kanal_split_observed_share") == {
        ("default/web", "1", "default/canary"): 0.1,
        ("default/web", "1", "default/stable"): 0.9,
    }
    assert samples(text, "kanal_split_declared_weight") == {
        ("default/web", "1", "default/canary"): 10.0,
        ("default/web", "1", "default/stable"): 90.0,
    }
    assert samples(text, "kanal_split_window_requests") == {("default/web", "1"): 200.0}
    assert samples(text, "kanal_split_choices") == {
        ("default/web", "1", "default/canary"): 20.0,
        ("default/web", "1", "default/stable"): 180.0,
    }

    # /explain: observed beside declared for the chosen rule.
    assert explained["rule"]["name"] == "canary"
    assert [(b["upstream"], b["weight"], b["observedShare"]) for b in explained["backends"]] == [
        ("default/stable", 90, 0.9), ("default/canary", 10, 0.1)]
    assert explained["split"]["window"] == 200

    # The Route's status as /config shows it under `kanal run`.
    [route] = config["routes"]
    [condition] = route["status"]["conditions"]
    assert condition == {
        "type": "SplitObserved", "status": "True", "reason": "ObservedMatchesDeclared",
        "message": "declared 90/10, observed 90.0/10.0 over the last 200 requests "
                   "(default/stable/default/canary)",
    }

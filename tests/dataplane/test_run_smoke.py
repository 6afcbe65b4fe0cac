"""The smallest scenario: `kanal run` in front of two backends splits traffic 90/10."""

from __future__ import annotations

import collections

import aiohttp

from tests.conftest import upstream_yaml


async def test_weighted_split_between_two_versions(kanal, backends):
    v1 = await backends("v1")
    v2 = await backends("v2")
    route = """\
        apiVersion: kanal.dev/v1alpha1
        kind: Route
        metadata: {name: web}
        spec:
          rules:
            - backends: [{upstream: web-v1, weight: 90}, {upstream: web-v2, weight: 10}]
        """
    k = kanal({"v1.yaml": upstream_yaml("web-v1", v1), "v2.yaml": upstream_yaml("web-v2", v2),
               "route.yaml": route})
    seen: collections.Counter[str] = collections.Counter()
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            async with session.get(k.url + "/") as answer:
                assert answer.status == 200
                seen[(await answer.json())["backend"]] += 1
    assert seen == {"v1": 180, "v2": 20}

"""Scenario: `kanal run --workers 2`: two proxy processes share one port."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import aiohttp

from tests.conftest import upstream_yaml

ROUTE = """\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: web}
spec:
  rules: [{backends: [{upstream: web}]}]
"""


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").iterdir():
            children = (task / "children").read_text().split()
            found += [int(c) for c in children]
            todo += [int(c) for c in children]
    return found


async def test_two_workers_serve_one_port(kanal, backends):
    web = await backends("web")
    k = kanal({"web.yaml": upstream_yaml("web", web), "route.yaml": ROUTE}, "--workers", "2")
    assert k.process is not None
    workers = [
        pid
        for pid in descendants(k.process.pid)
        if "\0--worker\0" in Path(f"/proc/{pid}/cmdline").read_text()
    ]
    assert len(workers) == 2, workers

    statuses: collections.Counter[int] = collections.Counter()

    async def client() -> None:
        for _ in range(25):
            # a new connection per request, so the kernel spreads them over the workers
            async with aiohttp.ClientSession() as session, session.get(k.url + "/") as answer:
                statuses[answer.status] += 1

    await asyncio.gather(*(client() for _ in range(8)))
    assert statuses == {200: 200}
    assert len(web.received) == 200

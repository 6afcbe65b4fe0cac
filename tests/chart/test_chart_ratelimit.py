"""The chart points dataplanes at an existing Redis for Global rate limits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.chart.conftest import Rendered


def dataplane_env(rendered: Rendered) -> list[dict[str, Any]]:
    deployment = rendered.one("Deployment", "-dataplane")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return list(container.get("env", []))


def test_the_redis_url_comes_from_a_secret(render: Callable[[str], Rendered]) -> None:
    env = dataplane_env(render("rate-limit-redis"))
    (redis,) = [item for item in env if item["name"] == "KANAL_REDIS_URL"]
    assert redis["valueFrom"] == {"secretKeyRef": {"name": "ratelimit-redis", "key": "url"}}


def test_no_redis_by_default(render: Callable[[str], Rendered]) -> None:
    assert all(item["name"] != "KANAL_REDIS_URL" for item in dataplane_env(render("default")))

"""Access policies on the admin endpoints: which apply (/explain), and no secrets (/config).

/explain lists the policies of the rule that would take a request and, for the headers
given (`header=Authorization:Bearer ...`), what each would decide on its own; the IP
rules and client-keyed rate limits judge the address given as
`header=X-Real-IP:ADDRESS`, if any. Nothing here counts a refusal, takes a token,
fetches keys or asks a service: explaining is read-only.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Any

from kanal.contract.access import AccessPolicy
from kanal.dataplane.access.jwks import KEYS
from kanal.dataplane.access.policy import Access, Grant, NeedKeys
from kanal.dataplane.access.ratelimit import RateLimiter
from kanal.dataplane.access.sharedlimits import local_buckets
from kanal.dataplane.router import RouteTable


def _each_alone(spec: AccessPolicy) -> list[tuple[str, AccessPolicy]]:
    """Each kind the policy sets, as a policy of that kind only."""
    bare = AccessPolicy(spec.name)
    kinds = [("ipRules", dataclasses.replace(bare, ip_rules=spec.ip_rules), spec.ip_rules),
             ("apiKey", dataclasses.replace(bare, api_key=spec.api_key), spec.api_key),
             ("basicAuth", dataclasses.replace(bare, basic_auth=spec.basic_auth),
              spec.basic_auth),
             ("jwt", dataclasses.replace(bare, jwt=spec.jwt), spec.jwt)]
    return [(name, alone) for name, alone, value in kinds if value is not None]


def explain_access(table: RouteTable, answer: dict[str, Any], host: str, method: str,
                   path: str, query: str, headers: Mapping[str, str]) -> dict[str, Any]:
    """`answer` with an `access` entry: the policies and what each decides."""
    selection = table.match(host, method, path, query, headers)
    access = None if selection is None else selection.access
    if access is None:
        return {**answer, "access": None}
    raw = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
    cookie = headers.get("cookie")
    client = headers.get("x-real-ip")
    decisions: dict[str, Any] = {}
    for name, alone in _each_alone(access.spec):
        if name == "ipRules" and client is None:
            decisions[name] = {"decision": "not judged: give header=X-Real-IP:ADDRESS"}
            continue
        decision = Access(alone).check(raw, query, None if cookie is None else
                                       cookie.encode("latin-1"), client or "", time.time(),
                                       KEYS.sets)
        if isinstance(decision, Grant):
            decisions[name] = {"decision": "allow"}
        elif isinstance(decision, NeedKeys):
            decisions[name] = {"decision": f"keys of {decision.uri} not fetched yet"}
        else:
            decisions[name] = {"decision": "refuse", "status": decision.status,
                               "reason": decision.reason}
    rate = access.rate
    if rate is not None:
        decisions["rateLimit"] = _rate_decision(rate, client, raw)
    return {**answer, "access": {"policies": access.describe(), "decisions": decisions}}


def _rate_decision(rate: RateLimiter, client: str | None,
                   headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """What the local buckets would say now (claims are not known here: keys by a claim
    read as a request without it)."""
    if rate.spec.type == "Global":
        return {"decision": "counted in Redis: not judged here"}
    keys = rate.keys(client or "", headers, None)
    levels = local_buckets().table.peek(keys, rate.limits, time.monotonic())
    return {"decision": "allow" if all(level >= 1.0 for level in levels) else "refuse",
            "remaining": {limit.name: math.floor(level)
                          for limit, level in zip(rate.limits, levels, strict=True)}}


def redact_access(route: dict[str, Any]) -> None:
    """A /config route without password hashes or key digests: users and clients by name."""
    for rule in route.get("rules", ()):
        policy = rule.get("access")
        if not policy:
            continue
        basic = policy.get("basic_auth")
        if basic:
            users = [line.partition(":")[0] for line in basic.get("htpasswd", "").splitlines()]
            policy["basic_auth"] = {**{k: v for k, v in basic.items() if k != "htpasswd"},
                                    "users": users}
        api_key = policy.get("api_key")
        if api_key:
            api_key["clients"] = [client["client"] for client in api_key.get("clients", ())]

"""Status as data: the conditions the compiler decides for each object.

The compiler returns these values next to the Snapshot; the status writer (cluster
mode) patches them into `status`, adding `lastTransitionTime`, and `kanal validate`
prints the ones that are not True. `Programmed` is not here: only the publisher knows
how many dataplanes applied a configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

ACCEPTED = "Accepted"
RESOLVED_REFS = "ResolvedRefs"
PROGRAMMED = "Programmed"

# Reasons (CamelCase, as Kubernetes conventions ask).
REASON_ACCEPTED = "Accepted"
REASON_INVALID = "Invalid"
REASON_CONFLICTED = "Conflicted"
REASON_RESOLVED_REFS = "ResolvedRefs"
REASON_BACKEND_NOT_FOUND = "BackendNotFound"
REASON_SECRET_NOT_FOUND = "SecretNotFound"
REASON_INVALID_SECRET = "InvalidSecret"
REASON_CONFIG_MAP_NOT_FOUND = "ConfigMapNotFound"
REASON_INVALID_CONFIG_MAP = "InvalidConfigMap"
REASON_FILE_NOT_READ = "FileNotRead"
REASON_SERVICE_NOT_FOUND = "ServiceNotFound"
REASON_SERVICE_DISCOVERY_UNAVAILABLE = "ServiceDiscoveryUnavailable"
REASON_NOT_ACCEPTED = "NotAccepted"

ConditionStatus = Literal["True", "False", "Unknown"]


@dataclass(frozen=True, slots=True)
class Condition:
    """One Kubernetes-style condition, without its transition time."""

    type: str
    status: ConditionStatus
    reason: str
    message: str = ""
    observed_generation: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The condition as it appears in `status.conditions` (camelCase)."""
        data: dict[str, Any] = {
            "type": self.type,
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
        }
        if self.observed_generation is not None:
            data["observedGeneration"] = self.observed_generation
        return data


@dataclass(frozen=True, slots=True)
class EndpointCounts:
    """An Upstream's `status.endpoints`. At compile time every endpoint counts as healthy."""

    total: int
    healthy: int

    def to_dict(self) -> dict[str, int]:
        return {"total": self.total, "healthy": self.healthy}


@dataclass(frozen=True, slots=True)
class ObjectStatus:
    """The status the compiler decided for one Route, Upstream or EgressPolicy."""

    kind: str
    key: str
    conditions: tuple[Condition, ...]
    endpoints: EndpointCounts | None = None

    @property
    def namespace(self) -> str:
        return self.key.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.key.split("/", 1)[1]

    def condition(self, type_: str) -> Condition | None:
        for condition in self.conditions:
            if condition.type == type_:
                return condition
        return None

    @property
    def ok(self) -> bool:
        """True when every condition is True."""
        return all(condition.status == "True" for condition in self.conditions)

    def to_dict(self) -> dict[str, Any]:
        """`kind`, `key` and the `status` body as the API would show it."""
        status: dict[str, Any] = {"conditions": [c.to_dict() for c in self.conditions]}
        if self.endpoints is not None:
            status["endpoints"] = self.endpoints.to_dict()
        return {"kind": self.kind, "key": self.key, "status": status}


def rejected_status(kind: str, key: str, message: str,
                    generation: int | None = None) -> ObjectStatus:
    """The status of an object whose spec failed validation (Accepted False, Invalid).

    For callers that parse objects themselves (the operator) and must report the ones
    that never reach the compiler.
    """
    return ObjectStatus(kind, key, (
        Condition("Accepted", "False", REASON_INVALID, message, generation),
        Condition("ResolvedRefs", "False", REASON_NOT_ACCEPTED,
                  "references are not checked until the object is accepted", generation),
    ))
